"""Hostile and careless input, round 4: links planted in the cache, report paths that are other
files of the run, paths that are not UTF-8, warnings turned into errors, a backtracking answer
pattern, a decompression bomb, malformed reports for compare, marks, inputs whose read blocks,
ini-relative paths, $HOME in the repro command and table injection. Each test here failed on
the code before its fix."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_safety_round3 import _args, _usage_error

from pytest_refract.errors import UsageProblem
from pytest_refract.reference.entries import ReferenceCache
from pytest_refract.reference.folder import FORMAT_VERSION, prepare_cache_dir
from pytest_refract.reference.model_index import MODEL_INDEX, model_identity

VICTIM = "the user's file, never ours to write\n"


def _victim(tmp_path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM)
    return victim


def _tokens_entry(cache, key="k"):
    key = cache.key("greedy", [1, 2], key)
    return key, {"tokens": np.array([1, 2, 3], dtype=np.int64)}


# --------------------------------------------------------------------------- 9. links in the cache folder


def test_a_model_index_link_is_replaced_never_written_through(tmp_path):
    cache = tmp_path / "cache"
    assert prepare_cache_dir(cache) == cache
    victim = _victim(tmp_path)
    (cache / MODEL_INDEX).symlink_to(victim)
    model = tmp_path / "m.bin"
    model.write_bytes(b"model bytes")
    assert model_identity(model, cache)["sha256"] == hashlib.sha256(b"model bytes").hexdigest()
    assert victim.read_text() == VICTIM
    assert not (cache / MODEL_INDEX).is_symlink() and "pytest-refract" in (cache / MODEL_INDEX).read_text()


def test_an_entry_link_is_never_written_through_when_an_entry_is_stored(tmp_path):
    """--refract-floor, --refract-repeat and a recomputed batch store without loading first."""
    cache = ReferenceCache(tmp_path / "cache", {"model": "x"})
    key, arrays = _tokens_entry(cache)
    path = cache._path("greedy", key)
    path.parent.mkdir(parents=True)
    victim = _victim(tmp_path)
    path.symlink_to(victim)
    cache.store("greedy", key, arrays)
    assert victim.read_text() == VICTIM
    assert not path.is_symlink() and path.is_file()
    assert cache.load("greedy", key)["arrays"]["tokens"].tolist() == [1, 2, 3]


def test_an_entry_link_is_never_read_through(tmp_path):
    cache = ReferenceCache(tmp_path / "cache", {"model": "x"})
    key, arrays = _tokens_entry(cache)
    cache.store("greedy", key, arrays)
    path = cache._path("greedy", key)
    elsewhere = tmp_path / "elsewhere.rfc"
    os.replace(path, elsewhere)  # a sound entry, reached only through a link
    path.symlink_to(elsewhere)
    with pytest.warns(Warning, match="symbolic link"):
        assert cache.load("greedy", key) is None
    assert not path.exists() and not path.is_symlink() and elsewhere.is_file()


def test_a_linked_kind_folder_is_never_written_into(tmp_path):
    cache = ReferenceCache(tmp_path / "cache", {"model": "x"})
    key, arrays = _tokens_entry(cache)
    folder = cache._path("greedy", key).parent
    folder.parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    folder.symlink_to(outside)
    with pytest.warns(Warning, match="symbolic link"):
        cache.store("greedy", key, arrays)
    assert list(outside.iterdir()) == []


def test_a_planted_write_check_link_does_not_truncate_its_target(tmp_path):
    cache = tmp_path / "cache"
    assert prepare_cache_dir(cache) == cache
    victim = _victim(tmp_path)
    (cache / f".write-check.{os.getpid()}.tmp").symlink_to(victim)
    assert prepare_cache_dir(cache) == cache
    assert victim.read_text() == VICTIM


# --------------------------------------------------------------------------- 10. report paths that are the run's own files


def _run_usage_error(pytester, tiny_model, *extra) -> str:
    return _usage_error(pytester.runpytest_subprocess(f"--refract-model={tiny_model}",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0", *extra, timeout=60))


@pytest.mark.parametrize("case", ["ini", "conftest", "test-file", "log-file", "pytest-cache", "html-assets",
                                  "another plugin's input"])
def test_a_report_path_that_is_another_file_of_the_run_is_refused(pytester, tiny_model, case):
    pytester.makefile(".ini", pytest="[pytest]\n")
    pytester.makeconftest("")
    test_file = pytester.makepyfile(test_one="def test_one():\n    pass\n")
    ini, conftest = pytester.path / "pytest.ini", pytester.path / "conftest.py"
    before = {p: p.read_bytes() for p in (ini, conftest, test_file)}
    json_path, extra, said = {
        "ini": (ini, [], "pytest's ini file"),
        "conftest": (conftest, [], "conftest.py"),
        "test-file": (test_file, [str(test_file)], "test file"),
        "log-file": (pytester.path / "run.log", [f"--log-file={pytester.path / 'run.log'}"], "--log-file"),
        "pytest-cache": (pytester.path / ".pytest_cache" / "v" / "cache" / "lastfailed", ["-p", "cacheprovider"],
                         "pytest's cache folder"),
        "html-assets": (pytester.path / "assets" / "style.css", ["--html=page.html"], "assets folder"),
        "another plugin's input": (pytester.path / "extra.css", ["--html=page.html", "--css=extra.css"], "--css"),
    }[case]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if case == "another plugin's input":
        json_path.write_text("p { color: red }")
        before[json_path] = json_path.read_bytes()
    line = _run_usage_error(pytester, tiny_model, f"--refract-json={json_path}", *extra)
    assert said in line and "--refract-json" in line, line
    assert {p: p.read_bytes() for p in before} == before


def test_the_file_stdout_is_appended_to_is_refused(pytester, tiny_model):
    out = pytester.path / "out.txt"
    with open(out, "w") as fh:
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--refract-model={tiny_model}",
                              "--refract-candidate=ctk=q8_0,ctv=q8_0", f"--refract-json={out}"],
                             stdout=fh, stderr=subprocess.STDOUT, cwd=pytester.path, timeout=120)
    text = out.read_text()
    assert run.returncode == 4 and "is the file this run's stdout goes to" in text, text
    assert "Traceback" not in text


# --------------------------------------------------------------------------- 12. paths that are not UTF-8


def test_a_report_of_undecodable_paths_is_strict_utf8_json():
    from pytest_refract.report.jsonio import dumps

    text = dumps({"prompts": os.fsdecode(b"p\xe9.jsonl"), os.fsdecode(b"k\xff"): "\ud800"})
    data = json.loads(text.encode("utf-8"))  # encodes: no lone surrogate is left
    assert data == {"prompts": "p\\xE9.jsonl", "k\\xFF": "\\uD800"}


@pytest.mark.parametrize("env", ["utf-8", "C locale"])
def test_undecodable_input_and_model_names_keep_the_run_and_its_report(pytester, tiny_model, tiny_prompts,
                                                                       tiny_corpus, monkeypatch, env):
    if env == "C locale":
        monkeypatch.setenv("LC_ALL", "C")
        monkeypatch.setenv("PYTHONUTF8", "0")
        names = ("prompts-é.jsonl".encode("utf-8"), "modèle.gguf".encode("utf-8"))
    else:
        names = (b"prompts-\xe9.jsonl", b"mod\xe8le.gguf")
    folder = os.fsencode(str(pytester.path))
    prompts, model = (folder + b"/" + n for n in names)
    with open(prompts, "wb") as fh:
        fh.write(Path(tiny_prompts).read_bytes())
    with open(model, "wb") as fh:
        fh.write(Path(tiny_model).read_bytes())
    report = pytester.path / "r.json"
    args = _args(os.fsdecode(model), os.fsdecode(prompts), tiny_corpus, f"--refract-json={report}")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *[os.fsencode(a) for a in args]],
                            capture_output=True, cwd=pytester.path, timeout=300)
    text = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert "INTERNALERROR" not in text and "Traceback" not in text, text
    assert result.returncode in (0, 1) and "refract KV-cache audit" in text, text
    data = json.loads(report.read_bytes().decode("utf-8"), parse_constant=lambda c: pytest.fail(c))
    assert "\\x" in data["repro_command"]


RAISING_REPORT_HOOK = """
def pytest_refract_report(report, config):
    raise RuntimeError("a plugin broke")
"""


def test_a_failure_after_measuring_still_prints_the_summary_and_one_line(pytester, tiny_model, tiny_prompts,
                                                                         tiny_corpus):
    pytester.makeconftest(RAISING_REPORT_HOOK)
    result = pytester.runpytest_subprocess(*_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-axes=kld",
                                                  f"--refract-json={pytester.path / 'r.json'}"), timeout=300)
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text and "Traceback" not in text, text
    assert "refract KV-cache audit" in text and "gate" in text
    assert "the report files could not be written (RuntimeError: a plugin broke)" in text
    assert result.ret == 1


# --------------------------------------------------------------------------- 13. warnings turned into errors


def _corrupt(cache, kind, key):
    path = cache._path(kind, key)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def test_under_warnings_as_errors_a_corrupt_entry_is_evicted_and_recomputed(tmp_path, capsys):
    cache = ReferenceCache(tmp_path / "cache", {"model": "x"})
    key, arrays = _tokens_entry(cache)
    cache.store("greedy", key, arrays)
    path = _corrupt(cache, "greedy", key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load("greedy", key) is None
    assert not path.exists()
    assert "rejected" in capsys.readouterr().err


def test_under_warnings_as_errors_an_unusable_cache_folder_measures_without_it(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_cache_dir(not_a_folder) is None
    assert "measuring without the reference cache" in capsys.readouterr().err


def test_filterwarnings_error_runs_the_audit_over_a_corrupt_cache(pytester, tiny_model, tiny_prompts, tiny_corpus):
    cache = pytester.path / "cache"
    args = _args(tiny_model, tiny_prompts, tiny_corpus, "--refract-axes=kld", f"--refract-cache-dir={cache}")
    assert "2 passed" in pytester.runpytest_subprocess(*args, timeout=300).stdout.str()
    for entry in cache.glob("*/*/*.rfc"):
        raw = bytearray(entry.read_bytes())
        raw[-1] ^= 0xFF
        entry.write_bytes(bytes(raw))
    result = pytester.runpytest_subprocess(*args, "-W", "error", "-s", timeout=300)
    text = result.stdout.str() + result.stderr.str()
    assert "2 passed" in text and "failed" not in text and "INTERNALERROR" not in text, text
    assert "rejected" in text


# --------------------------------------------------------------------------- 14. a backtracking answer pattern

REDOS = "--refract-rniah-answer=(\\w|\\s|.)*z{value}"


def test_a_backtracking_answer_pattern_is_not_searched_unless_rniah_runs(pytester, tiny_model):
    result = pytester.runpytest_subprocess(f"--refract-model={tiny_model}", "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                           REDOS, "--collect-only", "-q", timeout=60)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()


def test_a_backtracking_answer_pattern_is_refused_in_bounded_time(pytester, tiny_model):
    started = time.monotonic()
    line = _run_usage_error(pytester, tiny_model, "--refract-axes=rniah", REDOS)
    assert "takes longer than" in line and "backtracks" in line
    assert time.monotonic() - started < 45


def test_the_bounded_search_answers_and_times_out():
    from pytest_refract.inputs import answer

    assert answer.search(answer.answer_regex("the {value}", "4817"), "It is THE 4817.")
    assert not answer.search(answer.answer_regex("{value}", "4817"), "no number")
    started = time.monotonic()
    with pytest.raises(answer.PatternTimeout):
        answer.search(r"(\w|\s|.)*z4817", "I do not know the magic number at all", timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert answer.search("{value}".replace("{value}", "x"), "x")  # a fresh helper after the kill


# --------------------------------------------------------------------------- 15. a decompression bomb


def _crafted_entry(cache, kind, key, layout, payload) -> None:
    header = json.dumps({"format": FORMAT_VERSION, "key": key, "size": len(payload), "arrays": layout,
                         "meta": "{}"}).encode()
    head = struct.pack("<I", len(header)) + header
    path = cache._path(kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RFRC" + hashlib.sha256(head + payload).digest() + head + payload)


@pytest.mark.parametrize("promised", [[3], [1 << 28]])
def test_an_entry_that_inflates_past_its_layout_is_rejected_before_taking_the_memory(tmp_path, promised):
    cache = ReferenceCache(tmp_path / "cache", {"model": "x"})
    key = cache.key("greedy", [1])
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 kB
    _crafted_entry(cache, "greedy", key, [{"name": "tokens", "dtype": "<i8", "shape": promised}], bomb)
    tracemalloc.start()
    try:
        with pytest.warns(Warning, match="rejected .*(more than|deflate)"):
            assert cache.load("greedy", key) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


# --------------------------------------------------------------------------- 16, 22. compare


def _report(tmp_path, name="r.json", **changes) -> Path:
    data = {"schema": "pytest-refract.report.v1", "composite": 90.0, "band": "EXCELLENT", "candidate": "c",
            "reference": "ctk=f16,ctv=f16", "model": {"path": "m.gguf", "size_bytes": 1, "sha256_first_mib": "x"},
            "verdict": {"verdict": "PASS", "score": 95.0},
            "axes": {"kld": {"score": 90.0, "mean_kld": 0.1, "verdict": {"multiple": 1.5}}}}
    data.update(changes)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _compare(*args):
    return subprocess.run([sys.executable, "-m", "pytest_refract", "compare", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("changes, field", [
    ({"verdict": "PASS"}, "field verdict must be an object"),
    ({"verdict": ["PASS"]}, "field verdict must be an object"),
    ({"verdict": {"score": "95"}}, "field verdict.score must be a number"),
    ({"verdict": {"verdict": 3}}, "field verdict.verdict must be a string"),
    ({"axes": {"kld": {"score": 90.0, "verdict": {"multiple": [1, 2]}}}}, "field axes.kld.verdict.multiple must be a number"),
    ({"axes": {"kld": {"score": 90.0, "verdict": "2x"}}}, "field axes.kld.verdict must be an object"),
    ({"composite": "88"}, "field composite must be a number"),
])
def test_compare_names_a_field_of_the_wrong_type(tmp_path, changes, field):
    path = _report(tmp_path, **changes)
    run = _compare(_report(tmp_path, "base.json"), path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and str(path) in run.stderr and field in run.stderr, run.stderr


def test_compare_into_a_closed_pipe_is_quiet(tmp_path):
    path = _report(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head`) is gone before anything is written
    try:
        run = subprocess.run([sys.executable, "-m", "pytest_refract", "compare", str(path), str(path)],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert run.stderr == "" and run.returncode == 0, run.stderr


def test_compare_markdown_keeps_a_newline_in_a_name_inside_its_cell(tmp_path):
    from pytest_refract.cli.compare import render_markdown, render_text, table

    forged = "m.gguf\n| verdict | PASS | PASS |\r\n|x\\"
    rows = table([{"model": {"path": forged}, "candidate": "c"}], ["a.json"])
    for text in (render_markdown(rows), render_text(rows)):
        assert len(text.splitlines()) == len(rows) + 1, text
        assert not any(line.startswith("| verdict") for line in text.splitlines())
    line = next(line for line in render_markdown(rows).splitlines() if line.startswith("| model"))
    assert line.count(" | ") == 1 and "\\n" in line


# --------------------------------------------------------------------------- 17. marks


def test_strict_markers_without_xdist_collects_the_audit(pytester, tiny_model):
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--strict-markers", f"--refract-model={tiny_model}",
                                           "--refract-candidate=ctk=q8_0,ctv=q8_0", "--collect-only", "-q")
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == 0 and "xdist_group" not in text, text


# --------------------------------------------------------------------------- 18. inputs whose read blocks


def test_an_input_whose_read_blocks_is_refused_in_bounded_time(tmp_path, monkeypatch):
    from pytest_refract import files

    release = threading.Event()

    def blocking_read(fd, n):  # /proc/kmsg with nothing to say: a regular file whose read waits
        release.wait(30)
        return b""

    monkeypatch.setattr(files, "READ_DEADLINE_S", 0.3, raising=False)
    monkeypatch.setattr(files, "_read_chunk", blocking_read, raising=False)
    path = tmp_path / "corpus.txt"
    path.write_text("text")
    started = time.monotonic()
    try:
        with pytest.raises(UsageProblem, match="could not be read.*blocks"):
            files.read_input(path, "corpus", files.MAX_TEXT_BYTES, "--refract-corpus")
    finally:
        release.set()
    assert time.monotonic() - started < 5


def test_a_model_path_shorter_than_a_header_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """/proc/kmsg stats as an empty regular file; its read would block."""
    import builtins

    from pytest_refract.engines import gguf

    empty = tmp_path / "kmsg"
    empty.write_bytes(b"")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    with pytest.raises(UsageProblem, match="not a GGUF"):
        gguf.read_gguf(empty)
    assert str(empty) not in opened


# --------------------------------------------------------------------------- 20. ini paths


def test_ini_paths_resolve_against_the_ini_files_folder(pytester, tiny_model, tiny_prompts):
    from pytest_refract.settings import read_settings

    folder = pytester.path / "cfg"
    folder.mkdir()
    (folder / "prompts.jsonl").write_bytes(Path(tiny_prompts).read_bytes())
    (folder / "pytest.ini").write_text("[pytest]\nrefract_json = report.json\nrefract_prompts = prompts.jsonl\n"
                                       f"refract_model = {tiny_model}\nrefract_candidate = ctk=q8_0,ctv=q8_0\n")
    config = pytester.parseconfig("-c", str(folder / "pytest.ini"), "--refract-html=page.html")
    s = read_settings(config)
    assert s.json_path == str(folder / "report.json")
    assert s.prompts_path == str(folder / "prompts.jsonl")
    assert s.html_path == "page.html"  # the command line's stay relative to the current folder


# --------------------------------------------------------------------------- 21. $HOME in the repro command


def test_home_is_replaced_only_as_a_whole_folder(monkeypatch):
    from pytest_refract.report.build import _portable_args

    monkeypatch.setenv("HOME", "/home/al")
    assert _portable_args(["--refract-model=/home/alice/m.gguf", "/home/al/t.py", "--refract-json=/home/al",
                           "/home/al", "x/home/al/y", "--refract-corpus=/home/al/c.txt"]) == [
        "--refract-model=/home/alice/m.gguf", "~/t.py", "--refract-json=~", "~", "x/home/al/y",
        "--refract-corpus=~/c.txt"]
