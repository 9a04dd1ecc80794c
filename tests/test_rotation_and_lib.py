"""Rotation policies and llama.cpp libraries, run as users run the plugin.

Stock build (llama-cpp-python's own llama.cpp): the tiny model for the library flag and the
facts read back from llama.cpp's log, SmolLM2 for rotation (its 64-wide heads are what
llama.cpp rotates). TurboQuant fork: tests marked ``fork`` run when REFRACT_FORK_LIB names the
folder of a shared-library build of the fork and skip otherwise (CI has no copy of the fork)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import one_usage_error_line, read_report

from pytest_refract.engines import libload
from pytest_refract.errors import UsageProblem


def _tiny_args(model, prompts, corpus, *extra):
    return [f"--refract-model={model}", f"--refract-prompts={prompts}", f"--refract-corpus={corpus}",
            "--refract-ctx=64", "--refract-chunks=2", "--refract-n-predict=8", "--refract-threads=1", *extra]




def _own_library_folder() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


# --------------------------------------------------------------------------- stock, tiny model


def test_own_library_folder_is_loaded_named_and_digested(pytester, tiny_model, tiny_prompts, tiny_corpus):
    folder = _own_library_folder()
    if libload.find_library(folder) is None:
        pytest.skip("this llama-cpp-python was installed bindings-only: it has no library folder of its own")
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*_tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                       "--refract-candidate=ctk=q8_0,ctv=q8_0", "-k", "kld", "--refract-no-sensitivity",
                                                       f"--refract-llama-lib={folder}", f"--refract-json={report}"))
    assert result.ret == 0, result.stdout.str()
    data = read_report(report)
    build = data["llama_cpp_build"]
    assert build["library_folder"] == "lib"
    assert re.fullmatch(r"[0-9a-f]{64}", build["library_digest"])
    assert "libllama.so" in build["libraries"] and any(n.startswith("libggml") for n in build["libraries"])
    assert build["ggml_version"]
    # The tiny model's heads are 32 wide: llama.cpp rotates only multiples of 64, and says so.
    assert data["rotation"] == {"k": False, "v": False}
    assert data["reference_rotation"] == {"k": False, "v": False}
    # Sizes as llama.cpp allocated them; the tiny model's 2 layers x 2 heads x 32: f16 K+V = 512 bytes.
    assert data["reference_kv_bytes_per_token"] == 512
    assert data["reference_kv_allocation"]["exact"] is True
    assert data["kv_allocation"]["k_type"] == "q8_0" and data["kv_allocation"]["bytes_per_token"] == 2 * (68 + 68)
    assert all(re.match(r"^(LLAMA_|GGML_)", k) for k in data["context_env"])


def test_reference_cache_is_keyed_by_the_library_digest(pytester, tiny_model, tiny_prompts, tiny_corpus, tmp_path):
    """Two copies of the same build share cache entries; one byte more in libllama, and the
    reference is measured afresh."""
    import shutil

    own = _own_library_folder()
    if libload.find_library(own) is None:
        pytest.skip("this llama-cpp-python was installed bindings-only: it has no library folder of its own")
    first, second, changed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (first, second, changed):
        shutil.copytree(own, folder, symlinks=True)
    lib = changed / libload.find_library(changed).resolve().name
    lib.write_bytes(lib.read_bytes() + b"\0")  # ELF loaders ignore trailing bytes

    def run(folder, name):
        report = pytester.path / f"{name}.json"
        result = pytester.runpytest_subprocess(*_tiny_args(
            tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0", "-k", "kld", "--refract-no-sensitivity",
            f"--refract-llama-lib={folder}", f"--refract-cache-dir={tmp_path / 'cache'}", f"--refract-json={report}"))
        assert result.ret == 0, result.stdout.str()
        return read_report(report)

    a = run(first, "a")
    b = run(second, "b")
    c = run(changed, "c")
    assert a["llama_cpp_build"]["library_digest"] == b["llama_cpp_build"]["library_digest"]
    assert c["llama_cpp_build"]["library_digest"] != a["llama_cpp_build"]["library_digest"]
    assert a["reference_cache"]["misses"] == 2 and a["reference_cache"]["hits"] == 0
    assert b["reference_cache"]["hits"] == 2 and b["reference_cache"]["misses"] == 0
    assert c["reference_cache"]["hits"] == 0 and c["reference_cache"]["misses"] == 2


def test_creation_log_is_printed_only_with_verbose(pytester, tiny_model, tiny_prompts, tiny_corpus):
    args = _tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0", "-k", "kld",
                      "--refract-no-sensitivity", "-s")
    quiet = pytester.runpytest_subprocess(*args)
    loud = pytester.runpytest_subprocess(*args, "-v")
    assert quiet.ret == loud.ret == 0
    assert "attn_rot_k" not in quiet.stdout.str() + quiet.stderr.str()
    assert "attn_rot_k = 0" in loud.stdout.str() + loud.stderr.str()


def test_llama_lib_after_llama_cpp_was_imported_elsewhere_is_one_line(tmp_path):
    import llama_cpp  # noqa: F401  (imported from its own folder, as a user's conftest might)

    other = tmp_path / "build" / "bin"
    other.mkdir(parents=True)
    (other / "libllama.so").write_bytes(b"not loaded")
    with pytest.raises(UsageProblem) as err:
        libload.use_library(str(other))
    msg = str(err.value)
    assert "llama_cpp is already imported in this process" in msg and "\n" not in msg


def test_a_library_that_does_not_load_is_one_line(pytester, tiny_model, tiny_prompts, tiny_corpus, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "libllama.so").write_bytes(b"\x7fELF not really")
    result = pytester.runpytest_subprocess(*_tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                       "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                       f"--refract-llama-lib={folder}"))
    assert "libllama.so does not load" in one_usage_error_line(result)


def test_llama_lib_ini_key(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytester.makeini("[pytest]\nrefract_llama_lib = /nonexistent/ini-build\n")
    result = pytester.runpytest_subprocess(*_tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                       "--refract-candidate=ctk=q8_0,ctv=q8_0"))
    assert "folder /nonexistent/ini-build does not exist" in one_usage_error_line(result)


# --------------------------------------------------------------------------- stock, SmolLM2


@pytest.mark.smollm2
def test_rotation_off_vs_default_on_smollm2(pytester, smollm2):
    """Upstream llama.cpp rotates quantized caches by default: rot=off must switch that off,
    read back from llama.cpp's log, and give a different KLD (the same cache sizes)."""
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={smollm2}", "--refract-axes=kld", "--refract-ctx=256", "--refract-chunks=2",
        "--refract-candidate=ctk=q8_0,ctv=q4_0", "--refract-candidate=ctk=q8_0,ctv=q4_0,rot=off",
        f"--refract-json={report}", "--refract-gate=raw", "--refract-fail-under=0",
    )
    assert result.ret == 0, result.stdout.str()  # about rotation, not the gate: raw, never failing
    data = read_report(report)
    default, off = data["candidates"]
    assert default["candidate"] == "ctk=q8_0,ctv=q4_0" and off["candidate"] == "ctk=q8_0,ctv=q4_0,rot=off"
    assert default["rotation"] == {"k": True, "v": True}
    assert off["rotation"] == {"k": False, "v": False}
    assert off["context_env"].get("LLAMA_ATTN_ROT_DISABLE") == "1"
    assert "LLAMA_ATTN_ROT_DISABLE" not in default["context_env"]
    kld_default, kld_off = default["axes"]["kld"]["mean_kld"], off["axes"]["kld"]["mean_kld"]
    assert kld_default > 0 and kld_off > 0 and kld_default != kld_off
    # SmolLM2: 30 layers x 3 KV heads x 64. q8_0 rows of 192 are 204 bytes, q4_0 rows 108, f16 384.
    assert default["kv_cache"]["bytes_per_token"] == off["kv_cache"]["bytes_per_token"] == 30 * (204 + 108)
    assert data["reference_kv_bytes_per_token"] == 30 * 2 * 384
    assert data["rotation"] == default["rotation"]
    assert {r["candidate"]: r["rotation"] for r in data["ranking"]}[off["candidate"]] == {"k": False, "v": False}


@pytest.mark.smollm2
def test_per_side_rotation_on_a_stock_build_is_one_line(pytester, smollm2):
    result = pytester.runpytest_subprocess(f"--refract-model={smollm2}", "--refract-axes=none",
                                           "--refract-candidate=ctk=q8_0,ctv=q4_0,rot=v")
    line = one_usage_error_line(result)
    assert "rot=v was not honoured: this build rotated K (rotated K+V)" in line
    assert "all-or-nothing" in line


@pytest.mark.smollm2
def test_refused_cache_type_quotes_llama_cpp_on_smollm2(pytester, smollm2):
    result = pytester.runpytest_subprocess(f"--refract-model={smollm2}", "--refract-axes=none",
                                           "--refract-candidate=ctk=q8_0,ctv=q4_k")
    line = one_usage_error_line(result)
    assert "llama.cpp refused a context for ctk=q8_0,ctv=q4_k" in line
    assert "V cache type q4_K with block size 256 does not divide n_embd_head_v=64" in line


# --------------------------------------------------------------------------- TurboQuant fork


TURBO4_BLOCK_BYTES = 68  # ggml_row_size(turbo4, 128) in the fork (a norm and 4-bit indices per 128 values)


def _fork_lib() -> Path:
    folder = os.environ.get("REFRACT_FORK_LIB")
    if not folder:
        pytest.skip("REFRACT_FORK_LIB does not name a shared-library build of the TurboQuant fork")
    return Path(folder)


def _bindings() -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", libload.bindings_version() or "0")[:3])


@pytest.mark.fork
def test_fork_library_with_newer_bindings_names_the_matching_version(pytester, tiny_model, tiny_prompts, tiny_corpus):
    folder = _fork_lib()
    if _bindings() < (0, 3, 36):
        pytest.skip("needs llama-cpp-python 0.3.36 bindings, which do not match the fork")
    result = pytester.runpytest_subprocess(*_tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                       "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                       f"--refract-llama-lib={folder}"))
    line = one_usage_error_line(result)
    assert "matches llama-cpp-python 0.3.22" in line
    assert "CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install --no-cache-dir llama-cpp-python==0.3.22" in line


@pytest.mark.fork
@pytest.mark.smollm2
def test_fork_turbo4_and_per_side_rotation(pytester, smollm2):
    folder = _fork_lib()
    if _bindings() >= (0, 3, 36):
        pytest.skip("the fork needs llama-cpp-python 0.3.22 bindings (bindings-only install)")
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={smollm2}", f"--refract-llama-lib={folder}", "--refract-axes=kld", "--refract-ctx=256",
        # What this test reads is the rotation and the allocation, not the verdict: the raw gate.
        "--refract-chunks=2", "--refract-gate=raw", "--refract-fail-under=0", f"--refract-json={report}",
        "--refract-candidate=ctk=q8_0,ctv=turbo4", "--refract-candidate=ctk=q8_0,ctv=turbo4,rot=v",
        "--refract-candidate=ctk=q8_0,ctv=turbo4,rot=off",
    )
    assert result.ret == 0, result.stdout.str()
    data = read_report(report)
    build = data["llama_cpp_build"]
    assert build["library_folder"] == folder.name and re.fullmatch(r"[0-9a-f]{64}", build["library_digest"])
    default, v_only, off = data["candidates"]
    # The fork rotates nothing by default and one side on request.
    assert default["rotation"] == {"k": False, "v": False}
    assert v_only["rotation"] == {"k": False, "v": True}
    assert off["rotation"] == {"k": False, "v": False}
    assert v_only["context_env"]["LLAMA_ATTN_ROT_V_OVERRIDE"] == "1"
    assert v_only["axes"]["kld"]["mean_kld"] != default["axes"]["kld"]["mean_kld"]
    # turbo4's 64-wide heads are zero-padded to 128: the cache llama.cpp allocated, not the
    # unpadded arithmetic.
    alloc = default["kv_allocation"]
    assert alloc["v_type"] == "turbo4" and alloc["exact"] is True
    assert alloc["k_bytes_per_token"] == 30 * 204
    assert alloc["v_bytes_per_token"] == 30 * 3 * TURBO4_BLOCK_BYTES  # one 128-wide block per padded head
    assert default["kv_cache"]["bytes_per_token"] == alloc["k_bytes_per_token"] + alloc["v_bytes_per_token"]
