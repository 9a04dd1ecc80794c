"""Issue 14: nothing lost, nothing faked. A user's files are never deleted or overwritten, a
failed measurement never becomes a score, and hostile inputs end in one line."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import read_report
from pytest_refract.cli import compare
from pytest_refract.report import schema
from pytest_refract.axes import BUILTIN
from pytest_refract.axes import plad as plad_axis
from pytest_refract.errors import UsageProblem
from pytest_refract.audit.guard import check_outputs, special_file_kind
from pytest_refract.reference.entries import ReferenceCache
from pytest_refract.reference.folder import MARKER, RefCacheWarning, clear_entries, prepare_cache_dir
from pytest_refract.report.build import composite_of, floor_of, repeat_stats
from pytest_refract.scoring.metrics import harmonic_mean, kld_score, trajectory_axis_score
from tiny_model import write_tiny_llama


def _tiny_args(model, prompts, corpus, *extra):
    return [f"--refract-model={model}", f"--refract-prompts={prompts}", f"--refract-corpus={corpus}",
            "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-ctx=64", "--refract-chunks=2",
            "--refract-n-predict=8", "--refract-threads=1", *extra]


def _usage_error(result) -> str:
    """Exit 4, exactly one ERROR line, no traceback; returns that line."""
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == 4, text
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, text
    return errors[0]


def _needs_llama():
    pytest.importorskip("llama_cpp")


# --------------------------------------------------------------------------- no fake scores

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
FINITE_SCORES = st.floats(min_value=0.0, max_value=100.0)


@given(NON_FINITE)
def test_kld_score_of_a_non_finite_kld_is_no_score(value):
    assert kld_score(value) is None
    assert kld_score(None) is None
    assert plad_axis.item_score(value) is None


@given(st.lists(FINITE_SCORES, max_size=5), NON_FINITE, st.integers(min_value=0, max_value=5))
def test_no_non_finite_input_yields_a_finite_score(finite, bad, where):
    scores = list(finite)
    scores.insert(min(where, len(scores)), bad)
    assert harmonic_mean(scores) is None
    assert harmonic_mean(scores[:-1] + [None]) is None
    axes = {f"axis{i}": {"score": s} for i, s in enumerate(scores)}
    assert composite_of(axes) is None
    assert composite_of({"a": {"score": 90.0}}, {"gate": bad}) is None
    assert floor_of({f"axis{i}": {"floor_score": s} for i, s in enumerate(scores)}) is None
    stats = repeat_stats(scores)
    assert stats["mean"] is None and stats["stdev"] is None
    assert trajectory_axis_score([{"prefix_agreement": bad, "ref_len": 8, "cand_len": 8}]) is None
    assert trajectory_axis_score([{"prefix_agreement": 4, "ref_len": bad, "cand_len": 8}]) is None


@given(st.lists(FINITE_SCORES.filter(lambda v: v > 0), min_size=1, max_size=5))
def test_finite_scores_still_make_a_composite(scores):
    composite = harmonic_mean(scores)
    assert composite is not None and min(scores) - 1e-9 <= composite <= max(scores) + 1e-9


@given(NON_FINITE, st.integers(0, 5), st.integers(0, 7), st.booleans())
def test_non_finite_logits_anywhere_yield_no_kld_score(bad, row, col, in_reference):
    from pytest_refract.scoring.metrics import kld_positions, kld_summary

    rng = np.random.default_rng(row * 8 + col)
    ref, cand = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    (ref if in_reference else cand)[row, col] = bad
    with np.errstate(all="ignore"):
        stats = kld_positions(ref, cand, rng.integers(0, 8, 6))
        assert kld_score(kld_summary(**stats)["mean_kld"]) is None


@given(NON_FINITE)
def test_kld_axis_with_a_non_finite_position_has_no_score(bad):
    raw = {"kld": [0.01, bad, 0.02], "p_diff": [0.0, 0.0, 0.0], "nll_ref": [1.0, 1.0, 1.0],
           "nll_cand": [1.0, 1.0, 1.0], "same_top": [1, 1, 1]}
    section = BUILTIN["kld"].aggregate([{"id": "chunk-00", "_raw": raw, "wall_s": 0.0}])
    assert section["score"] is None and section["band"] is None
    assert "not a finite number" in section["error"]
    assert composite_of({"kld": section, "trajectory": {"score": 100.0}}) is None


# --------------------------------------------------------------------------- reference cache folder


def _entry(folder: Path, namespace="0123456789abcdef0123", kind="kld") -> Path:
    path = folder / namespace / kind / ("ab" * 20 + ".rfc")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RFRC")
    return path


def test_cache_refuses_a_folder_of_user_files_and_touches_nothing(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(UsageProblem, match="did not write .*notes.txt.*refusing to use or clear it"):
        prepare_cache_dir(folder, clear=True)
    assert (folder / "notes.txt").read_text() == "hi" and (folder / "sub").is_dir()
    assert not (folder / MARKER).exists()


def test_cache_marks_a_new_folder_and_clears_only_its_own_entries(tmp_path):
    folder = tmp_path / "cache"
    assert prepare_cache_dir(folder) == folder
    marker = json.loads((folder / MARKER).read_text())
    assert marker["written_by"] == "pytest-refract" and isinstance(marker["format"], int)
    ours = _entry(folder)
    # Files a user later put in the marked folder (even inside our layout) survive a clear.
    (folder / "notes.txt").write_text("keep")
    (ours.parent / "mine.txt").write_text("keep")
    prepare_cache_dir(folder, clear=True)
    assert not ours.exists()
    assert (folder / "notes.txt").read_text() == "keep" and (ours.parent / "mine.txt").read_text() == "keep"
    assert (folder / MARKER).is_file()


def test_cache_adopts_a_folder_laid_out_as_it_writes(tmp_path):
    """A cache written before the marker existed is still ours: used, marked, clearable."""
    folder = tmp_path / "old"
    entry = _entry(folder)
    assert prepare_cache_dir(folder) == folder and (folder / MARKER).is_file()
    assert clear_entries(folder) == 1 and not entry.exists() and not (folder / "0123456789abcdef0123").exists()


def test_a_user_file_named_like_the_marker_does_not_mark_the_folder(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / MARKER).write_text("my own notes")
    (folder / "data.csv").write_text("1,2")
    with pytest.raises(UsageProblem, match="refusing"):
        prepare_cache_dir(folder, clear=True)
    assert (folder / MARKER).read_text() == "my own notes"


@pytest.mark.parametrize("layout", ["file", "under_a_file", "proc"])
def test_unusable_cache_folder_is_one_warning_and_no_cache(tmp_path, layout):
    if layout == "file":
        folder = tmp_path / "plain"
        folder.write_text("x")
    elif layout == "under_a_file":
        (tmp_path / "plain").write_text("x")
        folder = tmp_path / "plain" / "cache"
    else:
        folder = Path("/proc/refract-cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_cache_dir(folder, clear=True) is None
    assert len(caught) == 1 and issubclass(caught[0].category, RefCacheWarning)
    assert "measuring without the reference cache" in str(caught[0].message)
    if layout == "file":
        assert folder.read_text() == "x"


def test_cache_entry_replaced_by_a_folder_is_one_warning_then_no_cache(tmp_path):
    cache = ReferenceCache(tmp_path, {"model": "x"})
    key, other = cache.key("kld", [1]), cache.key("kld", [2])
    path = cache._path("kld", key)
    path.mkdir(parents=True)  # where the entry goes, a folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load("kld", key) is None
        cache.store("kld", key, {"a": np.arange(3)})
        cache.store("kld", other, {"a": np.arange(3)})
    assert len(caught) == 1 and "cannot be read" in str(caught[0].message)
    assert not cache.enabled and path.is_dir()
    cache = ReferenceCache(tmp_path, {"model": "x"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.store("kld", key, {"a": np.arange(3)})
    assert len(caught) == 1 and "cannot be written" in str(caught[0].message) and not cache.enabled


def test_cache_entry_with_non_finite_log_probs_is_rejected(tmp_path):
    cache = ReferenceCache(tmp_path, {"model": "x"})
    key = cache.key("kld", [1])
    cache.store("kld", key, {"q": np.zeros((2, 4), np.uint16), "scale": np.array([np.nan, 1], np.float32),
                             "min_log_prob": np.zeros(2, np.float32)})
    with pytest.warns(RefCacheWarning, match="non-finite"):
        assert cache.load("kld", key) is None


# --------------------------------------------------------------------------- paths


def test_special_files_are_named_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert special_file_kind(fifo) == "a FIFO (named pipe)"  # returns: a FIFO is never opened
    assert special_file_kind("/dev/null") == "a character device"
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert special_file_kind(sock_path) == "a socket"
    read_fd, write_fd = os.pipe()
    try:
        assert "process substitution" in special_file_kind(f"/dev/fd/{read_fd}")
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert special_file_kind(tmp_path) is None and special_file_kind(tmp_path / "missing") is None


def test_outputs_never_name_an_input_or_each_other(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    hard = tmp_path / "hard.gguf"
    os.link(model, hard)
    for path in (model, link, hard):
        with pytest.raises(UsageProblem, match=r"--refract-html=.* is the model \(--refract-model\)"):
            check_outputs({"--refract-html": str(path)}, [("model (--refract-model)", model)])
    with pytest.raises(UsageProblem, match="--refract-html=.*x.out is also --refract-json"):
        check_outputs({"--refract-json": str(tmp_path / "x.out"), "--refract-html": str(tmp_path / "x.out")}, [])
    with pytest.raises(UsageProblem, match="is a character device"):
        check_outputs({"--refract-json": "/dev/null"}, [])
    with pytest.raises(UsageProblem, match="cannot write in /proc"):
        check_outputs({"--refract-json": "/proc/r.json"}, [])
    check_outputs({"--refract-json": str(tmp_path / "r.json"), "--refract-html": str(tmp_path / "r.html")},
                  [("model", model)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.gguf", "link.gguf", "m.gguf"]  # probe removed


# --------------------------------------------------------------------------- reports read from disk


def _report(tmp_path, **changes) -> Path:
    data = {"schema": "pytest-refract.report.v1", "composite": 90.0, "band": "EXCELLENT", "candidate": "c",
            "reference": "ctk=f16,ctv=f16", "model": {"path": "m.gguf", "size_bytes": 1, "sha256_first_mib": "x"},
            "axes": {"kld": {"score": 90.0, "mean_kld": 0.1}}}
    data.update(changes)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"composite": "90"}, "field composite must be a number"),
    ({"composite": True}, "field composite must be a number"),
    ({"axes": {"kld": 5}}, "field axes.kld must be an object"),
    ({"axes": []}, "field axes must be an object"),
    ({"axes": {"kld": {"score": "high"}}}, "field axes.kld.score must be a number"),
    ({"axes": {"kld": {"kld_percentiles": {"99": "x"}}}}, "field axes.kld.kld_percentiles.99 must be a number"),
    ({"model": "m.gguf"}, "field model must be an object"),
    ({"model": {"size_bytes": "1"}}, "field model.size_bytes must be a number"),
    ({"candidates": [{"candidate": "c", "composite": []}]}, "field candidates[0].composite must be a number"),
    ({"candidates": [3]}, "field candidates[0] must be an object"),
])
def test_compare_names_the_file_and_the_field_of_a_malformed_report(tmp_path, changes, field):
    path = _report(tmp_path, **changes)
    with pytest.raises(schema.ReportFileError, match="^" + re.escape(f"{path}: {field}")):
        schema.load_report(path)
    run = subprocess.run([sys.executable, "-m", "pytest_refract", "compare", str(path), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and str(path) in run.stderr


def test_compare_says_a_folder_is_a_folder(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pytest_refract", "compare", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path} is a folder, not a report file; give the JSON report's path"


def test_a_well_formed_report_still_loads(tmp_path):
    assert schema.load_report(_report(tmp_path))["composite"] == 90.0


# --------------------------------------------------------------------------- usage errors before any model loads


@pytest.mark.parametrize("option", ["model", "candidate", "axes", "rniah-lengths", "json", "html", "corpus",
                                    "threads", "cache-dir", "fail-under"])
def test_empty_option_values_are_usage_errors_naming_the_option(pytester, tiny_model, option):
    args = [f"--refract-model={tiny_model}", "--refract-candidate=ctk=q8_0,ctv=q8_0"]
    args = [a for a in args if not a.startswith(f"--refract-{option}=")] + [f"--refract-{option}="]
    line = _usage_error(pytester.runpytest_subprocess(*args))
    assert f"--refract-{option} is empty" in line


def test_ini_boolean_with_a_bad_value_names_its_key(pytester, tiny_model):
    pytester.makeini("[pytest]\nrefract_floor = yes please\n")
    line = _usage_error(pytester.runpytest_subprocess(f"--refract-model={tiny_model}",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0"))
    assert "refract_floor" in line and "yes please" in line


def test_threads_above_the_logical_cpu_count_are_refused(pytester, tiny_model):
    cpus = os.cpu_count()
    line = _usage_error(pytester.runpytest_subprocess(f"--refract-model={tiny_model}", "--refract-threads=10000",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0"))
    assert line == f"ERROR: --refract-threads=10000 exceeds this machine's {cpus} logical CPUs; use at most {cpus}"


def test_clear_cache_on_a_folder_of_user_files_deletes_nothing(pytester, tiny_model):
    folder = pytester.path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hi\n")
    line = _usage_error(pytester.runpytest_subprocess(f"--refract-model={tiny_model}",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                      f"--refract-cache-dir={folder}", "--refract-clear-cache"))
    assert "refusing to use or clear it" in line and "notes.txt" in line
    assert (folder / "notes.txt").read_text() == "hi\n" and (folder / "sub").is_dir()


@pytest.mark.parametrize("case", ["html-is-model", "json-is-corpus", "json-is-prompts", "json-is-html",
                                  "json-is-bundled-corpus", "html-in-proc", "json-in-proc-self", "json-is-devnull"])
def test_report_paths_never_overwrite_inputs_and_are_checked_first(pytester, tiny_model, tiny_prompts,
                                                                     tiny_corpus, case):
    model = pytester.path / "model.gguf"
    shutil.copy(tiny_model, model)
    corpus = pytester.path / "corpus.txt"
    shutil.copy(tiny_corpus, corpus)
    before = {p: p.read_bytes() for p in (model, corpus, Path(tiny_prompts))}
    from pytest_refract.inputs.data import DEFAULT_CORPUS, data_dir

    outputs, expected = {
        "html-is-model": ((f"--refract-html={model}",), "is the model (--refract-model)"),
        "json-is-corpus": ((f"--refract-json={corpus}",), "is the corpus (--refract-corpus)"),
        "json-is-prompts": ((f"--refract-json={tiny_prompts}",), "is the prompt set (--refract-prompts)"),
        "json-is-html": ((f"--refract-json={pytester.path}/x.out", f"--refract-html={pytester.path}/x.out"),
                         "is also --refract-json"),
        "json-is-bundled-corpus": ((f"--refract-json={data_dir() / DEFAULT_CORPUS}",), "is the bundled corpus"),
        "html-in-proc": (("--refract-html=/proc/refract.html",), "cannot write in /proc"),
        "json-in-proc-self": (("--refract-json=/proc/self/r.json",), "cannot write in /proc/self"),
        "json-is-devnull": (("--refract-json=/dev/null",), "is a character device"),
    }[case]
    args = [f"--refract-model={model}", f"--refract-prompts={tiny_prompts}", f"--refract-corpus={corpus}",
            "--refract-candidate=ctk=q8_0,ctv=q8_0", *outputs]
    line = _usage_error(pytester.runpytest_subprocess(*args))
    assert expected in line
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not (pytester.path / "x.out").exists()


@pytest.mark.parametrize("kind", ["fifo", "process-substitution", "device"])
def test_a_model_path_that_is_not_a_regular_file_is_named(pytester, kind):
    if kind == "fifo":
        model = pytester.path / "model.gguf"
        os.mkfifo(model)  # no writer: opening it would block forever
        expected = f"model path {model} is a FIFO (named pipe), not a regular file"
        result = pytester.runpytest_subprocess(f"--refract-model={model}", "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                               timeout=60)
    elif kind == "device":
        expected = "model path /dev/zero is a character device, not a regular file"
        result = pytester.runpytest_subprocess("--refract-model=/dev/zero", "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                               timeout=60)
    else:
        # What bash's --refract-model=<(cat model.gguf) passes: /dev/fd/N of a pipe.
        script = ("import os, subprocess, sys\n"
                  "r, w = os.pipe()\n"
                  "run = subprocess.run([sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', "
                  "f'--refract-model=/dev/fd/{r}', '--refract-candidate=ctk=q8_0,ctv=q8_0'], pass_fds=(r,), "
                  "capture_output=True, text=True, timeout=60)\n"
                  "print(run.returncode); print(run.stdout); print(run.stderr)\n")
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             cwd=pytester.path)
        lines = run.stdout.splitlines()
        assert lines[0] == "4", run.stdout
        assert "is a pipe (e.g. from <(...) process substitution), not a regular file" in run.stdout
        assert "truncated" not in run.stdout and "Traceback" not in run.stdout
        return
    line = _usage_error(result)
    assert expected in line


# --------------------------------------------------------------------------- runs on llama.cpp


def test_haystack_option_names_itself(pytester, tiny_model, tiny_prompts, tiny_corpus):
    _needs_llama()
    line = _usage_error(pytester.runpytest_subprocess(
        *_tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-axes=rniah", "--refract-haystack=/missing")))
    assert "haystack file not found: /missing (--refract-haystack)" in line and "corpus" not in line


@pytest.mark.parametrize("changes, field", [({"composite": "high"}, "field composite must be a number"),
                                            ({"axes": {"kld": "good"}}, "field axes.kld must be an object")])
def test_malformed_baseline_is_one_line_naming_file_and_field(pytester, tiny_model, tiny_prompts, tiny_corpus,
                                                              changes, field):
    _needs_llama()
    path = _report(pytester.path, **changes)
    line = _usage_error(pytester.runpytest_subprocess(
        *_tiny_args(tiny_model, tiny_prompts, tiny_corpus, f"--refract-baseline={path}")))
    assert f"--refract-baseline: {path}: {field}" in line


def test_non_finite_logits_fail_every_item_and_the_gate(pytester, tiny_prompts, tiny_corpus):
    _needs_llama()
    model = write_tiny_llama(pytester.path / "nan.gguf", n_ctx_train=1024, nan_output=True)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*_tiny_args(model, tiny_prompts, tiny_corpus, f"--refract-json={report}"))
    assert result.ret == 1
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines(["trajectory test_trajectory[[]fact-001]: the model produced non-finite logits*",
                                 "kld test_kld[[]chunk-00]: the model produced non-finite logits*"])
    data = read_report(report)
    for axis in ("trajectory", "kld"):
        assert data["axes"][axis]["score"] is None and data["axes"][axis]["band"] is None
    assert data["composite"] is None and data["band"] is None and data["gate"]["passed"] is False
    assert "Traceback" not in result.stdout.str()


def _corrupt_smollm2(source: Path, target: Path) -> Path:
    """Issue 14's finding 3: SmolLM2's first 4 MiB, then random bytes up to the same size."""
    keep = 4 << 20
    size = source.stat().st_size
    rng = np.random.default_rng(14)
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read(keep))
        left = size - keep
        while left:
            n = min(left, 8 << 20)
            dst.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    return target


def test_corrupted_gguf_never_becomes_a_perfect_score(pytester, smollm2):
    _needs_llama()
    model = _corrupt_smollm2(smollm2, pytester.path / "corrupt.gguf")
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={model}", "--refract-candidate=ctk=q8_0,ctv=q4_0", "--refract-chunks=1",
        "--refract-n-predict=8", "-k", "fact-001 or chunk-00", f"--refract-json={report}", "--refract-threads=2",
        timeout=900)
    out = result.stdout.str()
    assert result.ret != 0, out
    assert "non-finite" in out, out
    result.stdout.fnmatch_lines(["*gate FAILED*"])
    data = read_report(report)
    assert data["axes"]["kld"]["score"] is None and data["composite"] is None
    assert data["gate"]["passed"] is False and data["gate"]["reasons"]


def test_gpu_layers_on_a_build_without_offload_records_zero(pytester, tiny_model, tiny_prompts, tiny_corpus):
    _needs_llama()
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads to a GPU")
    report = pytester.path / "r.json"
    # The gate is not what this test is about (the tiny model's bf16 control can be bit-identical
    # on KLD, so the candidate's verdict is FAIL): the raw composite gate at 0 passes.
    result = pytester.runpytest_subprocess(*_tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-gpu-layers=9999",
                                                       "--refract-axes=kld", "--refract-gate=raw", "--refract-fail-under=0",
                                                       f"--refract-json={report}"))
    assert result.ret == 0
    result.stdout.fnmatch_lines(["refract: --refract-gpu-layers=9999: this llama.cpp build has no GPU offload; "
                                 "every layer runs on the CPU (0 offloaded)"])
    data = read_report(report)
    assert data["settings"]["gpu_layers"] == 0 and "no GPU offload" in data["settings"]["gpu_layers_note"]


@pytest.mark.parametrize("layout", ["file", "entry-is-folder"])
def test_cache_problems_are_one_warning_never_item_failures(pytester, tiny_model, tiny_prompts, tiny_corpus, layout):
    _needs_llama()
    cache = pytester.path / "cache"
    # The gate is not what this test is about (the tiny model's bf16 control can be bit-identical
    # on KLD, so the candidate's verdict is FAIL): the raw composite gate at 0 passes.
    args = _tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-axes=kld", "--refract-gate=raw", "--refract-fail-under=0",
                      f"--refract-cache-dir={cache}")
    if layout == "file":
        cache.write_text("not a folder")
    else:
        assert pytester.runpytest_subprocess(*args).ret == 0  # fill the cache
        entries = sorted(cache.glob("*/kld/*.rfc"))
        assert len(entries) == 2
        for entry in entries:
            entry.unlink()
            entry.mkdir()
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2)
    assert result.ret == 0
    # Said once: at configure (on stderr) for the folder, in the warnings summary for an entry.
    text = result.stdout.str() + result.stderr.str()
    assert text.count("RefCacheWarning: reference cache") == 1, text
    assert "measuring without the reference cache" in text
    assert "NotADirectoryError" not in text and "IsADirectoryError" not in text
    if layout == "file":
        assert cache.read_text() == "not a folder"


INTERRUPT_AFTER_TRAJECTORY = """
def pytest_runtest_call(item):
    if item.name == "test_kld[chunk-00]":
        raise KeyboardInterrupt
"""


def test_interrupted_run_says_not_run_and_how_many_ran(pytester, tiny_model, tiny_prompts, tiny_corpus):
    _needs_llama()
    pytester.makeconftest(INTERRUPT_AFTER_TRAJECTORY)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*_tiny_args(tiny_model, tiny_prompts, tiny_corpus, f"--refract-json={report}"))
    assert result.ret == 2
    out = result.stdout.str()
    assert "failed to measure" not in out
    data = read_report(report)
    traj, kld = data["axes"]["trajectory"], data["axes"]["kld"]
    assert (traj["n_run"], traj["n_not_run"]) == (3, 0) and (kld["n_run"], kld["n_not_run"]) == (0, 2)
    assert kld["error"].startswith("not all items ran: 0 of 2") and kld["status"] == "incomplete"
    assert traj["error"].startswith("all 3 item(s) ran, but the run was interrupted")
    assert data["diagnosis"][0].endswith("3 of 5 selected items ran; 2 were not run.")
    assert not any("failed to measure" in line for line in data["diagnosis"])
    assert data["gate"]["passed"] is False
