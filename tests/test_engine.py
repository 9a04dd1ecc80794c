"""The llama.cpp engine on the tiny generated model: determinism, cache hygiene, exact prefix
reuse, batched decoding against one sequence at a time, and the teacher-forcing shortcut of
the trajectory axis."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pytest_refract.axes.trajectory import _compare_batch
from pytest_refract.engines import llamacpp as E
from pytest_refract.engines.gguf import read_gguf
from pytest_refract.engines.kvconfig import parse_kv_config, validate_for_model
from pytest_refract.scoring.metrics import kld_positions


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    eng = E.Engine(tiny_model)
    yield eng
    eng.close()


def _ctx(engine, model, kv_text, role, n_ctx=1024, n_batch=512, n_seq=1):
    kv = parse_kv_config(kv_text)
    types = validate_for_model(kv, E.cache_types(), *read_gguf(model).head_dims, role)
    settings = E.ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=1)
    return engine.context(kv, types, settings, role, n_seq=n_seq)


def _tokens(n, seed):
    rng = np.random.RandomState(seed)
    return [1] + [int(t) for t in rng.randint(3, 300, size=n - 1)]


def _greedy_rows(ctx, prompt, n_predict):
    """One prompt's greedy tokens and the logit row of every step."""
    rows = []
    tokens = ctx.greedy([prompt], n_predict, on_row=lambda i, step, row: rows.append(row.copy()))[0]
    return tokens, np.stack(rows)


def _last_rows(ctx, seq, tokens, logits_from):
    rows = []
    ctx.prefill(seq, tokens, logits_from, lambda first, view: rows.append(view.copy()))
    return np.concatenate(rows)


def test_cache_types_come_from_the_loaded_ggml():
    types = E.cache_types()
    assert types["f16"].ggml_type == 1 and types["q8_0"].ggml_type == 8 and types["q4_0"].block_size == 32
    assert "turbo4" not in types  # upstream build
    assert "i32" not in types


def test_the_type_table_is_read_only_as_far_as_the_build_declares(monkeypatch, tmp_path):
    """ggml's type functions do no bounds check: without a ggml.h declaring GGML_TYPE_COUNT the
    scan refuses (one line) instead of reading past the table; a build folder's CMakeCache.txt
    leads to its sources' header."""
    from pytest_refract.engines import ggml_types as T
    from pytest_refract.engines import libload
    from pytest_refract.errors import UsageProblem

    monkeypatch.setattr(T, "_CACHE_TYPES", None)
    monkeypatch.setattr(T, "_header_candidates", lambda: [tmp_path / "nowhere" / "ggml.h"])
    with pytest.raises(UsageProblem, match=r"no ggml.h declaring GGML_TYPE_COUNT at .*nowhere/ggml.h"):
        E.cache_types()
    monkeypatch.undo()
    src, build = tmp_path / "src", tmp_path / "build"
    (src / "ggml" / "include").mkdir(parents=True)
    (src / "ggml" / "include" / "ggml.h").write_text("enum ggml_type {\n    GGML_TYPE_COUNT   = 41,\n};\n")
    (build / "bin").mkdir(parents=True)
    (build / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    monkeypatch.setattr(libload, "loaded_library_dir", lambda: build / "bin")
    header = src / "ggml" / "include" / "ggml.h"
    assert header in T._header_candidates()
    monkeypatch.setattr(T, "_header_candidates", lambda: [header])
    assert T._ggml_type_count() == 41


def test_same_tokens_same_logits_across_resets(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "a")
    toks = _tokens(100, 0)
    ctx.reset()
    a = ctx.evaluate(0, toks, 0, logits_from=50)
    ctx.evaluate(0, _tokens(30, 1), 100, logits_from=0)  # dirty the cache further
    ctx.reset()
    b = ctx.evaluate(0, toks, 0, logits_from=50)
    assert a.shape == (50, tiny_engine.n_vocab)
    assert np.array_equal(a, b)


def test_prefill_reuses_whole_batches_bit_exactly(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q8_0", "b", n_batch=128)
    shared = _tokens(300, 2)
    first = shared + _tokens(200, 3)[1:]
    second = shared + _tokens(150, 4)[1:]
    ctx.reset()
    fresh = ctx.evaluate(0, second, 0, logits_from=len(second) - 20)
    ctx.reset()
    _last_rows(ctx, 0, first, len(first) - 1)
    before = ctx.n_batch_tokens
    reused = _last_rows(ctx, 0, second, len(second) - 20)
    assert ctx.n_batch_tokens - before == len(second) - 256  # two whole 128-token batches were kept
    assert np.array_equal(fresh, reused)


def test_quantized_cache_changes_logits_but_deterministically(tiny_engine, tiny_model):
    ref = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "ref")
    cand = _ctx(tiny_engine, tiny_model, "ctk=q4_0,ctv=q4_0", "cand")
    toks = _tokens(200, 5)
    ref.reset()
    cand.reset()
    r = ref.evaluate(0, toks, 0, logits_from=100)
    c = cand.evaluate(0, toks, 0, logits_from=100)
    assert not np.array_equal(r, c)
    cand.reset()
    assert np.array_equal(c, cand.evaluate(0, toks, 0, logits_from=100))


def test_greedy_matches_argmax_of_teacher_forced_logits(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "g")
    prompt = _tokens(20, 6)
    out, logits = _greedy_rows(ctx, prompt, 12)
    assert len(out) == len(logits) >= 1
    assert [int(np.argmax(row)) for row in logits] == out
    ctx.reset()
    forced = ctx.evaluate(0, prompt + out[:-1], 0, logits_from=len(prompt) - 1)
    assert [int(np.argmax(row)) for row in forced] == out


@pytest.mark.parametrize("n_seq", [1, 3])
def test_teacher_forcing_after_divergence_equals_a_full_forced_pass(tiny_engine, tiny_model, n_seq):
    """The trajectory axis's shortcut: the candidate's own greedy rows up to its divergence,
    then its cache cut back and the reference's rest fed in one batch, give the KLD and top-1
    of teacher-forcing the whole reference continuation."""
    cand = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q8_0", f"tf{n_seq}", n_ctx=256, n_seq=n_seq)
    ref = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "tf-ref")
    prompts = [_tokens(20, 7), _tokens(31, 17)]
    # "Reference" continuations: one the candidate does not choose, one it follows for a while.
    own = cand.greedy([prompts[1]], 11)[0]
    ref_tokens = [_tokens(12, 8)[1:], own[:5] + _tokens(7, 9)[1:]]
    ref_rows = []
    for prompt, cont in zip(prompts, ref_tokens):
        ref.reset()
        ref_rows.append(ref.evaluate(0, prompt + cont[:-1], 0, logits_from=len(prompt) - 1))
    run = SimpleNamespace(settings=SimpleNamespace(n_predict=11),
                          greedy=lambda role, ps, n, on_row, on_finish: cand.greedy(
                              ps, n, on_row, lambda i, slot: on_finish(cand, i, slot)))
    compared = _compare_batch(run, "cand", prompts, [(t, r, r) for t, r in zip(ref_tokens, ref_rows)], False)
    for prompt, cont, rows, (_compared_tokens, tf_kld, tf_top1) in zip(prompts, ref_tokens, ref_rows, compared):
        cand.reset()
        full = cand.evaluate(0, prompt + cont[:-1], 0, logits_from=len(prompt) - 1)
        # Rows before the divergence come from one-token decode steps, the rest from one batch:
        # same tokens and positions, so the distributions agree closely (not bit-exactly).
        expect = kld_positions(rows, full, cont, ref_is_logprobs=False)
        assert tf_kld == pytest.approx(float(np.mean(expect["kld"])), abs=1e-4)
        assert tf_top1 == pytest.approx(100.0 * float(np.mean(full.argmax(axis=1) == np.asarray(cont))))


def test_context_overflow_is_a_measurement_error(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=f16,ctv=f16", "small", n_ctx=256)
    with pytest.raises(E.MeasurementError, match="do not fit the context"):
        ctx.greedy([_tokens(250, 9)], 64)


def test_evaluate_each_streams_the_same_rows_batch_by_batch(tiny_engine, tiny_model):
    ctx = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q4_0", "stream", n_batch=64)
    toks = _tokens(200, 7)
    ctx.reset()
    whole = ctx.evaluate(0, toks, 0, logits_from=40)
    seen = []
    ctx.reset()
    ctx.evaluate_each(0, toks, 0, 40, lambda first, view: seen.append((first, view.shape[0], view.copy())))
    # Cut at n_batch: rows 40..63, 64..127, 128..191, 192..199, handed over in order.
    assert [(f, n) for f, n, _ in seen] == [(0, 24), (24, 64), (88, 64), (152, 8)]
    assert np.array_equal(np.concatenate([v for _, _, v in seen]), whole)


@pytest.mark.parametrize("kv_text", ["ctk=f16,ctv=f16", "ctk=q8_0,ctv=q4_0", "ctk=f16,ctv=f16,fa=off"])
def test_sequences_decoded_together_match_one_at_a_time(tiny_engine, tiny_model, kv_text):
    single = _ctx(tiny_engine, tiny_model, kv_text, "one")
    many = _ctx(tiny_engine, tiny_model, kv_text, "many", n_ctx=256, n_seq=4)
    prompts = [_tokens(n, seed) for n, seed in ((5, 10), (40, 11), (17, 12), (90, 13))]
    # Unequal lengths: the batch shrinks as sequences finish, and each stream sees a new width.
    budgets = [30, 12, 30, 7]
    seen = {}
    for n_predict in sorted(set(budgets)):
        out = many.greedy(prompts, n_predict,
                          on_row=lambda i, step, row, n_predict=n_predict: seen.setdefault((n_predict, i, step), row.copy()))
        for i, prompt in enumerate(prompts):
            tokens, logits = _greedy_rows(single, prompt, n_predict)
            assert out[i] == tokens
            # Step 0 comes from the prompt, evaluated alone: exact. Later steps share a batch;
            # on this model's f32 weights ggml's kernels for several rows round differently
            # from those for one (up to 3e-5 with f16 flash attention; on SmolLM2 the rows
            # were bit-identical). Hence the audit gives reference, floor and candidates the
            # same batch layout and keys cached references by it; a mix-up of sequences
            # would differ by whole logits.
            assert np.array_equal(seen[(n_predict, i, 0)], logits[0])
            assert all(np.allclose(seen[(n_predict, i, k)], logits[k], rtol=0, atol=1e-4) for k in range(len(tokens)))
    assert many.n_seq_decode_steps > 0 and many.n_seq_decode_tokens > many.n_seq_decode_steps
    # More prompts than sequences: finished sequences hand their slot to the next prompt.
    queue = prompts + [_tokens(n, seed) for n, seed in ((3, 14), (60, 15), (25, 16))]
    finished = []
    out = many.greedy(queue, 20, on_finish=lambda i, slot: finished.append((i, slot)))
    assert sorted(i for i, _ in finished) == list(range(len(queue))) and {s for _, s in finished} <= set(range(4))
    for i, prompt in enumerate(queue):
        assert out[i] == single.greedy([prompt], 20)[0]
    # One context decodes a queue one prompt at a time, the same tokens.
    assert single.greedy(queue, 20) == out


def test_sequence_truncate_and_evaluate_match_a_single_context(tiny_engine, tiny_model):
    single = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q8_0", "one-b")
    many = _ctx(tiny_engine, tiny_model, "ctk=q8_0,ctv=q8_0", "many-b", n_ctx=200, n_seq=3)
    prompts = [_tokens(20, 20), _tokens(33, 21), _tokens(9, 22)]
    out = many.greedy(prompts, 10)
    forced = _tokens(12, 23)[1:]
    many.truncate(1, 33 + 4)
    rows = []
    many.evaluate_each(1, forced, 33 + 4, 0, lambda first, view: rows.append(view.copy()))
    single.reset()
    single.evaluate(0, prompts[1] + out[1][:4], 0, logits_from=36)
    expect = single.evaluate(0, forced, 37, logits_from=0)
    assert np.array_equal(np.concatenate(rows), expect)
    with pytest.raises(E.MeasurementError, match="do not fit"):
        many.greedy([_tokens(250, 24)], 10)
