"""The verdict: damage as a multiple of the control's, and a three-way decision (PASS / FAIL /
UNDECIDED) against a margin, by one declared test at every control precision. Pure functions:
numpy only, no llama.cpp, no pytest, no axis imports (an axis is any object with the members
read here, see axes/base.py).

Per axis, the *damage* D is a number where 0 means "identical to the reference". Every built-in
axis writes it as a ratio of sums over its items, ``D = sum(a_i) / sum(b_i)`` (a table with the
two columns per item): KLD the mean KLD over all scored positions, trajectory the share of
reference tokens whose top-1 the candidate changes under teacher forcing, R-NIAH the share of
the reference's retrievals lost, PLAD the mean excess drift. An axis may define ``damage`` as
any other vectorised statistic of its table.

The headline is the multiple ``M = D_candidate / D_control`` on the same items. The decision
does not divide by the control: it tests the *difference* ``Delta = D_candidate - margin x
D_control``, which stays defined and estimable however small the control's damage is (at a
control without damage it is the candidate's own damage, and PASS is then out of reach, as it
should be: nothing shows that the candidate is within 3x of nothing). There is no switch to an
absolute tolerance chosen from the data.

- **Bounds of Delta.** Per item, the candidate's and the control's damage over the mean exposure
  (``pseudo_values``: they average to the damages, each rises with its own item only); their
  differences ``z_i`` carry the pairing (what the two share cancels). The bounds are the
  empirical-likelihood bounds of the mean of z (``el_upper``): the largest (smallest) weighted
  mean over item weights whose likelihood ratio stays above the Student-t calibrated limit. They
  follow the data's skewness (a right-skewed candidate widens the PASS side, where a t bound
  narrows it). A rare-item allowance (``tail_bounds``) then moves a share 1 - (2 err)^(1/n) of
  the weight to the worst item seen (the best, for the FAIL side): the share of items a problem
  could occupy and still go unseen. For counted damage the worst item is also allowed the units
  a count of 0 hides, and a FAIL also needs the candidate beyond the margin times the control's
  Poisson upper bound (a control with 0 on most items has count noise no paired bound sees).
  All weights are >= 0, so no bound falls when an item gets worse: the verdict is monotone.
- **Decision.** PASS when the upper bound of Delta at the PASS side's error is below 0 (and at
  least MIN_ITEMS_FOR_PASS items were measured, see below); FAIL when the lower bound at the FAIL
  side's error is above 0; UNDECIDED otherwise. A candidate with no damage on any item is bounded
  by the zero-event bound on its damage against the *lower* end of the control's damage.
- **The interval on M** shown beside the verdict is the test inverted: every multiple m that the
  same test at m would not reject (a Fieller-type set, open to infinity where the control's
  damage could be 0). Its ends are consistent with the decision: PASS exactly when its upper end
  is at or below the margin (with enough items for a PASS), FAIL exactly when its lower end is
  above it. Below MIN_ITEMS_FOR_PASS items its upper end is not certified and shown open.
- **Rare failures.** A sample can miss a problem confined to a few items. PASS needs at least
  MIN_ITEMS_FOR_PASS (46) items: enough that a problem on 10 % of the items shows on at least two
  of them with probability 95 %. Every PASS states what its sample could still miss
  (``could_miss``): the share f of items below which a problem confined to them goes unseen with
  probability over 5 %, f = 1 - 0.05^(1/n). FAIL needs no minimum.
- **Errors.** Each side has its own one-sided error: PASS ``(1 - level) / 2``; FAIL the same
  divided by the number of axes the run verdict reads (a run FAILs when any axis FAILs, so the
  FAIL errors of its axes add; a run PASSes only when every axis PASSes, so its false-PASS
  error is at most one axis's). A sequential design spends each side's error over its looks
  (scoring/sequential.py).

A control whose damage is beyond what a rounding-only change can cause (or whose raw score is 0)
is a broken yardstick: no verdict, and the run says so.

The point score is a fixed decreasing map of the point estimate M (100 at M <= 1, the band edges
at 1.5x, 3x and 10x), monotone: a candidate with more damage on every item has a larger M and
never scores higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Dict, List, Optional, Sequence, cast

import numpy as np

LEVEL = 0.95
# The verdict margin on M, and the bands on M (upper edges). PASS/FAIL is decided against the
# margin; the band describes where the point estimate lies. See the README ("What the verdict
# means") for the measurements behind the numbers.
DEFAULT_MARGIN = 3.0
MULTIPLE_BANDS = (("EXCELLENT", 1.5), ("PASS", 3.0), ("DEGRADED", 10.0))
# Score knots: (multiple, score). Between knots the score is linear in log M; beyond the last it
# reaches 0 at 100x the control's damage.
SCORE_KNOTS = ((1.0, 100.0), (1.5, 90.0), (3.0, 80.0), (10.0, 60.0), (100.0, 0.0))
# Defaults for an axis that names none (its damage is then 1 - score/100 per item, so the
# tolerance 0.2 is the PASS band's floor of 80).
DEFAULT_ABSOLUTE_TOLERANCE = 0.2
DEFAULT_DAMAGE_RESOLUTION = 0.0
# Fewer items than this give no interval and so no decision (at 2 the t quantile is 12.7: an
# interval that decides only what is far from the margin).
MIN_ITEMS = 2
# A PASS needs this many items: a problem confined to 10 % of the items (RARE_SHARE) then shows
# on at least two of them with probability 95 % (RARE_SEEN): 46 items. One item that stands out
# is what any interval writes off as noise; two are a pattern the bounds weigh (at 29 items the
# problem is seen once with 95 %, and the seeded simulations still PASS a cache that breaks on
# 10 % of prompts 8 % of the time). FAIL needs no minimum.
RARE_SHARE = 0.10
RARE_SEEN = 0.95


def _min_items_for_pass(share: float = RARE_SHARE, seen: float = RARE_SEEN) -> int:
    n = 2
    while 1.0 - (1.0 - share) ** n - n * share * (1.0 - share) ** (n - 1) < seen:
        n += 1
    return n


MIN_ITEMS_FOR_PASS = _min_items_for_pass()
# Projected item counts beyond this many times the current are reported as "more than".
MAX_PROJECTION = 100

PASS, FAIL, UNDECIDED = "PASS", "FAIL", "UNDECIDED"


# --------------------------------------------------------------------------- numbers


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for 1 and 2 degrees of freedom, otherwise the Cornish-Fisher
    expansion to fourth order (within 5e-4 of the exact value from 3 degrees of freedom)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def ratio_of_sums(table) -> np.ndarray:
    """sum(column 0) / sum(column 1) of a table (n, 2) or a stack (..., n, 2); 0 where the
    denominator is 0 (nothing was exposed to damage)."""
    t = np.asarray(table, dtype=np.float64)
    num, den = t[..., 0].sum(axis=-1), t[..., 1].sum(axis=-1)
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, 0.0)


def _leave_one_out(table: np.ndarray) -> np.ndarray:
    """(n, n - 1, k): table n times, each with one row left out."""
    n = table.shape[0]
    keep = ~np.eye(n, dtype=bool)
    return np.stack([table[keep[i]] for i in range(n)])


def _loo_damage(table: np.ndarray, damage) -> np.ndarray:
    """The damage of each leave-one-out table; for a ratio of sums straight from the sums."""
    if damage is ratio_of_sums and table.ndim == 2 and table.shape[1] == 2:
        num, den = table[:, 0].sum() - table[:, 0], table[:, 1].sum() - table[:, 1]
        safe = np.where(den > 0, den, 1.0)
        return np.where(den > 0, num / safe, 0.0)
    return np.asarray(damage(_leave_one_out(table)), dtype=np.float64)


def _jackknife_se(estimates: np.ndarray) -> float:
    """The jackknife standard error of leave-one-out estimates."""
    n = estimates.shape[0]
    return float(math.sqrt((n - 1) / n * float(((estimates - estimates.mean()) ** 2).sum())))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval (``lo``/``hi`` None when there are too few items), on
    the scale it is reported on, and the standard error on the scale the interval was built on."""

    point: float
    lo: Optional[float]
    hi: Optional[float]
    se: Optional[float]
    n: int


def multiple_interval(candidate: np.ndarray, control: np.ndarray, damage=ratio_of_sums,
                      level: float = LEVEL) -> Estimate:
    """M = D(candidate) / D(control) with its jackknife-t interval on log M; the tables are
    paired row by row (row i of both is the same item). Needs D(control) > 0."""
    cand, ctrl = np.asarray(candidate, dtype=np.float64), np.asarray(control, dtype=np.float64)
    n = cand.shape[0]
    d_cand, d_ctrl = float(damage(cand)), float(damage(ctrl))
    if d_ctrl <= 0:
        raise ValueError("the control's damage is 0: the multiple is undefined")
    point = d_cand / d_ctrl
    if n < MIN_ITEMS or d_cand <= 0:
        # No log scale for a candidate without damage: M is 0 and its upper end is what one
        # more item of the control's own mean damage could show (handled by the caller).
        return Estimate(point, None, None, None, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = np.log(_loo_damage(cand, damage)) - np.log(_loo_damage(ctrl, damage))
    if not np.all(np.isfinite(loo)):
        return Estimate(point, None, None, None, n)
    se = _jackknife_se(loo)
    t = t_quantile(0.5 + level / 2, n - 1)
    log_m = math.log(point)
    # exp(log(M)) need not give M back to the last bit: with a zero-width interval (every item
    # at the same ratio) the ends could miss the point and decide a verdict the point does not
    # support. The interval always holds its point.
    return Estimate(point, min(point, math.exp(log_m - t * se)), max(point, math.exp(log_m + t * se)), se, n)


def damage_interval(table: np.ndarray, damage=ratio_of_sums, level: float = LEVEL,
                    zero_is_exact: bool = False) -> Estimate:
    """The candidate's own damage with a jackknife-t interval (clamped at 0). With no damage on
    any item the upper end is the Poisson bound for zero events over the exposure,
    -ln((1 - level) / 2) / sum(column 1): what a count of damaged units could still hide; 0 where
    the axis's zero is exact (a KLD of 0 on every position means bit-identical logits)."""
    t = np.asarray(table, dtype=np.float64)
    n = t.shape[0]
    point = float(damage(t))
    if n < MIN_ITEMS:
        return Estimate(point, None, None, None, n)
    if point <= 0 and zero_is_exact:
        return Estimate(0.0, 0.0, 0.0, None, n)
    if point <= 0:
        exposure = float(t[:, 1].sum()) if t.shape[-1] > 1 else float(n)
        upper = -math.log((1 - level) / 2) / max(exposure, 1.0)
        return Estimate(0.0, 0.0, upper, None, n)
    se = _jackknife_se(_loo_damage(t, damage))
    q = t_quantile(0.5 + level / 2, n - 1)
    return Estimate(point, max(0.0, point - q * se), point + q * se, se, n)


# --------------------------------------------------------------------------- the test


def pseudo_values(table, damage=ratio_of_sums) -> np.ndarray:
    """Per item, what it adds to the damage, averaging to the damage itself. For a ratio of sums
    (a table (n, 2) or a stack (..., n, 2)): the item's damage over the mean exposure,
    ``a_i / mean(b)``; each depends on its own item only and rises with it, so no bound built
    on them falls when an item gets worse. (The exposures' own spread is left out: where an
    item's damage grows with its exposure, as lost retrievals with the retrievals to lose, that
    overstates the spread, erring toward UNDECIDED.) For any other damage statistic: the
    jackknife pseudo-values ``n D - (n - 1) D_(-i)``."""
    t = np.asarray(table, dtype=np.float64)
    n = t.shape[-2]
    if damage is ratio_of_sums:
        mean_b = t[..., 1].mean(-1, keepdims=True)
        return np.where(mean_b > 0, t[..., 0] / np.where(mean_b > 0, mean_b, 1.0), 0.0)
    whole = float(damage(t))
    return n * whole - (n - 1) * _loo_damage(t, damage)


def el_upper(z, err: float) -> np.ndarray:
    """The empirical-likelihood upper bound of the mean of ``z`` (..., n) at one-sided error
    ``err``: the largest sum p . z over item weights p (summing to 1) whose log-likelihood ratio
    sum(log(n p_i)) is at least -q / 2, q the squared Student t quantile (n - 1 degrees of
    freedom). The weights solve p_i proportional to 1 / (v - z_i) for one v above max z (the
    Lagrange condition), found by bisection on log(v - max z). Vectorised over leading axes.
    Every weight is >= 0 and the set of weights does not depend on z, so the bound never falls
    when an item rises."""
    z = np.asarray(z, dtype=np.float64)
    n = z.shape[-1]
    target = -t_quantile(1.0 - err, n - 1) ** 2 / 2
    top = z.max(-1, keepdims=True)
    spread = top - z.min(-1, keepdims=True)
    scale = np.where(spread > 0, spread, 1.0)
    lo, hi = np.log(scale * 1e-12), np.log(scale * 1e12)

    def weights(log_gap):
        w = 1.0 / (top + np.exp(log_gap) - z)
        return w / w.sum(-1, keepdims=True)

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for _ in range(42):
            mid = (lo + hi) / 2
            feasible = np.log(n * weights(mid)).sum(-1, keepdims=True) >= target
            hi, lo = np.where(feasible, mid, hi), np.where(feasible, lo, mid)
        bound = (weights(hi) * z).sum(-1)
    return np.where(spread[..., 0] > 0, bound, z.mean(-1))


def tail_bounds(z, err_lower: float, err_upper: float, unseen=0.0):
    """(lower, upper) bounds of the mean of ``z`` (..., n): the empirical-likelihood bounds
    with a share ``_allowance(n, err)`` of the weight moved to the best (lower) or worst (upper)
    item seen. A sample can under-represent a problem confined to a few items; the bound
    assumes that up to that share of the items could be as bad as the worst one seen (or, on
    the FAIL side, as good as the best); ``unseen`` is added to that worst item (for counted
    damage, what a count of 0 can hide on one item). Both bounds are convex combinations of
    non-negative weights on the items, so neither falls when an item rises. An error of 0 gives
    an infinite bound (that side decides nothing)."""
    z = np.asarray(z, dtype=np.float64)
    n = z.shape[-1]
    shape = z.shape[:-1]
    lower = upper = None
    if err_lower > 0:
        share = _allowance(n, err_lower)
        lower = (1 - share) * -el_upper(-z, err_lower) + share * z.min(-1)
    if err_upper > 0:
        share = _allowance(n, err_upper)
        upper = (1 - share) * el_upper(z, err_upper) + share * (z.max(-1) + unseen)
    lower = np.full(shape, -np.inf) if lower is None else lower
    upper = np.full(shape, np.inf) if upper is None else upper
    return lower, upper


def _allowance(n: int, err: float) -> float:
    """The share of the weight a bound at one-sided error ``err`` moves to the worst (or best)
    item: 1 - (2 err)^(1/n), the share of items a problem could occupy and still go unseen with
    probability 2 err (at 2.5 %: could_miss(n)). It grows as the error shrinks, so a bound read
    at a smaller error (a later look, a family of candidates) allows more for what it missed."""
    return 1.0 - (2.0 * err) ** (1.0 / n)


def poisson_upper(events, err: float):
    """The upper bound on a Poisson mean with ``events`` observed, at one-sided error ``err``
    (Wilson-Hilferty's cube-root approximation of the chi-square quantile, within 1 % from 0
    events)."""
    k1 = np.asarray(events, dtype=np.float64) + 1.0
    z = NormalDist().inv_cdf(1.0 - err)
    return k1 * (1.0 - 1.0 / (9.0 * k1) + z / (3.0 * np.sqrt(k1))) ** 3


def _no_negative_damage(table) -> np.ndarray:
    """A copy with column 0 at least 0: damage is >= 0 by definition, and a KLD a rounding
    error below 0 (identical logits summed in another order) must not count as a control
    better than none, nor, times the margin, as evidence against the candidate."""
    t = np.array(table, dtype=np.float64)
    if t.ndim >= 2 and t.shape[-1] >= 1:
        t[..., 0] = np.maximum(t[..., 0], 0.0)
    return t


@dataclass(frozen=True)
class MarginTest:
    """The test of ``Delta = D_candidate - margin x D_control`` for one table pair (or a stack)."""

    delta: np.ndarray
    lower: np.ndarray      # lower bound of Delta (FAIL when above 0)
    upper: np.ndarray      # upper bound of Delta (PASS when below 0, with enough items)
    verdict: np.ndarray    # "PASS", "FAIL", "UNDECIDED" per stack entry


def _poisson_guard(d_cand, ctrl, margin: float, err_fail: float):
    """For an axis whose damage counts whole units, FAIL's guard: the candidate's damage must
    exceed the margin times the control's Poisson upper bound. A paired bound cannot see the
    count noise of a control that shows 0 on most items; this keeps such a control from making
    a FAIL of a candidate at the margin."""
    if err_fail <= 0:
        return np.zeros(ctrl.shape[:-2], dtype=bool)
    exposure = ctrl[..., 1].sum(-1)
    rate_hi = poisson_upper(ctrl[..., 0].sum(-1), err_fail) / np.where(exposure > 0, exposure, 1.0)
    return d_cand > margin * rate_hi


def _unseen_units(cand, err_pass: float):
    """For counted damage: the units a count of 0 can hide on one item at the PASS error (3.7
    at 2.5 %), on the scale of the pseudo-values (per mean exposure)."""
    if err_pass <= 0:
        return 0.0
    mean_b = cand[..., 1].mean(-1)
    return float(poisson_upper(0, err_pass)) / np.where(mean_b > 0, mean_b, 1.0)


def margin_test(candidate, control, margin: float, err_pass: float, err_fail: float, damage=ratio_of_sums,
                exact_zero: bool = False, counts: bool = False,
                min_pass_items: int = MIN_ITEMS_FOR_PASS) -> MarginTest:
    """The declared test of one axis at one margin, on paired tables (n, 2) or stacks
    (..., n, 2) for a ratio of sums. ``err_pass`` / ``err_fail``: each side's one-sided error.
    PASS needs the upper bound of Delta below 0 and at least ``min_pass_items`` items; FAIL the
    lower bound above 0 (and, where the damage ``counts`` whole units, the Poisson guard). A
    candidate without damage on any item where the axis's zero is ``exact_zero`` (bit-identical
    logits) PASSes with enough items: it is no worse than any control."""
    cand, ctrl = _no_negative_damage(candidate), _no_negative_damage(control)
    n = cand.shape[-2]
    d_cand = np.asarray(damage(cand), dtype=np.float64)
    d_ctrl = np.asarray(damage(ctrl), dtype=np.float64)
    delta = d_cand - margin * d_ctrl
    if n < MIN_ITEMS:
        nan = np.full(delta.shape, np.nan)
        return MarginTest(delta, nan, nan, np.full(delta.shape, UNDECIDED, dtype=object))
    p_ctrl = pseudo_values(ctrl, damage)
    z = pseudo_values(cand, damage) - margin * p_ctrl
    lower, upper = tail_bounds(z, err_fail, err_pass, _unseen_units(cand, err_pass) if counts else 0.0)
    passes = (upper < 0) | ((d_cand <= 0) & exact_zero)
    if n < min_pass_items:
        passes = np.zeros(delta.shape, dtype=bool)
    fails = lower > 0
    if counts:
        fails = fails & _poisson_guard(d_cand, ctrl, margin, err_fail)
    verdict = np.where(fails, FAIL, np.where(passes, PASS, UNDECIDED)).astype(object)
    return MarginTest(delta, lower, upper, verdict)


def could_miss(n: int, seen: float = RARE_SEEN) -> float:
    """The share of items below which a problem confined to them goes unseen in a sample of n
    with probability above 1 - ``seen``: 1 - (1 - seen)^(1/n) (1 for no items)."""
    if n <= 0:
        return 1.0
    return 1.0 - (1.0 - seen) ** (1.0 / n)


def inverted_interval(candidate, control, err_pass: float, err_fail: float, damage=ratio_of_sums,
                      counts: bool = False):
    """The multiples m that the test at m rejects on neither side, [lo, hi] (hi None where no
    multiple is rejected above: a control without damage), by grid refinement on log m. Both bounds
    of Delta fall as m rises (the control's pseudo-values are >= 0), so the set is an interval
    and its ends agree with the decision at any margin (the minimum item count aside)."""
    cand, ctrl = _no_negative_damage(candidate), _no_negative_damage(control)
    d_cand, d_ctrl = float(damage(cand)), float(damage(ctrl))
    p_cand, p_ctrl = pseudo_values(cand, damage), pseudo_values(ctrl, damage)

    rate_hi = None
    if counts and err_fail > 0:
        exposure = float(ctrl[..., 1].sum())
        rate_hi = float(poisson_upper(float(ctrl[..., 0].sum()), err_fail)) / (exposure if exposure > 0 else 1.0)
    unseen = _unseen_units(cand, err_pass) if counts else 0.0

    def fails(ms: np.ndarray) -> np.ndarray:
        lo, _ = tail_bounds(p_cand[None, :] - ms[:, None] * p_ctrl[None, :], err_fail, 0.0)
        out = lo > 0
        return out & (d_cand > ms * rate_hi) if rate_hi is not None else out

    def passes(ms: np.ndarray) -> np.ndarray:
        _, hi = tail_bounds(p_cand[None, :] - ms[:, None] * p_ctrl[None, :], 0.0, err_pass, unseen)
        return hi < 0

    if d_ctrl <= 0:
        # No damage on the control: Delta does not depend on m; every multiple or none is rejected.
        return (math.inf if bool(fails(np.ones(1))[0]) else 0.0), None
    point = d_cand / d_ctrl
    start = point if point > 0 else 1.0

    def edge(rejected, inside: float, outside: float) -> float:
        # A grid of 33 multiples between the two, four times over the bracketing pair: the end
        # to within 1e-5 relative, with 4 vectorised evaluations instead of a scalar bisection.
        a, b = math.log(inside), math.log(outside)
        for _ in range(4):
            grid = np.linspace(a, b, 33)
            hit = rejected(np.exp(grid))
            first = int(np.argmax(hit)) if hit.any() else len(grid) - 1
            a, b = grid[max(first - 1, 0)], grid[first]
        return math.exp(a)

    lo = 0.0
    if bool(fails(np.array([start * 1e-9]))[0]):
        lo = start if bool(fails(np.array([start]))[0]) else edge(fails, start, start * 1e-9)
    hi: Optional[float] = None
    if bool(passes(np.array([start * 1e9]))[0]):
        hi = start if bool(passes(np.array([start]))[0]) else edge(passes, start, start * 1e9)
    return lo, hi


def multiple_band(multiple: Optional[float]) -> Optional[str]:
    if multiple is None:
        return None
    for name, upper in MULTIPLE_BANDS:
        if multiple <= upper:
            return name
    return "FAIL"


def score_of_multiple(multiple: Optional[float]) -> Optional[float]:
    """100 at or below the control's damage, the band floors (90, 80, 60) at 1.5x, 3x and 10x,
    linear in log M between, 0 from 100x: decreasing, so more damage never scores higher."""
    if multiple is None or not math.isfinite(multiple):
        return None if multiple is None else 0.0
    if multiple <= SCORE_KNOTS[0][0]:
        return SCORE_KNOTS[0][1]
    for (m0, s0), (m1, s1) in zip(SCORE_KNOTS, SCORE_KNOTS[1:]):
        if multiple <= m1:
            frac = (math.log(multiple) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return s0 + frac * (s1 - s0)
    return 0.0


def decide(lo: Optional[float], hi: Optional[float], margin: float) -> str:
    if lo is None or hi is None:
        return UNDECIDED
    if hi <= margin:
        return PASS
    if lo > margin:
        return FAIL
    return UNDECIDED


def items_to_decide(n: int, distance: float, half_width: float) -> Optional[int]:
    """Items in all that would likely decide, if the estimate stayed where it is: the interval's
    half width shrinks as 1/sqrt(n), so it clears the margin at n x (half width / distance)^2.
    None when the estimate sits on the margin (no number of items decides it)."""
    if distance <= 0 or half_width <= 0:
        return None
    return int(math.ceil(n * (half_width / distance) ** 2))


# --------------------------------------------------------------------------- one axis


@dataclass
class AxisVerdict:
    """What the gate reads for one axis of one candidate."""

    axis: str
    label: str
    verdict: str                  # PASS, FAIL or UNDECIDED
    basis: str                    # "multiple", "absolute" or "broken control"
    margin: float                 # on M for "multiple", on D for "absolute"
    n_items: int
    damage: Optional[float] = None
    control_damage: Optional[float] = None
    multiple: Optional[float] = None
    multiple_ci95: Optional[List[Optional[float]]] = None  # [lo, None]: open above, below the PASS minimum
    damage_ci95: Optional[List[float]] = None
    band: Optional[str] = None
    score: Optional[float] = None
    score_ci95: Optional[List[Optional[float]]] = None
    items_needed: Optional[int] = None
    reason: str = ""
    level: float = LEVEL          # the interval's level: 1 - (PASS error + FAIL error)
    pass_error: Optional[float] = None   # one-sided error of the PASS side (upper end)
    fail_error: Optional[float] = None   # one-sided error of the FAIL side (lower end)
    min_pass_items: Optional[int] = None  # a PASS needs at least this many items
    could_miss: Optional[float] = None   # a problem on fewer than this share of items could go unseen
    detail: Optional[dict] = None        # an axis's own figures of its verdict (the depth axis's buckets)

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def headline(self) -> str:
        """E.g. "next-token KLD 2.5x the control's [2.4, 2.6] PASS"."""
        if self.basis == "multiple" and self.multiple is not None:
            # The lower end is always a number (clamped at 0); only the upper end may be open.
            ci = (f" [{_num(cast(float, self.multiple_ci95[0]))}, {_end(self.multiple_ci95[1])}]"
                  if self.multiple_ci95 else "")
            return f"{self.label} {_num(self.multiple)}x the control's{ci} {self.verdict}"
        if self.basis == "multiple" and self.damage is not None and self.control_damage == 0:
            return f"{self.label} {_num(self.damage)}, the control's 0 {self.verdict}"
        if self.basis == "absolute" and self.damage is not None:
            ci = f" [{_num(self.damage_ci95[0])}, {_num(self.damage_ci95[1])}]" if self.damage_ci95 else ""
            return f"{self.label} {_num(self.damage)}{ci} (tolerance {_num(self.margin)}) {self.verdict}"
        return f"{self.label}: {self.verdict} ({self.reason})"


def _end(x: Optional[float]) -> str:
    """An interval's upper end; None is an open end."""
    return "inf" if x is None else _num(x)


def miss_text(share: Optional[float], noun: str = "items") -> str:
    """What a PASS's sample could miss: "a problem confined to fewer than 6.3 % of items could go unseen"."""
    if share is None:
        return ""
    return (f"a problem confined to fewer than {100 * share:.2g} % of {noun} could go unseen "
            f"(with probability over {100 * (1 - RARE_SEEN):.0f} %)")


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return "inf"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.2g}"


def member(axis, name: str, default):
    value = getattr(axis, name, None)
    return default if value is None else value


def paired_tables(axis, candidate_items: Sequence[dict], control_items: Sequence[dict]):
    """(ids, candidate table, control table) over the items both have, in the candidate's order."""
    cand_ids, cand = axis.damage_table(candidate_items)
    ctrl_ids, ctrl = axis.damage_table(control_items)
    row = {i: k for k, i in enumerate(ctrl_ids)}
    shared = [(k, row[i]) for k, i in enumerate(cand_ids) if i in row]
    ids = [cand_ids[a] for a, _ in shared]
    width = cand.shape[1] if cand.ndim == 2 else 2
    if not shared:
        return ids, np.zeros((0, width)), np.zeros((0, width))
    return ids, cand[[a for a, _ in shared]], ctrl[[b for _, b in shared]]


def control_problem(axis, control_damage: Optional[float], control_score: Optional[float]) -> Optional[str]:
    """Why the control cannot serve as the yardstick on this axis, or None."""
    label = member(axis, "DAMAGE_LABEL", axis.NAME)
    if control_score is not None and control_score <= 0:
        return f"the control scores 0 on {axis.NAME}: the yardstick is broken (a rounding-only change cannot do that)"
    limit = getattr(axis, "CONTROL_MAX_DAMAGE", None)
    if limit is not None and control_damage is not None and control_damage > limit:
        return (f"the control's {label} on {axis.NAME} is {_num(control_damage)}, above the {_num(limit)} a "
                "rounding-only change can cause: the yardstick is broken (check the control config and the build)")
    return None


def axis_verdict(axis, candidate_items: Sequence[dict], control_items: Optional[Sequence[dict]],
                 control_score: Optional[float] = None, level: float = LEVEL,
                 same_computation: bool = False, errors: Optional[tuple] = None, n_axes: int = 1,
                 min_pass_items: int = MIN_ITEMS_FOR_PASS) -> AxisVerdict:
    """The verdict of one axis. ``errors``: (PASS error, FAIL error), each one-sided, as a
    sequential design's look spends them (FAIL already per axis); without it both sides get
    (1 - level) / 2, the FAIL side divided by ``n_axes`` (the axes the candidate's verdict reads:
    a candidate FAILs when any does, so their FAIL errors add up)."""
    if errors is None:
        side = (1.0 - level) / 2
        errors = (side, side / max(1, n_axes))
    err_pass, err_fail = float(errors[0]), float(errors[1])
    # An axis whose verdict is several tests (the depth axis: one per depth bucket) decides it
    # itself, from these errors (scoring/depth.py says how it spends them).
    own = getattr(axis, "bucket_verdict", None)
    if callable(own):
        verdict = own(candidate_items, control_items, control_score, err_pass, err_fail, same_computation,
                      min_pass_items)
    else:
        verdict = _axis_verdict(axis, candidate_items, control_items, control_score, err_pass, err_fail,
                                same_computation, min_pass_items)
    verdict.level = 1.0 - err_pass - err_fail
    verdict.pass_error, verdict.fail_error = err_pass, err_fail
    verdict.min_pass_items = 0 if same_computation else min_pass_items
    if verdict.verdict == PASS:
        verdict.could_miss = 0.0 if same_computation else could_miss(verdict.n_items)
    return verdict


def _as_ratio_of_sums(damage):
    """``ratio_of_sums`` itself where the axis keeps the base class's damage (a bound method that
    calls it), so the per-item rates (monotone, exact) are used instead of jackknife values."""
    func = getattr(damage, "__func__", damage)
    if func is ratio_of_sums or (getattr(func, "__qualname__", "") == "Axis.damage"
                                 and getattr(func, "__module__", "").endswith("axes.base")):
        return ratio_of_sums
    return damage


def _axis_verdict(axis, candidate_items: Sequence[dict], control_items: Optional[Sequence[dict]],
                  control_score: Optional[float], err_pass: float, err_fail: float, same_computation: bool,
                  min_pass_items: int) -> AxisVerdict:
    """``same_computation``: the candidate is the reference's own config (a self-reference), so a
    damage of 0 is exact and nothing can hide in items not measured."""
    name = axis.NAME
    label = member(axis, "DAMAGE_LABEL", name)
    margin = float(member(axis, "MARGIN", DEFAULT_MARGIN))
    tolerance = float(member(axis, "ABSOLUTE_TOLERANCE", DEFAULT_ABSOLUTE_TOLERANCE))
    damage = _as_ratio_of_sums(axis.damage)
    exact_zero = same_computation or bool(member(axis, "ZERO_DAMAGE_EXACT", False))
    if control_items is None:
        _ids, cand = axis.damage_table(candidate_items)
        ctrl = None
    else:
        _ids, cand, ctrl = paired_tables(axis, candidate_items, control_items)
    n = int(cand.shape[0])
    if n == 0:
        return AxisVerdict(name, label, UNDECIDED, "multiple", margin, 0, reason="no item measured on both sides")
    if damage is ratio_of_sums:
        cand = _no_negative_damage(cand)
        ctrl = None if ctrl is None else _no_negative_damage(ctrl)
    d_cand = float(damage(cand))
    if ctrl is None:
        # No control at all: the declared fallback, not a switch chosen from the data.
        return _absolute_verdict(name, label, tolerance, margin, cand, damage, None, 1.0 - 2 * err_pass,
                                 "no control was measured", exact_zero)
    d_ctrl = float(damage(ctrl))
    problem = control_problem(axis, d_ctrl, control_score)
    if problem:
        return AxisVerdict(name, label, UNDECIDED, "broken control", margin, n, damage=d_cand, control_damage=d_ctrl,
                           reason=problem)
    return _multiple_verdict(axis, name, label, margin, cand, ctrl, damage, d_cand, d_ctrl, err_pass, err_fail,
                             exact_zero, 0 if same_computation else min_pass_items)


def _multiple_verdict(axis, name, label, margin, cand, ctrl, damage, d_cand, d_ctrl, err_pass, err_fail, exact_zero,
                      min_pass_items) -> AxisVerdict:
    n = cand.shape[0]
    counts = bool(member(axis, "DAMAGE_COUNTS", False))
    test = margin_test(cand, ctrl, margin, err_pass, err_fail, damage, exact_zero, counts, min_pass_items)
    verdict = str(test.verdict)
    if n < MIN_ITEMS:
        return AxisVerdict(name, label, UNDECIDED, "multiple", margin, n, damage=d_cand, control_damage=d_ctrl,
                           multiple=d_cand / d_ctrl if d_ctrl > 0 else None,
                           reason=f"fewer than {MIN_ITEMS} items: no interval, no decision")
    if d_cand <= 0 and exact_zero:
        lo, hi = 0.0, 0.0
    else:
        lo, hi = inverted_interval(cand, ctrl, err_pass, err_fail, damage, counts)
    # Damage is never negative by definition (a negative KLD mean is storage rounding): M is
    # at least 0, and its interval always holds it.
    d_cand = max(0.0, d_cand)
    lo = max(0.0, lo)
    point = d_cand / d_ctrl if d_ctrl > 0 else None
    if point is not None:
        # The bisection's ends are within 3e-7 of the exact ones: the interval always holds its point.
        lo = min(lo, point)
        hi = None if hi is None else max(hi, point)
    reasons = []
    if d_ctrl <= 0 and verdict != PASS:  # an exact zero (the same computation) is a PASS without a multiple
        reasons.append(f"the control has no {label} on these {n} items: no multiple, and no PASS, since nothing "
                       "shows the candidate within the margin of it")
    if verdict == UNDECIDED and n < min_pass_items and hi is not None and hi <= margin:
        reasons.append(f"a PASS needs at least {min_pass_items} items ({n} measured): fewer can miss a problem "
                       f"confined to {100 * RARE_SHARE:.0f} % of them")
    needed = None
    if verdict == UNDECIDED and n < min_pass_items and hi is not None and hi <= margin:
        needed = min_pass_items
    elif verdict == UNDECIDED and point is not None and point > 0 and hi is not None and lo > 0:
        # The interval's half width on log M shrinks about as 1/sqrt(n).
        needed = items_to_decide(n, abs(math.log(point) - math.log(margin)), (math.log(hi) - math.log(lo)) / 2)
        if needed is not None and point < margin:
            needed = max(needed, min_pass_items)
    # Below the PASS minimum the upper end is no certified bound (a sample that small can miss
    # what makes the damage large): the interval is shown open above, [lo, inf).
    shown_hi = hi if n >= min_pass_items else None
    ci = [lo, shown_hi] if point is not None else None
    # No multiple where the control has no damage: the score says what the candidate's own
    # damage says (none: 100, some: 0); it describes, the verdict decides.
    score = score_of_multiple(point) if point is not None else (0.0 if d_cand > 0 else 100.0)
    return AxisVerdict(name, label, verdict, "multiple", margin, n, damage=d_cand, control_damage=d_ctrl,
                       multiple=point, multiple_ci95=ci, band=multiple_band(point) if point is not None else None,
                       score=score,
                       score_ci95=[score_of_multiple(shown_hi if shown_hi is not None else math.inf), score_of_multiple(lo)]
                       if ci else None,
                       items_needed=needed, reason="; ".join(reasons))


def _absolute_verdict(name, label, tolerance, margin, cand, damage, d_ctrl, level, why, exact_zero) -> AxisVerdict:
    n = cand.shape[0]
    est = damage_interval(cand, damage, level, exact_zero)
    verdict = decide(est.lo, est.hi, tolerance)
    needed = None
    if verdict == UNDECIDED and est.hi is not None:
        half = (est.hi - est.point) if est.point > 0 else est.hi
        needed = items_to_decide(n, abs(est.point - tolerance), half)
    # The score reads the damage as a multiple of a nominal control whose damage puts the
    # tolerance at the margin: the same scale as a candidate with a usable control.
    nominal = tolerance / margin
    ci = [est.lo, est.hi] if est.lo is not None and est.hi is not None else None  # both or neither
    return AxisVerdict(name, label, verdict, "absolute", tolerance, n, damage=max(0.0, est.point), control_damage=d_ctrl,
                       damage_ci95=ci, band=multiple_band(est.point / nominal), score=score_of_multiple(est.point / nominal),
                       score_ci95=[score_of_multiple(ci[1] / nominal), score_of_multiple(ci[0] / nominal)] if ci else None,
                       items_needed=needed, reason=why + f"; held to the absolute tolerance {_num(tolerance)}")


# --------------------------------------------------------------------------- the run


@dataclass
class RunVerdict:
    verdict: str
    axes: Dict[str, AxisVerdict] = field(default_factory=dict)
    control_problems: List[str] = field(default_factory=list)
    score: Optional[float] = None

    def headline(self) -> str:
        parts = "; ".join(v.headline() for v in self.axes.values())
        return f"{self.verdict}: {parts}" if parts else self.verdict

    def as_json(self) -> dict:
        return {"verdict": self.verdict, "headline": self.headline(), "score": self.score,
                "control_problems": list(self.control_problems),
                "axes": {n: v.as_json() for n, v in self.axes.items()}}


def run_verdict(axes: Dict[str, AxisVerdict]) -> RunVerdict:
    """FAIL when any axis FAILs; else UNDECIDED when any axis is undecided (a broken control
    included); PASS only when every axis PASSes. The run's score is the harmonic mean of the axis
    scores (None when any is missing)."""
    verdicts = [v.verdict for v in axes.values()]
    if not verdicts:
        overall = UNDECIDED
    elif FAIL in verdicts:
        overall = FAIL
    elif UNDECIDED in verdicts:
        overall = UNDECIDED
    else:
        overall = PASS
    scores = [v.score for v in axes.values()]
    score = None
    known_scores = [s for s in scores if s is not None]
    if scores and len(known_scores) == len(scores):
        score = 0.0 if any(s <= 0 for s in known_scores) else len(known_scores) / sum(1.0 / s for s in known_scores)
    problems = [f"{v.axis}: {v.reason}" for v in axes.values() if v.basis == "broken control"]
    return RunVerdict(overall, dict(axes), problems, score)


RERUN_NOTE = ("a run over more items is a new test with its own error: its guarantee is per run, and "
              "rerunning until a PASS comes raises the chance of a wrong PASS; pin --refract-seed in CI")


def undecided_advice(axis: AxisVerdict) -> str:
    """What an UNDECIDED axis asks the user to do."""
    if axis.basis == "broken control":
        return f"{axis.axis}: fix the control ({axis.reason})"
    if axis.items_needed is None:
        return (f"{axis.axis}: the estimate sits on the margin; more items narrow the interval but may not decide it"
                f" ({RERUN_NOTE})")
    if axis.items_needed > MAX_PROJECTION * max(axis.n_items, 1):
        return f"{axis.axis}: would need more than {MAX_PROJECTION}x the {axis.n_items} items measured"
    return (f"{axis.axis}: about {axis.items_needed} items in all would likely decide it "
            f"({axis.n_items} measured; {RERUN_NOTE})")
