"""Cutting a sequence back to a prefix and going on from there (prefix reuse, teacher forcing)
must give the logits of a fresh evaluation, also where llama.cpp's memory cannot simply cut:
a sliding-window cache (sized for the window unless swa_full, it may overwrite cells that left
the window) and a hybrid model's recurrent layers (their state cannot roll back)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import read_report
from tiny_model import write_tiny_family

from pytest_refract.engines import base
from pytest_refract.engines import llamacpp as E
from pytest_refract.engines.gguf import read_gguf
from pytest_refract.engines.kvconfig import parse_kv_config, validate_for_model

WINDOW = 32
N_BATCH = 64  # a small batch keeps llama.cpp's window cache small: pad(32 + 64, 256) = 256 cells


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = write_tiny_family(tmp_path_factory.mktemp("swa") / "gemma.gguf", "gemma3", sliding_window=WINDOW)
    eng = E.Engine(path)
    yield eng, path
    eng.close()


def _ctx(gemma, kv_text, role):
    eng, path = gemma
    kv = parse_kv_config(kv_text)
    types = validate_for_model(kv, E.cache_types(), *read_gguf(path).head_dims, role)
    return eng.context(kv, types, E.ContextSettings(n_ctx=1024, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=1), role)


def _tokens(n, seed):
    rng = np.random.RandomState(seed)
    return [1] + [int(t) for t in rng.randint(3, 300, size=n - 1)]


def test_the_model_has_a_sliding_window(gemma):
    assert gemma[0].n_swa == WINDOW and not gemma[0].is_recurrent


def _prefill_after_a_long_sequence(ctx):
    shared = _tokens(300, 1)
    first = shared + _tokens(400, 2)[1:]  # 700 tokens: far past the 256-cell window cache
    second = shared + _tokens(150, 3)[1:]
    ctx.reset()
    fresh = ctx.evaluate(0, second, 0, logits_from=len(second) - 20)
    ctx.reset()
    _prefill(ctx, first, len(first) - 1)
    return fresh, _prefill(ctx, second, len(second) - 20)


def _prefill(ctx, tokens, logits_from):
    rows = []
    ctx.prefill(0, tokens, logits_from, lambda first, view: rows.append(view.copy()))
    return np.concatenate(rows)


def _cuts(ctx, before=None):
    """The context's cut counts (base.CutCounts), less ``before``'s."""
    now = ctx.cuts.as_counts()
    return {k: v - (before or {}).get(k, 0) for k, v in now.items()}


NO_CUTS = {"cut_kept": 0, "cut_rebuilt_window": 0, "cut_rebuilt_engine": 0, "cut_reuse_refused_window": 0}


@pytest.mark.parametrize("kv_text", ["ctk=f16,ctv=f16", "ctk=q8_0,ctv=q8_0"])
def test_prefix_reuse_past_the_window_is_exact(gemma, kv_text):
    ctx = _ctx(gemma, kv_text, f"reuse-{kv_text}")
    before = _cuts(ctx)
    fresh, reused = _prefill_after_a_long_sequence(ctx)
    assert np.array_equal(fresh, reused)
    # Once: the second prefill could have kept 256 cached tokens, but the first sequence had
    # outgrown the window. The resets and the first prefill (on an empty sequence) cut nothing.
    assert _cuts(ctx, before) == dict(NO_CUTS, cut_reuse_refused_window=1)


def test_reusing_cells_the_window_dropped_would_be_wrong(gemma, monkeypatch):
    """Why the mend exists: trusting the cut (as llama_memory_seq_rm lets one) changes logits."""
    monkeypatch.setattr(base, "window_kept", lambda window, longest: True)
    fresh, reused = _prefill_after_a_long_sequence(_ctx(gemma, "ctk=f16,ctv=f16", "trusting"))
    assert not np.array_equal(fresh, reused)


def test_full_window_cache_keeps_prefix_reuse(gemma):
    ctx = _ctx(gemma, "ctk=f16,ctv=f16,swa_full=on", "full")
    before = ctx.n_batch_tokens + ctx.n_decode_tokens
    cuts = _cuts(ctx)
    fresh, reused = _prefill_after_a_long_sequence(ctx)
    assert np.array_equal(fresh, reused)
    assert _cuts(ctx, cuts) == dict(NO_CUTS, cut_kept=1)  # no window: the same prefill keeps its cells
    # Every cell is kept: of the second sequence (449 tokens) the shared 256 (four whole
    # batches) were not recomputed; the first (699 tokens) and the fresh run were whole.
    assert ctx.n_batch_tokens + ctx.n_decode_tokens - before == 449 + 699 + (449 - 256)


def test_teacher_forcing_cut_past_the_window_is_exact(gemma):
    ctx = _ctx(gemma, "ctk=q8_0,ctv=q8_0", "forced")
    prefix = _tokens(4 * N_BATCH, 4)
    rest = _tokens(300, 5)[1:]
    forced = _tokens(40, 6)[1:]
    ctx.reset()
    ctx.evaluate(0, prefix + rest, 0, logits_from=None)
    before = _cuts(ctx)
    ctx.truncate(0, len(prefix))
    assert _cuts(ctx, before) == dict(NO_CUTS, cut_rebuilt_window=1)  # 555 tokens outgrew the window of 32
    cut = ctx.evaluate(0, forced, len(prefix), logits_from=0)
    ctx.reset()
    ctx.evaluate(0, prefix, 0, logits_from=None)
    fresh = ctx.evaluate(0, forced, len(prefix), logits_from=0)
    assert np.array_equal(cut, fresh)


def test_a_cut_within_the_window_keeps_its_cells(gemma):
    """The counts move only on the path that ran: a sequence that never outgrew the window is
    cut back in place, and a clear (a cut to 0) is no cut at all."""
    ctx = _ctx(gemma, "ctk=q8_0,ctv=q8_0", "within")
    ctx.reset()
    ctx.evaluate(0, _tokens(WINDOW, 13), 0, logits_from=None)  # exactly the window: nothing masked yet
    before = _cuts(ctx)
    ctx.truncate(0, WINDOW // 2)
    assert _cuts(ctx, before) == dict(NO_CUTS, cut_kept=1)
    ctx.clear(0)
    ctx.evaluate(0, _tokens(WINDOW + 1, 14), 0, logits_from=None)  # one past it
    ctx.truncate(0, 0)
    assert _cuts(ctx, before) == dict(NO_CUTS, cut_kept=1)
    ctx.evaluate(0, _tokens(WINDOW + 1, 14), 0, logits_from=None)
    ctx.truncate(0, WINDOW // 2)
    assert _cuts(ctx, before) == dict(NO_CUTS, cut_kept=1, cut_rebuilt_window=1)


def test_sequences_cut_past_the_window_match_a_single_context(gemma):
    eng, path = gemma
    single = _ctx(gemma, "ctk=q8_0,ctv=q8_0", "one")
    kv = parse_kv_config("ctk=q8_0,ctv=q8_0")
    types = validate_for_model(kv, E.cache_types(), *read_gguf(path).head_dims, "many")
    many = eng.context(kv, types, E.ContextSettings(n_ctx=400, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=1),
                       "many", n_seq=2)
    prompts = [_tokens(2 * N_BATCH, 7), _tokens(2 * N_BATCH, 8)]
    many.greedy(prompts, 60)
    forced = _tokens(12, 9)[1:]
    many.truncate(1, len(prompts[1]))
    rows = []
    many.evaluate_each(1, forced, len(prompts[1]), 0, lambda first, view: rows.append(view.copy()))
    single.reset()
    single.evaluate(0, prompts[1], 0, logits_from=None)
    expect = single.evaluate(0, forced, len(prompts[1]), logits_from=0)
    assert np.array_equal(np.concatenate(rows), expect)


@pytest.fixture(scope="module")
def jamba(tmp_path_factory):
    path = write_tiny_family(tmp_path_factory.mktemp("hybrid") / "jamba.gguf", "jamba")
    eng = E.Engine(path)
    yield eng, path
    eng.close()


def test_hybrid_prefix_reuse_and_teacher_forcing_are_exact(jamba):
    assert not jamba[0].is_recurrent  # a hybrid: it has a KV cache to audit
    ctx = _ctx(jamba, "ctk=q8_0,ctv=q8_0", "hybrid")
    fresh, reused = _prefill_after_a_long_sequence(ctx)
    assert np.array_equal(fresh, reused)
    prefix, forced = _tokens(2 * N_BATCH, 10), _tokens(20, 11)[1:]
    ctx.reset()
    ctx.evaluate(0, prefix + _tokens(50, 12)[1:], 0, logits_from=None)
    before = _cuts(ctx)
    ctx.truncate(0, len(prefix))  # llama.cpp cannot roll the recurrent state back: rebuilt
    assert _cuts(ctx, before) == dict(NO_CUTS, cut_rebuilt_engine=1)
    cut = ctx.evaluate(0, forced, len(prefix), logits_from=0)
    ctx.reset()
    ctx.evaluate(0, prefix, 0, logits_from=None)
    assert np.array_equal(cut, ctx.evaluate(0, forced, len(prefix), logits_from=0))


def test_the_report_says_which_cut_path_ran(pytester, tiny_corpus):
    """Through the plugin, as users run it: R-NIAH's second trial shares its first's haystack up
    to the needle (past one 512-token batch at position 0.9 of 1100 tokens). With the window
    cache the reuse is refused and counted; with swa_full=on the cells are kept and counted."""
    model = write_tiny_family(pytester.path / "gemma.gguf", "gemma3", n_ctx_train=2048)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={model}", f"--refract-corpus={tiny_corpus}", "--refract-axes=rniah",
        "--refract-rniah-lengths=1100", "--refract-rniah-positions=0.9", "--refract-rniah-trials=2",
        "--refract-threads=1", "--refract-no-progress", "--refract-no-sensitivity",
        "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-candidate=ctk=q8_0,ctv=q8_0,swa_full=on",
        f"--refract-json={report}", "-p", "no:cacheprovider",
    )
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    data = read_report(report)
    assert data["complete"] is True
    computes = {sec["candidate"]: sec["axes"]["rniah"]["compute"] for sec in data["candidates"]}
    window, full = computes["ctk=q8_0,ctv=q8_0"], computes["ctk=q8_0,ctv=q8_0,swa_full=on"]
    # The reference (an f16 window cache) ran in the first candidate's items only.
    assert window["reference"]["cut_reuse_refused_window"] == 1 and window["reference"]["cut_kept"] == 0
    assert window["cand0"]["cut_reuse_refused_window"] == 1 and window["cand0"]["cut_kept"] == 0
    assert full["cand1"]["cut_reuse_refused_window"] == 0 and full["cand1"]["cut_kept"] == 1
    for counts in (window["reference"], window["cand0"], full["cand1"]):
        assert counts["cut_rebuilt_window"] == counts["cut_rebuilt_engine"] == 0
