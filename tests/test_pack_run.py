"""Reference packs in a run (tiny model): saved, read back as the run's reference and control,
this build's own f16 measured against it (build drift, exactly 0 on the same build), and every
bad pack a one-line usage error, never a PASS."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import one_usage_error_line, read_report, tiny_args
from pytest_refract.report.jsonio import SCHEMA

pytest_plugins = ["pytester"]

# What differs between two runs of the same numbers: time, and where the reference came from.
_VOLATILE = {"wall_s", "reference_cache", "compute", "control_cached", "sequential", "cached"}


def _numbers(x):
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items() if k not in _VOLATILE}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    return x


def _run(pytester, tiny_model, tiny_prompts, tiny_corpus, *extra):
    report = pytester.path / f"r{len(list(pytester.path.glob('r*.json')))}.json"
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                      "--refract-candidate=ctk=q4_0,ctv=q4_0",
                                                      f"--refract-cache-dir={pytester.path / 'cache'}",
                                                      f"--refract-json={report}", *extra))
    return result, report


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory, tiny_model, tiny_prompts, tiny_corpus):
    """One pack and the report of the run that saved it, for every test of the module."""
    import subprocess
    import sys

    where = tmp_path_factory.mktemp("saved")
    pack, report = where / "pack", where / "saved.json"
    args = tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0",
                     f"--refract-cache-dir={where / 'cache'}", f"--refract-json={report}",
                     f"--refract-save-reference={pack}")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=where,
                          capture_output=True, text=True, timeout=600)
    assert (pack / "manifest.json").is_file(), done.stdout + done.stderr
    return pack, read_report(report)


@pytest.fixture
def saved(saved_once, tmp_path):
    """A copy of the pack this test may damage."""
    pack, report = saved_once
    copy = tmp_path / "pack"
    shutil.copytree(pack, copy)
    return copy, report


def test_same_build_drift_is_exactly_zero_and_candidates_are_unchanged(pytester, tiny_model, tiny_prompts,
                                                                       tiny_corpus, saved):
    pack, without = saved
    assert without["saved_reference_pack"]["files"] == 12 and without["saved_reference_pack"]["bytes"] > 0
    result, report = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-reference-pack={pack}")
    data = read_report(report)
    drift = data["build_drift"]
    assert drift["config"] == "ctk=f16,ctv=f16" and drift["verdict"] == "PASS"
    for name, axis in drift["axes"].items():
        # Exactly 0: the same bits as the pack's (an exact PASS, whatever the control's damage).
        assert axis["damage"] == 0.0 and axis["verdict"] == "PASS", name
        assert axis.get("multiple") in (0.0, None) and axis.get("multiple_ci95") in ([0.0, 0.0], None), name
    # Every candidate number equals the run that computed its own reference, bit for bit.
    assert _numbers(data["axes"]) == _numbers(without["axes"])
    assert _numbers(data["verdict"]) == _numbers(without["verdict"])
    assert data["reference_pack"]["checksum"] == without["saved_reference_pack"]["checksum"]
    assert data["reference_pack"]["path"] == str(pack)
    assert data["schema"] == SCHEMA
    result.stdout.fnmatch_lines(["build drift PASS*"])
    from pytest_refract.report.html import render_html

    page = render_html(data)
    assert "Build drift against the reference pack" in page and str(pack) in page


def test_the_pack_is_the_same_bits_from_the_cache_or_computed(pytester, tiny_model, tiny_prompts, tiny_corpus, saved):
    pack, _ = saved
    again = pytester.path / "again"
    # Computed afresh (no cache) on the same build: the same entries, byte for byte.
    _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "--refract-no-cache", f"--refract-save-reference={again}")
    first = json.loads((pack / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    assert first.keys() == second.keys() and len(first) == 12
    # The reference's entries are the same bytes; the control's results hold their wall time.
    reference = [rel for rel in first if "/control-" not in rel]
    assert len(reference) == 6 and all(first[rel] == second[rel] for rel in reference)


def _flip_one_byte(pack: Path) -> None:
    entry = sorted(pack.rglob("*.rfc"))[0]
    raw = bytearray(entry.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    entry.write_bytes(bytes(raw))


def _newer_schema(pack: Path) -> None:
    from pytest_refract.reference.pack import manifest_checksum

    manifest = json.loads((pack / "manifest.json").read_text())
    manifest["schema"] += 1
    manifest["checksum"] = manifest_checksum(manifest)
    (pack / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, words", [
    (_flip_one_byte, "does not match its checksum"),
    (lambda p: sorted(p.rglob("*.rfc"))[-1].unlink(), "missing (a truncated pack)"),
    (_newer_schema, "newer than this pytest-refract reads"),
])
def test_a_damaged_pack_is_one_usage_error(pytester, tiny_model, tiny_prompts, tiny_corpus, saved, damage, words):
    pack, _ = saved
    damage(pack)
    result, report = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-reference-pack={pack}")
    assert words in one_usage_error_line(result)
    assert not report.exists()


@pytest.mark.parametrize("extra, words", [
    (["--refract-decode-batch=1"], "decode_batch"),
    (["--refract-n-predict=4"], "trajectory axis was measured with"),
    (["--refract-sensitivity=ctk=f32,ctv=f32"], "sensitivity control"),
])
def test_a_pack_for_other_settings_is_one_usage_error(pytester, tiny_model, tiny_prompts, tiny_corpus, saved, extra,
                                                      words):
    pack, _ = saved
    result, _report = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-reference-pack={pack}", *extra)
    assert words in one_usage_error_line(result)


def test_a_pack_for_other_prompts_or_another_model_is_refused(pytester, tiny_model, tiny_prompts, tiny_corpus, saved):
    pack, _ = saved
    other = pytester.path / "other.jsonl"
    other.write_text(tiny_prompts.read_text().replace("hello world the end", "hello world"))
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, other, tiny_corpus,
                                                      "--refract-candidate=ctk=q4_0,ctv=q4_0",
                                                      f"--refract-reference-pack={pack}"))
    assert "other prompts" in one_usage_error_line(result)
    model = pytester.path / "copy.gguf"
    raw = bytearray(Path(tiny_model).read_bytes())
    raw[-1] ^= 1  # a weight's last byte: another model file
    model.write_bytes(bytes(raw))
    result = pytester.runpytest_subprocess(*tiny_args(model, tiny_prompts, tiny_corpus,
                                                      "--refract-candidate=ctk=q4_0,ctv=q4_0",
                                                      f"--refract-reference-pack={pack}"))
    assert "another model" in one_usage_error_line(result)


def test_a_pack_path_that_is_a_file_is_one_usage_error(pytester, tiny_model, tiny_prompts, tiny_corpus):
    f = pytester.path / "notapack"
    f.write_text("x")
    result, _ = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-reference-pack={f}")
    assert "is a file" in one_usage_error_line(result)
    result, _ = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-save-reference={f}")
    assert "is a file" in one_usage_error_line(result)


def test_save_refuses_a_foreign_folder_and_leaves_it_alone(pytester, tiny_model, tiny_prompts, tiny_corpus):
    mine = pytester.path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    result, _ = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-save-reference={mine}")
    assert "not a reference pack" in one_usage_error_line(result)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def _check_other_build(data: dict) -> None:
    made, ran = data["reference_pack"]["build"], data["llama_cpp_build"]
    if made["library_digest"] == ran["library_digest"]:
        pytest.skip("the pack was made by the very library under test: there is no other build to compare with")
    drift = data["build_drift"]
    assert drift["verdict"] in ("PASS", "FAIL", "UNDECIDED") and set(drift["axes"]) == {"trajectory", "kld"}
    for axis in drift["axes"].values():
        assert axis["damage"] is not None and axis["damage"] >= 0
    # Gated like a candidate: a drift that is not PASS fails the gate, naming it.
    if drift["verdict"] != "PASS":
        assert not data["gate"]["passed"] and any(r.startswith("build drift:") for r in data["gate"]["reasons"])


def test_drift_against_another_release(request, tmp_path, tiny_model, tiny_prompts, tiny_corpus):
    """REFRACT_OLD_PYTHON: the interpreter of a virtualenv whose llama-cpp-python is another
    release (e.g. 0.3.22, as .ci/oldest-bindings builds it) with pytest-refract's dependencies.
    A library of another llama.h cannot be loaded into these bindings (engines/libload.py
    refuses it), so the other release runs in its own interpreter, on this source tree."""
    import subprocess

    python = os.environ.get("REFRACT_OLD_PYTHON")
    if not python:
        pytest.skip("REFRACT_OLD_PYTHON (a python with another llama-cpp-python release) is not set")
    pack, _ = request.getfixturevalue("saved")
    report = tmp_path / "old.json"
    installed = subprocess.run([python, "-c", "import importlib.metadata as m; print(any(e.value == "
                                "'pytest_refract.plugin' for e in m.entry_points(group='pytest11')))"],
                               capture_output=True, text=True).stdout.strip() == "True"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    args = tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0",
                     f"--refract-reference-pack={pack}", f"--refract-json={report}", "--refract-no-cache")
    done = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider",
                           *([] if installed else ["-p", "pytest_refract.plugin"]), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), done.stdout[-3000:] + done.stderr[-2000:]
    _check_other_build(read_report(report))


@pytest.mark.fork
def test_drift_against_a_fork_build(request, pytester, tiny_model, tiny_prompts, tiny_corpus):
    lib = os.environ.get("REFRACT_FORK_LIB")
    if not lib:
        pytest.skip("REFRACT_FORK_LIB (a shared-library build of a llama.cpp fork) is not set")
    pack, _ = request.getfixturevalue("saved")
    folder = Path(lib).parent if Path(lib).is_file() else Path(lib)
    result, report = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-reference-pack={pack}",
                          f"--refract-llama-lib={folder}")
    assert report.exists(), result.stdout.str()
    _check_other_build(read_report(report))


def test_pack_options_that_exclude_each_other(pytester, tiny_model, tiny_prompts, tiny_corpus, tmp_path):
    result, _ = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-reference-pack={tmp_path}",
                     "--refract-floor")
    assert "--refract-floor" in one_usage_error_line(result)
    shutil.rmtree(tmp_path, ignore_errors=True)
