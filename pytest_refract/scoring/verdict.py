"""The verdict: damage as a multiple of the control's, with a paired interval, and a three-way
decision (PASS / FAIL / UNDECIDED) against a margin. Pure functions: numpy only, no llama.cpp,
no pytest, no axis imports (an axis is any object with the members read here, see axes/base.py).

Per axis, the *damage* D is a number where 0 means "identical to the reference". Every built-in
axis writes it as a ratio of sums over its items, ``D = sum(a_i) / sum(b_i)`` (a table with the
two columns per item): KLD the mean KLD over all scored positions, trajectory the share of
reference tokens whose top-1 the candidate changes under teacher forcing, R-NIAH the share of
the reference's retrievals lost, PLAD the mean excess drift. An axis may define ``damage`` as
any other vectorised statistic of its table.

The headline is the multiple ``M = D_candidate / D_control`` on the same items. Its 95 %
interval is a jackknife-t interval on log M: the n leave-one-out estimates (one item left out of
candidate *and* control at once, so what the two share cancels) give the standard error, and
Student's t with n - 1 degrees of freedom the width; the jackknife variance is scaled by
(n + SMALL_SAMPLE_WIDENING) / n. Seeded simulations (tests/test_verdict.py) put its coverage at
0.953-0.969 from 8 to 128 items, where a percentile or BCa bootstrap of the same log ratio covers
0.85-0.86 at 8 items.

PASS when the interval's upper end is at or below the axis's margin, FAIL when its lower end is
above it, UNDECIDED otherwise. Where the control's damage is (near) 0 the multiple is undefined
and the candidate's own damage is held to the axis's absolute tolerance instead, with the same
three-way rule. A control whose damage is beyond what a rounding-only change can cause (or whose
raw score is 0) is a broken yardstick: no verdict, and the run says so.

The point score is a fixed decreasing map of the point estimate M (100 at M <= 1, the band edges
at 1.5x, 3x and 10x), so it sits inside the score interval mapped from M's interval, depends on
the item count only through the ratio estimator's small-sample bias (which lowers it), and is
monotone: a candidate with more damage on every item has a larger M and never scores higher.

Each interval has the level it is asked for: the fixed-sample 95 %, or a sequential design's look
level (scoring/sequential.py), which keeps everything else: margins, bands, the decision rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Dict, List, Optional, Sequence

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
# A multiple needs at least this many items where the control has any damage: a ratio resting on
# one item's damage has a standard error that the jackknife cannot estimate.
MIN_CONTROL_ITEMS_WITH_DAMAGE = 2
# The jackknife variance of a log ratio of skewed sums is a little small at few items: in the
# seeded simulations (tests/test_verdict.py) the plain jackknife-t missed the true multiple in
# 5.5-7 % of runs at 8-32 items for a nominal 5 %. Its variance is scaled by (n + 3) / n, which
# brings the miss rate to 4-5 % from 8 items and vanishes as n grows (1.02 at 144 items).
SMALL_SAMPLE_WIDENING = 3
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
    """The jackknife standard error, widened by sqrt((n + SMALL_SAMPLE_WIDENING) / n)."""
    n = estimates.shape[0]
    return float(math.sqrt((n + SMALL_SAMPLE_WIDENING) / n * (n - 1) / n
                           * float(((estimates - estimates.mean()) ** 2).sum())))


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
    multiple_ci95: Optional[List[float]] = None
    damage_ci95: Optional[List[float]] = None
    band: Optional[str] = None
    score: Optional[float] = None
    score_ci95: Optional[List[float]] = None
    items_needed: Optional[int] = None
    reason: str = ""
    level: float = LEVEL          # the intervals' level (a sequential look's, see sequential.py)

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def headline(self) -> str:
        """E.g. "next-token KLD 2.5x the control's [2.4, 2.6] PASS"."""
        if self.basis == "multiple" and self.multiple is not None:
            ci = f" [{_num(self.multiple_ci95[0])}, {_num(self.multiple_ci95[1])}]" if self.multiple_ci95 else ""
            return f"{self.label} {_num(self.multiple)}x the control's{ci} {self.verdict}"
        if self.basis == "absolute" and self.damage is not None:
            ci = f" [{_num(self.damage_ci95[0])}, {_num(self.damage_ci95[1])}]" if self.damage_ci95 else ""
            return f"{self.label} {_num(self.damage)}{ci} (tolerance {_num(self.margin)}) {self.verdict}"
        return f"{self.label}: {self.verdict} ({self.reason})"


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
                 same_computation: bool = False) -> AxisVerdict:
    verdict = _axis_verdict(axis, candidate_items, control_items, control_score, level, same_computation)
    verdict.level = level
    return verdict


def _axis_verdict(axis, candidate_items: Sequence[dict], control_items: Optional[Sequence[dict]],
                  control_score: Optional[float], level: float, same_computation: bool) -> AxisVerdict:
    """The verdict of one axis: the multiple of the control's damage where the control has
    damage to compare with, else the candidate's damage against the absolute tolerance.
    ``same_computation``: the candidate is the reference's own config (a self-reference), so a
    damage of 0 is exact, not a count of 0 events that could hide some."""
    name = axis.NAME
    label = member(axis, "DAMAGE_LABEL", name)
    margin = float(member(axis, "MARGIN", DEFAULT_MARGIN))
    tolerance = float(member(axis, "ABSOLUTE_TOLERANCE", DEFAULT_ABSOLUTE_TOLERANCE))
    resolution = float(member(axis, "DAMAGE_RESOLUTION", DEFAULT_DAMAGE_RESOLUTION))
    damage = axis.damage
    exact_zero = same_computation or bool(member(axis, "ZERO_DAMAGE_EXACT", False))
    if control_items is None:
        _ids, cand = axis.damage_table(candidate_items)
        ctrl = None
    else:
        _ids, cand, ctrl = paired_tables(axis, candidate_items, control_items)
    n = int(cand.shape[0])
    if n == 0:
        return AxisVerdict(name, label, UNDECIDED, "multiple", margin, 0, reason="no item measured on both sides")
    d_cand = float(damage(cand))
    d_ctrl = float(damage(ctrl)) if ctrl is not None else None
    problem = control_problem(axis, d_ctrl, control_score) if ctrl is not None else None
    if problem:
        return AxisVerdict(name, label, UNDECIDED, "broken control", margin, n, damage=d_cand, control_damage=d_ctrl,
                           reason=problem)
    ctrl_items_damaged = int((np.asarray(damage(ctrl[:, None, :])) > 0).sum()) if ctrl is not None else 0
    if ctrl is not None and d_ctrl > resolution and ctrl_items_damaged >= MIN_CONTROL_ITEMS_WITH_DAMAGE:
        return _multiple_verdict(name, label, margin, cand, ctrl, damage, d_cand, d_ctrl, level, exact_zero)
    why = ("no control was measured" if ctrl is None else
           f"the control's {label} is {_num(d_ctrl)} on {ctrl_items_damaged} of {n} items: the multiple is undefined")
    return _absolute_verdict(name, label, tolerance, margin, cand, damage, d_ctrl, level, why, exact_zero)


def _multiple_verdict(name, label, margin, cand, ctrl, damage, d_cand, d_ctrl, level, exact_zero) -> AxisVerdict:
    n = cand.shape[0]
    est = multiple_interval(cand, ctrl, damage, level)
    lo, hi = est.lo, est.hi
    if d_cand <= 0 and n >= MIN_ITEMS:
        # No damage at all on the candidate: M is 0, and its upper end is the zero-event bound
        # on the candidate's damage over the control's.
        lo, hi = 0.0, damage_interval(cand, damage, level, exact_zero).hi / d_ctrl
    elif lo is None and n >= MIN_ITEMS:
        # No log-scale jackknife (the candidate's damage rests on one item): the conservative
        # ratio of the two sides' own intervals, the candidate's ends over the control's.
        c, k = damage_interval(cand, damage, level), damage_interval(ctrl, damage, level)
        lo = c.lo / k.hi if k.hi else 0.0
        hi = c.hi / k.lo if k.lo else math.inf
    # Damage is never negative by definition (a negative KLD mean is storage rounding): M is
    # at least 0, and its interval always holds it.
    point = max(0.0, est.point)
    if lo is not None:
        lo, hi = min(lo, point), max(hi, point)
    verdict = decide(lo, hi, margin)
    needed = None
    if verdict == UNDECIDED and est.se is not None:
        t = t_quantile(0.5 + level / 2, n - 1)
        needed = items_to_decide(n, abs(math.log(est.point) - math.log(margin)), t * est.se)
    ci = [lo, hi] if lo is not None and math.isfinite(hi) else None
    score = score_of_multiple(point)
    return AxisVerdict(name, label, verdict, "multiple", margin, n, damage=max(0.0, d_cand), control_damage=d_ctrl,
                       multiple=point, multiple_ci95=ci, band=multiple_band(point), score=score,
                       score_ci95=[score_of_multiple(hi), score_of_multiple(lo)] if ci else None,
                       items_needed=needed,
                       reason="" if ci else f"fewer than {MIN_ITEMS} items: no interval, no decision")


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
    ci = [est.lo, est.hi] if est.lo is not None else None
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
    if scores and all(s is not None for s in scores):
        score = 0.0 if any(s <= 0 for s in scores) else len(scores) / sum(1.0 / s for s in scores)
    problems = [f"{v.axis}: {v.reason}" for v in axes.values() if v.basis == "broken control"]
    return RunVerdict(overall, dict(axes), problems, score)


def undecided_advice(axis: AxisVerdict) -> str:
    """What an UNDECIDED axis asks the user to do."""
    if axis.basis == "broken control":
        return f"{axis.axis}: fix the control ({axis.reason})"
    if axis.items_needed is None:
        return (f"{axis.axis}: the estimate sits on the margin; more items narrow the interval but may not decide it")
    if axis.items_needed > MAX_PROJECTION * max(axis.n_items, 1):
        return f"{axis.axis}: would need more than {MAX_PROJECTION}x the {axis.n_items} items measured"
    return (f"{axis.axis}: about {axis.items_needed} items in all would likely decide it "
            f"({axis.n_items} measured; select more items or raise the axis's count)")
