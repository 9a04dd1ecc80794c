"""The hooks other plugins fill: pytest_refract_axes (a fifth axis, here the example in
examples/custom_axis) and pytest_refract_report, run as users run them (a pytest subprocess
on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_report, tiny_args

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_axis" / "conftest.py"

REPORT_HOOK = '''
import json, os

def pytest_refract_report(report, config):
    # Seen before any file is written: what we add shows up in the JSON.
    report["custom"]["measurements"].append({"test": "uploader", "kind": "note", "gate": None,
                                             "metrics": {"axes": sorted(report["axes"])}})
    with open(os.environ["REFRACT_HOOK_LOG"], "a") as log:
        log.write(json.dumps({"composite": report["composite"], "written": os.path.exists(config.getoption("refract_json"))}) + "\\n")
'''


def test_a_fifth_axis_and_the_report_hook(pytester, tiny_model, tiny_prompts, tiny_corpus, monkeypatch, tmp_path):
    pytester.makeconftest(EXAMPLE.read_text() + REPORT_HOOK)
    log = tmp_path / "hook.log"
    monkeypatch.setenv("REFRACT_HOOK_LOG", str(log))
    report, page = pytester.path / "r.json", pytester.path / "r.html"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0",
                   "--refract-axes=trajectory,length", f"--refract-json={report}", f"--refract-html={page}",
                   "--refract-fail-under=0", "--refract-undecided=pass"), "-v")
    out = result.stdout.str()
    assert result.ret == 0, out[-3000:]
    for prompt in ("fact-001", "code-001", "creative-001"):
        assert f"test_length[{prompt}] PASSED" in out
    data = read_report(report)
    length, trajectory = data["axes"]["length"], data["axes"]["trajectory"]
    scores = [r["score"] for r in length["items"]]
    assert length["score"] == sum(scores) / len(scores)
    assert data["composite"] == pytest.approx(2 / (1 / length["score"] + 1 / trajectory["score"]))
    assert data["ranking"][0]["axes"] == {"trajectory": trajectory["score"], "length": length["score"]}
    # The control ran on the new axis too, so each item stands beside the control's same item.
    assert data["sensitivity"]["axes"]["length"]["score"] is not None
    assert all("in the control" in item["vs_control"]["text"] for item in length["items"])
    assert "length" in out.split("refract KV-cache audit")[1]
    html = page.read_text()
    assert 'id="section-length"' in html and all(f"<td>{p}</td>" in html for p in ("fact-001", "code-001"))
    # The report hook ran once, before the files were written, and its addition is in the JSON.
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [{"composite": data["composite"], "written": False}]
    assert {"test": "uploader", "kind": "note", "gate": None,
            "metrics": {"axes": ["length", "trajectory"]}} in data["custom"]["measurements"]


def test_an_axis_that_breaks_the_protocol_is_one_usage_error(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytester.makeconftest("def pytest_refract_axes(config):\n    return [object()]\n")
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0"))
    assert result.ret == 4
    err = result.stderr.str()
    assert "lacks NAME, units, planned_tokens, measure, aggregate" in err and "Traceback" not in err


def test_an_unknown_axis_name_lists_the_added_ones(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytester.makeconftest(EXAMPLE.read_text())
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-axes=lenght"))
    assert result.ret == 4
    assert "unknown axis 'lenght'; choose from trajectory, kld, rniah, plad, decode, depth, length or none" in result.stderr.str()


DICT_UNITS_AXIS = '''
from pytest_refract.axes import Axis


class DictAxis(Axis):
    NAME = "dicts"

    def units(self, run):
        return [{"id": "a", "keywords": [], "prompt": "hi"}]

    def measure(self, run, unit):
        return {"id": unit["id"], "score": 100.0, "band": "EXCELLENT"}


def pytest_refract_axes(config):
    return [DictAxis()]
'''


def test_an_axis_whose_units_are_not_units_is_one_usage_error(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytester.makeconftest(DICT_UNITS_AXIS)
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-axes=dicts"))
    assert result.ret == 4
    err = result.stderr.str()
    assert "axis 'dicts': units() must return pytest_refract.axes.Unit objects, not dict" in err, err
    assert "Traceback" not in err


def test_indexing_a_unit_says_what_to_read():
    from pytest_refract.axes import Unit

    unit = Unit("a", payload={"prompt": "hi"}).for_item("length", "cand0", None)
    assert (unit.id, unit.axis, unit.candidate, unit.batch, unit.payload["prompt"]) == ("a", "length", "cand0", None, "hi")
    with pytest.raises(TypeError, match=r"unit.payload\['prompt'\]"):
        unit["prompt"]
