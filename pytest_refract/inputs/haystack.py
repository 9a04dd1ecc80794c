"""Needle-in-a-haystack prompts built in token space, so a haystack is exactly ``length``
tokens (no chars-per-token estimate) and the needle sits on a sentence boundary."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Reasoning traces that thinking models print before their answer.
_REASONING = [
    (re.compile(r"<think>.*?</think>", re.S), re.compile(r"<think>", re.S)),
    (re.compile(r"<thinking>.*?</thinking>", re.S), re.compile(r"<thinking>", re.S)),
    (re.compile(r"<reasoning>.*?</reasoning>", re.S), re.compile(r"<reasoning>", re.S)),
    (re.compile(r"\[THINK\].*?\[/THINK\]", re.S), re.compile(r"\[THINK\]", re.S)),
    (re.compile(r"<\|channel\|>analysis.*?<\|end\|>", re.S), re.compile(r"<\|channel\|>analysis", re.S)),
]
THINK_MARKERS = ("<think>", "<thinking>", "[THINK]", "<|channel|>analysis", "<reasoning>")
_WORDS = ("amber", "falcon", "willow", "granite", "harbor", "lantern", "meadow", "orchid", "pepper", "quartz",
          "saddle", "thistle", "velvet", "walnut", "zephyr", "copper", "juniper", "marble", "nectar", "raven")


def split_sentences(text: str) -> List[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def strip_reasoning(text: str) -> str:
    """The answer after a reasoning trace; empty if the trace never closed (no answer yet)."""
    for closed, opened in _REASONING:
        text = closed.sub("", text)
        m = opened.search(text)
        if m:
            text = text[: m.start()]
    return text.strip()


def trial_value(seed: int, length: int, position: float, trial: int, kind: str = "numbers") -> str:
    """A value per trial, so no single lucky token decides a cell; stable across runs."""
    rng = random.Random(f"{seed}:{length}:{position:.4f}:{trial}")
    if kind == "words":
        return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
    return str(rng.randint(1000, 9999))


@dataclass
class Haystack:
    """Sentences of the haystack text, each tokenized once (with its leading space)."""

    sentence_tokens: List[List[int]]

    @classmethod
    def from_text(cls, text: str, tokenize) -> "Haystack":
        sentences = split_sentences(text)
        if not sentences:
            raise ValueError("haystack text has no sentences")
        return cls([tokenize(" " + s) for s in sentences])

    def build(self, length: int, position: float, needle: Sequence[int]) -> Tuple[List[int], int]:
        """(body tokens of exactly ``length``, index where the needle starts). The needle goes
        at the sentence boundary nearest ``position`` x (length - needle); the text after it
        is cut at ``length`` tokens."""
        if length <= len(needle):
            raise ValueError(f"haystack length {length} does not exceed the needle's {len(needle)} tokens")
        avail = length - len(needle)
        target = position * avail
        pre: List[int] = []
        i, n = 0, len(self.sentence_tokens)
        while True:
            nxt = self.sentence_tokens[i % n]
            after = len(pre) + len(nxt)
            if after > target:
                if after <= avail and (after - target) < (target - len(pre)):
                    pre += nxt
                    i += 1
                break
            pre += nxt
            i += 1
        body = pre + list(needle)
        while len(body) < length:
            body += self.sentence_tokens[i % n]
            i += 1
        return body[:length], len(pre)
