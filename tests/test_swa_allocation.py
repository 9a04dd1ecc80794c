"""Sliding-window models' KV memory as llama.cpp allocated it: two caches (full-attention layers
with the context's cells, SWA layers with a window plus a micro-batch), read from its log,
reported apart, never every layer times the context. The expected figures are computed here
from the model's own shape (layers, KV heads, head size, bytes per f16/q8_0/q4_0 element),
not from the log they are checked against."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import write_tiny_family

from pytest_refract.engines import kvlog
from pytest_refract.engines.allocation import context_kv_bytes, kv_allocation, kv_memory_summary

# bytes per element of each cache type (q8_0: 34 bytes per 32; q4_0: 18 bytes per 32)
BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

GEMMA_LOG = [
    (2, "llama_kv_cache_iswa: creating non-SWA KV cache, size = 4608 cells\n"),
    (2, "llama_kv_cache: size =   13.50 MiB (  4608 cells,   3 layers,  1/1 seqs), K (f16):    6.75 MiB, "
        "V (f16):    6.75 MiB\n"),
    (2, "llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells\n"),
    (2, "llama_kv_cache: size =   15.00 MiB (  1024 cells,  15 layers,  1/1 seqs), K (f16):    7.50 MiB, "
        "V (f16):    7.50 MiB\n"),
]


def test_parse_log_tells_the_two_caches_apart():
    facts = kvlog.parse_log(GEMMA_LOG)
    assert [(c.kind, c.cells, c.layers, c.streams) for c in facts.caches] == [("full", 4608, 3, 1), ("swa", 1024, 15, 1)]
    # A model with one cache: no kind.
    one = kvlog.parse_log([(2, "llama_kv_cache: size =    2.29 MiB (   256 cells,  30 layers,  2/2 seqs), "
                               "K (q8_0):    1.49 MiB, V (q4_0):    0.79 MiB\n")])
    assert [(c.kind, c.layers, c.streams) for c in one.caches] == [(None, 30, 2)]


class _Info:
    """The metadata kv_allocation reads, for a Gemma-3-270M-shaped model."""

    def __init__(self, n_layer=18, n_head_kv=1, head=256):
        self.meta = {"block_count": n_layer, "attention.head_count_kv": n_head_kv, "attention.head_count": 4}
        self.head_dims = (head, head)

    def arch_key(self, key, default=None):
        return self.meta.get(key, default)


class _Type:
    def __init__(self, name):
        self.name, self.ggml_type, self.block_size = name, name, 1 if name == "f16" else 32


def _row_size(ggml_type, n):
    return int(n * BYTES[ggml_type])


def _ctx(facts, n_ctx_seq, n_seq=1):
    return type("Ctx", (), {"cache_logs": facts, "n_ctx_seq": n_ctx_seq, "n_seq": n_seq})()


def test_gemma_shaped_allocation_is_full_per_token_plus_a_window():
    facts = kvlog.parse_log(GEMMA_LOG)
    alloc = kv_allocation(_Info(), facts, (_Type("f16"), _Type("f16")), _row_size)
    assert alloc["exact"] is True
    assert alloc["bytes_per_token"] == 3 * 256 * 2 * 2  # 3 full layers x 1 KV head x 256 x f16 x (K+V)
    assert alloc["swa_bytes_per_cell"] == 15 * 256 * 2 * 2
    assert (alloc["full_layers"], alloc["swa_layers"]) == (3, 15)
    # The context's total: full cells x full bytes + SWA cells x SWA bytes, not 18 layers x 4608.
    assert context_kv_bytes(alloc, _ctx(facts, 4608)) == 3072 * 4608 + 15360 * 1024
    assert context_kv_bytes(alloc, _ctx(facts, 4608)) < 18 * 1024 * 4608


def test_kv_vs_reference_compares_like_with_like():
    facts = kvlog.parse_log(GEMMA_LOG)
    ref = kv_allocation(_Info(), facts, (_Type("f16"), _Type("f16")), _row_size)
    q = kvlog.parse_log([
        GEMMA_LOG[0],
        (2, "llama_kv_cache: size =    5.48 MiB (  4608 cells,   3 layers,  1/1 seqs), K (q8_0):    3.59 MiB, "
            "V (q4_0):    1.90 MiB\n"),
        GEMMA_LOG[2],
        (2, "llama_kv_cache: size =    6.09 MiB (  1024 cells,  15 layers,  1/1 seqs), K (q8_0):    3.98 MiB, "
            "V (q4_0):    2.11 MiB\n"),
    ])
    cand = kv_allocation(_Info(), q, (_Type("q8_0"), _Type("q4_0")), _row_size)
    assert cand["bytes_per_token"] == 3 * (272 + 144)  # q8_0 K 272 B + q4_0 V 144 B per 256-wide head
    facts_cmp = kv_memory_summary(cand, ref)
    assert facts_cmp["vs_reference"] == pytest.approx((272 + 144) / 1024)
    assert facts_cmp["swa_vs_reference"] == pytest.approx((272 + 144) / 1024)
    # A model without sliding window: one ratio, no SWA keys.
    plain = kv_allocation(_Info(n_layer=30, head=64), kvlog.parse_log([(2, GEMMA_LOG[1][1].replace("3 layers", "30 layers"))]),
                          (_Type("f16"), _Type("f16")), _row_size)
    assert plain["swa_bytes_per_cell"] is None and "swa_vs_reference" not in kv_memory_summary(plain, plain)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    # 4 layers, sliding window 64 on every other one, 1 KV head of 32: 2 full + 2 SWA layers.
    return write_tiny_family(tmp_path_factory.mktemp("g") / "tiny-gemma3.gguf", "gemma3", n_layer=4)


@pytest.mark.parametrize("ctk,ctv", [("f16", "f16"), ("q8_0", "q4_0")])
@pytest.mark.parametrize("n_ctx,n_seq", [(1024, 1), (2048, 2)])
def test_tiny_gemma3_contexts_hold_what_llama_cpp_allocated(tiny_gemma, ctk, ctv, n_ctx, n_seq):
    from pytest_refract.engines import llamacpp
    from pytest_refract.engines.base import ContextSettings
    from pytest_refract.engines.gguf import read_gguf
    from pytest_refract.engines.kvconfig import parse_kv_config

    engine = llamacpp.Engine(tiny_gemma)
    types = llamacpp.cache_types()
    kv = parse_kv_config(f"ctk={ctk},ctv={ctv}")
    pair = (types[ctk], types[ctv])
    settings = ContextSettings(n_ctx=256, n_batch=512, n_ubatch=512, n_threads=1)
    try:
        probe, _ = engine.probe(kv, pair, settings)
        alloc = kv_allocation(read_gguf(tiny_gemma), probe, pair, llamacpp.row_size)
        per_head = int(32 * BYTES[ctk]) + int(32 * BYTES[ctv])
        assert alloc["exact"] and alloc["bytes_per_token"] == 2 * per_head
        assert alloc["swa_bytes_per_cell"] == 2 * per_head
        ctx = engine.context(kv, pair, settings, "reference", n_seq=n_seq, n_ctx_seq=n_ctx // n_seq)
        cells = {c.kind: (c.cells, c.streams) for c in ctx.cache_logs.caches}
        # llama.cpp's SWA cache: the window (64) plus a micro-batch (512), padded to 256 cells,
        # per stream, and never more than the context's.
        swa_cells = min(n_ctx // n_seq, 768)
        assert cells == {"full": (n_ctx // n_seq, n_seq), "swa": (swa_cells, n_seq)}
        assert context_kv_bytes(alloc, ctx) == n_seq * (2 * per_head * (n_ctx // n_seq) + 2 * per_head * swa_cells)
    finally:
        engine.close()
