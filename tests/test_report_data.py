"""Report as data: build_report is a pure function of plain data (no llama.cpp, no session),
and the axis registry gives an external axis the protocol's defaults, so the report, the
terminal summary, compare and the bootstrap handle it without knowing its name."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_refract import axes as axes_mod
from pytest_refract.axes import BUILTIN, resolve
from pytest_refract.axes.plad import item_score
from pytest_refract.cli import compare
from pytest_refract.engines.kvconfig import parse_kv_config
from pytest_refract.errors import UsageProblem
from pytest_refract.record import RunRecord
from pytest_refract.report import terminal as summary
from pytest_refract.report.build import build_report
from pytest_refract.report.jsonio import dumps
from pytest_refract.scoring.metrics import band_for
from pytest_refract.settings import Settings

ROLES = ("cand0", "cand1", "control")


def _settings(**changes) -> Settings:
    values = dict(model="tiny.gguf", reference=parse_kv_config("ctk=f16,ctv=f16"),
                  candidates=(parse_kv_config("ctk=q8_0,ctv=q4_0"), parse_kv_config("ctk=q4_0,ctv=q4_0")),
                  axes=("trajectory", "kld", "rniah", "plad"), fail_under=60.0, fail_under_text="FAIL",
                  item_fail_under=None, json_path=None, prompts_path=None, corpus_path=None, n_predict=8, ctx=64,
                  chunks=2, seed=0, threads=1, gpu_layers=0, floor=False, rniah_positions=(0.5,), rniah_trials=2,
                  sensitivity=parse_kv_config("ctk=bf16,ctv=bf16"), sensitivity_note="bf16: rounding only",
                  gate_basis="raw")
    values.update(changes)
    return Settings(**values)


def _common(k: int) -> dict:
    return {"wall_s": 0.25 + k, "compute": {"reference": {"batch_tokens": 8, "decode_tokens": 8}},
            "reference_cache": {"hits": k % 2, "misses": 1 - k % 2}}


def _trajectory(k: int) -> dict:
    out = {}
    for i in range(3):
        agree = 8 - ((i + k) % 3)
        out[f"p{i}"] = dict(_common(k), id=f"p{i}", category="c", prompt_tokens=5, ref_len=8, cand_len=8,
                            prefix_agreement=agree, first_divergence=agree if agree < 8 else None,
                            full_match=agree == 8, teacher_forced_kld=0.01 * (8 - agree),
                            teacher_forced_top1_pct=100.0 - (8 - agree), near_tie_divergence=agree < 8 and i == 1,
                            score=100.0 * agree / 8, band=band_for(100.0 * agree / 8))
    return out


def _kld(k: int) -> dict:
    out = {}
    for i in range(2):
        kld = [0.002 * (k + 1) * (j + i + 1) for j in range(4)]
        mean = sum(kld) / 4
        raw = {"kld": kld, "p_diff": [-0.001 * (k + 1)] * 4, "nll_ref": [2.0] * 4, "nll_cand": [2.0 + mean] * 4,
               "same_top": [1.0, 1.0, 1.0, 0.0 if k else 1.0]}
        out[f"chunk-{i:02d}"] = dict(_common(k), id=f"chunk-{i:02d}", chunk=i, score=100 * math.exp(-mean),
                                     band=band_for(100 * math.exp(-mean)), mean_kld=mean, mean_kld_unc=0.0,
                                     max_kld=max(kld), p99_kld=max(kld), same_top_p_pct=75.0, rms_dp_pct=0.1,
                                     ppl_ref=math.exp(2.0), ppl_cand=math.exp(2.0 + mean), n_positions=4, _raw=raw)
    return out


def _rniah(k: int) -> dict:
    hits = 2 - (k == 1)
    score = 100.0 * (1 - (2 - hits) / 2)
    return {"128-0.50": dict(_common(k), id="128-0.50", length=128, position=0.5, prompt_tokens=140, trials=2,
                             ref_hits=2, cand_hits=hits, degradation=(2 - hits) / 2, status="scored", score=score,
                             band=band_for(score), answers=[{"value": "1234"}])}


def _plad(k: int) -> dict:
    out = {}
    for i, kind in enumerate(("typo", "case")):
        excess = 0.01 * k * (i + 1)
        out[f"p{i}-{kind}"] = dict(_common(k), id=f"p{i}-{kind}", prompt_id=f"p{i}", perturbation=kind, skipped=False,
                                   perturbed_prompt="x", ref_drift=0.1, cand_drift=0.1 + excess, excess=excess,
                                   score=item_score(excess), band=band_for(item_score(excess)))
    return out


def _length(k: int) -> dict:
    return {f"u{i}": dict(_common(k), id=f"u{i}", score=90.0 - 20 * k * i, band=band_for(90.0 - 20 * k * i))
            for i in range(3)}


def _facts(**changes) -> RunRecord:
    s = changes.pop("settings", None) or _settings()
    values = dict(
        settings=s, candidate_roles=("cand0", "cand1"),
        labels={"cand0": "ctk=q8_0,ctv=q4_0", "cand1": "ctk=q4_0,ctv=q4_0", "control": "ctk=bf16,ctv=bf16"},
        self_reference={"cand0": False, "cand1": False}, control_role="control",
        text_inputs=({"name": "corpus.txt", "sha256": "ab", "bytes": 10, "replaced_invalid_utf8": True},),
        axis_inputs={"kld": {"corpus": {"name": "corpus.txt", "sha256": "ab", "bytes": 10,
                                        "replaced_invalid_utf8": True}}},
        axis_settings={"rniah": {"lengths": [128], "effective_answer_tokens": 32, "thinking_template": False}},
        rotation={"reference": None, "cand0": {"k": False, "v": False}, "cand1": {"k": True, "v": True}},
        kv_allocation={r: {"bytes_per_token": 100} for r in ("reference", "cand0", "cand1")},
        context_env={r: {"LLAMA_X": "1"} for r in ("reference", "cand0", "cand1")},
        kv_cache={"cand0": {"bytes_per_token": 60, "vs_reference": 0.6}, "cand1": {"bytes_per_token": 50,
                                                                                   "vs_reference": 0.5}},
        reference_kv_bytes_per_token=100, kv_bytes_peak=12345,
        model={"name": "tiny", "path": "tiny.gguf", "size_bytes": 1000, "architecture": "llama", "n_params": 10,
               "n_ctx_train": 1024, "sha256_first_mib": "00"},
        host={"machine": "x86_64", "system": "Linux", "cpus": 2}, reference_cache_enabled=True,
        reference_cache_read=False, binding_version="0.3.0", llama_build={"commit": "abc"}, baseline=None,
        selected={r: {"trajectory": 3, "kld": 2, "rniah": 1, "plad": 2} for r in ("cand0", "cand1")},
        items_selected=16, wall_s=1.5)
    values.update(changes)
    return RunRecord(**values)


def _inputs(registry=None, complete=True, **fact_changes) -> dict:
    registry = BUILTIN if registry is None else registry
    results = {}
    for k, role in enumerate(ROLES):
        per_axis = {"trajectory": _trajectory(k), "kld": _kld(k), "rniah": _rniah(k), "plad": _plad(k)}
        if "length" in registry:
            per_axis["length"] = _length(k)
        if role == "control":
            for items in per_axis.values():
                for item in items.values():
                    item["control_cached"] = False
        results[role] = per_axis
    custom = [{"test": "test_mine.py::test_mine", "kind": "gate", "gate": "mine", "metrics": {"score": 95.0}}]
    return dict(facts=_facts(**fact_changes), results=results, failed={}, custom=custom,
                invocation_args=["--refract-model=tiny.gguf", "-q"], complete=complete, registry=registry)


# --------------------------------------------------------------------------- pure


def test_build_report_is_pure():
    inputs = _inputs()
    before = copy.deepcopy({k: v for k, v in inputs.items() if k != "registry"})
    first, second = build_report(**inputs), build_report(**inputs)
    # Nothing it was given changed, and the same inputs give the same report (but the time).
    assert {k: v for k, v in inputs.items() if k != "registry"} == before
    assert first.pop("timestamp") and second.pop("timestamp")
    assert first == second
    # The session's fields are part of the build, not patched on afterwards.
    assert first["wall_s"] == 1.5 and first["items_selected"] == 16
    assert first["items_run"] == 3 * (3 + 2 + 1 + 2)  # both candidates and the control
    assert list(first)[-4:] == ["wall_s", "items_run", "items_selected", "items_skipped_decided"]
    assert first["items_skipped_decided"] == 0  # no sequential design in these inputs
    assert len(first["candidates"]) == 2 and first["sensitivity"]["config"] == "ctk=bf16,ctv=bf16"
    assert first["gate"]["passed"] is (not first["gate"]["reasons"])
    assert first["settings"]["rniah"]["lengths"] == [128]
    assert first["axes"]["kld"]["corpus"]["name"] == "corpus.txt"
    assert "corpus.txt is not valid UTF-8" in " ".join(first["diagnosis"])
    json.loads(dumps(first), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_build_report_gate_reads_the_baseline_from_the_facts():
    inputs = _inputs(settings=_settings(max_drop=0.0, baseline_path="old.json"),
                     baseline={"composite": 100.0, "timestamp": "then", "axes": {"kld": {"score": 100.0}},
                               "candidates": [{"candidate": "ctk=q8_0,ctv=q4_0", "composite": 100.0,
                                               "axes": {"kld": {"score": 100.0}}}]})
    report = build_report(**inputs)
    assert any(r.startswith("ctk=q8_0,ctv=q4_0: kld dropped") for r in report["gate"]["reasons"])
    assert report["gate"]["passed"] is False
    assert report["baseline"] == {"path": "old.json", "composite": 100.0, "timestamp": "then", "max_drop": 0.0}
    assert list(report)[-1] == "baseline"


def test_build_report_needs_no_llama_cpp():
    """In a fresh interpreter: building (and writing) a report imports neither llama_cpp nor
    the modules that drive it (the engine, the audit layer, the session). The options' parser
    (engines/kvconfig.py, pure) may come in with Settings."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_report_data as t; "
            "from pytest_refract.report.build import build_report; from pytest_refract.report.jsonio import dumps; "
            "dumps(build_report(**t._inputs())); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp' "
            "or m.startswith('pytest_refract.audit') "
            "or m in ('pytest_refract.engines.llamacpp', 'pytest_refract.engines.base', 'pytest_refract.plugin', "
            "'pytest_refract.session'))))")
    env_path = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_interrupted_report_renders_axes_that_never_ran():
    inputs = _inputs(complete=False)
    for role in ROLES:
        for name in ("rniah", "plad"):
            inputs["results"][role].pop(name)
    report = build_report(**inputs)
    section = report["candidates"][0]["axes"]
    assert section["rniah"]["status"] == "incomplete" and section["rniah"]["n_not_run"] == 1
    lines = _render(report, BUILTIN)
    assert any(line.startswith("rniah      n/a NO SCORE") for line in lines)


# --------------------------------------------------------------------------- registry


def _length_axis():
    """The smallest external axis: the required members only."""

    def aggregate(results):
        score = sum(r["score"] for r in results) / len(results)
        return {"score": score, "band": band_for(score), "items": list(results)}

    return SimpleNamespace(NAME="length", units=lambda run: [], planned_tokens=lambda run, unit: 0,
                           measure=lambda run, unit: {}, aggregate=aggregate)


def test_registry_fills_the_documented_defaults():
    external = _length_axis()
    registry = resolve([external])
    assert list(registry) == ["trajectory", "kld", "rniah", "plad", "decode", "depth", "length"]
    axis = registry["length"]
    assert (axis.TITLE, axis.ITEMS_KEY, axis.BATCHED, axis.COMPARE_METRICS) == ("length", "items", 0, ())
    assert axis.diagnose({"score": 10.0}, {}) == [] and axis.control_diagnosis({}, {}) == []
    assert axis.item_detail({"score": 1.0}) == "" and axis.section_detail({}, control=True) == ""
    ids, table = axis.item_table([{"id": "a", "score": 80.0}, {"id": "b", "score": None}, {"id": "c", "score": 60}])
    assert ids == ["a", "c"] and table.shape == (2, 1)
    assert float(axis.statistic(table)) == 70.0
    assert axis.aggregate is external.aggregate and axis.NAME == "length"
    assert not hasattr(external, "TITLE")  # defaults are not written onto the object
    own = _length_axis()
    own.TITLE, own.ITEMS_KEY = "Length", "rows"
    assert (resolve([own])["length"].TITLE, resolve([own])["length"].ITEMS_KEY) == ("Length", "rows")


def test_builtin_axes_define_every_optional_member():
    registry = resolve()
    assert list(registry) == list(axes_mod.ORDER)
    for name, axis in BUILTIN.items():
        assert registry[name] is axis and axis.NAME == name and isinstance(axis, axes_mod.Axis)
        assert all(hasattr(axis, member) for member in ("TITLE", *axes_mod.DEFAULTS)), name


@pytest.mark.parametrize("extra, message", [
    ([SimpleNamespace(NAME="x")], "lacks units, planned_tokens, measure, aggregate"),
    ([_length_axis(), _length_axis()], "registered twice"),
    ([SimpleNamespace(**dict(vars(_length_axis()), NAME="kld"))], "registered twice"),
    ([SimpleNamespace(**dict(vars(_length_axis()), NAME="Length 2"))], "lowercase word"),
])
def test_registry_refuses_incomplete_or_clashing_axes(extra, message):
    with pytest.raises(UsageProblem, match=message):
        resolve(extra)


# --------------------------------------------------------------------------- an external axis end to end


class _Terminal:
    def __init__(self):
        self.text = ""

    def write_sep(self, sep, title):
        self.text += f"{sep * 3} {title}\n"

    def write(self, text, **markup):
        self.text += text

    def write_line(self, text="", **markup):
        self.text += text + "\n"


def _render(report, registry):
    tr = _Terminal()
    summary.render(tr, report, "r.json", registry)
    return tr.text.splitlines()


def test_external_axis_is_scored_summarised_and_compared():
    registry = resolve([_length_axis()])
    report = build_report(**_inputs(registry=registry))
    cand1 = report["candidates"][1]
    length = cand1["axes"]["length"]
    assert length["score"] == pytest.approx((90 + 70 + 50) / 3)
    assert length["ci95"] is not None  # the default bootstrap table
    # The default damage (lost score share) of each unit beside the control's same unit.
    assert [i["vs_control"]["damage"] for i in length["items"]] == pytest.approx([0.1, 0.3, 0.5])
    assert "length" in report["ranking"][0]["axes"]
    assert list(cand1["axes"]) == ["trajectory", "kld", "rniah", "plad", "length"]
    lines = _render(report, registry)
    assert any(line.startswith("length     ") and "EXCELLENT" not in line for line in lines)
    # Its items beside the control's same items, by the default damage (the lost score share).
    assert "  length[u2] damage 0.5 vs 0.9 in the control (0.6\u00d7)" in lines
    # compare runs offline with the built-ins: an axis it does not know shows its score row and
    # its verdict's multiple of the control's damage (every axis has one) alone.
    rows = compare.table(*compare.expand_candidates([report], ["r.json"]))
    labels = [row[0] for row in rows]
    assert "length score" in labels and labels[labels.index("length score") + 1:] == ["  multiple of the control's"]
    assert "  mean KLD" in labels and "plad score" in labels


# --------------------------------------------------------------------------- two counts, one thing


def test_interrupted_run_sentences_count_one_axis_items_against_its_own_selection():
    """ "A of B item(s) ran ... (C of them failed to measure)": A and C are this axis's items, B its
    selection; the diagnosis's "X of Y selected items ran; Z were not run" adds those up."""
    inputs = _inputs(complete=False)
    for role in ROLES:
        inputs["results"][role]["trajectory"].pop("p2")  # trajectory: 2 ran of 3 selected
        inputs["results"][role]["plad"].pop("p1-case")
    inputs["failed"] = {"cand0": {"trajectory": ["p2"], "kld": []}}  # ...one more ran and failed
    inputs["results"]["cand0"]["trajectory"].pop("p1")
    report = build_report(**inputs)
    section = report["candidates"][0]
    ran_total, not_run_total = 0, 0
    for name, axis in section["axes"].items():
        ran = len(inputs["results"]["cand0"].get(name, {})) + len(inputs["failed"]["cand0"].get(name, []))
        selected = inputs["facts"].selected["cand0"][name]
        failed = len(inputs["failed"]["cand0"].get(name, []))
        assert (axis["n_run"], axis["n_not_run"]) == (ran, selected - ran), name
        numbers = [int(n) for n in re.findall(r"\d+", axis["error"])]
        if ran < selected:
            assert numbers[:2] == [ran, selected], (name, axis["error"])
        else:
            assert numbers[0] == ran, (name, axis["error"])
        if failed:
            assert f"({failed} of them failed to measure)" in axis["error"]
        ran_total, not_run_total = ran_total + ran, not_run_total + selected - ran
    line = next(d for d in section["diagnosis"] if d.startswith("INCOMPLETE"))
    assert f"{ran_total} of {ran_total + not_run_total} selected items ran; {not_run_total} were not run." in line
