"""Strict JSON, atomic writes, composite and diagnosis."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from pytest_refract.report import build as report
from pytest_refract.axes import BUILTIN
from pytest_refract.files import write_atomic
from pytest_refract.report.jsonio import dumps
from pytest_refract.report.sections import composite_of


def _reject(constant):
    raise AssertionError(f"non-strict JSON constant {constant!r}")


def _strict(text):
    return json.loads(text, parse_constant=_reject)


# --------------------------------------------------------------------------- dumps


def test_dumps_is_strict_json():
    data = {
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "np32": np.float32(0.25),
        "np32_nan": np.float32("nan"),
        "np64_inf": np.float64("inf"),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "nested": {"list": [1.5, float("nan"), (np.float32(2.0), float("inf"))], 3: "int key"},
        "text": "naïve",
        "none": None,
    }
    text = dumps(data)
    parsed = _strict(text)
    assert parsed == {
        "nan": None,
        "inf": None,
        "ninf": None,
        "np32": 0.25,
        "np32_nan": None,
        "np64_inf": None,
        "np_int": 7,
        "np_bool": True,
        "nested": {"list": [1.5, None, [2.0, None]], "3": "int key"},
        "text": "naïve",
        "none": None,
    }
    assert type(parsed["np32"]) is float
    assert type(parsed["np_int"]) is int
    assert "naïve" in text  # not \u-escaped
    assert "NaN" not in text and "Infinity" not in text


def test_strict_parser_would_reject_plain_json_dumps():
    # Guard: the check above is meaningful only if the parser really rejects NaN.
    with pytest.raises(AssertionError, match="NaN"):
        _strict(json.dumps({"x": float("nan")}))


# --------------------------------------------------------------------------- write_atomic


def test_write_atomic_writes_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "report.json"
    result = write_atomic(target, '{"a": 1}')
    assert result == target
    assert target.read_text(encoding="utf-8") == '{"a": 1}'
    assert sorted(os.listdir(tmp_path)) == ["report.json"]
    write_atomic(str(target), "second")
    assert target.read_text(encoding="utf-8") == "second"
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_write_atomic_failure_keeps_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("previous", encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(target, "new content that never lands")
    assert target.read_text(encoding="utf-8") == "previous"
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_write_atomic_failure_without_previous_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("nope")))
    with pytest.raises(OSError):
        write_atomic(tmp_path / "r.json", "x")
    assert os.listdir(tmp_path) == []


def test_write_atomic_keeps_normal_file_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        target = tmp_path / "report.json"
        target.write_text("old")
        os.chmod(target, 0o644)
        write_atomic(target, "new")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)


# --------------------------------------------------------------------------- composite


def test_composite_of():
    assert composite_of({}) is None
    assert composite_of({"trajectory": {"score": 80.0}, "kld": {"score": None}}) is None
    assert composite_of({"trajectory": {"score": 90.0}, "kld": {"score": 60.0}}) == pytest.approx(72.0)
    assert composite_of({"kld": {"score": 97.5}}) == pytest.approx(97.5)
    assert composite_of({"trajectory": {"score": 0.0}, "kld": {"score": 99.0}}) == 0.0


# --------------------------------------------------------------------------- diagnose


def _traj(score, median_first_divergence=12.0):
    return {"score": score, "median_first_divergence": median_first_divergence}


def _kld(score, mean_kld=None, ppl_ref=10.0, ppl_cand=10.5, same_top=95.0):
    if mean_kld is None:
        mean_kld = -math.log(score / 100.0)
    return {"score": score, "mean_kld": mean_kld, "same_top_p_pct": same_top, "ppl_ref": ppl_ref, "ppl_cand": ppl_cand}


def diagnose(axes, self_reference=False, reference=None):
    return report.diagnose(axes, BUILTIN, self_reference, reference=reference)


def _text(lines):
    return "\n".join(lines)


def test_diagnose_all_clear():
    lines = diagnose({"trajectory": _traj(95.0), "kld": _kld(92.0)})
    assert lines == ["All clear: the candidate cache tracks the reference on every axis that ran."]
    named = diagnose({"trajectory": _traj(95.0), "kld": _kld(92.0)}, reference="ctk=q8_0,ctv=q8_0")
    assert named == ["All clear: the candidate cache tracks the reference (ctk=q8_0,ctv=q8_0) on every axis that ran."]


def test_diagnose_minor_drift():
    lines = diagnose({"trajectory": _traj(85.0), "kld": _kld(95.0)})
    assert lines == ["Minor drift: every axis that ran is PASS or better."]


def test_diagnose_trajectory_low_kld_high_is_near_tie():
    lines = diagnose({"trajectory": _traj(70.0, 7.0), "kld": _kld(95.0)})
    text = _text(lines)
    assert "near-tie" in text
    assert "after a median of 7 tokens" in text
    assert "All clear" not in text and "Minor drift" not in text
    assert "Short-context drift" not in text


def test_diagnose_trajectory_low_kld_middling_is_plain_drift():
    text = _text(diagnose({"trajectory": _traj(70.0, None), "kld": _kld(85.0)}))
    assert "Generated text drifts: greedy continuations leave the reference's path." in text
    assert "near-tie" not in text


def test_diagnose_kld_low():
    lines = diagnose({"trajectory": _traj(95.0), "kld": _kld(70.0, mean_kld=0.3567, same_top=81.25)})
    text = _text(lines)
    assert "Short-context drift" in text
    assert "mean KLD 0.3567 nats" in text
    assert "same top token 81.2% of positions" in text or "same top token 81.3% of positions" in text
    assert "All clear" not in text and "Catastrophic" not in text


def test_diagnose_catastrophic():
    lines = diagnose({"trajectory": _traj(20.0, 1.0), "kld": _kld(30.0)})
    assert lines[0].startswith("Catastrophic")
    assert "Short-context drift" in _text(lines)
    assert "All clear" not in _text(lines)


def test_diagnose_not_catastrophic_when_one_axis_survives():
    assert "Catastrophic" not in _text(diagnose({"trajectory": _traj(20.0), "kld": _kld(65.0)}))


def test_diagnose_perplexity_hides_damage():
    lines = diagnose({"kld": _kld(75.0, mean_kld=0.2877, ppl_ref=12.5, ppl_cand=12.25)})
    hides = [line for line in lines if line.startswith("Perplexity hides the damage")]
    assert len(hides) == 1
    assert "PPL 12.250 vs 12.500" in hides[0]
    assert "mean KLD is 0.2877 nats" in hides[0]


def test_diagnose_perplexity_warning_needs_lower_or_equal_ppl():
    text = _text(diagnose({"kld": _kld(75.0, ppl_ref=12.5, ppl_cand=12.6)}))
    assert "Perplexity hides" not in text
    text = _text(diagnose({"kld": _kld(100.0, mean_kld=0.0, ppl_ref=12.5, ppl_cand=12.5)}))
    assert "Perplexity hides" not in text


def test_diagnose_unscored_axis_and_self_reference():
    lines = diagnose({"trajectory": {"score": None}, "kld": _kld(99.0)}, self_reference=True)
    assert lines[0].startswith("Self-reference")
    assert lines[1] == "No score for trajectory: some items failed to measure (see the failed tests)."
    assert lines[-1].startswith("All clear")
    assert diagnose({"kld": {"score": None}}) == [
        "No score for kld: some items failed to measure (see the failed tests)."
    ]


def test_floor_below_threshold_is_a_loud_warning():
    from types import SimpleNamespace

    from pytest_refract.engines.kvconfig import parse_kv_config
    from pytest_refract.record import RunRecord
    from pytest_refract.report.build import _candidate_section

    settings = SimpleNamespace(floor=True, repeat=1, fail_under=60.0, fail_under_text="FAIL", seed=0, gate_basis="raw",
                               candidates=(parse_kv_config("ctk=q8_0,ctv=q8_0"),), reference=parse_kv_config("ctk=f16,ctv=f16"))
    facts = RunRecord(settings=settings, self_reference={"cand0": False}, labels={"cand0": "ctk=q8_0,ctv=q8_0"})
    item = {"id": "a", "category": "c", "prefix_agreement": 8, "ref_len": 8, "cand_len": 8, "first_divergence": None,
            "full_match": True, "teacher_forced_kld": 0.0, "wall_s": 1.0,
            "floor": {"prefix_agreement": 4, "ref_len": 8, "cand_len": 8, "teacher_forced_kld": 0.1}}
    section = _candidate_section(facts, "cand0", {"trajectory": {"a": item}}, {}, {}, True, None, BUILTIN)
    assert section["floor"] == 50.0
    assert section["diagnosis"][0].startswith("WARNING: the noise floor (reference vs reference) is 50.00")
    item["floor"]["prefix_agreement"] = 8
    section = _candidate_section(facts, "cand0", {"trajectory": {"a": item}}, {}, {}, True, None, BUILTIN)
    assert section["floor"] == 100.0
    assert section["diagnosis"][-1] == "Noise floor (reference vs reference): 100.00."
