"""Uncertainty and calibration of the axis scores. Pure functions: numpy only, no llama.cpp,
no pytest; every number here is unit-tested against hand-computed cases.

Two questions a verdict on a few dozen items must answer:

1. How sure is a score? Each axis score is a statistic of per-item values (prompts, chunks,
   cells, pairs). A percentile bootstrap over those items, with a seeded numpy Generator,
   gives a repeatable 95 % interval. The composite's interval comes from the same replicates:
   in each replicate every axis is resampled (its own items, its own stream) and the
   replicate's axis scores are combined by the harmonic mean.

2. Is the drift cache damage or the model's own sensitivity to rounding? A control config
   (a rounding-only change of the reference, e.g. bf16 for an f16 reference) is measured on
   the same items. Per axis, the candidate's *retention* is its score over the control's,
   R = S_candidate / S_control, capped at 1 (a candidate cannot do better than "as close as
   the control"). Candidate and control are resampled *paired*, by item (the same prompts,
   chunks, cells and pairs in each replicate), so the item-to-item variation they share
   cancels. The calibrated score is 100 x the upper end of R's 95 % interval: the most
   favourable retention the data support. It is 100 when the interval covers 1 (the
   candidate is statistically indistinguishable from the control), and otherwise falls by
   exactly the damage beyond the control that the data establish.
"""

from __future__ import annotations

import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95
# Fewer items than this give no interval: one item's resamples are all the same item, and a
# zero-width interval would claim a certainty a single measurement cannot carry.
MIN_ITEMS = 2
# Score points of excess damage too small to matter: the report's resolution (scores print
# with two decimals). A difference that is real but below this (e.g. a KLD 1e-6 nats above
# the control's on every chunk) does not make a candidate "beyond the control".
NEGLIGIBLE_POINTS = 0.01


# --------------------------------------------------------------------------- per-axis streams


def stream_of(axis) -> int:
    """The axis's own random stream: its STREAM where it names one (the built-ins: 1-4, the
    streams they always had), else its name hashed, so each axis's draws are the same whichever
    other axes ran."""
    stream = getattr(axis, "STREAM", None)
    if stream is not None:
        return int(stream)
    return zlib.crc32(axis.NAME.encode("utf-8"))


# --------------------------------------------------------------------------- bootstrap


def resample_indices(n_items: int, seed: int, stream: int, n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """(n_resamples, n_items) item indices drawn with replacement. The stream keeps each
    axis's draws independent of which other axes ran; the same seed gives the same draws."""
    rng = np.random.default_rng([int(seed), int(stream)])
    return rng.integers(0, n_items, size=(n_resamples, n_items))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> Tuple[float, float]:
    """Equal-tailed percentile interval (linear interpolation between order statistics)."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


def replicates(axis, table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Axis score of each resample (``axis.statistic`` takes a stack of tables at once)."""
    return axis.statistic(table[indices])


def retention(candidate: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Candidate score over control score, capped at 1. A control at 0 leaves nothing the
    candidate could lose beyond it: retention 1."""
    c = np.asarray(candidate, dtype=np.float64)
    k = np.asarray(control, dtype=np.float64)
    safe = np.where(k > 0, k, 1.0)
    with np.errstate(over="ignore"):  # a tiny control score: the ratio is capped at 1 anyway
        return np.where(k > 0, np.minimum(1.0, c / safe), 1.0)


def harmonic_mean_rows(columns: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise harmonic mean of equally long arrays (0 where any is 0)."""
    stack = np.vstack([np.asarray(c, dtype=np.float64) for c in columns])
    zero = (stack <= 0).any(axis=0)
    safe = np.where(stack > 0, stack, 1.0)
    return np.where(zero, 0.0, stack.shape[0] / (1.0 / safe).sum(axis=0))


def _interval(samples: np.ndarray, n_items: int, point: float) -> Optional[List[float]]:
    """The percentile interval, widened to reach the point estimate where a very skewed
    statistic puts the estimate outside it (an interval must not exclude its own estimate)."""
    if n_items < MIN_ITEMS:
        return None
    lo, hi = percentile_interval(samples)
    return [min(lo, point), max(hi, point)]


def axis_uncertainty(axis, items: Sequence[dict], seed: int) -> dict:
    """Point score, 95 % interval and the bootstrap replicates of one axis's items. ``axis`` is
    an axis object: its ``item_table`` gives the numbers per item, its ``statistic`` the score."""
    ids, table = axis.item_table(items)
    if not ids:
        return {"score": None, "ci95": None, "n_items": 0, "replicates": None}
    idx = resample_indices(len(ids), seed, stream_of(axis))
    reps = replicates(axis, table, idx)
    point = float(axis.statistic(table))
    return {"score": point, "ci95": _interval(reps, len(ids), point), "n_items": len(ids), "replicates": reps}


def calibrate_axis(axis, candidate_items: Sequence[dict], control_items: Sequence[dict], seed: int) -> dict:
    """The candidate's retention of the control's score on one axis, paired by item.

    Returns ``calibrated_score`` (100 x the upper end of the retention interval), the
    retention estimate and its interval, whether the candidate is indistinguishable from the
    control (the interval of the paired difference covers 0), the paired difference
    (control minus candidate, in score points) with its interval, and the replicates."""
    cand_ids, cand_table = axis.item_table(candidate_items)
    ctrl_ids, ctrl_table = axis.item_table(control_items)
    ctrl_row = {i: k for k, i in enumerate(ctrl_ids)}
    shared = [(k, ctrl_row[i]) for k, i in enumerate(cand_ids) if i in ctrl_row]
    if not shared:
        return {"calibrated_score": None, "retention": None, "retention_ci95": None, "indistinguishable": None,
                "excess_damage": None, "excess_damage_ci95": None, "n_paired": 0, "replicates": None}
    cand_table = cand_table[[a for a, _ in shared]]
    ctrl_table = ctrl_table[[b for _, b in shared]]
    n = len(shared)
    idx = resample_indices(n, seed, stream_of(axis))
    cand_reps, ctrl_reps = replicates(axis, cand_table, idx), replicates(axis, ctrl_table, idx)
    cand_score, ctrl_score = float(axis.statistic(cand_table)), float(axis.statistic(ctrl_table))
    ret_reps = retention(cand_reps, ctrl_reps)
    point = float(retention(cand_score, ctrl_score))
    if n >= MIN_ITEMS:
        lo, hi = _interval(ret_reps, n, point)
        diff_lo, diff_hi = _interval(ctrl_reps - cand_reps, n, ctrl_score - cand_score)
        # The difference's interval reaches 0 (or below), up to a negligible margin.
        indistinguishable = diff_lo <= NEGLIGIBLE_POINTS
        ret_ci, diff_ci = [lo, hi], [diff_lo, diff_hi]
    else:
        # One item cannot tell noise from damage: no interval, and the estimate stands.
        hi, ret_ci, diff_ci, indistinguishable = point, None, None, None
    # The difference's interval covering 0 means the data cannot tell the candidate from the
    # control: top of the scale by definition (the retention interval's upper end is then 1
    # up to where the two percentiles interpolate).
    return {
        "calibrated_score": 100.0 if indistinguishable else 100.0 * hi,
        "retention": point,
        "retention_ci95": ret_ci,
        "indistinguishable": indistinguishable,
        "excess_damage": ctrl_score - cand_score,
        "excess_damage_ci95": diff_ci,
        "n_paired": n,
        "replicates": 100.0 * ret_reps,
    }


def composite_interval(axis_replicates: Sequence[Optional[np.ndarray]], n_items: Sequence[int],
                       point: Optional[float] = None) -> Optional[List[float]]:
    """95 % interval of the harmonic-mean composite from each axis's replicates (replicate k
    of every axis combined); None when any axis has no interval. Given the point estimate,
    the interval is widened to reach it (see _interval)."""
    if not axis_replicates or any(r is None for r in axis_replicates) or any(n < MIN_ITEMS for n in n_items):
        return None
    lo, hi = percentile_interval(harmonic_mean_rows(axis_replicates))
    if point is not None:
        lo, hi = min(lo, point), max(hi, point)
    return [lo, hi]


