"""Sequential measurement: an axis stops measuring once its verdict is decided, and the verdict
stays valid although the data chose when to stop. Pure functions, numpy only.

The design is group-sequential with Bonferroni error spending, fixed before the first look:

- **Looks.** With N items selected for an axis (after ``-k`` and ``--refract-max-items``) and a
  first look after F items (the axis's first decode batch, at least MIN_FIRST_LOOK), the looks
  are at F, 2F, 4F, ... items and at N: K looks in all, known before anything is measured.
- **Spending.** The error 1 - 0.95 = 5 % is split over the K looks before the first: half of it
  at the first look (FIRST_LOOK_SHARE), the other half equally over the later ones, so with
  K looks the first interval has level 97.5 % and each later one 1 - 2.5 % / (K - 1). A decided
  verdict is wrong only when the interval at the look that decided it misses the true multiple
  on the wrong side; by the union bound the chance that *any* of the K intervals misses is at
  most the sum of their errors, 5 %, however the stopping used them. So a PASS or FAIL,
  whenever it comes, is wrong at most 5 % of the time (as far as each look's interval holds its
  level: the jackknife-t's coverage is simulated in tests/test_verdict.py, the whole rule's
  error rate in tests/test_sequential.py). The first look gets the larger share because that is
  where a clear case should stop: an audit pays for every look it does not stop at, and a
  case that needs the later looks is one near the margin, where a slightly wider interval
  costs least.
- **Between looks** the interval is shown (at the last look's level) but decides nothing: only a look
  may stop the axis.

With a single look (N at most F, or ``--refract-exhaustive``) the level is the fixed-sample 95 %
and the verdict is exactly the fixed design's. The price of stopping early is a wider interval
at every look: an axis that runs to its cap ends with a K-look interval, which may leave UNDECIDED
what one fixed-size look of the same items would decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .verdict import LEVEL

# No look before this many items: a t interval on fewer decides little and spends a look.
MIN_FIRST_LOOK = 8


def planned_looks(n_max: int, first: int) -> Tuple[int, ...]:
    """The item counts at which the axis may stop: first, 2 x first, ... below n_max, then
    n_max (one look at n_max when n_max <= first)."""
    if n_max <= 0:
        return ()
    first = max(1, int(first))
    looks: List[int] = []
    n = first
    while n < n_max:
        looks.append(n)
        n *= 2
    looks.append(n_max)
    return tuple(looks)


# The share of the error spent at the first look (the rest goes equally to the later looks).
FIRST_LOOK_SHARE = 0.5


def look_levels(n_looks: int, level: float = LEVEL) -> Tuple[float, ...]:
    """Each look's interval level: FIRST_LOOK_SHARE of the error 1 - level at the first look,
    the rest split equally over the later looks; one look keeps the whole error."""
    if n_looks <= 1:
        return (level,) * max(0, n_looks)
    error = 1.0 - level
    first = error * FIRST_LOOK_SHARE
    later = (error - first) / (n_looks - 1)
    return (1.0 - first,) + (1.0 - later,) * (n_looks - 1)


@dataclass(frozen=True)
class Design:
    """One axis's sequential design for one candidate, fixed before its first item."""

    looks: Tuple[int, ...]
    levels: Tuple[float, ...]   # the level of each look's interval, one per look
    stopping: bool              # False: every selected item is measured, one look at the end

    @classmethod
    def plan(cls, n_max: int, first: int, stopping: bool = True, level: float = LEVEL) -> "Design":
        if not stopping:
            looks = (n_max,) if n_max > 0 else ()
            return cls(looks, look_levels(len(looks), level), False)
        looks = planned_looks(n_max, max(MIN_FIRST_LOOK, first))
        return cls(looks, look_levels(len(looks), level), True)

    def level_at(self, look: Optional[int]) -> float:
        """The interval level of look number ``look``; before the first look, the first's (an
        interval shown then decides nothing)."""
        if not self.levels:
            return LEVEL
        return self.levels[0 if look is None else look]

    @property
    def n_max(self) -> int:
        return self.looks[-1] if self.looks else 0

    def look_at(self, n: int) -> Optional[int]:
        """The index of the last look reached with n items measured (None before the first)."""
        reached = [k for k, at in enumerate(self.looks) if n >= at]
        return reached[-1] if reached else None

    def next_look(self, n: int) -> Optional[int]:
        """The item count of the next look after n items (None when none is left)."""
        return next((at for at in self.looks if at > n), None)

    def as_json(self) -> dict:
        return {"method": ("group-sequential, Bonferroni over the planned looks, half the error at the first"
                           if self.stopping and len(self.looks) > 1 else "fixed sample (one look)"),
                "looks": list(self.looks), "look_levels": list(self.levels), "stopping": self.stopping}


def simulate_decision(candidate, control, design: Design, decide_at) -> Tuple[str, int]:
    """Run ``design`` over paired tables (row i of both is item i, in measuring order): at each
    look, ``decide_at(candidate[:n], control[:n], level)`` at that look's level gives PASS, FAIL
    or UNDECIDED; the first decided look stops. Returns (verdict, items measured). The same rule
    the audit applies item by item (stopping.py), for seeded simulations of its error rate."""
    verdict, n = "UNDECIDED", 0
    for look, at in enumerate(design.looks):
        n = min(at, len(candidate))
        verdict = decide_at(candidate[:n], control[:n], design.levels[look])
        if verdict != "UNDECIDED" and design.stopping:
            return verdict, n
    return verdict, n


def skip_reason(n: int, n_max: int, noun: str, headline: str) -> str:
    """The pytest skip reason of an item an axis no longer needs."""
    return f"decided after {n} of {n_max} {noun}: {headline}"


def fmt_multiple(multiple: Optional[float], ci: Optional[List[float]]) -> str:
    """``M 2.5x [2.3, 2.7]`` (the interval left out when there is none)."""
    if multiple is None:
        return "M n/a"
    text = f"M {_short(multiple)}x"
    if ci:
        text += f" [{_short(ci[0])}, {_short(ci[1])}]"
    return text


def _short(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
