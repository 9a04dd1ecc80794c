"""The per-row numeric work was rewritten to reuse buffers and skip passes (benchmarks/
bench_overhead.py measured it); every number must stay bit for bit what it was. The
formulas below are the straightforward versions the rewrite replaced, kept here as the
oracle: the rewritten functions must return exactly their bits, NaN placement included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_refract.reference.codec import (
    CompressedRows,
    LogprobRows,
    compact,
    concat_quantized,
    dequantize_logprobs,
    quantize_logprobs,
    sparse_logprobs,
    sparsify,
)
from pytest_refract.scoring.metrics import KLD_LOG_PROB_CUTOFF, kld_positions, log_softmax, rows_finite


def _oracle_log_softmax(logits):
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64))
    return (shifted - lse.astype(np.float32)).astype(np.float32, copy=False)


def _oracle_kld_positions(ref_logits, cand_logits, next_tokens, block=32, ref_is_logprobs=False):
    cand_logits = np.asarray(cand_logits)
    tokens = np.asarray(next_tokens, dtype=np.int64)
    n = ref_logits.shape[0]
    out = {"kld": np.empty(n), "nll_ref": np.empty(n), "nll_cand": np.empty(n), "same_top": np.empty(n, dtype=bool)}
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        ref_lp = (np.asarray(ref_logits[lo:hi], dtype=np.float32) if ref_is_logprobs
                  else _oracle_log_softmax(ref_logits[lo:hi]))
        cand_lp = _oracle_log_softmax(cand_logits[lo:hi])
        rows = np.arange(hi - lo)
        terms = np.exp(ref_lp)
        terms *= ref_lp - cand_lp
        terms[ref_lp <= KLD_LOG_PROB_CUTOFF] = 0.0
        out["kld"][lo:hi] = terms.sum(axis=1, dtype=np.float64)
        out["nll_ref"][lo:hi] = -ref_lp[rows, tokens[lo:hi]]
        out["nll_cand"][lo:hi] = -cand_lp[rows, tokens[lo:hi]]
        out["same_top"][lo:hi] = ref_lp.argmax(axis=1) == cand_lp.argmax(axis=1)
        broken = ~(np.isfinite(ref_lp.sum(axis=1, dtype=np.float64)) & np.isfinite(cand_lp.sum(axis=1, dtype=np.float64)))
        if broken.any():
            for key in ("kld", "nll_ref", "nll_cand"):
                out[key][lo:hi][broken] = np.nan
    out["p_diff"] = np.exp(-out["nll_cand"]) - np.exp(-out["nll_ref"])
    return out


def _oracle_quantize(logits, block=32):
    x = np.asarray(logits, dtype=np.float32)
    n, vocab = x.shape
    q = np.empty((n, vocab), dtype=np.uint16)
    scale = np.empty(n, dtype=np.float32)
    min_log_prob = np.empty(n, dtype=np.float32)
    for lo in range(0, n, block):
        xb = x[lo : lo + block]
        mx = xb.max(axis=1)
        mn = np.maximum(xb.min(axis=1), mx - np.float32(16.0))
        lse = np.log(np.exp(xb - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
        sc = (mx - mn) / np.float32(65535.0)
        inv = np.divide(np.float32(1.0), sc, out=np.zeros_like(sc), where=sc > 0)
        t = (xb - mn[:, None]) * inv[:, None]
        np.rint(t, out=t)
        np.clip(t, 0, 65535, out=t)
        t[xb <= mn[:, None]] = 0
        q[lo : lo + block] = t.astype(np.uint16)
        scale[lo : lo + block] = sc
        min_log_prob[lo : lo + block] = mn - mx - lse
    return {"q": q, "scale": scale, "min_log_prob": min_log_prob}


def _oracle_sparsify(stored):
    q = stored["q"]
    rows, cols = np.nonzero(q)
    counts = np.bincount(rows, minlength=q.shape[0]) if q.shape[0] else np.zeros(0, dtype=np.int64)
    row_ptr = np.zeros(q.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    return {"scale": stored["scale"], "min_log_prob": stored["min_log_prob"], "row_ptr": row_ptr,
            "col": cols.astype(np.uint32), "val": q[rows, cols], "n_vocab": np.asarray([q.shape[1]], dtype=np.int64)}


def _oracle_dequantize(stored):
    q = stored["q"]
    out = q.astype(np.float32)
    out *= stored["scale"][:, None]
    out += stored["min_log_prob"][:, None]
    return out


def _same(a, b):
    """Bit for bit: same dtype, shape and bytes (NaN in the same places, signs of zero too)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _logits(rng, n, vocab, spread):
    return (rng.standard_normal((n, vocab)) * spread).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 80), st.sampled_from([2, 3, 17, 300, 4099]),
       st.sampled_from([0.01, 1.0, 4.0, 30.0]))
def test_quantize_and_dequantize_keep_every_bit(seed, n, vocab, spread):
    x = _logits(np.random.default_rng(seed), n, vocab, spread)
    want = _oracle_quantize(x)
    got = quantize_logprobs(x)
    for key in want:
        _same(got[key], want[key])
    _same(dequantize_logprobs(got), _oracle_dequantize(want))
    sparse = sparse_logprobs(x)
    _same(dequantize_logprobs(sparse), _oracle_dequantize(want))
    _same(dequantize_logprobs(compact(sparse)), _oracle_dequantize(want))
    whole = _oracle_sparsify(want)
    assert set(sparse) == set(whole)
    for key in whole:
        _same(sparse[key], whole[key])
        _same(sparsify(want)[key], whole[key])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 80), st.sampled_from([2, 5, 300, 4099]),
       st.sampled_from([0.5, 4.0, 25.0]), st.booleans())
def test_kld_positions_keeps_every_bit(seed, n, vocab, spread, from_cache):
    rng = np.random.default_rng(seed)
    ref = _logits(rng, n, vocab, spread)
    cand = ref + _logits(rng, n, vocab, 0.05 * spread)
    tokens = rng.integers(0, vocab, n)
    if from_cache:
        stored = sparse_logprobs(ref)
        got = kld_positions(LogprobRows(stored)[0:n], cand, tokens, ref_is_logprobs=True)
        want = _oracle_kld_positions(_oracle_dequantize(_oracle_quantize(ref)), cand, tokens, ref_is_logprobs=True)
    else:
        got = kld_positions(ref, cand, tokens)
        want = _oracle_kld_positions(ref, cand, tokens)
    for key in want:
        _same(got[key], want[key])


def test_kld_positions_marks_the_same_broken_rows():
    """NaN, +inf and -inf in either side's rows (or a logit so low that x - max overflows)."""
    rng = np.random.default_rng(3)
    ref = _logits(rng, 40, 50, 3.0)
    cand = ref + _logits(rng, 40, 50, 0.1)
    ref[2, 4] = np.nan
    cand[5, 0] = np.inf
    cand[7, 9] = -np.inf
    ref[33, 1] = -np.inf
    cand[36, 3] = -3.0e38
    cand[36, 4] = 3.0e38
    tokens = rng.integers(0, 50, 40)
    with np.errstate(all="ignore"):
        got = kld_positions(ref, cand, tokens)
        want = _oracle_kld_positions(ref, cand, tokens)
    for key in want:
        _same(got[key], want[key])
    assert np.isnan(got["kld"][[2, 5, 7, 33, 36]]).all()


def test_rows_finite_is_the_float64_sum_test():
    x = np.array([[1.0, 2.0], [np.nan, 0.0], [np.inf, 1.0], [-np.inf, 1.0], [3e38, 3e38], [-3e38, -3e38]],
                 dtype=np.float32)
    with np.errstate(all="ignore"):
        assert rows_finite(x).tolist() == np.isfinite(x.sum(axis=1, dtype=np.float64)).tolist()
    assert rows_finite(x).tolist() == [True, False, False, False, True, True]


def test_buffers_do_not_leak_into_the_caller_arrays():
    """log_softmax writes only its own buffers; kld_positions leaves its inputs as they were."""
    rng = np.random.default_rng(5)
    ref, cand = _logits(rng, 70, 300, 4.0), _logits(rng, 70, 300, 4.0)
    before = ref.copy(), cand.copy()
    kld_positions(ref, cand, rng.integers(0, 300, 70))
    _same(ref, before[0])
    _same(cand, before[1])
    out, scratch = np.empty_like(ref), np.empty_like(ref)
    assert log_softmax(ref, out=out, scratch=scratch) is out
    _same(out, _oracle_log_softmax(ref))
    _same(ref, before[0])


def test_dequantize_into_a_buffer_and_compressed_rows():
    rng = np.random.default_rng(9)
    x = _logits(rng, 12, 600, 6.0)
    rows = CompressedRows(600)
    for row in x:
        rows.append_logits(row)
    want = _oracle_dequantize(_oracle_quantize(x))
    buf = np.full((5, 600), 7.0, dtype=np.float32)
    assert rows[3:8].dequantize_into(slice(0, 5), buf) is buf
    _same(buf, want[3:8])
    _same(np.asarray(rows[0:12]), want)
    _same(np.asarray(LogprobRows(concat_quantized([sparse_logprobs(x[:7]), sparse_logprobs(x[7:])]))), want)
    with pytest.raises(ValueError, match="buffer"):
        dequantize_logprobs(sparse_logprobs(x), out=np.empty((12, 600), dtype=np.float64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_require_finite_refuses_any_non_finite_logit(bad):
    from pytest_refract.engines.base import NON_FINITE_LOGITS, require_finite
    from pytest_refract.errors import MeasurementError

    rows = np.zeros((3, 40), dtype=np.float32)
    rows[0, 0], rows[2, -1] = 3.4e38, -3.4e38  # finite extremes: a measurement
    assert require_finite(rows) is rows
    assert require_finite(np.empty((0, 40), dtype=np.float32)).shape == (0, 40)
    rows[1, 17] = bad
    with pytest.raises(MeasurementError, match="non-finite"):
        require_finite(rows)
    assert "non-finite" in NON_FINITE_LOGITS


@pytest.mark.parametrize("shape", [(0, 7), (3, 5), (1, 4000)])
def test_sparsify_edge_rows_match_the_oracle(shape):
    """Empty, all-zero and all-kept rows give the oracle's arrays exactly."""
    q = np.zeros(shape, dtype=np.uint16)
    if shape[0] >= 3:
        q[1] = np.arange(1, shape[1] + 1)
    stored = {"q": q, "scale": np.ones(shape[0], np.float32), "min_log_prob": np.zeros(shape[0], np.float32)}
    want, got = _oracle_sparsify(stored), sparsify(stored)
    for key in want:
        _same(got[key], want[key])
