"""Haystack construction (exact token length, one needle at the requested fraction, on a
sentence boundary), reasoning-trace stripping and trial values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_refract.engines import llamacpp as E
from pytest_refract.inputs.haystack import Haystack, split_sentences, strip_reasoning, trial_value

TEXT = " ".join(
    f"Sentence number {i} talks about the end of the world and a hello to it." if i % 3 else f"Short one {i}."
    for i in range(60)
)


@pytest.fixture(scope="module")
def tiny_tokenize(tiny_model):
    eng = E.Engine(tiny_model, vocab_only=True)
    yield lambda text: eng.tokenize(text, add_special=False)
    eng.close()


def _find(hay, needle):
    return [i for i in range(len(hay) - len(needle) + 1) if hay[i : i + len(needle)] == needle]


@pytest.mark.parametrize("length", [64, 200, 513])
@pytest.mark.parametrize("position", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_exact_length_one_needle_near_the_fraction(tiny_tokenize, length, position):
    hay = Haystack.from_text(TEXT, tiny_tokenize)
    needle = tiny_tokenize(" The magic number is 4821.")
    body, offset = hay.build(length, position, needle)
    assert len(body) == length
    assert _find(body, needle) == [offset]
    # On a sentence boundary: the tokens before the needle are whole sentences.
    boundaries, total = [0], 0
    for sentence in hay.sentence_tokens * 4:
        total += len(sentence)
        boundaries.append(total)
    assert offset in boundaries
    # Within one sentence of the requested fraction.
    longest = max(len(s) for s in hay.sentence_tokens)
    assert abs(offset - position * (length - len(needle))) <= longest


def test_needle_longer_than_length_is_an_error(tiny_tokenize):
    hay = Haystack.from_text(TEXT, tiny_tokenize)
    with pytest.raises(ValueError, match="does not exceed"):
        hay.build(5, 0.5, list(range(10)))


def test_split_sentences():
    assert split_sentences("One. Two?  Three! Four") == ["One.", "Two?", "Three!", "Four"]
    assert split_sentences("   ") == []


@pytest.mark.parametrize(
    "raw, answer",
    [
        ("The number is 42.", "The number is 42."),
        ("<think>it might be 17</think>The number is 42.", "The number is 42."),
        ("<think>still thinking about 42", ""),
        ("<thinking>x</thinking> 7", "7"),
        ("[THINK]hmm[/THINK]Answer: 9", "Answer: 9"),
    ],
)
def test_strip_reasoning(raw, answer):
    assert strip_reasoning(raw) == answer


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6), st.integers(64, 8192), st.floats(0, 1), st.integers(0, 20))
def test_trial_values_are_stable_and_well_formed(seed, length, position, trial):
    a = trial_value(seed, length, position, trial)
    assert a == trial_value(seed, length, position, trial)
    assert a.isdigit() and len(a) == 4
    w = trial_value(seed, length, position, trial, "words")
    assert "-" in w and w == trial_value(seed, length, position, trial, "words")


def test_trials_differ_within_a_cell():
    values = {trial_value(0, 1024, 0.5, t) for t in range(5)}
    assert len(values) >= 4
