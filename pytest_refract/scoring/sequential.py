"""Sequential measurement: an axis stops measuring once its verdict is decided, and the verdict
stays valid although the data chose when to stop. Pure functions, numpy only.

The design is group-sequential with Bonferroni error spending, fixed before the first look:

- **Looks.** With N items selected for an axis (after ``-k`` and ``--refract-max-items``) and a
  first look after F items (the axis's first decode batch, at least MIN_FIRST_LOOK), the looks
  are at F, 2F, 4F, ... items and at N, plus one at the first multiple of F from which a PASS is
  allowed (verdict.MIN_ITEMS_FOR_PASS): K looks in all, known before anything is measured.
- **Spending, per side.** A wrong FAIL and a wrong PASS are separate errors, each 2.5 % (the two
  sides of a 95 % interval). The FAIL side's 2.5 % is split over all K looks: half at the first,
  the other half equally over the later ones; it is further divided by the number of axes the
  candidate's verdict reads (a candidate FAILs when any axis FAILs, so their FAIL errors add). The
  PASS side's 2.5 % is split the same way over the looks where a PASS is allowed (those with at
  least MIN_ITEMS_FOR_PASS items); a candidate PASSes only when every axis does, so its
  false-PASS error is at most one axis's. By the union bound the chance that *any* look's bound
  misses on a side is at most that side's sum, however the stopping used them. So a PASS or a
  FAIL, whenever it comes, is wrong at most 2.5 % of the time (as far as each bound holds its
  level: simulated in tests/test_verdict_sim.py on nine generators).
- **Between looks** the interval is shown (at the last look's level) but decides nothing: only a
  look may stop the axis.

With a single look (N at most F, or ``--refract-exhaustive``) each side keeps its whole 2.5 %.

**Reruns.** The guarantee is per run: a run that ends UNDECIDED and is run again over more items
(or over the same items with a new seed) starts a new test with its own errors; rerunning until
a PASS comes raises the chance of a wrong PASS with every try. The report says so beside every
UNDECIDED; the seed (``--refract-seed``) picks the items, so pin it in CI to keep a rerun the same
test of the same items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import verdict as V
from .verdict import LEVEL

# No look before this many items: a t interval on fewer decides little and spends a look.
MIN_FIRST_LOOK = 8


def planned_looks(n_max: int, first: int, pass_from: int = 0) -> Tuple[int, ...]:
    """The item counts at which the axis may stop: first, 2 x first, ... below n_max, then
    n_max (one look at n_max when n_max <= first); plus the first multiple of ``first`` at or
    beyond ``pass_from`` (where a PASS becomes possible), when that lies inside."""
    if n_max <= 0:
        return ()
    first = max(1, int(first))
    looks: List[int] = []
    n = first
    while n < n_max:
        looks.append(n)
        n *= 2
    looks.append(n_max)
    if pass_from > first:
        at = -(-pass_from // first) * first
        if at < n_max and at not in looks:
            looks.append(at)
    return tuple(sorted(looks))


# The share of a side's error spent at its first look (the rest goes equally to the later looks).
FIRST_LOOK_SHARE = 0.5


def spend(n_looks: int, error: float) -> Tuple[float, ...]:
    """``error`` split over ``n_looks`` looks: FIRST_LOOK_SHARE of it at the first, the rest
    equally over the later ones; one look keeps the whole error."""
    if n_looks <= 0:
        return ()
    if n_looks == 1:
        return (error,)
    first = error * FIRST_LOOK_SHARE
    return (first,) + ((error - first) / (n_looks - 1),) * (n_looks - 1)


def look_levels(n_looks: int, level: float = LEVEL) -> Tuple[float, ...]:
    """Each look's two-sided level when both sides spend alike (1 - 2 x each side's error)."""
    return tuple(1.0 - 2.0 * e for e in spend(n_looks, (1.0 - level) / 2))


@dataclass(frozen=True)
class Design:
    """One axis's sequential design for one candidate, fixed before its first item."""

    looks: Tuple[int, ...]
    pass_errors: Tuple[float, ...]   # per look, the one-sided error of the PASS side (0: no PASS there)
    fail_errors: Tuple[float, ...]   # per look, the one-sided error of the FAIL side (already per axis)
    stopping: bool                   # False: every selected item is measured, one look at the end
    min_pass_items: int = V.MIN_ITEMS_FOR_PASS

    @classmethod
    def plan(cls, n_max: int, first: int, stopping: bool = True, level: float = LEVEL,
             n_axes: int = 1, min_pass_items: int = V.MIN_ITEMS_FOR_PASS) -> "Design":
        side = (1.0 - level) / 2
        if not stopping:
            looks: Tuple[int, ...] = (n_max,) if n_max > 0 else ()
        else:
            looks = planned_looks(n_max, max(MIN_FIRST_LOOK, first), min_pass_items)
        fail = tuple(e / max(1, n_axes) for e in spend(len(looks), side))
        eligible = [k for k, at in enumerate(looks) if at >= min_pass_items]
        shares = spend(len(eligible), side)
        passes = [0.0] * len(looks)
        for k, e in zip(eligible, shares):
            passes[k] = e
        return cls(looks, tuple(passes), fail, stopping, min_pass_items)

    @property
    def levels(self) -> Tuple[float, ...]:
        """Per look, the level of the interval shown: 1 - (PASS error + FAIL error), the PASS
        error of the first look that allows one where this look does not."""
        return tuple(1.0 - self.display_pass_error(k) - f for k, f in enumerate(self.fail_errors))

    def display_pass_error(self, look: int) -> float:
        """The PASS side's error a look's interval is shown at: its own, or where no PASS is
        allowed there, the first PASS look's (the whole side's error when none is planned)."""
        if self.pass_errors[look] > 0:
            return self.pass_errors[look]
        later = [e for e in self.pass_errors if e > 0]
        return later[0] if later else (1.0 - LEVEL) / 2

    def errors_at(self, look: Optional[int]) -> Tuple[float, float, int]:
        """(PASS error shown, FAIL error, PASS allowed from this many items) at look ``look``
        (the first before any)."""
        if not self.looks:
            side = (1.0 - LEVEL) / 2
            return side, side, self.min_pass_items
        k = 0 if look is None else look
        allowed = self.min_pass_items if self.pass_errors[k] > 0 else max(self.min_pass_items, self.looks[k] + 1)
        return self.display_pass_error(k), self.fail_errors[k], allowed

    def level_at(self, look: Optional[int]) -> float:
        """The interval level of look number ``look``; before the first look, the first's (an
        interval shown then decides nothing)."""
        if not self.looks:
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
        return {"method": ("group-sequential, Bonferroni over the planned looks per side, half of each side's "
                           "error at its first look" if self.stopping and len(self.looks) > 1
                           else "fixed sample (one look)"),
                "looks": list(self.looks), "look_levels": list(self.levels), "stopping": self.stopping,
                "pass_errors": list(self.pass_errors), "fail_errors": list(self.fail_errors),
                "min_pass_items": self.min_pass_items}


def errors_of(design_json: dict) -> Tuple[float, float, int]:
    """(PASS error, FAIL error, PASS allowed from this many items) at the look a design's JSON
    (``Design.as_json`` plus stopping.py's ``look_read``) was last read at."""
    pass_errors, fail_errors = design_json.get("pass_errors"), design_json.get("fail_errors")
    looks = design_json.get("looks") or []
    if not pass_errors or not fail_errors or not looks:
        side = (1.0 - LEVEL) / 2
        return side, side, int(design_json.get("min_pass_items") or V.MIN_ITEMS_FOR_PASS)
    design = Design(tuple(looks), tuple(pass_errors), tuple(fail_errors), bool(design_json.get("stopping")),
                    int(design_json.get("min_pass_items") or V.MIN_ITEMS_FOR_PASS))
    read = design_json.get("look_read")
    return design.errors_at(None if read is None else int(read) - 1)


def simulate_decision(candidate, control, design: Design, decide_at) -> Tuple[str, int]:
    """Run ``design`` over paired tables (row i of both is item i, in measuring order): at each
    look, ``decide_at(candidate[:n], control[:n], pass_error, fail_error)`` at that look's errors
    gives PASS, FAIL or UNDECIDED; the first decided look stops. Returns (verdict, items
    measured). The same rule the audit applies item by item (stopping.py), for seeded
    simulations of its error rate."""
    verdict, n = "UNDECIDED", 0
    for look, at in enumerate(design.looks):
        n = min(at, len(candidate))
        verdict = decide_at(candidate[:n], control[:n], design.pass_errors[look], design.fail_errors[look])
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


def _short(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):  # an open upper end
        return "inf"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def simulate_decisions(candidate, control, design: Design, decide_at):
    """``simulate_decision`` over stacks (runs, n, 2) at once: ``decide_at(cand, ctrl, pass_error,
    fail_error)`` returns an array of verdicts per run. Returns (verdicts, items measured) per
    run."""
    import numpy as np

    runs = candidate.shape[0]
    verdict = np.full(runs, "UNDECIDED", dtype=object)
    used = np.zeros(runs, dtype=int)
    open_ = np.ones(runs, dtype=bool)
    for look, at in enumerate(design.looks):
        n = min(at, candidate.shape[1])
        now = decide_at(candidate[:, :n], control[:, :n], design.pass_errors[look], design.fail_errors[look])
        verdict = np.where(open_, now, verdict)
        used = np.where(open_, n, used)
        if design.stopping:
            open_ = open_ & (now == "UNDECIDED")
    return verdict, used
