"""The llama.cpp engine on the tiny generated model: determinism, cache hygiene, exact prefix
reuse, and the teacher-forcing shortcut of the trajectory axis."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_refract import engine as E
from pytest_refract.axes.trajectory import _teacher_forced_logits
from pytest_refract.gguf_meta import read_gguf
from pytest_refract.kvconfig import parse_kv_config, validate_for_model


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    eng = E.Engine(tiny_model)
    yield eng
    eng.close()


def _ctx(engine, model, kv_text, role, n_ctx=1024, n_batch=512):
    kv = parse_kv_config(kv_text)
    types = validate_for_model(kv, E.cache_types(), *read_gguf(model).head_dims, role)
    return engine.context(kv, types, E.ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=1), role)


def _tokens(n, seed):
    rng = np.random.RandomState(seed)
    return [1] + [int(t) for t in rng.randint(3, 300, size=n - 1)]


def test_cache_types_come_from_the_loaded_ggml():
    types = E.cache_types()
    assert types["f16"].ggml_type == 1 and types["q8_0"].ggml_type == 8 and types["q4_0"].block_size == 32
    assert "turbo4" not in types  # upstream build
    assert "i32" not in types


def test_same_tokens_same_logits_across_resets(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "a")
    toks = _tokens(100, 0)
    ctx.reset()
    a = ctx.evaluate(toks, 0, logits_from=50)
    ctx.evaluate(_tokens(30, 1), 100, logits_from=0)  # dirty the cache further
    ctx.reset()
    b = ctx.evaluate(toks, 0, logits_from=50)
    assert a.shape == (50, tiny_engine.n_vocab)
    assert np.array_equal(a, b)


def test_prefill_reuses_whole_batches_bit_exactly(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q8_0", "b", n_batch=128)
    shared = _tokens(300, 2)
    first = shared + _tokens(200, 3)[1:]
    second = shared + _tokens(150, 4)[1:]
    ctx.reset()
    fresh = ctx.evaluate(second, 0, logits_from=len(second) - 20)
    ctx.reset()
    ctx.prefill(first, logits_from=len(first) - 1)
    before = ctx.n_batch_tokens
    reused = ctx.prefill(second, logits_from=len(second) - 20)
    assert ctx.n_batch_tokens - before == len(second) - 256  # two whole 128-token batches were kept
    assert np.array_equal(fresh, reused)


def test_quantized_cache_changes_logits_but_deterministically(tiny_engine, tiny_model):
    ref = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "ref")
    cand = _ctx(tiny_engine, tiny_model, "ctk=q4_0,ctv=q4_0", "cand")
    toks = _tokens(200, 5)
    ref.reset(); cand.reset()
    r = ref.evaluate(toks, 0, logits_from=100)
    c = cand.evaluate(toks, 0, logits_from=100)
    assert not np.array_equal(r, c)
    cand.reset()
    assert np.array_equal(c, cand.evaluate(toks, 0, logits_from=100))


def test_greedy_matches_argmax_of_teacher_forced_logits(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "g")
    prompt = _tokens(20, 6)
    out, logits = ctx.greedy(prompt, 12, keep_logits=True)
    assert len(out) == len(logits) >= 1
    assert [int(np.argmax(row)) for row in logits] == out
    ctx.reset()
    forced = ctx.evaluate(prompt + out[:-1], 0, logits_from=len(prompt) - 1)
    assert [int(np.argmax(row)) for row in forced] == out


def test_teacher_forcing_after_divergence_equals_a_full_forced_pass(tiny_engine, tiny_model):
    cand = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q8_0", "tf", n_batch=512)
    prompt = _tokens(20, 7)
    ref_tokens = _tokens(12, 8)[1:]  # a "reference" continuation the candidate did not choose
    cand_tokens, cand_logits = cand.greedy(prompt, 11, keep_logits=True)
    got = _teacher_forced_logits(cand, len(prompt), ref_tokens, cand_tokens, cand_logits)
    assert got.shape[0] == len(ref_tokens)
    cand.reset()
    full = cand.evaluate(prompt + ref_tokens[:-1], 0, logits_from=len(prompt) - 1)
    # Rows before the divergence come from one-token decode steps, the rest from one batch:
    # same tokens and positions, so the distributions agree closely (not bit-exactly).
    assert np.allclose(got, full, atol=1e-3)
    assert [int(np.argmax(r)) for r in got] == [int(np.argmax(r)) for r in full]


def test_context_overflow_is_a_measurement_error(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "small", n_ctx=256)
    with pytest.raises(E.MeasurementError, match="do not fit the context"):
        ctx.greedy(_tokens(250, 9), 64)


def test_evaluate_each_streams_the_same_rows_batch_by_batch(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q4_0", "stream", n_batch=64)
    toks = _tokens(200, 7)
    ctx.reset()
    whole = ctx.evaluate(toks, 0, logits_from=40)
    seen = []
    ctx.reset()
    ctx.evaluate_each(toks, 0, 40, lambda first, view: seen.append((first, view.shape[0], view.copy())))
    # Cut at n_batch: rows 40..63, 64..127, 128..191, 192..199, handed over in order.
    assert [(f, n) for f, n, _ in seen] == [(0, 24), (24, 64), (88, 64), (152, 8)]
    assert np.array_equal(np.concatenate([v for _, _, v in seen]), whole)
