"""Pure scoring functions: no llama.cpp, no pytest. Everything here is unit-tested directly.

KLD statistics follow llama.cpp's ``tools/perplexity`` (``--kl-divergence``) definitions so
that our numbers can be compared with the KLD tables the community publishes.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

BANDS = (("EXCELLENT", 90.0), ("PASS", 80.0), ("DEGRADED", 60.0), ("FAIL", 0.0))
BAND_FLOOR = dict(BANDS)

# llama-perplexity drops reference log-probabilities at or below this from the KL sum.
KLD_LOG_PROB_CUTOFF = -16.0


def band_for(score: Optional[float]) -> Optional[str]:
    if score is None:
        return None
    for name, floor in BANDS:
        if score >= floor:
            return name
    return "FAIL"


def parse_threshold(text) -> float:
    """``--refract-fail-under``: a band name (fail if below that band) or a number 0-100."""
    value = str(text).strip()
    if value.upper() in BAND_FLOOR:
        # "FAIL" means: fail when the score is in the FAIL band, i.e. under DEGRADED's floor.
        return 60.0 if value.upper() == "FAIL" else BAND_FLOOR[value.upper()]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a band (FAIL, DEGRADED, PASS, EXCELLENT) nor a number 0-100"
        ) from None
    if not (0.0 <= number <= 100.0) or math.isnan(number):
        raise ValueError(f"{text!r} is outside 0-100")
    return number


def is_score(value) -> bool:
    """A real, finite number (not None, not NaN or Infinity, not a bool or a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def harmonic_mean(scores: Sequence[Optional[float]]) -> Optional[float]:
    """Composite of the axes that ran. One axis at 0 makes the composite 0: a harmonic mean
    punishes a single collapsed surface, which is the point. None when any score is missing
    or not finite: a composite never stands in for an axis that was not measured."""
    if not scores or not all(is_score(s) for s in scores):
        return None
    values = [float(s) for s in scores]
    if any(v < 0 for v in values):
        raise ValueError("scores must be non-negative")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# --------------------------------------------------------------------------- trajectory


def prefix_agreement(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token, or None when the sequences are identical
    (a sequence that stops early diverges at its end)."""
    n = prefix_agreement(a, b)
    if n == len(a) == len(b):
        return None
    return n


def top2_margin(logprobs: np.ndarray) -> float:
    """p(most likely token) - p(second most likely) of one row of log-probabilities."""
    row = np.asarray(logprobs, dtype=np.float64)
    if row.size < 2:
        return 1.0
    top = np.partition(row, row.size - 2)[-2:]
    return float(np.exp(top.max()) - np.exp(top.min()))


def trajectory_item_score(ref: Sequence[int], cand: Sequence[int]) -> float:
    denom = max(len(ref), len(cand))
    if denom == 0:
        return 100.0
    return 100.0 * prefix_agreement(ref, cand) / denom


def trajectory_axis_score(items: Iterable[dict]) -> Optional[float]:
    """100 x mean prefix agreement / mean max(len ref, len cand). Dividing by the longer side
    keeps a candidate that stops early (EOS) from scoring 100 on a shared prefix."""
    items = list(items)
    if not items:
        return None
    if not all(is_score(i.get("prefix_agreement")) and is_score(i.get("ref_len")) and is_score(i.get("cand_len"))
               for i in items):
        return None
    agree = sum(i["prefix_agreement"] for i in items) / len(items)
    longest = sum(max(i["ref_len"], i["cand_len"]) for i in items) / len(items)
    if longest == 0:
        return 100.0
    return 100.0 * agree / longest


# --------------------------------------------------------------------------- KLD


def log_softmax(logits: np.ndarray, out: Optional[np.ndarray] = None,
                scratch: Optional[np.ndarray] = None) -> np.ndarray:
    """Row-wise log-softmax in float32 with a float64 normaliser, as llama-perplexity does.

    ``out`` and ``scratch`` (float32, the rows' shape) are buffers to reuse: a block of a 262k
    vocabulary is tens of MB, and a fresh array of that size is fresh pages from the OS. The
    operations, and so every bit of the result, are the same with or without them."""
    x = np.asarray(logits, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    if scratch is None:
        scratch = np.empty(x.shape, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    np.subtract(x, m, out=out)
    np.exp(out, out=scratch)
    lse = np.log(scratch.sum(axis=-1, keepdims=True, dtype=np.float64))
    np.subtract(out, lse.astype(np.float32), out=out)
    return out


def rows_finite(x: np.ndarray) -> np.ndarray:
    """Per row of float32 values: whether every value is finite. The same answer as
    ``isfinite(row.sum(dtype=float64))`` (a float64 sum of finite float32 values cannot
    overflow below 10^269 entries, and NaN and both infinities survive a sum, a min and a
    max), from two float32 passes instead of a widening one."""
    return np.isfinite(x.min(axis=1)) & np.isfinite(x.max(axis=1))


def _block_rows(rows, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """Rows lo..hi of ``rows`` as float32: written into ``out`` where the rows can fill a
    buffer (16-bit reference rows, see reference.codec.LogprobRows), else converted."""
    fill = getattr(rows, "dequantize_into", None)
    if fill is not None:
        return fill(slice(lo, hi), out)
    return np.asarray(rows[lo:hi], dtype=np.float32)


class StoredLogprobs(np.ndarray):
    """Log-prob rows in the form a reference stores them (16-bit, see reference/codec.py),
    handed out in place of logits: kld_positions then compares them with the reference's rows
    as they are, without a log-softmax that would move their last bits."""


def kld_positions(
    ref_logits: np.ndarray, cand_logits: np.ndarray, next_tokens: Sequence[int], block: int = 32,
    ref_is_logprobs: bool = False,
) -> Dict[str, np.ndarray]:
    """Per-position statistics of one chunk (rows = positions, columns = vocabulary).

    Returns arrays: ``kld`` = KL(ref || cand) in nats, ``p_diff`` = p_cand(next) - p_ref(next),
    ``nll_ref`` / ``nll_cand`` = -log p(next), ``same_top`` = argmax agreement.
    Rows are processed in blocks so temporaries stay a few MB even for 256k-token vocabularies;
    the blocks' buffers are allocated once per call and reused.
    With ``ref_is_logprobs`` the reference rows are already log-probabilities (e.g. read back
    from the 16-bit reference cache) and are used as they are, as llama-perplexity uses its base.
    """
    # Anything with a shape that yields float rows by slicing will do for the reference (e.g.
    # 16-bit rows dequantized block by block), so a full float matrix need not exist.
    if not hasattr(ref_logits, "shape"):
        ref_logits = np.asarray(ref_logits)
    # Rows already in a reference's stored form (a build measured against a reference pack):
    # used as they are, as the reference's are, so the same bits on both sides give exactly 0.
    cand_stored = isinstance(cand_logits, StoredLogprobs)
    cand_logits = np.asarray(cand_logits)
    if tuple(ref_logits.shape) != cand_logits.shape:
        raise ValueError(f"logit shapes differ: {ref_logits.shape} vs {cand_logits.shape}")
    tokens = np.asarray(next_tokens, dtype=np.int64)
    n = ref_logits.shape[0]
    if tokens.shape[0] != n:
        raise ValueError("one next token per position is required")
    out = {
        "kld": np.empty(n, dtype=np.float64),
        "nll_ref": np.empty(n, dtype=np.float64),
        "nll_cand": np.empty(n, dtype=np.float64),
        "same_top": np.empty(n, dtype=bool),
    }
    width = min(block, n)
    shape = (width,) + tuple(cand_logits.shape[1:])
    # Four float32 buffers of one block, reused by every block: the reference's rows (or
    # log-probs), the candidate's log-probs (then ref - cand), the exp() scratch (then the KL
    # terms), and the cutoff mask.
    ref_buf = np.empty(shape, dtype=np.float32)
    cand_buf = np.empty(shape, dtype=np.float32)
    terms_buf = np.empty(shape, dtype=np.float32)
    mask_buf = np.empty(shape, dtype=bool)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        k = hi - lo
        ref_rows = _block_rows(ref_logits, lo, hi, ref_buf[:k])
        if ref_is_logprobs:
            ref_lp = ref_rows
        else:
            # Into our own buffer (in place when the rows are already there): never into the
            # caller's array, which asarray may have returned as it is.
            ref_lp = log_softmax(ref_rows, out=ref_buf[:k], scratch=terms_buf[:k])
        if cand_stored:
            cand_lp = cand_logits[lo:hi]
        else:
            cand_lp = log_softmax(cand_logits[lo:hi], out=cand_buf[:k], scratch=terms_buf[:k])
        rows = np.arange(k)
        block_tokens = tokens[lo:hi]
        out["nll_ref"][lo:hi] = -ref_lp[rows, block_tokens]
        out["nll_cand"][lo:hi] = -cand_lp[rows, block_tokens]
        out["same_top"][lo:hi] = ref_lp.argmax(axis=1) == cand_lp.argmax(axis=1)
        # Finite logits always give finite log-probs; a row with NaN or Infinity anywhere is
        # no measurement (a -inf would otherwise vanish under the cutoff), so its statistics
        # are NaN and no score can come of them.
        broken = ~(rows_finite(ref_lp) & rows_finite(cand_lp))
        terms = np.exp(ref_lp, out=terms_buf[:k])
        diff = np.subtract(ref_lp, cand_lp, out=cand_buf[:k])
        terms *= diff
        np.copyto(terms, 0.0, where=np.less_equal(ref_lp, KLD_LOG_PROB_CUTOFF, out=mask_buf[:k]))
        out["kld"][lo:hi] = terms.sum(axis=1, dtype=np.float64)
        if broken.any():
            for key in ("kld", "nll_ref", "nll_cand"):
                out[key][lo:hi][broken] = np.nan
    out["p_diff"] = np.exp(-out["nll_cand"]) - np.exp(-out["nll_ref"])
    return out


def mean_and_uncertainty(values: np.ndarray) -> tuple:
    """Mean and standard error with llama-perplexity's conventions (0 below 11 samples)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 1:
        return 0.0, 0.0
    mean = float(v.sum() / n)
    var = float((v * v).sum() / n - mean * mean)
    unc = math.sqrt(var / (n - 1)) if (var > 0 and n > 10) else 0.0
    return mean, unc


def llama_percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between order statistics, as llama-perplexity prints them.

    This is numpy's default ("linear") percentile method, but not numpy's arithmetic: numpy
    interpolates as ``a + (b - a) * t`` (or ``b - (b - a) * (1 - t)``), this as llama.cpp does,
    ``(1 - t) * a + t * b``, and the two differ in the last bit for many inputs (e.g. the 99.9th
    percentile of [1, 36]). Replacing this with ``np.percentile`` would change reported KLD
    percentiles, so it stays; tests/test_scoring.py pins the difference."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def kld_summary(kld: np.ndarray, p_diff: np.ndarray, nll_ref: np.ndarray, nll_cand: np.ndarray, same_top: np.ndarray) -> dict:
    """Axis-level (or chunk-level) KLD statistics from per-position arrays."""
    kld = np.asarray(kld, dtype=np.float64)
    n = kld.size
    if n == 0:
        raise ValueError("no scored positions")
    mean_kld, mean_kld_unc = mean_and_uncertainty(kld)
    # A KL divergence is never negative; a slightly negative mean is the 16-bit storage of the
    # reference's log-probs, not a candidate better than the reference.
    mean_kld = max(0.0, mean_kld) if math.isfinite(mean_kld) else mean_kld
    sorted_kld = np.sort(kld)
    p_diff = np.asarray(p_diff, dtype=np.float64)
    mse, mse_unc = mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse)
    rms_unc = 0.5 / rms * mse_unc if rms > 0 else 0.0
    mean_dp, mean_dp_unc = mean_and_uncertainty(p_diff)
    same = float(np.count_nonzero(same_top)) / n
    same_unc = math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0
    mean_nll_ref = float(np.mean(nll_ref))
    mean_nll_cand = float(np.mean(nll_cand))
    return {
        "mean_kld": mean_kld,
        "mean_kld_unc": mean_kld_unc,
        "kld_percentiles": {
            "max": float(sorted_kld[-1]),
            "99.9": llama_percentile(sorted_kld, 0.999),
            "99": llama_percentile(sorted_kld, 0.99),
            "95": llama_percentile(sorted_kld, 0.95),
            "90": llama_percentile(sorted_kld, 0.90),
            # np.median equals the mean-of-the-middle-two it replaced bit for bit, except that
            # it turns a middle -0.0 into 0.0; a KL sum over two or more tokens is never -0.0.
            "median": float(np.median(sorted_kld)),
        },
        "rms_dp_pct": 100.0 * rms,
        "rms_dp_pct_unc": 100.0 * rms_unc,
        "mean_dp_pct": 100.0 * mean_dp,
        "mean_dp_pct_unc": 100.0 * mean_dp_unc,
        "same_top_p_pct": 100.0 * same,
        "same_top_p_pct_unc": 100.0 * same_unc,
        "ppl_ref": math.exp(mean_nll_ref),
        "ppl_cand": math.exp(mean_nll_cand),
        "n_positions": int(n),
    }


def kld_score(mean_kld: Optional[float]) -> Optional[float]:
    """100 x exp(-mean KLD): 100 for identical distributions, ~99 at 0.01 nats. None when the
    KLD is missing or not finite (max(0, NaN) is 0, which once scored a NaN KLD as 100)."""
    if not is_score(mean_kld):
        return None
    return 100.0 * math.exp(-max(0.0, float(mean_kld)))
