"""The sensitivity control and the gates beside it, run as users run the plugin (pytester
subprocess) on the tiny random-weight model."""

from __future__ import annotations

import pytest

from conftest import one_usage_error_line, read_report, tiny_args






def test_control_runs_by_default_inside_the_candidates_items(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0",
                   f"--refract-json={report}", f"--refract-cache-dir={pytester.path / 'cache'}"), "-v")
    result.assert_outcomes(passed=6)  # the control adds no items: ids and counts are unchanged
    result.stdout.fnmatch_lines(["*test_kld?chunk-00?*", "*control    ctk=bf16,ctv=bf16*"])
    data = read_report(report)
    sens = data["sensitivity"]
    assert sens["config"] == "ctk=bf16,ctv=bf16" and "bf16" in sens["note"] and sens["ranked"] is False
    assert sens["cached"] is False
    for name in ("trajectory", "kld"):
        assert sens["axes"][name]["score"] is not None
        lo, hi = sens["axes"][name]["ci95"]
        assert lo <= sens["axes"][name]["score"] <= hi
        axis = data["axes"][name]
        lo, hi = axis["ci95"]
        assert lo <= axis["score"] <= hi
        assert not any("calibrat" in key for key in axis)  # the retired retention score
        # Every item measured on both sides stands beside the control's same item.
        assert all("vs_control" in item for item in axis["items"])
    assert sens["axes"]["kld"]["n_chunks"] == 3
    lo, hi = data["composite_ci95"]
    assert lo <= data["composite"] <= hi
    assert data["schema"] == "pytest-refract.report.v3"
    assert not any(key.startswith("calibrated") for key in data)
    # The gate reads the verdict: each axis's damage as a multiple of the control's.
    assert data["gate"]["basis"] == "verdict" and data["gate"]["undecided"] == "fail"
    assert data["verdict"]["verdict"] in ("PASS", "FAIL", "UNDECIDED")
    for name in ("trajectory", "kld"):
        v = data["axes"][name]["verdict"]
        assert v == data["verdict"]["axes"][name]
        if v["basis"] == "multiple" and v["multiple_ci95"]:
            assert v["multiple_ci95"][0] <= v["multiple"] <= v["multiple_ci95"][1]
    assert data["gate"]["passed"] == (data["verdict"]["verdict"] == "PASS")
    traj = data["axes"]["trajectory"]
    assert 0 <= traj["teacher_forced_top1_pct"] <= 100
    for item in traj["items"]:
        assert "ref_margin_at_divergence" in item
        if item["first_divergence"] is None:
            assert item["ref_margin_at_divergence"] is None
        elif item["first_divergence"] < item["ref_len"]:
            assert 0 <= item["ref_margin_at_divergence"] <= 1
    # A warm run reads the control from the reference cache, as it reads the reference.
    again = pytester.path / "r2.json"
    pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0",
                   f"--refract-json={again}", f"--refract-cache-dir={pytester.path / 'cache'}")).assert_outcomes(passed=6)
    warm = read_report(again)
    assert warm["sensitivity"]["cached"] is True
    for name in ("trajectory", "kld"):
        assert warm["sensitivity"]["axes"][name]["score"] == sens["axes"][name]["score"]
        assert warm["sensitivity"]["axes"][name]["ci95"] == sens["axes"][name]["ci95"]
    assert warm["verdict"]["score"] == data["verdict"]["score"]
    spot = warm["reference_cache"]["spot_check"]
    assert all(c["match"] for c in spot["checked"] + spot["reference_checked"]) and not warm["reference_cache"]["tampered"]
    if not any(c["axis"] == "kld" for c in spot["checked"]):
        # Only the cache's spot check (one cached control item per axis, re-measured) costs
        # the control anything on a warm run.
        assert "control" not in warm["axes"]["kld"]["compute"]


def test_the_control_as_a_candidate_is_at_the_top(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=bf16,ctv=bf16",
                   "--refract-candidate=ctk=q4_0,ctv=q4_0", f"--refract-json={report}"))
    data = read_report(report)
    bf16 = next(c for c in data["candidates"] if c["candidate"] == "ctk=bf16,ctv=bf16")
    # Each of its items has exactly the control's damage on the same item.
    for axis in bf16["axes"].values():
        for item in axis.get("items") or axis.get("cells") or []:
            if "vs_control" in item:
                assert item["vs_control"]["damage"] == item["vs_control"]["control_damage"]
    assert len(data["ranking"]) == 2  # the control itself is never ranked
    # The control measured as a candidate has exactly the control's damage: 1x where the control
    # has damage; where it has none (the tiny model's bf16 cache can be bit-identical to f16)
    # there is no multiple and the candidate's own damage is 0. Never a FAIL (a PASS needs 46
    # items, more than the tiny run measures); its score is 100 either way.
    assert bf16["verdict"]["verdict"] != "FAIL" and bf16["verdict"]["score"] == 100.0
    for v in bf16["verdict"]["axes"].values():
        assert v["basis"] == "multiple" and v["verdict"] != "FAIL"
        if v["multiple"] is not None:
            assert v["multiple"] == pytest.approx(1.0)
        else:
            assert v["damage"] == 0.0
    assert result.ret == (0 if all(c["verdict"]["verdict"] == "PASS" for c in data["candidates"]) else 1)


def test_gate_basis_flag_chooses_what_the_gate_reads(pytester, tiny_model, tiny_prompts, tiny_corpus):
    # On the tiny model q4_0 diverges on a prompt where the control does not: raw below 90.
    common = tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0",
                       "--refract-fail-under=90")
    verdict = pytester.runpytest_subprocess(*common, f"--refract-json={pytester.path / 'v.json'}")
    raw = pytester.runpytest_subprocess(*common, "--refract-gate=raw", f"--refract-json={pytester.path / 'r.json'}")
    v, r = (read_report(pytester.path / f"{x}.json") for x in "vr")
    assert v["composite"] == r["composite"] < 90
    # The default reads the verdict: three prompts and three chunks cannot show q4_0's damage is
    # within 3x the control's, so it is not PASS, and the gate fails with the verdict's reason.
    assert v["gate"]["basis"] == "verdict" and v["verdict"]["verdict"] != "PASS"
    assert v["gate"]["passed"] is False and verdict.ret == 1
    assert any(reason.startswith("verdict ") for reason in v["gate"]["reasons"])
    verdict.stdout.fnmatch_lines(["*verdict    *", "*gate FAILED: verdict *"])
    assert r["gate"]["basis"] == "raw" and r["gate"]["passed"] is False and raw.ret == 1
    assert any("composite" in reason and "below" in reason for reason in r["gate"]["reasons"])
    raw.stdout.fnmatch_lines(["*gate FAILED: composite * is below --refract-fail-under=90*"])
    # Under the raw gate the composite leads, and the verdict follows as what this gate did not read.
    raw.stdout.fnmatch_lines(["composite  *", "*the verdict (not what this gate reads*", "verdict    *"])


def test_no_sensitivity_gates_on_the_raw_composite(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-no-sensitivity",
                   f"--refract-json={report}"))
    result.assert_outcomes(passed=6)
    data = read_report(report)
    assert data["sensitivity"]["config"] is None and data["gate"]["basis"] == "raw"
    assert data["verdict"] is None and "vs_control" not in data["axes"]["kld"]["items"][0]
    assert data["axes"]["kld"]["ci95"] is not None  # intervals do not need the control


def test_reference_not_f16_gets_the_nearest_rounding_only_control(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-reference=ctk=bf16,ctv=bf16",
                   "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-axes=kld", f"--refract-json={report}"))
    data = read_report(report)
    assert data["sensitivity"]["config"] == "ctk=f16,ctv=f16"
    assert "not f16" in data["sensitivity"]["note"]


@pytest.mark.parametrize("extra, message", [
    (["--refract-gate=median"], "--refract-gate='median' must be verdict or raw"),
    (["--refract-undecided=maybe"], "--refract-undecided='maybe' must be fail or pass"),
    (["--refract-gate=verdict", "--refract-no-sensitivity"], "needs the sensitivity control"),
    # The retired retention gate: one line saying so and what to use.
    (["--refract-gate=calibrated"], "--refract-gate=calibrated was retired; use the verdict gate (the default"),
    (["--refract-sensitivity=ctk=f16,ctv=f16"], "equals the reference"),
    (["--refract-sensitivity=ctk=q9_9,ctv=f16"], "--refract-sensitivity ctk=q9_9"),
])
def test_sensitivity_flag_problems_are_one_line_usage_errors(pytester, tiny_model, tiny_prompts, tiny_corpus, extra,
                                                             message):
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0", *extra))
    assert message in one_usage_error_line(result)
