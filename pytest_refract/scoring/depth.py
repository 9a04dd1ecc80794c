"""The depth axis's numbers: which positions of a long chunk are scored, the depth buckets they
fall in, and the verdict across buckets. Pure functions: numpy and scoring/verdict.py only.

**Buckets.** A chunk of N tokens is scored from position ``FIRST_BUCKET`` (256) to N - 2 (each
position predicts the next token), every ``stride``-th position. Bucket edges double from 256
while they stay below N / 2, then N / 2 and N: the last bucket is the chunk's second half,
exactly the positions ``llama-perplexity -c N --kl-divergence`` scores (all of them at stride 1).

**Verdict across buckets** (the audit's 2.5 % per side, as scoring/verdict.py explains):

- PASS means *every* bucket is within the margin. Its null hypothesis ("some bucket is at or
  beyond the margin") is a union, so the test is an intersection-union test: each bucket is
  tested at the whole PASS error, with no correction. Whichever bucket truly is beyond the
  margin, a wrong PASS needs that bucket's own test to pass it, which happens at most at its
  error.
- FAIL means *some* bucket is beyond the margin: a union of B bucket tests, so the FAIL error is
  split equally over the B buckets (Bonferroni). B depends on the settings only (N), so the
  split is fixed before the first item.
- Sequential looks spend each side's error over the looks as every axis does
  (scoring/sequential.py): at each look, the look's PASS error goes whole to every bucket, its
  FAIL error split over the buckets. The union bound over looks and buckets keeps a wrong FAIL
  at most 2.5 %, a wrong PASS at most 2.5 % (tests/test_depth_sim.py simulates it).

Positions of one chunk share their context: the unit of resampling is the chunk, as for KLD.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import verdict as V

# The first bucket's start when items carry no edges (inputs/depth.py lays the chunks out).
FIRST_BUCKET = 256


class _BucketAxis:
    """One bucket of an axis, as scoring/verdict.py reads an axis: the bucket's damage table."""

    def __init__(self, axis, index: int, edges: Sequence[int]):
        self._axis = axis
        self.index = index
        self.NAME = axis.NAME
        lo, hi = edges[index], edges[index + 1]
        self.DAMAGE_LABEL = f"KLD at depth {lo}\u2013{hi}"
        for name in ("MARGIN", "ABSOLUTE_TOLERANCE", "DAMAGE_RESOLUTION", "ZERO_DAMAGE_EXACT", "CONTROL_MAX_DAMAGE"):
            setattr(self, name, getattr(axis, name, None))
        self.DAMAGE_COUNTS = False
        # The verdict's own ratio of sums (itself, so the per-item rates and the clamp at 0 apply).
        self.damage = V.ratio_of_sums

    def damage_table(self, items):
        return bucket_table(items, self.index)


def bucket_axes(axis, items: Sequence[dict]) -> List[_BucketAxis]:
    """One verdict axis per depth bucket of ``items`` (the buckets the items were measured in)."""
    edges = list(items[0]["bucket_edges"]) if items else []
    return [_BucketAxis(axis, b, edges) for b in range(len(edges) - 1)]


def bucket_table(items: Sequence[dict], index: int):
    """(ids, per item (KLD summed over the bucket's positions, positions)) for one bucket."""
    rows = [(float(i["bucket_kld_sum"][index]), float(i["bucket_positions"][index])) for i in items]
    return [str(i["id"]) for i in items], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)


def where_text(verdicts: Sequence[str], edges: Sequence[int]) -> str:
    """ "PASS at depth 256-2048, FAIL at 2048-4096": runs of equal bucket verdicts."""
    runs: List[list] = []
    for k, v in enumerate(verdicts):
        if runs and runs[-1][0] == v:
            runs[-1][2] = edges[k + 1]
        else:
            runs.append([v, edges[k], edges[k + 1]])
    text = ", ".join(f"{v} at depth {a}\u2013{b}" for v, a, b in runs)
    failing = [edges[k] for k, v in enumerate(verdicts) if v == V.FAIL]
    if failing:
        text += f" (damage beyond the margin from depth {failing[0]})"
    return text


def bucket_errors(err_pass: float, err_fail: float, n_buckets: int):
    """(PASS error, FAIL error) of each bucket's test: the whole PASS error (intersection-union),
    the FAIL error split equally over the buckets (Bonferroni)."""
    return err_pass, err_fail / max(1, n_buckets)


def combine(verdicts):
    """The axis verdict of its buckets' verdicts (strings, or arrays of them over runs): FAIL
    when any bucket FAILs, PASS when every bucket PASSes, UNDECIDED otherwise."""
    stack = np.asarray(verdicts, dtype=object)
    any_fail = (stack == V.FAIL).any(axis=0)
    all_pass = (stack == V.PASS).all(axis=0)
    out = np.where(any_fail, V.FAIL, np.where(all_pass, V.PASS, V.UNDECIDED)).astype(object)
    return str(out) if out.ndim == 0 else out


def bucket_verdict(axis, candidate_items, control_items, control_score, err_pass: float, err_fail: float,
                   same_computation: bool, min_pass_items: int) -> V.AxisVerdict:
    """The depth axis's verdict: every bucket tested by the declared test (verdict.axis_verdict)
    at the whole PASS error and 1/B of the FAIL error; PASS when every bucket PASSes, FAIL when
    any FAILs, UNDECIDED otherwise. The headline figures are the deciding bucket's: the failing
    bucket with the highest lower end, else the bucket with the highest multiple."""
    edges = list(candidate_items[0]["bucket_edges"]) if candidate_items else [FIRST_BUCKET, 2 * FIRST_BUCKET]
    n_buckets = len(edges) - 1
    errors = bucket_errors(err_pass, err_fail, n_buckets)
    per = [V.axis_verdict(_BucketAxis(axis, b, edges), candidate_items, control_items, control_score=control_score,
                          errors=errors, same_computation=same_computation, min_pass_items=min_pass_items)
           for b in range(n_buckets)]
    verdicts = [v.verdict for v in per]
    overall = str(combine(verdicts))
    if overall == V.FAIL:
        lead = max((v for v in per if v.verdict == V.FAIL),
                   key=lambda v: float(v.multiple_ci95[0] or 0.0) if v.multiple_ci95 else 0.0)
    else:
        lead = max(per, key=lambda v: -1.0 if v.multiple is None else v.multiple)
    out = V.AxisVerdict(**{k: val for k, val in lead.__dict__.items()})
    out.verdict = overall
    out.axis = axis.NAME
    needed = [v.items_needed for v in per if v.verdict == V.UNDECIDED and v.items_needed is not None]
    out.items_needed = max(needed) if needed and overall == V.UNDECIDED else None
    where = where_text(verdicts, edges)
    reasons = [where] + [f"{v.label}: {v.reason}" for v in per if v.reason and v.verdict == V.UNDECIDED][:1]
    out.reason = "; ".join(r for r in reasons if r)
    out.detail = {"buckets": [_bucket_json(v, edges, k) for k, v in enumerate(per)], "where": where,
                  "growth": growth(candidate_items, control_items)}
    return out


def _bucket_json(v: V.AxisVerdict, edges: Sequence[int], k: int) -> dict:
    return {"from": edges[k], "to": edges[k + 1], "control_mean_kld": v.control_damage, "multiple": v.multiple,
            "multiple_ci95": v.multiple_ci95, "verdict": v.verdict, "items_needed": v.items_needed,
            "reason": v.reason or None}


def growth(candidate_items, control_items, level: float = V.LEVEL) -> Optional[Dict[str, object]]:
    """M in the deepest bucket over M in the shallowest, with a jackknife-t interval over chunks
    on its log (chunks paired by id, as the verdict's). None without a control or where a
    bucket has no damage on either side."""
    if not candidate_items or not control_items:
        return None
    ctrl = {str(i["id"]): i for i in control_items}
    pairs = [(c, ctrl[str(c["id"])]) for c in candidate_items if str(c["id"]) in ctrl]
    if not pairs:
        return None
    last = len(pairs[0][0]["bucket_edges"]) - 2
    if last < 1:
        return None
    sums = np.asarray([[c["bucket_kld_sum"][last], k["bucket_kld_sum"][last], c["bucket_kld_sum"][0],
                        k["bucket_kld_sum"][0]] for c, k in pairs], dtype=np.float64)
    sums = np.maximum(sums, 0.0)
    counts = np.asarray([[c["bucket_positions"][last], c["bucket_positions"][0]] for c, _k in pairs], dtype=np.float64)

    def log_growth(s: np.ndarray) -> float:
        # Position counts are the same on both sides, so they cancel in each multiple.
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log(s[..., 0].sum(-1)) - np.log(s[..., 1].sum(-1))
                         - np.log(s[..., 2].sum(-1)) + np.log(s[..., 3].sum(-1)))

    point = log_growth(sums)
    if not math.isfinite(point):
        return None
    n = len(pairs)
    out: Dict[str, object] = {"value": math.exp(point), "ci95": None, "deep": [int(pairs[0][0]["bucket_edges"][last]),
                              int(pairs[0][0]["bucket_edges"][last + 1])],
                              "shallow": [int(pairs[0][0]["bucket_edges"][0]), int(pairs[0][0]["bucket_edges"][1])],
                              "n_chunks": n, "positions": [int(counts[:, 0].sum()), int(counts[:, 1].sum())]}
    if n >= V.MIN_ITEMS:
        loo = np.asarray([log_growth(np.delete(sums, i, axis=0)) for i in range(n)])
        if np.all(np.isfinite(loo)):
            se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
            t = V.t_quantile(0.5 + level / 2, n - 1)
            out["ci95"] = [math.exp(point - t * se), math.exp(point + t * se)]
    return out
