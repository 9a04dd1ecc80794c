"""Prompt perturbations and token edit distance: pure functions, checked by property and example."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_refract.inputs.perturb import (
    PERTURBATIONS,
    STOPWORDS,
    SYNONYMS,
    applicable,
    drift,
    levenshtein,
    perturb,
)

WORD_RE = re.compile(r"[A-Za-z]+")

# Arbitrary text finds crashes and no-op outputs, but rarely contains a long word, a synonym or
# a sentence end, so the per-kind properties also run on prose-like text built from pieces that
# do: real table words in three casings, long and short made-up words, separators that include
# non-ASCII letters and digits (which must never be treated as part of a word).
_table_words = st.sampled_from(sorted(SYNONYMS)).flatmap(
    lambda w: st.sampled_from([w, w.capitalize(), w.upper()])
)
_made_up_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12)
_stopword_words = st.sampled_from(sorted(STOPWORDS))
_separators = st.text(alphabet=" \t\n.,;:?!'-0123456789éßΣ\u00a0", min_size=1, max_size=3)
prose = st.lists(
    st.tuples(st.one_of(_table_words, _made_up_words, _stopword_words), _separators), max_size=12
).map(lambda parts: "".join(w + s for w, s in parts))
any_text = st.one_of(st.text(), prose)
kinds = st.sampled_from(PERTURBATIONS)
seeds = st.integers(min_value=-(2**40), max_value=2**40)
prompt_ids = st.text(max_size=20)


def _diff_positions(a: str, b: str):
    assert len(a) == len(b)
    return [i for i in range(len(a)) if a[i] != b[i]]


# --------------------------------------------------------------------------- general contract


@given(any_text, kinds, seeds, prompt_ids)
def test_perturb_is_deterministic_and_never_a_no_op(text, kind, seed, prompt_id):
    first = perturb(text, kind, seed=seed, prompt_id=prompt_id)
    # Disturb the global generator in between: the result must not depend on it.
    random.seed(seed ^ 0x5A5A)
    random.random()
    second = perturb(text, kind, seed=seed, prompt_id=prompt_id)
    assert first == second
    assert first is None or (isinstance(first, str) and first != text)


@given(any_text, seeds, prompt_ids)
def test_applicable_is_perturb_for_every_kind(text, seed, prompt_id):
    result = applicable(text, seed=seed, prompt_id=prompt_id)
    assert list(result) == list(PERTURBATIONS)
    for kind in PERTURBATIONS:
        assert result[kind] == perturb(text, kind, seed=seed, prompt_id=prompt_id)


@pytest.mark.parametrize("kind", ["", "Typo", "swap", None, "typo "])
def test_unknown_kind_is_a_value_error(kind):
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb("Explain photosynthesis.", kind)


def test_unknown_kind_is_a_value_error_even_for_empty_text():
    with pytest.raises(ValueError):
        perturb("", "bogus")


@pytest.mark.parametrize(
    "kind, text",
    [
        ("typo", "a b c"),
        ("typo", "short words only here"),  # nothing of length >= 6
        ("typo", "because between without"),  # long, but all stopwords
        ("typo", "aaaaaaa bbbbbbbb"),  # long, but every inner swap is a no-op
        ("typo", "naïveté résumé"),  # accented letters split words into short ASCII runs
        ("typo", ""),
        ("case", "all lower"),
        ("case", "123 ... ?"),
        ("punct", ""),
        ("punct", " \n\t "),
        ("paraphrase", "xyz qwe"),
        ("paraphrase", "bigger shorthand cars"),  # table words only as parts of longer words
        ("paraphrase", ""),
    ],
)
def test_skipped_when_nothing_applies(kind, text):
    assert perturb(text, kind) is None


def test_words_are_ascii_letter_runs():
    # "é" is not an ASCII letter, so in "éCOLE" the word is "COLE" and case applies to it;
    # in "Émile" the word is "mile", which is lower-case, so case has nothing to do.
    assert perturb("éCOLE", "case") == "écOLE"
    assert perturb("Émile", "case") is None


# --------------------------------------------------------------------------- typo


@given(any_text, seeds, prompt_ids)
def test_typo_swaps_two_adjacent_inner_letters_of_one_long_word(text, seed, prompt_id):
    result = perturb(text, "typo", seed=seed, prompt_id=prompt_id)
    words = [m for m in WORD_RE.finditer(text) if len(m.group()) >= 6 and m.group().lower() not in STOPWORDS]
    swappable = [m for m in words if any(m.group()[i] != m.group()[i + 1] for i in range(1, len(m.group()) - 2))]
    if result is None:
        assert not swappable
        return
    assert len(result) == len(text)
    diff = _diff_positions(text, result)
    assert len(diff) == 2 and diff[1] == diff[0] + 1
    i = diff[0]
    assert result[i] == text[i + 1] and result[i + 1] == text[i]
    (word,) = [m for m in words if m.start() <= i and i + 1 < m.end()]
    # Strictly inside: neither the first nor the last letter moved.
    assert word.start() < i and i + 1 < word.end() - 1


def test_typo_hand_example():
    text = "Explain photosynthesis."
    result = perturb(text, "typo")
    assert result is not None and len(result) == len(text)
    diff = _diff_positions(text, result)
    assert len(diff) == 2 and diff[1] == diff[0] + 1
    word = next(m for m in WORD_RE.finditer(text) if m.start() <= diff[0] < m.end())
    assert len(word.group()) >= 6 and word.start() < diff[0] and diff[1] < word.end() - 1
    assert result.endswith(".")


def test_typo_skips_stopwords_and_unswappable_words_for_a_usable_one():
    # Only "thermal" can take a typo; every seed must find it rather than give up.
    text = "between aaaaaaa thermal because"
    for seed in range(20):
        result = perturb(text, "typo", seed=seed)
        assert result is not None
        assert result.startswith("between aaaaaaa t") and result.endswith("l because")


def test_typo_varies_with_seed_and_prompt_id():
    text = (
        "Describe the migration patterns of arctic terns, including their remarkable navigation, "
        "seasonal timing, feeding strategies and conservation challenges."
    )
    by_seed = {perturb(text, "typo", seed=s, prompt_id="bio-001") for s in range(21)}
    by_id = {perturb(text, "typo", seed=0, prompt_id=f"bio-{n:03d}") for n in range(21)}
    assert None not in by_seed and None not in by_id
    assert len(by_seed) >= 2
    assert len(by_id) >= 2


def test_paraphrase_choice_varies_with_seed():
    text = "big small quick simple short main help happy car"
    picks = {perturb(text, "paraphrase", seed=s) for s in range(21)}
    assert len(picks) >= 2


def test_stable_across_processes_with_different_hash_seeds():
    # Python's hash() of a str changes with PYTHONHASHSEED; ours must not.
    code = (
        "from pytest_refract.inputs.perturb import applicable;"
        "print(repr(applicable('Give a Short answer, then describe several interesting "
        "consequences for big houses!', seed=7, prompt_id='p-1')))"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60
        )
        outputs.add(done.stdout)
    outputs.add(
        repr(
            applicable(
                "Give a Short answer, then describe several interesting consequences for big houses!",
                seed=7,
                prompt_id="p-1",
            )
        )
        + "\n"
    )
    assert len(outputs) == 1


# --------------------------------------------------------------------------- case


@given(any_text, seeds)
def test_case_only_lowers_initial_upper_case_letters(text, seed):
    result = perturb(text, "case", seed=seed)
    starts = {m.start() for m in WORD_RE.finditer(text) if m.group()[0].isupper()}
    if result is None:
        assert not starts
        return
    assert result.lower() == text.lower()
    assert len(result) == len(text)
    # Exactly the word-initial upper-case letters changed, each to its lower case.
    assert set(_diff_positions(text, result)) == starts
    for i in starts:
        assert result[i] == text[i].lower()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("What is NASA?", "what is nASA?"),
        ("Hello World", "hello world"),
        ("iPhone and McDonald", "iPhone and mcDonald"),
        ("Don't Stop", "don't stop"),
        ("3Rd place, X-Ray", "3rd place, x-ray"),
    ],
)
def test_case_hand_examples(text, expected):
    assert perturb(text, "case") == expected


# --------------------------------------------------------------------------- punct


@given(any_text, seeds)
def test_punct_changes_only_the_end(text, seed):
    result = perturb(text, "punct", seed=seed)
    stripped = text.rstrip()
    if not stripped:
        assert result is None
        return
    tail = text[len(stripped) :]
    assert result is not None
    assert result.endswith(tail)
    core = result[: len(result) - len(tail)]
    if stripped[-1] in ".?!":
        assert core == stripped[:-1]
    else:
        assert core == stripped + "."


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello there.", "Hello there"),
        ("Hello there", "Hello there."),
        ("Why?", "Why"),
        ("Stop!\n", "Stop\n"),
        ("Write a haiku  \n", "Write a haiku.  \n"),
        ("Wait...", "Wait.."),
        ("x", "x."),
        (".", ""),
    ],
)
def test_punct_hand_examples(text, expected):
    assert perturb(text, "punct") == expected


# --------------------------------------------------------------------------- paraphrase


def _case_pattern(word: str) -> str:
    if len(word) > 1 and word.isupper():
        return "upper"
    if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        return "capitalized"
    return "lower"


@given(any_text, seeds, prompt_ids)
def test_paraphrase_swaps_one_table_word_keeping_its_case(text, seed, prompt_id):
    result = perturb(text, "paraphrase", seed=seed, prompt_id=prompt_id)
    hits = [m.group() for m in WORD_RE.finditer(text) if m.group().lower() in SYNONYMS]
    if result is None:
        assert not hits
        return
    # Non-word material is untouched, and exactly one word changed.
    before = WORD_RE.split(text)
    after = WORD_RE.split(result)
    assert before == after
    old_words = WORD_RE.findall(text)
    new_words = WORD_RE.findall(result)
    assert len(old_words) == len(new_words)
    changed = [(o, n) for o, n in zip(old_words, new_words) if o != n]
    assert len(changed) == 1
    old, new = changed[0]
    assert new.lower() == SYNONYMS[old.lower()]
    pattern = _case_pattern(old)
    expected_new = {"upper": new.upper(), "capitalized": new.lower().capitalize(), "lower": new.lower()}[pattern]
    assert new == expected_new


def test_paraphrase_hand_example():
    text = "Give a Short answer."
    assert SYNONYMS["short"] == "brief"
    # Both "Short" and "answer" are in the table; which one is swapped is the seed's choice.
    outputs = {perturb(text, "paraphrase", seed=s) for s in range(21)}
    assert outputs <= {"Give a Brief answer.", "Give a Short reply."}
    assert "Give a Brief answer." in outputs


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a big house", None),  # two hits: checked below, not here
        ("Buy it", "Purchase it"),
        ("BUY IT", "PURCHASE IT"),
        ("buy it", "purchase it"),
        ("bUy it", "purchase it"),  # mixed case falls back to lower case
        ("Several cars", "Multiple cars"),  # "cars" is not "car": whole ASCII words only
    ],
)
def test_paraphrase_case_examples(text, expected):
    if expected is None:
        assert perturb(text, "paraphrase") in {"a large house", "a big home"}
    else:
        assert perturb(text, "paraphrase") == expected


def test_synonym_table_is_sane():
    assert 25 <= len(SYNONYMS) <= 60
    for key, value in SYNONYMS.items():
        assert re.fullmatch(r"[a-z]+", key), key
        assert re.fullmatch(r"[a-z]+", value), value
        assert value != key


def test_stopwords_are_lower_case_words():
    assert STOPWORDS and all(re.fullmatch(r"[a-z]+", w) for w in STOPWORDS)
    assert {"the", "because", "between"} <= STOPWORDS


# --------------------------------------------------------------------------- levenshtein


def reference_levenshtein(a, b):
    # Textbook full-matrix DP, kept deliberately naive so it shares no shortcut with the code.
    rows, cols = len(a) + 1, len(b) + 1
    d = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        d[i][0] = i
    for j in range(cols):
        d[0][j] = j
    for i in range(1, rows):
        for j in range(1, cols):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
    return d[-1][-1]


tokens = st.lists(st.integers(0, 5), max_size=30)


@given(tokens, tokens)
def test_levenshtein_matches_reference(a, b):
    assert levenshtein(a, b) == reference_levenshtein(a, b)


@given(tokens, tokens)
def test_levenshtein_is_symmetric(a, b):
    assert levenshtein(a, b) == levenshtein(b, a)


@given(tokens)
def test_levenshtein_identity(a):
    assert levenshtein(a, a) == 0
    assert levenshtein(a, list(a)) == 0
    assert levenshtein(tuple(a), a) == 0


@given(tokens, tokens, tokens)
@settings(max_examples=60)
def test_levenshtein_triangle_inequality(a, b, c):
    assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("abcdef", "azcdeq", 2),
        ("aaaa", "aa", 2),
    ],
)
def test_levenshtein_hand_cases(a, b, expected):
    assert levenshtein([ord(c) for c in a], [ord(c) for c in b]) == expected


def test_levenshtein_long_inputs_stay_fast_and_exact():
    # A realistic ~1000-token pair differing in a few scattered places.
    a = [i % 97 for i in range(1000)]
    b = list(a)
    b[100] = 500
    del b[400]
    b.insert(800, 501)
    assert levenshtein(a, b) == 3
    assert levenshtein(a, list(reversed(a[:200]))) == reference_levenshtein(a, list(reversed(a[:200])))


# --------------------------------------------------------------------------- drift


@pytest.mark.parametrize(
    "anchor, other, expected",
    [
        ([], [], 0.0),
        ([], [1], 1.0),
        ([1, 2, 3, 4], [1, 2, 3, 4], 0.0),
        ([1, 2, 3, 4], [1, 2, 3, 5], 0.25),
        ([1, 2, 3, 4], [1, 2], 0.5),
        ([1], [2, 3, 4], 1.0),  # distance 3 over length 1: capped
        ([1, 2], [3, 4, 5, 6, 7], 1.0),
        ([1, 2], [], 1.0),
    ],
)
def test_drift_examples(anchor, other, expected):
    assert drift(anchor, other) == pytest.approx(expected)


@given(tokens, tokens)
def test_drift_is_bounded_and_consistent(anchor, other):
    value = drift(anchor, other)
    assert 0.0 <= value <= 1.0
    if anchor:
        assert value == pytest.approx(min(1.0, reference_levenshtein(anchor, other) / len(anchor)))
    assert (value == 0.0) == (list(anchor) == list(other))
