"""The verdict's statistics (scoring/verdict.py) on simulated paired items: seeded, numpy only.

The simulation: per prompt a hazard h (gamma distributed: some prompts are full of near-ties),
the control flips Binomial(L, h) reference tokens, the candidate Binomial(L, m x h), on the same
prompts; its true multiple is m. Chunks for a KLD-like axis: a per-chunk difficulty shared by
both sides, times independent log-normal noise per side. The harder generators, and the error
rates at the margin, are in tests/test_verdict_sim.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_refract.axes import BUILTIN
from pytest_refract.scoring import verdict as V

L = 128


def flips(n, m, rng, mean=0.02, shape=0.7):
    h = rng.gamma(shape, mean / shape, n)
    ctrl = rng.binomial(L, np.minimum(h, 1.0))
    cand = rng.binomial(L, np.minimum(m * h, 1.0))
    exposure = np.full(n, float(L))
    return np.column_stack([cand, exposure]).astype(float), np.column_stack([ctrl, exposure]).astype(float)


def chunks(n, m, rng):
    d = rng.lognormal(0.0, 0.6, n) * 0.004
    ctrl, cand = d * rng.lognormal(0.0, 0.15, n), m * d * rng.lognormal(0.0, 0.15, n)
    pos = np.full(n, 255.0)
    return np.column_stack([cand * pos, pos]), np.column_stack([ctrl * pos, pos])


AXIS = SimpleNamespace(NAME="sim", DAMAGE_LABEL="greedy flips", MARGIN=3.0, ABSOLUTE_TOLERANCE=0.05,
                       DAMAGE_RESOLUTION=0.0, CONTROL_MAX_DAMAGE=None, damage=V.ratio_of_sums)


def verdict_of(cand, ctrl, axis=AXIS):
    """The axis verdict of two paired tables (items are rows)."""
    ids = [f"i{k}" for k in range(len(cand))]

    def table(items):
        rows = np.asarray([i["row"] for i in items], dtype=float).reshape(len(items), 2)
        return [i["id"] for i in items], rows

    ns = SimpleNamespace(**{k: getattr(axis, k) for k in vars(axis)}, damage_table=table)
    return V.axis_verdict(ns, [{"id": i, "row": r} for i, r in zip(ids, cand)],
                          None if ctrl is None else [{"id": i, "row": r} for i, r in zip(ids, ctrl)])


# --------------------------------------------------------------------------- numbers


def test_t_quantile_matches_tables():
    for df, exact in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (7, 2.3646), (11, 2.2010), (31, 2.0395), (127, 1.9788)):
        assert V.t_quantile(0.975, df) == pytest.approx(exact, abs=5e-3)


def test_score_knots_and_bands():
    assert V.score_of_multiple(0.5) == 100.0
    assert V.score_of_multiple(1.0) == 100.0
    assert V.score_of_multiple(1.5) == pytest.approx(90.0)
    assert V.score_of_multiple(3.0) == pytest.approx(80.0)
    assert V.score_of_multiple(10.0) == pytest.approx(60.0)
    assert V.score_of_multiple(1000.0) == 0.0
    assert [V.multiple_band(m) for m in (1.2, 2.9, 9.0, 11.0)] == ["EXCELLENT", "PASS", "DEGRADED", "FAIL"]


@given(st.floats(0.01, 500), st.floats(0.01, 500))
def test_score_is_decreasing_in_the_multiple(a, b):
    lo, hi = sorted((a, b))
    assert V.score_of_multiple(lo) >= V.score_of_multiple(hi)


def test_decide_is_three_way():
    assert V.decide(1.2, 2.9, 3.0) == "PASS"
    assert V.decide(3.1, 9.0, 3.0) == "FAIL"
    assert V.decide(2.0, 4.0, 3.0) == "UNDECIDED"
    assert V.decide(None, None, 3.0) == "UNDECIDED"


# --------------------------------------------------------------------------- properties


tables = st.integers(3, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 60), min_size=n, max_size=n),
    st.lists(st.integers(1, 60), min_size=n, max_size=n),
    st.lists(st.integers(0, 30), min_size=n, max_size=n)))


def _as_tables(cand, ctrl, extra=None):
    exposure = np.full(len(cand), float(L))
    c = np.column_stack([np.asarray(cand, float) + (0 if extra is None else np.asarray(extra, float)), exposure])
    return c, np.column_stack([np.asarray(ctrl, float), exposure])


@settings(max_examples=60, deadline=None)
@given(tables)
def test_interval_contains_point_and_score_inside_its_interval(data):
    cand, ctrl, _ = data
    v = verdict_of(*_as_tables(cand, ctrl))
    if v.multiple_ci95 is not None and v.multiple is not None and v.basis == "multiple":
        lo, hi = v.multiple_ci95
        hi = math.inf if hi is None else hi  # open above below the PASS minimum
        assert lo <= v.multiple * (1 + 1e-6) and v.multiple <= hi * (1 + 1e-6)
        slo, shi = v.score_ci95
        assert slo <= v.score <= shi
    if v.damage_ci95 is not None and v.basis == "absolute":
        assert v.damage_ci95[0] <= v.damage <= v.damage_ci95[1]


@settings(max_examples=60, deadline=None)
@given(tables)
def test_itemwise_larger_damage_never_scores_higher(data):
    cand, ctrl, extra = data
    base = verdict_of(*_as_tables(cand, ctrl))
    worse = verdict_of(*_as_tables(cand, ctrl, extra))
    if base.score is not None and worse.score is not None and base.basis == worse.basis:
        assert worse.score <= base.score + 1e-9
    if base.multiple is not None and worse.multiple is not None:
        assert worse.multiple >= base.multiple - 1e-12


def test_zero_control_is_no_free_pass_and_no_switch():
    rng = np.random.default_rng(3)
    cand, ctrl = flips(48, 4.0, rng)
    ctrl[:, 0] = 0.0  # a control that never flips a token
    v = verdict_of(cand, ctrl)
    # The same declared test: the candidate's damage against 3 x nothing. No multiple to show,
    # never a PASS; here the candidate's flips are many, so FAIL.
    assert v.basis == "multiple" and v.multiple is None and v.verdict == "FAIL"
    assert "the control has no greedy flips" in v.reason and v.score == 0.0
    # Both at 0 on every item: nothing to compare, no decision (the score describes the
    # candidate's own damage, none).
    v0 = verdict_of(np.column_stack([np.zeros(48), np.full(48, 10.0)]), np.column_stack([np.zeros(48), np.full(48, 10.0)]))
    assert v0.verdict == "UNDECIDED" and v0.multiple is None and v0.score == 100.0


def test_control_scoring_zero_is_a_broken_yardstick():
    rng = np.random.default_rng(4)
    cand, ctrl = flips(12, 2.0, rng)
    ids = [f"i{k}" for k in range(12)]
    ns = SimpleNamespace(**vars(AXIS), damage_table=lambda items: ([i["id"] for i in items],
                                                                    np.asarray([i["row"] for i in items], float)))
    v = V.axis_verdict(ns, [{"id": i, "row": r} for i, r in zip(ids, cand)],
                       [{"id": i, "row": r} for i, r in zip(ids, ctrl)], control_score=0.0)
    assert v.basis == "broken control" and v.verdict == "UNDECIDED" and v.score is None
    assert "yardstick is broken" in v.reason


def test_control_beyond_rounding_is_a_broken_yardstick():
    kld = BUILTIN["kld"]
    ctrl = [{"id": f"c{k}", "mean_kld": 0.3, "n_positions": 255} for k in range(8)]
    cand = [{"id": f"c{k}", "mean_kld": 0.4, "n_positions": 255} for k in range(8)]
    v = V.axis_verdict(kld, cand, ctrl, control_score=74.0)
    assert v.basis == "broken control" and "above the 0.05" in v.reason
    run = V.run_verdict({"kld": v})
    assert run.verdict == "UNDECIDED" and run.control_problems


# --------------------------------------------------------------------------- seeded simulations


def _mean_score(gen, n, m, sims, seed):
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(sims):
        cand, ctrl = gen(n, m, rng)
        # The verdict's score is the fixed map of the point multiple (no interval needed).
        d_ctrl = float(V.ratio_of_sums(ctrl))
        if d_ctrl > 0:
            scores.append(V.score_of_multiple(float(V.ratio_of_sums(cand)) / d_ctrl))
    return float(np.mean(scores)), len(scores)


@pytest.mark.parametrize("gen", [flips, chunks])
def test_expected_score_does_not_rise_as_items_are_removed(gen):
    # A true multiple of 2 (score 85.8): the mean score over seeded runs at 8, 32 and 128 items.
    means = {n: _mean_score(gen, n, 2.0, 300, seed=n)[0] for n in (8, 32, 128)}
    # 300 runs put the mean within ~0.3 points; fewer items must not score higher than more.
    assert means[8] <= means[32] + 0.3
    assert means[32] <= means[128] + 0.3
    assert abs(means[128] - V.score_of_multiple(2.0)) < 1.0


@pytest.mark.parametrize("n", [8, 48, 96])
@pytest.mark.parametrize("gen", [flips, chunks])
def test_pass_is_rare_just_beyond_the_margin(gen, n):
    # True multiple 5 % beyond the 3x margin: PASS must come out at most ~5 % of the time.
    rng = np.random.default_rng(1000 + n)
    sims, passed = 100, 0
    for _ in range(sims):
        v = verdict_of(*gen(n, 3.15, rng))
        passed += v.verdict == "PASS"
    assert passed / sims <= 0.05, f"PASS in {passed} of {sims} runs at {n} items"


@pytest.mark.parametrize("n", [48, 96])
@pytest.mark.parametrize("gen", [flips, chunks])
def test_interval_coverage_is_at_least_nominal(gen, n):
    rng = np.random.default_rng(2000 + n)
    covered = total = 0
    for _ in range(80):
        v = verdict_of(*gen(n, 2.5, rng))
        if v.basis != "multiple" or v.multiple_ci95 is None or v.multiple_ci95[1] is None:
            continue
        total += 1
        covered += v.multiple_ci95[0] <= 2.5 <= v.multiple_ci95[1]
    assert total >= 75
    assert covered / total >= 0.93, f"coverage {covered / total:.3f} at {n} items"


def test_the_interval_agrees_with_the_verdict():
    rng = np.random.default_rng(12)
    for m in (1.5, 2.5, 3.0, 4.0, 8.0):
        v = verdict_of(*flips(64, m, rng))
        lo, hi = v.multiple_ci95
        assert (v.verdict == "PASS") == (hi <= 3.0) and (v.verdict == "FAIL") == (lo > 3.0)
    # Below the PASS minimum the upper end is not shown, and no PASS is given.
    v = verdict_of(*chunks(16, 1.0, rng))
    assert v.multiple_ci95[1] is None and v.verdict == "UNDECIDED" and "a PASS needs at least 46 items" in v.reason


def test_a_clear_difference_is_decided_and_a_close_one_asks_for_items():
    rng = np.random.default_rng(7)
    clear = verdict_of(*chunks(48, 1.2, rng))
    assert clear.verdict == "PASS" and clear.could_miss == pytest.approx(V.could_miss(48))
    assert verdict_of(*chunks(32, 12.0, rng)).verdict == "FAIL"
    v = verdict_of(*flips(48, 3.0, np.random.default_rng(11)))
    assert v.verdict == "UNDECIDED"
    assert v.items_needed is not None and v.items_needed > 48
    advice = V.undecided_advice(v)
    assert "items in all" in advice and "guarantee is per run" in advice and "--refract-seed" in advice


def test_a_self_reference_zero_is_exact():
    # The reference's own config decodes the same computation: 0 flips is not a sample of 0
    # events that a zero-event bound must qualify, and nothing can hide in items not measured.
    zero = np.column_stack([np.zeros(3), np.full(3, 8.0)])
    ns = SimpleNamespace(**vars(AXIS), damage_table=lambda items: ([i["id"] for i in items],
                                                                    np.asarray([i["row"] for i in items], float)))
    items = [{"id": f"i{k}", "row": r} for k, r in enumerate(zero)]
    assert V.axis_verdict(ns, items, items).verdict == "UNDECIDED"
    exact = V.axis_verdict(ns, items, items, same_computation=True)
    assert exact.verdict == "PASS" and exact.could_miss == 0.0


def test_a_zero_width_interval_still_holds_its_point():
    """Every item at the same ratio (3 flips of 1 for the candidate per item of the control's
    damage): a multiple exactly at the margin is never a FAIL."""
    v = verdict_of(*_as_tables([3] * 48, [1] * 48, [0] * 48))
    lo, hi = v.multiple_ci95
    assert lo <= v.multiple <= hi
    assert v.multiple == 3.0 and v.verdict != "FAIL"
