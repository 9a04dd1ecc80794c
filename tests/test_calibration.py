"""The raw scores' intervals (pytest_refract.scoring.calibration), each candidate item beside the
control's same item, and the sentences that set two counts side by side: hand-computed cases
and properties. Pure numpy, no llama.cpp."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_refract.axes import BUILTIN
from pytest_refract.axes.trajectory import CONFIDENT, NEAR_TIE, divergence_counts
from pytest_refract.report import sensitivity
from pytest_refract.scoring import calibration as C


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


# --------------------------------------------------------------------------- in the report


def _traj_section(pairs, near_ties):
    """Prompts (prefix agreement, length); near_ties per prompt: True (near-tie divergence),
    False (confident), None (diverges where the reference has no margin to read)."""
    items = [dict(t, near_tie_divergence=tie, first_divergence=t["prefix_agreement"], teacher_forced_top1_pct=95.0)
             for t, tie in zip(traj_items(pairs), near_ties)]
    return {"score": float(BUILTIN["trajectory"].statistic(BUILTIN["trajectory"].item_table(items)[1])), "items": items,
            "n_divergences": len(items), "n_near_tie_divergences": sum(bool(t) for t in near_ties),
            "teacher_forced_top1_pct": 95.0}


def _kld_section(means):
    items = [{"id": f"chunk-{i:02d}", "mean_kld": m, "n_positions": 255} for i, m in enumerate(means)]
    return {"score": 100 * math.exp(-sum(means) / len(means)), "items": items}


def test_report_gives_raw_intervals_and_no_calibrated_score():
    axes = {"trajectory": _traj_section([(10, 128), (12, 128), (8, 128), (11, 128)], [False, True, False, False]),
            "kld": _kld_section([0.003, 0.004, 0.0035, 0.003])}
    out = sensitivity.intervals(axes, {}, 0, BUILTIN)
    traj, kld = axes["trajectory"], axes["kld"]
    assert traj["ci95"][0] <= traj["score"] <= traj["ci95"][1] and kld["ci95"][0] <= kld["score"] <= kld["ci95"][1]
    lo, hi = out["composite_ci95"]
    assert lo <= 2 / (1 / traj["score"] + 1 / kld["score"]) <= hi
    assert set(out) == {"composite_ci95"}
    assert not any("calibrat" in key for section in axes.values() for key in section)
    # A custom gate has no items to resample: no composite interval.
    assert sensitivity.intervals(axes, {"mine": 90.0}, 0, BUILTIN) == {"composite_ci95": None}


def test_retired_calibrated_score_is_gone_from_the_statistics():
    assert not hasattr(C, "calibrate_axis") and not hasattr(C, "retention")


def test_each_item_is_set_beside_the_controls_same_item():
    control = {"config": "ctk=bf16,ctv=bf16",
               "axes": {"kld": _kld_section([0.004, 0.002, 0.004]),
                        "trajectory": {"items": [dict(i, teacher_forced_top1_pct=100 * (1 - 1 / 64), ref_len=64)
                                                 for i in traj_items([(64, 64)] * 2)]}}}
    axes = {"kld": _kld_section([0.012, 0.002, 0.0]),
            "trajectory": {"items": [dict(i, teacher_forced_top1_pct=100 * (1 - 3 / 64), ref_len=64)
                                     for i in traj_items([(64, 64)] * 2)]}}
    del control["axes"]["kld"]["items"][2]  # a chunk the control has no result for gets no comparison
    sensitivity.pair_items_with_control(axes, control, BUILTIN)
    chunks = axes["kld"]["items"]
    assert chunks[0]["vs_control"]["text"] == "KLD 0.012 vs 0.004 in the control (3.0\u00d7)"
    assert chunks[0]["vs_control"]["damage"] == pytest.approx(0.012)
    assert chunks[0]["vs_control"]["control_damage"] == pytest.approx(0.004)
    assert chunks[1]["vs_control"]["text"] == "KLD 0.002 vs 0.002 in the control (1.0\u00d7)"
    assert "vs_control" not in chunks[2]
    # Below the 16-bit resolution (even slightly negative) a mean KLD is shown as such, with no ratio.
    assert BUILTIN["kld"].item_damage_text((3.5e-5 * 10, 10), (-5e-9 * 10, 10)) == "KLD 3.5e-05 vs <1e-06 in the control"
    prompt = axes["trajectory"]["items"][0]["vs_control"]
    assert prompt["text"] == "3 flips vs 1 in the control (of 64 reference tokens)"
    # Without a control nothing is paired.
    bare = {"kld": _kld_section([0.012])}
    sensitivity.pair_items_with_control(bare, None, BUILTIN)
    assert "vs_control" not in bare["kld"]["items"][0]


def test_rniah_and_plad_items_beside_the_control():
    control = {"axes": {"rniah": {"cells": [{"id": "c1", "ref_hits": 3, "cand_hits": 3, "trials": 3}]},
                        "plad": {"items": [{"id": "p-a", "excess": 0.0, "skipped": False}]}}}
    axes = {"rniah": {"cells": [{"id": "c1", "ref_hits": 3, "cand_hits": 1, "trials": 3}]},
            "plad": {"items": [{"id": "p-a", "excess": 0.1, "skipped": False}]}}
    sensitivity.pair_items_with_control(axes, control, BUILTIN)
    assert axes["rniah"]["cells"][0]["vs_control"]["text"] == "2 of the reference's 3 retrievals lost vs 0 in the control"
    assert axes["plad"]["items"][0]["vs_control"]["text"] == "excess drift 0.1 vs 0 in the control"


# --------------------------------------------------------------------------- two counts, one thing


def _pairs_of_counts(line):
    """Every "A of B" in a sentence, as integer pairs, in order."""
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+) of (\d+)", line)]


def test_confident_change_sentence_counts_the_same_kind_for_both():
    # 14 candidate divergences, 4 of them confident; the control's 11 are all near ties. The
    # sentence must set 4 of 14 beside the control's confident ones (0 of 11), not its near ties.
    control = {"config": "ctk=q4_0,ctv=q4_0", "axes": {"trajectory": _traj_section([(40, 128)] * 11, [True] * 11)}}
    axes = {"trajectory": _traj_section([(30, 128)] * 14, [False] * 4 + [True] * 10)}
    lines = sensitivity.control_diagnosis(axes, control, BUILTIN)
    line = next(line for line in lines if line.startswith("Changes confident tokens"))
    mine = divergence_counts(axes["trajectory"]["items"])
    theirs = divergence_counts(control["axes"]["trajectory"]["items"])
    assert _pairs_of_counts(line) == [(mine[CONFIDENT], mine["all"]), (theirs[CONFIDENT], theirs["all"])]
    assert _pairs_of_counts(line) == [(4, 14), (0, 11)]


def test_near_tie_sentence_counts_the_same_kind_for_both():
    control = {"config": "ctk=bf16,ctv=bf16", "axes": {"trajectory": _traj_section([(40, 128)] * 5, [True] * 3 + [False] * 2)}}
    axes = {"trajectory": _traj_section([(40, 128)] * 4, [True] * 4)}
    line = next(line for line in sensitivity.control_diagnosis(axes, control, BUILTIN)
                if line.startswith("Greedy divergences are near-tie flips only"))
    assert _pairs_of_counts(line) == [(4, 4), (3, 5)]  # near ties of all, for both


def test_no_more_confident_changes_sentence_counts_the_same_kind_for_both():
    control = {"config": "c", "axes": {"trajectory": _traj_section([(40, 128)] * 6, [False] * 3 + [True] * 3)}}
    axes = {"trajectory": _traj_section([(40, 128)] * 5, [False, False, True, True, None])}
    line = next(line for line in sensitivity.control_diagnosis(axes, control, BUILTIN)
                if line.startswith("No more confident tokens changed"))
    # A divergence without a readable margin counts among all divergences, in neither kind.
    assert _pairs_of_counts(line) == [(2, 5), (3, 6)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([True, False, None]), min_size=1, max_size=12),
       st.lists(st.sampled_from([True, False, None]), min_size=0, max_size=12))
def test_every_trajectory_control_sentence_compares_like_with_like(mine, theirs):
    control = {"config": "c", "axes": {"trajectory": _traj_section([(40, 128)] * len(theirs), theirs)}}
    axes = {"trajectory": _traj_section([(40, 128)] * len(mine), mine)}
    (line,) = sensitivity.control_diagnosis(axes, control, BUILTIN)
    kind = NEAR_TIE if "near-tie flips only" in line else CONFIDENT
    a = divergence_counts(axes["trajectory"]["items"])
    b = divergence_counts(control["axes"]["trajectory"]["items"])
    expected = [(a[kind], a["all"])] + ([(b[kind], b["all"])] if b["all"] else [])
    assert _pairs_of_counts(line) == expected


def test_report_without_control_has_intervals_but_no_control_sentences():
    axes = {"kld": _kld_section([0.01, 0.02, 0.03])}
    out = sensitivity.intervals(axes, {}, 0, BUILTIN)
    assert axes["kld"]["ci95"] is not None and out["composite_ci95"] is not None
    assert sensitivity.control_diagnosis(axes, None, BUILTIN) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(0, 64), st.integers(0, 64))
def test_prompt_text_sets_flips_beside_the_controls_flips_on_the_same_tokens(ref_len, flips, control_flips):
    flips, control_flips = min(flips, ref_len), min(control_flips, ref_len)

    def prompt(n):
        return {"id": "p", "ref_len": ref_len, "teacher_forced_top1_pct": 100.0 * (1 - n / ref_len)}

    axis = BUILTIN["trajectory"]
    (_, [row]), (_, [ctrl_row]) = axis.damage_table([prompt(flips)]), axis.damage_table([prompt(control_flips)])
    text = axis.item_damage_text(row, ctrl_row)
    # Both counts are reference tokens flipped, of the same reference continuation.
    assert re.fullmatch(rf"{flips} flips? vs {control_flips} in the control \(of {ref_len} reference tokens\)", text)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 8), st.integers(0, 8))
def test_cell_text_sets_lost_retrievals_beside_the_controls_of_the_same_reference(ref_hits, cand, ctrl):
    axis = BUILTIN["rniah"]

    def cell(hits):
        return {"id": "c", "ref_hits": ref_hits, "cand_hits": hits, "trials": 8}

    (_, [row]), (_, [ctrl_row]) = axis.damage_table([cell(cand)]), axis.damage_table([cell(ctrl)])
    lost, control_lost = max(0, ref_hits - cand), max(0, ref_hits - ctrl)
    assert axis.item_damage_text(row, ctrl_row) == (f"{lost} of the reference's {ref_hits} retrievals lost vs "
                                                    f"{control_lost} in the control")


def test_near_tie_fraction_on_summary_lines_counts_near_ties_of_all_divergences():
    """The terminal's "near-tie divergences a/b" and the HTML's control detail: a near ties of b
    divergences, for the candidate and the control alike."""
    from pytest_refract.report.html.render import ENV

    axis = BUILTIN["trajectory"]
    section = dict(axis.aggregate([dict(i, wall_s=0.0, full_match=False, teacher_forced_kld=0.0)
                                   for i in _traj_section([(4, 8)] * 5, [True, True, False, None, True])["items"]]))
    counts = divergence_counts(section["items"])
    assert counts == {NEAR_TIE: 3, CONFIDENT: 1, "all": 5}
    assert f"near-tie divergences {counts[NEAR_TIE]}/{counts['all']}" in axis.section_detail(section)
    control = dict(axis.aggregate([dict(i, wall_s=0.0, full_match=False, teacher_forced_kld=0.0)
                                   for i in _traj_section([(4, 8)] * 2, [False, True])["items"]]))
    detail = ENV.get_template("axes/trajectory.html.j2").module.control_detail(control, section)
    assert "near-tie divergences 1/2 (candidate 3/5)" in str(detail)
