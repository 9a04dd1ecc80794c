"""Trustworthy under bad input, interruption and repetition (tiny model, through pytester)."""

from __future__ import annotations

import json

import pytest
from conftest import one_usage_error_line, read_report, tiny_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_refract.errors import UsageProblem
from pytest_refract.inputs.data import load_prompts
from pytest_refract.report.jsonio import dumps


def _q8(model, prompts, corpus, *extra):
    return tiny_args(model, prompts, corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0", *extra)


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "prompts file not found"),
        ("", "holds no prompts"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "duplicate id 'a' (first on line 1)"),
        ('{"id": "a", "prompt": "x"}\n[1, 2]\n', "p.jsonl:2: expected a JSON object"),
        ('{"id": "a b", "prompt": "x"}\n', "id 'a b' must be letters"),
        ('{"id": "a"}\n', "p.jsonl:1: missing or empty prompt"),
    ],
)
def test_prompt_file_problems(pytester, tiny_model, tiny_corpus, content, expected):
    path = pytester.path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    line = one_usage_error_line(pytester.runpytest_subprocess(*_q8(tiny_model, path, tiny_corpus)))
    assert expected in line


def test_prompt_longer_than_the_context(pytester, tiny_model, tiny_corpus):
    path = pytester.path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "prompt": "hello world " * 600}) + "\n")
    line = one_usage_error_line(pytester.runpytest_subprocess(*_q8(tiny_model, path, tiny_corpus)))
    assert "prompt 'long' in" in line and "longer than the model's context of 1024 tokens" in line


@pytest.mark.parametrize("content, expected", [(None, "corpus file not found"), (b"", "is empty"), (b"   \n", "is empty")])
def test_corpus_problems(pytester, tiny_model, tiny_prompts, content, expected):
    path = pytester.path / "c.txt"
    if content is not None:
        path.write_bytes(content)
    line = one_usage_error_line(pytester.runpytest_subprocess(*_q8(tiny_model, tiny_prompts, path)))
    assert expected in line


def test_non_utf8_corpus_is_decoded_with_replacement_and_said(pytester, tiny_model, tiny_prompts, tiny_corpus):
    path = pytester.path / "latin1.txt"
    path.write_bytes(tiny_corpus.read_bytes().replace(b"hello", b"h\xe9llo"))
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*_q8(tiny_model, tiny_prompts, path, f"--refract-json={report}", "-k", "kld"))
    data = read_report(report)
    assert data["axes"]["kld"]["corpus"]["replaced_invalid_utf8"] is True
    assert any("not valid UTF-8" in line for line in data["diagnosis"])
    result.stdout.fnmatch_lines(["*latin1.txt is not valid UTF-8*"])


def test_self_reference_is_allowed_and_labelled(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=f16,ctv=f16", f"--refract-json={report}",
                   "-k", "kld"))
    assert result.ret == 0
    data = read_report(report)
    assert data["self_reference"] is True and data["diagnosis"][0].startswith("Self-reference")
    result.stdout.fnmatch_lines(["*(self-reference)*"])


def test_repeat_reports_zero_spread_on_cpu(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0", "--refract-repeat=3",
                   f"--refract-json={report}"))
    data = read_report(report)
    for name in ("trajectory", "kld"):
        rep = data["axes"][name]["repeat"]
        assert rep["n"] == 3 and len(rep["scores"]) == 3
        assert rep["stdev"] == 0.0 and rep["range"] == 0.0 and rep["verdict"] == "HEALTHY"
        assert rep["scores"] == [data["axes"][name]["score"]] * 3
        assert rep["mean"] == pytest.approx(data["axes"][name]["score"], rel=1e-12)
    assert data["repeat"]["stdev"] == 0.0 and data["repeat"]["mean"] == pytest.approx(data["composite"], rel=1e-12)
    assert "_repeats" not in json.dumps(data)


CRASH_CONFTEST = """
def pytest_runtest_call(item):
    if item.name == "test_kld[chunk-01]" and hasattr(item.config, "workerinput"):
        os._exit(3)
"""


def test_xdist_worker_crash_leaves_no_score(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytest.importorskip("xdist")
    pytester.makeconftest(CRASH_CONFTEST)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*_q8(tiny_model, tiny_prompts, tiny_corpus, f"--refract-json={report}",
                                                "-n", "2"))
    assert result.ret == 1
    data = read_report(report)
    assert data["axes"]["kld"]["score"] is None
    assert "chunk-01" in data["axes"]["kld"]["error"]
    assert data["composite"] is None and data["gate"]["passed"] is False
    assert data["axes"]["trajectory"]["score"] is not None  # the rest still measured


INTERRUPT_CONFTEST = """
import os, signal
def pytest_runtest_call(item):
    if item.name == "test_kld[chunk-00]":
        {action}
"""


@pytest.mark.parametrize("action", ["raise KeyboardInterrupt", "os.kill(os.getpid(), signal.SIGTERM)"])
def test_interrupted_run_writes_an_incomplete_report(pytester, tiny_model, tiny_prompts, tiny_corpus, action):
    pytester.makeconftest(INTERRUPT_CONFTEST.format(action=action))
    report = pytester.path / "r.json"
    html = pytester.path / "r.html"
    result = pytester.runpytest_subprocess(*_q8(tiny_model, tiny_prompts, tiny_corpus, f"--refract-json={report}",
                                                f"--refract-html={html}"))
    assert result.ret == 2  # pytest's INTERRUPTED: never a pass
    data = read_report(report)
    assert data["complete"] is False
    assert data["composite"] is None and data["band"] is None
    assert data["gate"]["passed"] is False
    assert len(data["axes"]["trajectory"]["items"]) == 3  # measured before the interruption
    assert data["axes"]["trajectory"]["score"] is None and data["axes"]["trajectory"]["status"] == "incomplete"
    assert data["diagnosis"][0].startswith("INCOMPLETE")
    assert html.exists()


def test_report_has_no_home_directory(pytester, tiny_model, tiny_prompts, tiny_corpus, monkeypatch):
    home = pytester.path / "home" / "someone"
    home.mkdir(parents=True)
    model = home / "models" / "tiny.gguf"
    model.parent.mkdir()
    model.write_bytes(tiny_model.read_bytes())
    monkeypatch.setenv("HOME", str(home))
    report = pytester.path / "r.json"
    pytester.runpytest_subprocess(*_q8(model, tiny_prompts, tiny_corpus, f"--refract-json={report}", "-k", "kld"))
    text = report.read_text()
    assert str(home) not in text
    data = read_report(report)
    assert data["model"]["path"] == "tiny.gguf"
    assert "~/models/tiny.gguf" in data["repro_command"]
    assert len(data["model"]["sha256_first_mib"]) == 64 and data["model"]["size_bytes"] == model.stat().st_size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=400))
def test_fuzz_prompts_loader_only_raises_usage_problems(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "p.jsonl"
    path.write_text(text, encoding="utf-8")
    try:
        prompts = load_prompts(path)
    except UsageProblem as exc:
        assert "\n" not in str(exc).strip()
    else:
        assert prompts and len({p.id for p in prompts}) == len(prompts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_fuzz_report_writer_emits_strict_json(value):
    text = dumps({"anything": value})

    def reject(constant):
        raise AssertionError(f"non-strict constant {constant}")

    json.loads(text, parse_constant=reject)
