"""Reading llama.cpp's log of a context's creation, rotation policies as environment, and the
library checks of --refract-llama-lib: pure functions, no llama.cpp needed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_refract.engines import kvlog, libload
from pytest_refract.engines.kvconfig import ROTATION_POLICIES, parse_kv_config
from pytest_refract.errors import UsageProblem

# Lines as upstream llama.cpp (llama-cpp-python 0.3.36's vendored copy) logs them.
UPSTREAM_LOG = [
    (2, "llama_kv_cache:        CPU KV buffer size =     2.29 MiB\n"),
    (2, "llama_kv_cache: size =    2.29 MiB (   256 cells,  30 layers,  1/1 seqs), K (q8_0):    1.49 MiB, "
        "V (q4_0):    0.79 MiB\n"),
    (2, "llama_kv_cache: attn_rot_k = 1, n_embd_head_k_all = 64\n"),
    (2, "llama_kv_cache: attn_rot_v = 1, n_embd_head_k_all = 64\n"),
]
FORK_LOG = [
    (2, "llama_kv_cache: turbo zero-padding V head_dim 64 -> 128 (cache 192 -> 384)\n"),
    (2, "llama_kv_cache: size =    3.26 MiB (   256 cells,  30 layers,  1/1 seqs), K (q8_0):    1.49 MiB, "
        "V (turbo4):    1.76 MiB\n"),
    (2, "llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 64\n"),
    (2, "llama_kv_cache: attn_rot_v = 1, n_embd_head_k_all = 64\n"),
]


def test_parse_upstream_log():
    facts = kvlog.parse_log(UPSTREAM_LOG)
    assert facts.rotation == {"k": True, "v": True}
    assert facts.caches == [kvlog.CacheAllocation(256, "q8_0", 1.49, "q4_0", 0.79, layers=30)]
    assert facts.errors == []


def test_parse_fork_log_per_side_rotation():
    facts = kvlog.parse_log(FORK_LOG)
    assert facts.rotation == {"k": False, "v": True}
    assert facts.caches[0].v_type == "turbo4" and facts.caches[0].v_mib == 1.76


def test_no_rotation_lines_means_unknown_not_off():
    facts = kvlog.parse_log(UPSTREAM_LOG[:2])
    assert facts.rotation is None
    assert "predates rotation" in kvlog.check_rotation("off", None, (True, True), "cand")


def test_refusal_reason_is_the_specific_error():
    errors = kvlog.parse_log([
        (4, "llama_init_from_model: V cache type q4_K with block size 256 does not divide n_embd_head_v=64\n"),
        (4, "llama_init_from_model: failed to initialize the context\n"),
        (2, "llama_kv_cache: info line\n"),
    ]).errors
    assert kvlog.refusal_reason(errors) == (
        "llama_init_from_model: V cache type q4_K with block size 256 does not divide n_embd_head_v=64")
    assert kvlog.refusal_reason([]) is None


def test_rotation_env_sets_what_both_builds_read():
    assert kvlog.rotation_env("default") == dict.fromkeys(kvlog.ROTATION_VARS)
    assert kvlog.rotation_env("off")["LLAMA_ATTN_ROT_DISABLE"] == "1"
    assert kvlog.rotation_env("v") == {"LLAMA_ATTN_ROT_DISABLE": None, "LLAMA_ATTN_ROT_K_OVERRIDE": None,
                                       "LLAMA_ATTN_ROT_V_OVERRIDE": "1"}
    assert kvlog.rotation_env("kv")["LLAMA_ATTN_ROT_K_OVERRIDE"] == kvlog.rotation_env("kv")["LLAMA_ATTN_ROT_V_OVERRIDE"] == "1"


def test_recorded_env_keeps_llama_and_ggml_variables_only():
    env = {"LLAMA_ATTN_ROT_DISABLE": "1", "GGML_SCHED_MAX_COPIES": "2", "HOME": "/root", "XLLAMA_X": "1"}
    assert kvlog.recorded_env(env) == {"GGML_SCHED_MAX_COPIES": "2", "LLAMA_ATTN_ROT_DISABLE": "1"}


def test_per_side_policy_on_an_all_or_nothing_build_is_one_line():
    msg = kvlog.check_rotation("k", {"k": True, "v": True}, (True, True), "--refract-candidate ctk=q8_0,ctv=q4_0,rot=k")
    assert msg == ("--refract-candidate ctk=q8_0,ctv=q4_0,rot=k: rot=k was not honoured: this build rotated V "
                   "(rotated K+V) (upstream llama.cpp only knows all-or-nothing rotation, LLAMA_ATTN_ROT_DISABLE; "
                   "per-side rotation needs a build such as the TurboQuant fork)")
    assert "\n" not in msg


def test_honoured_policies_pass():
    assert kvlog.check_rotation("off", {"k": False, "v": False}, (True, True), "c") is None
    assert kvlog.check_rotation("v", {"k": False, "v": True}, (True, True), "c") is None
    assert kvlog.check_rotation("kv", {"k": True, "v": True}, (True, True), "c") is None
    # A float side has nothing to rotate: asking for it is not a refusal.
    assert kvlog.check_rotation("kv", {"k": True, "v": False}, (True, False), "c") is None
    assert kvlog.check_rotation("default", {"k": True, "v": False}, (True, True), "c") is None


@given(st.sampled_from(ROTATION_POLICIES), st.booleans(), st.booleans())
def test_check_rotation_refuses_exactly_the_mismatches(policy, got_k, got_v):
    msg = kvlog.check_rotation(policy, {"k": got_k, "v": got_v}, (True, True), "c")
    want_k, want_v = policy in ("k", "kv"), policy in ("v", "kv")
    honoured = policy == "default" or (want_k == got_k and want_v == got_v)
    assert (msg is None) == honoured


def test_side_bytes_prefer_the_exact_layout_that_reproduces_the_log():
    # SmolLM2 q8_0 K: 30 layers x row(q8_0, 3 heads x 64) = 30 x 204 bytes; 256 cells print 1.49 MiB.
    assert kvlog.side_bytes_per_token(1.49, 256, [6120]) == (6120, True)
    # turbo4 V padded 64 -> 128 per head: the unpadded figure does not reproduce 1.45 MiB, the padded one does.
    unpadded, padded = 30 * 3 * 64 // 128 * 66, 30 * 3 * 128 // 128 * 66
    assert kvlog.side_bytes_per_token(1.45, 256, [unpadded, padded]) == (padded, True)
    # Nothing reproduces it: the printed size over the cells.
    assert kvlog.side_bytes_per_token(1.76, 256, [100]) == (round(1.76 * 1024 * 1024 / 256), False)


@given(st.integers(1, 50_000), st.sampled_from([256, 512, 4096]))
def test_side_bytes_recover_any_exact_size_from_its_printed_form(per_cell, cells):
    printed = round(per_cell * cells / (1024 * 1024), 2)
    assert kvlog.side_bytes_per_token(printed, cells, [per_cell]) == (per_cell, True)


@pytest.mark.parametrize("policy", ROTATION_POLICIES)
def test_rot_round_trips_through_the_label(policy):
    kv = parse_kv_config(f"ctk=q8_0,ctv=turbo4,rot={policy.upper()}")
    assert kv.rot == policy
    assert parse_kv_config(kv.label()) == kv
    assert ("rot=" in kv.label()) == (policy != "default")


def test_configs_differing_only_in_rotation_get_distinct_ids():
    a, b = parse_kv_config("ctk=q8_0,ctv=q4_0"), parse_kv_config("ctk=q8_0,ctv=q4_0,rot=off")
    assert a != b and a.short() == "q8_0-q4_0" and b.short() == "q8_0-q4_0-rot_off"


def test_unknown_rotation_policy_is_one_line():
    with pytest.raises(UsageProblem) as err:
        parse_kv_config("ctk=q8_0,ctv=q4_0,rot=both")
    assert str(err.value) == ("KV config 'ctk=q8_0,ctv=q4_0,rot=both': rot='both' is not a rotation policy; "
                              "choose from default, off, k, v, kv")


def test_abi_mismatch_names_the_matching_bindings():
    msg = libload.abi_problem(library_has_newer_symbols=False, bindings="0.3.36")
    assert "matches llama-cpp-python 0.3.22" in msg
    assert "CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install --no-cache-dir llama-cpp-python==0.3.22" in msg
    assert "0.3.36" in libload.abi_problem(library_has_newer_symbols=True, bindings="0.3.22")
    assert libload.abi_problem(library_has_newer_symbols=True, bindings="0.3.36") is None
    assert libload.abi_problem(library_has_newer_symbols=False, bindings="0.3.22") is None


def test_import_failure_with_a_missing_symbol_is_one_line(tmp_path):
    exc = RuntimeError(f"Failed to load shared library '{tmp_path}/libllama.so': {tmp_path}/x.so: "
                       "undefined symbol: llama_version")
    msg = libload.import_problem(exc, tmp_path)
    assert "lacks llama_version" in msg and "llama-cpp-python==0.3.22" in msg and "\n" not in msg


def test_library_digest_changes_with_any_byte(tmp_path):
    a, b = tmp_path / "libllama.so", tmp_path / "libggml.so"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    first = libload.library_digest([a, b])
    b.write_bytes(b"twO")
    assert libload.library_digest([a, b]) != first
    assert libload.library_digest([]) is None
