"""Intervals and the calibrated score (pytest_refract.scoring.calibration): hand-computed cases and
properties. Pure numpy, no llama.cpp."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_refract.axes import BUILTIN
from pytest_refract.report import sensitivity
from pytest_refract.scoring import calibration as C
from pytest_refract.scoring.metrics import band_for


def plad_items(scores):
    return [{"id": f"p{i:02d}", "score": float(s), "skipped": False} for i, s in enumerate(scores)]


def traj_items(pairs):
    return [{"id": f"t{i:02d}", "prefix_agreement": a, "ref_len": n, "cand_len": n} for i, (a, n) in enumerate(pairs)]


# --------------------------------------------------------------------------- hand-computed


def test_percentile_interval_interpolates_like_numpy_linear():
    # 101 values 0..100: the 2.5 % and 97.5 % points sit at positions 2.5 and 97.5.
    assert C.percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    # 5 values: positions 0.1 and 3.9 -> 1 + 0.1 * (2 - 1) and 4 + 0.9 * (5 - 4).
    lo, hi = C.percentile_interval(np.array([5.0, 1.0, 4.0, 2.0, 3.0]))
    assert lo == pytest.approx(1.1) and hi == pytest.approx(4.9)


def test_axis_statistics_match_the_axes_definitions():
    _, t = BUILTIN["trajectory"].item_table(traj_items([(10, 20), (30, 40)]))
    assert BUILTIN["trajectory"].statistic(t) == pytest.approx(100 * 40 / 60)
    kld = [{"id": "a", "mean_kld": 0.1, "n_positions": 10}, {"id": "b", "mean_kld": 0.3, "n_positions": 30}]
    _, t = BUILTIN["kld"].item_table(kld)
    assert BUILTIN["kld"].statistic(t) == pytest.approx(100 * math.exp(-0.25))
    cells = [{"id": "c1", "ref_hits": 3, "cand_hits": 1, "trials": 3},
             {"id": "c2", "ref_hits": 0, "cand_hits": 0, "trials": 3},  # not scored: reference never retrieves
             {"id": "c3", "ref_hits": 2, "cand_hits": 3, "trials": 3}]
    ids, t = BUILTIN["rniah"].item_table(cells)
    assert ids == ["c1", "c3"]
    assert BUILTIN["rniah"].statistic(t) == pytest.approx(100 * (1 - (2 / 3 + 0) / 2))
    _, t = BUILTIN["plad"].item_table(plad_items([40, 60]) + [{"id": "x", "score": None, "skipped": True}])
    assert BUILTIN["plad"].statistic(t) == pytest.approx(50.0)


def test_replicates_by_hand():
    # Two trajectory prompts; resample (0, 0), (1, 1), (0, 1) by hand.
    _, t = BUILTIN["trajectory"].item_table(traj_items([(10, 20), (30, 40)]))
    idx = np.array([[0, 0], [1, 1], [0, 1]])
    assert C.replicates(BUILTIN["trajectory"], t, idx).tolist() == pytest.approx([50.0, 75.0, 100 * 40 / 60])


def test_two_item_interval_by_hand():
    # Scores 0 and 100: a resample's mean is 0, 50 or 100 with chances 1/4, 1/2, 1/4, so with
    # 2000 resamples both tails hold far more than 2.5 %: the interval is [0, 100].
    unc = C.axis_uncertainty(BUILTIN["plad"], plad_items([0, 100]), seed=0)
    assert unc["score"] == 50.0 and unc["ci95"] == [0.0, 100.0]
    counts = np.bincount((unc["replicates"] / 50).astype(int), minlength=3) / C.N_RESAMPLES
    assert counts == pytest.approx([0.25, 0.5, 0.25], abs=0.04)


def test_one_item_has_no_interval():
    assert C.axis_uncertainty(BUILTIN["plad"], plad_items([70]), seed=0)["ci95"] is None


def test_retention_by_hand():
    assert C.retention(50.0, 100.0) == 0.5
    assert C.retention(120.0, 100.0) == 1.0  # better than the control counts as the control
    assert C.retention(5.0, 0.0) == 1.0  # nothing left to lose beyond a control at 0


def test_constant_damage_beyond_the_control_by_hand():
    # Control keeps 100 on every pair, the candidate 50: every resample's retention is 0.5.
    cal = C.calibrate_axis(BUILTIN["plad"], plad_items([50] * 8), plad_items([100] * 8), seed=3)
    assert cal["calibrated_score"] == pytest.approx(50.0)
    assert cal["retention"] == 0.5 and cal["retention_ci95"] == pytest.approx([0.5, 0.5])
    assert cal["excess_damage"] == 50.0 and cal["excess_damage_ci95"] == pytest.approx([50.0, 50.0])
    assert cal["indistinguishable"] is False


def test_candidate_equal_to_control_scores_top():
    items = traj_items([(3, 128), (17, 128), (128, 128), (40, 128), (9, 128)])
    cal = C.calibrate_axis(BUILTIN["trajectory"], items, items, seed=0)
    assert cal["calibrated_score"] == 100.0 and cal["indistinguishable"] is True
    assert cal["excess_damage"] == 0.0


def test_far_worse_than_control_fails():
    control = traj_items([(100 + i, 128) for i in range(20)])
    candidate = traj_items([(5 + i, 128) for i in range(20)])
    cal = C.calibrate_axis(BUILTIN["trajectory"], candidate, control, seed=0)
    assert band_for(cal["calibrated_score"]) == "FAIL"
    assert cal["indistinguishable"] is False


def test_pairing_uses_shared_items_only():
    control = plad_items([100, 100, 100])
    candidate = plad_items([100, 100])  # p02 missing
    assert C.calibrate_axis(BUILTIN["plad"], candidate, control, seed=0)["n_paired"] == 2


def test_composite_interval_combines_replicates_by_harmonic_mean():
    a, b = np.array([50.0, 100.0, 80.0]), np.array([100.0, 100.0, 0.0])
    assert C.harmonic_mean_rows([a, b]).tolist() == pytest.approx([2 / (1 / 50 + 1 / 100), 100.0, 0.0])
    assert C.composite_interval([a, None], [5, 5]) is None
    assert C.composite_interval([a, b], [1, 5]) is None


# --------------------------------------------------------------------------- properties

scores = st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=2, max_size=30)


@settings(max_examples=60, deadline=None)
@given(scores, st.integers(min_value=0, max_value=2**31))
def test_candidate_equal_to_control_is_top_for_any_items(values, seed):
    items = plad_items(values)
    assert C.calibrate_axis(BUILTIN["plad"], items, items, seed)["calibrated_score"] == 100.0


@settings(max_examples=60, deadline=None)
@given(scores, st.integers(min_value=0, max_value=2**31))
def test_interval_contains_the_point_estimate(values, seed):
    unc = C.axis_uncertainty(BUILTIN["plad"], plad_items(values), seed)
    lo, hi = unc["ci95"]
    assert lo <= unc["score"] <= hi


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 128), st.integers(1, 128)), min_size=2, max_size=20),
       st.integers(min_value=0, max_value=2**31))
def test_deterministic_for_a_seed(pairs, seed):
    items = traj_items([(min(a, n), n) for a, n in pairs])
    first = C.axis_uncertainty(BUILTIN["trajectory"], items, seed)
    again = C.axis_uncertainty(BUILTIN["trajectory"], items, seed)
    assert first["ci95"] == again["ci95"]
    assert np.array_equal(first["replicates"], again["replicates"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=80, max_value=100, allow_nan=False), min_size=10, max_size=30),
       st.integers(min_value=0, max_value=2**31))
def test_far_worse_than_control_fails_for_any_items(control_values, seed):
    candidate_values = [v / 4 for v in control_values]  # a quarter of the control on every item
    cal = C.calibrate_axis(BUILTIN["plad"], plad_items(candidate_values), plad_items(control_values), seed)
    assert band_for(cal["calibrated_score"]) == "FAIL"


@settings(max_examples=40, deadline=None)
@given(scores, scores, st.integers(min_value=0, max_value=2**31))
def test_calibrated_score_is_at_least_the_retention_estimate(cand, ctrl, seed):
    n = min(len(cand), len(ctrl))
    cal = C.calibrate_axis(BUILTIN["plad"], plad_items(cand[:n]), plad_items(ctrl[:n]), seed)
    assert 0.0 <= cal["calibrated_score"] <= 100.0
    assert cal["calibrated_score"] >= 100.0 * cal["retention"] - 1e-9
    # A control scores at most 100, so calibrating never lowers a score: what passes raw
    # passes calibrated.
    plad = BUILTIN["plad"]
    assert cal["calibrated_score"] >= plad.statistic(plad.item_table(plad_items(cand[:n]))[1]) - 1e-9


# --------------------------------------------------------------------------- in the report


def _traj_section(pairs, near_ties):
    items = [dict(t, near_tie_divergence=tie, first_divergence=t["prefix_agreement"])
             for t, tie in zip(traj_items(pairs), near_ties)]
    return {"score": float(BUILTIN["trajectory"].statistic(BUILTIN["trajectory"].item_table(items)[1])), "items": items,
            "n_divergences": len(items), "n_near_tie_divergences": sum(near_ties), "teacher_forced_top1_pct": 95.0}


def _kld_section(means):
    items = [{"id": f"chunk-{i:02d}", "mean_kld": m, "n_positions": 255} for i, m in enumerate(means)]
    return {"score": 100 * math.exp(-sum(means) / len(means)), "items": items}


def test_report_calibrates_each_axis_and_combines_by_harmonic_mean():
    control = {"config": "ctk=bf16,ctv=bf16",
               "axes": {"trajectory": _traj_section([(40, 128)] * 6, [True] * 6),
                        "kld": _kld_section([0.003, 0.004, 0.0035, 0.003])}}
    for section in control["axes"].values():
        section["ci95"] = None
    axes = {"trajectory": _traj_section([(10, 128), (12, 128), (8, 128), (11, 128), (9, 128), (10, 128)],
                                        [False, True, False, False, True, False]),
            "kld": _kld_section([0.003, 0.004, 0.0035, 0.003])}
    out = sensitivity.calibrate(axes, control, {}, 0, BUILTIN)
    traj, kld = axes["trajectory"], axes["kld"]
    assert kld["calibrated_score"] == 100.0  # the same KLD as the control on every chunk
    assert traj["calibration"]["indistinguishable"] is False
    # Every candidate prompt keeps 8-12 of the control's 40 tokens: retention at most 12/40.
    assert traj["calibrated_score"] <= 100 * 12 / 40 + 1e-9
    expected = 2 / (1 / traj["calibrated_score"] + 1 / 100.0)
    assert out["calibrated_composite"] == pytest.approx(expected)
    lo, hi = out["composite_ci95"]
    assert lo <= 2 / (1 / traj["score"] + 1 / kld["score"]) <= hi
    lines = sensitivity.calibration_diagnosis(axes, control, BUILTIN)
    assert any(line.startswith("Within the model's rounding sensitivity on kld") for line in lines)
    assert any(line.startswith("Beyond the control (ctk=bf16,ctv=bf16): trajectory") for line in lines)
    assert any(line.startswith("Changes confident tokens: 4 of 6") for line in lines)


def test_report_says_near_tie_flips_like_the_control():
    control = {"config": "ctk=bf16,ctv=bf16", "axes": {"trajectory": _traj_section([(40, 128)] * 4, [True] * 4)}}
    axes = {"trajectory": _traj_section([(40, 128)] * 4, [True] * 4)}
    sensitivity.calibrate(axes, control, {}, 0, BUILTIN)
    lines = sensitivity.calibration_diagnosis(axes, control, BUILTIN)
    assert any(line.startswith("Greedy divergences are near-tie flips only (4 of 4") for line in lines)
    assert axes["trajectory"]["calibrated_score"] == 100.0


def test_report_without_control_has_intervals_but_no_calibration():
    axes = {"kld": _kld_section([0.01, 0.02, 0.03])}
    out = sensitivity.calibrate(axes, None, {}, 0, BUILTIN)
    assert axes["kld"]["calibrated_score"] is None and axes["kld"]["ci95"] is not None
    assert "calibrated_composite" not in out and out["composite_ci95"] is not None
    assert sensitivity.calibration_diagnosis(axes, None, BUILTIN) == []
