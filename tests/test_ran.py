"""What really ran: llama.cpp's warnings named from recorded log lines (engines/kvlog.py),
flash attention as llama.cpp reported it, and the one-line summary (report/ran.py). Pure
functions on log text; no llama.cpp."""

from __future__ import annotations

import pytest

from pytest_refract.engines import kvlog
from pytest_refract.report.ran import ran_text, warning_lines

# Recorded llama.cpp log lines (level, text) for each named warning. The CUDA vector kernel's
# conversion and the scheduler's CPU placement are llama.cpp's own messages; the type change
# is a fork's wording.
RECORDED = {
    "kv_converted_to_f16": "ggml_cuda_flash_attn_ext_vec: no FlashAttention vector kernel compiled for K/V types "
                           "q8_0-q5_1, converting K and V to f16 instead (slow). Add \"q8_0-q5_1\" to "
                           "GGML_CUDA_FA_QUANTS to compile it.\n",
    "attention_on_cpu": "sched_reserve: layer 2 is assigned to device CUDA0 but the Flash Attention tensor is assigned "
                        "to device CPU (usually due to missing support)\n",
    "flash_attn_disabled": "sched_reserve: Flash Attention was auto, set to disabled\n",
    "cache_type_changed": "llama_kv_cache: symmetric turbo3 K on GQA ratio 6: upgrading K cache type turbo3 -> q8_0\n",
    "bf16_as_f16": "ggml_cuda_flash_attn_ext_vec: no FlashAttention vector kernel compiled for K/V types bf16-bf16, "
                   "converting K and V to f16 instead (slow). Add \"bf16-bf16\" to GGML_CUDA_FA_QUANTS to compile it.\n",
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_each_known_warning_is_named(name):
    assert name in kvlog.warning_names(RECORDED[name])


def test_names_do_not_spill_onto_other_warnings():
    assert kvlog.warning_names(RECORDED["kv_converted_to_f16"]) == ["kv_converted_to_f16"]
    assert kvlog.warning_names(RECORDED["attention_on_cpu"]) == ["attention_on_cpu"]
    assert kvlog.warning_names(RECORDED["bf16_as_f16"]) == ["kv_converted_to_f16", "bf16_as_f16"]
    assert kvlog.warning_names("llama_context: n_ctx_seq (512) < n_ctx_train (8192) -- the full capacity of the model "
                               "will not be utilized") == []
    assert kvlog.warning_names("cuda: flash attention falls back to the CPU backend for K/V types q5_1-q5_1") == [
        "attention_on_cpu"]


def test_warnings_of_a_creation_log_are_kept_with_their_names():
    log = [(2, "llama_context: flash_attn    = enabled\n"),
           (3, RECORDED["attention_on_cpu"]), (3, RECORDED["attention_on_cpu"]),
           (3, "llama_context: n_ctx_seq (512) < n_ctx_train (8192) -- the full capacity of the model will not be "
               "utilized\n")]
    facts = kvlog.parse_log(log)
    assert facts.flash_attn == "on"
    named = kvlog.named_warnings(facts.warnings)
    assert [w["names"] for w in named] == [["attention_on_cpu"], []]  # each message once, unnamed ones kept


@pytest.mark.parametrize("lines, expected", [
    (["llama_context: flash_attn    = enabled"], "on"),
    (["llama_context: flash_attn    = disabled"], "off"),
    (["llama_context: flash_attn    = 1"], "on"),
    (["llama_context: flash_attn    = auto", "sched_reserve: Flash Attention was auto, set to disabled"], "off"),
    (["llama_context: flash_attn    = auto", "sched_reserve: Flash Attention was auto, set to enabled"], "on"),
    (["llama_context: n_batch       = 512"], None),
])
def test_flash_attention_as_llama_cpp_reported_it(lines, expected):
    assert kvlog.parse_log([(2, line + "\n") for line in lines]).flash_attn == expected


def test_ran_text():
    ran = {"type_k": "q8_0", "type_v": "q4_0", "flash_attn": "on", "rotation": {"k": True, "v": False},
           "library": {"path": "/opt/llama/libllama.so", "sha256": "0123456789abcdef" * 4, "system_info": "CPU"},
           "warnings": kvlog.named_warnings([RECORDED["kv_converted_to_f16"]])}
    assert ran_text(ran) == ("K q8_0 / V q4_0, flash attention on, rotated K; libllama.so sha256 0123456789ab; "
                             "1 warning(s) (kv_converted_to_f16)")
    assert warning_lines(ran)[0].startswith("[kv_converted_to_f16] ggml_cuda_flash_attn_ext_vec: no FlashAttention")
    assert ran_text(None) == "not recorded"
    assert ran_text(dict(ran, warnings=[], rotation={"k": False, "v": False})).endswith("no rotation; libllama.so "
                                                                                       "sha256 0123456789ab; no warnings")
