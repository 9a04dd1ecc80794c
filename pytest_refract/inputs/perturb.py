"""Small, deterministic text perturbations of a prompt, and token-level edit distance.

Used to ask whether a tiny, meaning-preserving change to a prompt moves a quantized model's
output more than it moves the reference's. Pure: no llama.cpp, no pytest, no global state.

Every perturbation is reproducible from (seed, prompt id, perturbation name) alone. The random
generator is seeded from a SHA-256 of those three, never from Python's ``hash()``, which is
salted per process (PYTHONHASHSEED) and would give xdist workers and reruns different prompts.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Callable, Dict, List, Optional, Sequence

PERTURBATIONS = ("typo", "case", "punct", "paraphrase")

# ASCII letters only: a word is what we may edit, everything else (digits, accents, emoji,
# apostrophes, whitespace) must survive byte-for-byte, so we never match it as part of a word.
_WORD_RE = re.compile(r"[A-Za-z]+")

# Only words of at least this length get a typo: in shorter words swapping two inner letters
# changes the word too much (or, at length < 4, there is nothing strictly inside to swap).
TYPO_MIN_LEN = 6

# Common English function words. A typo in one of these ("bewteen") says little about the
# model's robustness to content, so they are never typo targets. Lower-case; compared against
# the lower-cased word. Short ones are listed too so the set is usable on its own, even though
# the length rule above already excludes them from typos.
STOPWORDS = frozenset(
    """
    a an the and or but nor so yet if then than that this these those there here
    is am are was were be been being do does did done have has had having
    i me my we us our you your he him his she her it its they them their
    of in on at to by for from with into onto upon over under about above below
    as not no can could will would shall should may might must
    what which who whom whose when where why how
    all any both each few more most other some such only own same very just also
    because through before between after again against during without within
    another others however therefore although though unless whereas whether while
    itself myself yourself herself himself ourselves themselves yourselves
    across around beyond behind beneath beside besides toward towards
    whatever whenever wherever whichever whoever
    always almost enough rather either neither instead cannot
    """.split()
)

# Transparent one-word swaps, lower-case word -> synonym. Our own table, deliberately small:
# every swap must keep the prompt's meaning and grammar in the usual prompt context, so a
# pair is listed in both directions only when both directions are safe. One-way examples and
# why: "start" (noun: "the start" -> "the begin"), "little" ("a little tired"), "end" ("the
# end" -> "the finish"), "home" ("at home"), "pick" ("pick up"), "close" ("close to"),
# "easy" ("take it easy").
SYNONYMS: Dict[str, str] = {
    "big": "large",
    "large": "big",
    "small": "little",
    "quick": "fast",
    "fast": "quick",
    "begin": "start",
    "choose": "pick",
    "select": "choose",
    "simple": "easy",
    "answer": "reply",
    "reply": "answer",
    "buy": "purchase",
    "purchase": "buy",
    "house": "home",
    "short": "brief",
    "brief": "short",
    "main": "primary",
    "primary": "main",
    "help": "assist",
    "assist": "help",
    "several": "multiple",
    "many": "numerous",
    "shut": "close",
    "happy": "glad",
    "glad": "happy",
    "car": "automobile",
    "automobile": "car",
    "finish": "end",
    "often": "frequently",
    "frequently": "often",
    "maybe": "perhaps",
    "perhaps": "maybe",
    "difficult": "hard",
    "mistake": "error",
}


def _rng(seed: int, prompt_id: str, kind: str) -> random.Random:
    # sha256 rather than hash(): stable across processes, platforms and Python versions.
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{kind}".encode("utf-8")).digest()
    # An int seed (not str/bytes) keeps random.Random's seeding path simple and version-stable.
    return random.Random(int.from_bytes(digest[:8], "big"))


def _typo(text: str, rng: random.Random) -> Optional[str]:
    # Collect (word span, valid swap indices) for every candidate word that has at least one
    # valid swap; filtering first means one unswappable word ("aaaaaa") never hides another.
    candidates = []
    for m in _WORD_RE.finditer(text):
        word = m.group()
        if len(word) < TYPO_MIN_LEN or word.lower() in STOPWORDS:
            continue
        # i and i+1 both strictly inside the word (first and last letters stay put, which keeps
        # the word recognisable); equal neighbours are skipped since swapping them is a no-op.
        indices = [i for i in range(1, len(word) - 2) if word[i] != word[i + 1]]
        if indices:
            candidates.append((m.start(), word, indices))
    if not candidates:
        return None
    start, word, indices = candidates[rng.randrange(len(candidates))]
    i = indices[rng.randrange(len(indices))]
    swapped = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return text[:start] + swapped + text[start + len(word) :]


def _case(text: str, rng: random.Random) -> Optional[str]:
    # Lower only each word's first letter: that models a user who did not bother with sentence
    # case, while acronyms keep the rest of their letters ("NASA" -> "nASA") so we only test
    # sensitivity to that one letter, not to a rewritten acronym. No randomness needed.
    del rng
    changed = False

    def lower_first(m: "re.Match[str]") -> str:
        nonlocal changed
        word = m.group()
        if word[0].isupper():
            changed = True
            return word[0].lower() + word[1:]
        return word

    result = _WORD_RE.sub(lower_first, text)
    return result if changed else None


def _punct(text: str, rng: random.Random) -> Optional[str]:
    # Toggle the final sentence mark; trailing whitespace (e.g. a newline that a chat template
    # cares about) is kept where it was, after the mark.
    del rng
    stripped = text.rstrip()
    if not stripped:
        return None
    tail = text[len(stripped) :]
    if stripped[-1] in ".?!":
        return stripped[:-1] + tail
    return stripped + "." + tail


def _match_case(template: str, word: str) -> str:
    # Keep the capitalization pattern of the word being replaced. Mixed case ("sHoRt") has no
    # faithful equivalent for a different word, so it falls back to lower case.
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[0].isupper() and (len(template) == 1 or template[1:].islower()):
        return word.capitalize()
    return word.lower()


def _paraphrase(text: str, rng: random.Random) -> Optional[str]:
    hits = [m for m in _WORD_RE.finditer(text) if m.group().lower() in SYNONYMS]
    if not hits:
        return None
    m = hits[rng.randrange(len(hits))]
    replacement = _match_case(m.group(), SYNONYMS[m.group().lower()])
    return text[: m.start()] + replacement + text[m.end() :]


_KINDS: Dict[str, Callable[[str, random.Random], Optional[str]]] = {
    "typo": _typo,
    "case": _case,
    "punct": _punct,
    "paraphrase": _paraphrase,
}


def perturb(text: str, kind: str, *, seed: int = 0, prompt_id: str = "") -> Optional[str]:
    """``text`` with one perturbation of ``kind`` applied, or None when it cannot apply.

    Never returns ``text`` unchanged: a "perturbation" equal to the input would count as a
    measurement of robustness while measuring nothing.
    """
    try:
        fn = _KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {', '.join(PERTURBATIONS)}") from None
    result = fn(text, _rng(seed, prompt_id, kind))
    # Each perturbation is built never to be a no-op; this guard keeps the contract even if a
    # future table entry or rule slips (e.g. a synonym equal to its key).
    if result is None or result == text:
        return None
    return result


def applicable(text: str, *, seed: int = 0, prompt_id: str = "") -> Dict[str, Optional[str]]:
    """Every perturbation of ``text``: kind -> perturbed text, or None where it does not apply."""
    return {kind: perturb(text, kind, seed=seed, prompt_id=prompt_id) for kind in PERTURBATIONS}


# --------------------------------------------------------------------------- edit distance


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Insert/delete/substitute edit distance between two token sequences (unit costs)."""
    a = list(a)
    b = list(b)
    if a == b:
        return 0
    # Shared prefix and suffix never contribute to the distance; trimming them is the common
    # case here (perturbed generations usually agree for a while, then diverge) and shrinks
    # the quadratic part.
    lo = 0
    while lo < len(a) and lo < len(b) and a[lo] == b[lo]:
        lo += 1
    hi_a, hi_b = len(a), len(b)
    while hi_a > lo and hi_b > lo and a[hi_a - 1] == b[hi_b - 1]:
        hi_a -= 1
        hi_b -= 1
    a = a[lo:hi_a]
    b = b[lo:hi_b]
    if not a:
        return len(b)
    if not b:
        return len(a)
    # One row of the DP matrix, over the shorter sequence: O(min(len)) memory.
    if len(b) > len(a):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur: List[int] = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def drift(anchor: Sequence[int], other: Sequence[int]) -> float:
    """Edit distance from ``anchor`` to ``other`` as a fraction of the anchor's length, in [0, 1].

    Capped at 1.0 because a far longer ``other`` would otherwise dominate any average; "as
    different as it gets" is all we need to know.
    """
    if len(anchor) == 0:
        # Nothing to normalise by: identical-empty means no drift, anything else is total drift.
        return 0.0 if len(other) == 0 else 1.0
    return min(1.0, levenshtein(anchor, other) / len(anchor))
