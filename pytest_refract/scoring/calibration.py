"""Uncertainty of the axis scores. Pure functions: numpy only, no llama.cpp, no pytest; every
number here is unit-tested against hand-computed cases.

How sure is a score? Each axis score is a statistic of per-item values (prompts, chunks,
cells, pairs). A percentile bootstrap over those items, with a seeded numpy Generator, gives a
repeatable 95 % interval. The composite's interval comes from the same replicates: in each
replicate every axis is resampled (its own items, its own stream) and the replicate's axis
scores are combined by the harmonic mean.

These intervals belong to the raw, REFRACT-comparable scores, which the report shows as
reference figures. Whether the candidate's damage is within the model's own rounding
sensitivity is the verdict's question (verdict.py), not these intervals'.
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


def composite_interval(axis_replicates: Sequence[Optional[np.ndarray]], n_items: Sequence[int],
                       point: Optional[float] = None) -> Optional[List[float]]:
    """95 % interval of the harmonic-mean composite from each axis's replicates (replicate k
    of every axis combined); None when any axis has no interval. Given the point estimate,
    the interval is widened to reach it (see _interval)."""
    if not axis_replicates or any(r is None for r in axis_replicates) or any(n < MIN_ITEMS for n in n_items):
        return None
    lo, hi = percentile_interval(harmonic_mean_rows([r for r in axis_replicates if r is not None]))  # all, as checked
    if point is not None:
        lo, hi = min(lo, point), max(hi, point)
    return [lo, hi]


