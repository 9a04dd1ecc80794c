"""Sequential measurement: an axis stops measuring once its verdict is decided, and the verdict
stays valid although the data chose when to stop. Pure functions, numpy only.

The design is group-sequential with Bonferroni error spending, fixed before the first look:

- **Looks.** With N items selected for an axis (after ``-k`` and ``--refract-max-items``) and a
  first look after F items (the axis's first decode batch, at least MIN_FIRST_LOOK), the looks
  are at F, 2F, 4F, ... items and at N: K looks in all, known before anything is measured.
- **Spending.** Every look's interval has level ``1 - (1 - 0.95) / K``. A decided verdict is
  wrong only when the interval at the look that decided it misses the true multiple on the
  wrong side; by the union bound the chance that *any* of the K intervals misses is at most
  K x (0.05 / K) = 5 %, however the stopping used them. So a PASS or FAIL, whenever it comes, is
  wrong at most 5 % of the time (as far as each look's interval holds its level: the
  jackknife-t's coverage is simulated in tests/test_verdict.py, the whole rule's error rate in
  tests/test_sequential.py).
- **Between looks** the interval is shown (at the look level) but decides nothing: only a look
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


def look_level(n_looks: int, level: float = LEVEL) -> float:
    """Each look's interval level: the error 1 - level split equally over the looks."""
    return 1.0 - (1.0 - level) / max(1, n_looks)


@dataclass(frozen=True)
class Design:
    """One axis's sequential design for one candidate, fixed before its first item."""

    looks: Tuple[int, ...]
    level: float                # the level of each look's interval
    stopping: bool              # False: every selected item is measured, one look at the end

    @classmethod
    def plan(cls, n_max: int, first: int, stopping: bool = True, level: float = LEVEL) -> "Design":
        if not stopping:
            return cls((n_max,) if n_max > 0 else (), level, False)
        looks = planned_looks(n_max, max(MIN_FIRST_LOOK, first))
        return cls(looks, look_level(len(looks), level), True)

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
        return {"method": ("group-sequential, Bonferroni over the planned looks" if self.stopping and len(self.looks) > 1
                           else "fixed sample (one look)"),
                "looks": list(self.looks), "look_level": self.level, "stopping": self.stopping}


def simulate_decision(candidate, control, design: Design, decide_at) -> Tuple[str, int]:
    """Run ``design`` over paired tables (row i of both is item i, in measuring order): at each
    look, ``decide_at(candidate[:n], control[:n], level)`` gives PASS, FAIL or UNDECIDED; the
    first decided look stops. Returns (verdict, items measured). The same rule the audit applies
    item by item (stopping.py), for seeded simulations of its error rate."""
    verdict, n = "UNDECIDED", 0
    for at in design.looks:
        n = min(at, len(candidate))
        verdict = decide_at(candidate[:n], control[:n], design.level)
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
