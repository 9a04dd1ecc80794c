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


# --------------------------------------------------------------------------- the layout guard

import ctypes  # noqa: E402

from pytest_refract.engines.libload import context_params_problem  # noqa: E402


class _Params(ctypes.Structure):
    """The leading fields of llama_context_params as 0.3.24+ bindings declare them, up to the
    cache types (cb_eval and its data collapsed into two pointers)."""

    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_ubatch", ctypes.c_uint32),
                ("n_seq_max", ctypes.c_uint32), ("n_threads", ctypes.c_int32), ("n_threads_batch", ctypes.c_int32),
                ("cb_eval", ctypes.c_void_p), ("cb_eval_user_data", ctypes.c_void_p),
                ("type_k", ctypes.c_int), ("type_v", ctypes.c_int)]


class _OlderLibrary(ctypes.Structure):
    """What a library of another llama.h writes: two 32-bit fields fewer before the cache types."""

    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_ubatch", ctypes.c_uint32),
                ("n_seq_max", ctypes.c_uint32), ("cb_eval", ctypes.c_void_p), ("cb_eval_user_data", ctypes.c_void_p),
                ("type_k", ctypes.c_int), ("type_v", ctypes.c_int), ("pad", ctypes.c_int * 4)]


def _defaults(struct):
    params = struct(n_ctx=512, n_batch=2048, n_ubatch=512, n_seq_max=1, type_k=1, type_v=1)
    if hasattr(params, "n_threads"):
        params.n_threads = params.n_threads_batch = 4
    return params


def test_layout_guard_accepts_matching_defaults():
    assert context_params_problem(_defaults(_Params), "0.3.36") is None


def test_layout_guard_refuses_a_shifted_layout():
    """The library fills its own (older) struct; the bindings read it through theirs."""
    library_side = _defaults(_OlderLibrary)
    seen_by_bindings = _Params.from_buffer_copy(bytes(library_side) + b"\0" * max(0, ctypes.sizeof(_Params)
                                                                                   - ctypes.sizeof(_OlderLibrary)))
    problem = context_params_problem(seen_by_bindings, "0.3.36")
    assert problem is not None and "\n" not in problem
    assert problem.startswith("llama-cpp-python 0.3.36's llama_context_params layout does not match the loaded "
                              "llama.cpp library: its defaults read back as ")
    assert "type_k=0" in problem  # the bindings' type_k lies beyond the library's cache types
    assert "pip install" in problem


@pytest.mark.parametrize("field, value", [("type_k", 0), ("type_v", 8), ("n_batch", 0), ("n_seq_max", 0),
                                          ("n_ubatch", 4096)])
def test_layout_guard_names_each_implausible_default(field, value):
    params = _defaults(_Params)
    setattr(params, field, value)
    problem = context_params_problem(params, "0.3.36")
    assert problem is not None and (f"{field}={value}" in problem or f"n_ubatch {value} > n_batch" in problem)


def test_layout_guard_passes_the_installed_bindings_and_library():
    llama_cpp = pytest.importorskip("llama_cpp")
    assert context_params_problem(llama_cpp.llama_context_default_params()) is None


def test_the_engine_refuses_mismatched_bindings_before_any_context(monkeypatch):
    pytest.importorskip("llama_cpp")
    from pytest_refract.engines import llamacpp
    from pytest_refract.errors import UsageProblem

    wrong = _defaults(_Params)
    wrong.type_k = 0
    monkeypatch.setattr(llamacpp.llama_cpp, "llama_context_default_params", lambda: wrong)
    with pytest.raises(UsageProblem, match="layout does not match"):
        llamacpp.check_context_params()
    monkeypatch.setattr(llamacpp, "_backend_ready", False)
    with pytest.raises(UsageProblem, match="layout does not match"):
        llamacpp._init_backend()


@pytest.mark.parametrize("schema, readable", [("pytest-refract.report.v1", True), ("pytest-refract.report.v2", True),
                                              ("pytest-refract.report.v3", True), ("pytest-refract.report.v4", False)])
def test_reports_of_every_additive_schema_version_load(tmp_path, schema, readable):
    import json

    from pytest_refract.report.jsonio import SCHEMA
    from pytest_refract.report.schema import ReportFileError, load_report

    assert SCHEMA == "pytest-refract.report.v3"
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": schema, "composite": 90.0, "candidate": "c", "reference": "r", "axes": {}}))
    if readable:
        assert load_report(path)["schema"] == schema
    else:
        with pytest.raises(ReportFileError, match="not a pytest-refract report"):
            load_report(path)
