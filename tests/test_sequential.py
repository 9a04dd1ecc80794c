"""Sequential stopping (scoring/sequential.py): the planned looks, the spending, and, in seeded
simulations of paired items (the generators of tests/test_verdict.py), the rate of a wrong
decided verdict with stopping on, and how many items stopping saves."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_refract.scoring import sequential as S
from pytest_refract.scoring import verdict as V
from tests.test_verdict import chunks, flips


def test_looks_double_from_the_first_and_end_at_the_cap():
    assert S.planned_looks(144, 16) == (16, 32, 64, 128, 144)
    assert S.planned_looks(75, 8) == (8, 16, 32, 64, 75)
    assert S.planned_looks(64, 8) == (8, 16, 32, 64)
    assert S.planned_looks(8, 8) == (8,)
    assert S.planned_looks(5, 8) == (5,)
    assert S.planned_looks(0, 8) == ()


def test_the_error_is_split_over_the_looks_half_of_it_at_the_first():
    design = S.Design.plan(144, 16)
    # A look is added where a PASS becomes possible (the first multiple of 16 from 46 items).
    assert design.looks == (16, 32, 48, 64, 128, 144)
    assert design.fail_errors == pytest.approx((0.0125, 0.0025, 0.0025, 0.0025, 0.0025, 0.0025))
    assert design.pass_errors == pytest.approx((0.0, 0.0, 0.0125, 0.025 / 6, 0.025 / 6, 0.025 / 6))
    # Each side's errors add up to its 2.5 % (the union bound's budget), for any K.
    for n_max in (9, 16, 17, 40, 75, 144, 1000):
        d = S.Design.plan(n_max, 8)
        assert sum(d.fail_errors) == pytest.approx(0.025)
        assert sum(d.pass_errors) == pytest.approx(0.025 if n_max >= V.MIN_ITEMS_FOR_PASS else 0.0)
    assert S.Design.plan(144, 16).level_at(None) == pytest.approx(1 - 0.0125 - 0.0125)
    # One look: each side's whole 2.5 %, whether by the cap or by --refract-exhaustive.
    assert S.Design.plan(6, 16).fail_errors == pytest.approx((0.025,))
    exhaustive = S.Design.plan(144, 16, stopping=False)
    assert exhaustive.looks == (144,) and exhaustive.levels == pytest.approx((0.95,))
    assert S.Design.plan(0, 16).levels == ()
    # No look before MIN_FIRST_LOOK items, whatever the batch.
    assert S.Design.plan(64, 1).looks[0] == S.MIN_FIRST_LOOK
    # The FAIL side is split over the candidate's axes.
    assert sum(S.Design.plan(144, 16, n_axes=3).fail_errors) == pytest.approx(0.025 / 3)


def test_look_bookkeeping():
    design = S.Design.plan(75, 8)
    assert design.look_at(7) is None and design.look_at(8) == 0 and design.look_at(20) == 1 and design.look_at(75) == 5
    assert design.next_look(8) == 16 and design.next_look(70) == 75 and design.next_look(75) is None


def _decide(cand, ctrl, err_pass, err_fail):
    # The decision axis_verdict reads (its interval aside), on the flips-like axis of tests/test_verdict.py.
    return V.margin_test(cand, ctrl, 3.0, err_pass, err_fail).verdict.item()


def _run(gen, n_max, first, m, sims, seed, stopping=True):
    rng = np.random.default_rng(seed)
    design = S.Design.plan(n_max, first, stopping)
    outcomes, used = [], []
    for _ in range(sims):
        cand, ctrl = gen(n_max, m, rng)
        verdict, n = S.simulate_decision(cand, ctrl, design, _decide)
        outcomes.append(verdict)
        used.append(n)
    return outcomes, float(np.mean(used))


@pytest.mark.parametrize("gen, n_max, first", [(flips, 64, 16), (flips, 144, 16), (chunks, 75, 8)])
def test_a_decided_verdict_at_the_margin_is_wrong_at_most_5_percent(gen, n_max, first):
    # At a true multiple exactly at the 3x margin any decided verdict is wrong: PASS claims the
    # damage is within 3x, FAIL that it is beyond. With stopping at every look the rate stays
    # within the nominal 5 % (Bonferroni makes it conservative).
    outcomes, _ = _run(gen, n_max, first, 3.0, 200, seed=20 + n_max)
    wrong = sum(v != V.UNDECIDED for v in outcomes) / len(outcomes)
    assert wrong <= 0.05


@pytest.mark.parametrize("gen, n_max, first, m", [(flips, 144, 16, 1.0), (chunks, 144, 8, 1.2), (chunks, 75, 8, 12.0)])
def test_a_clear_verdict_stops_early_and_agrees_with_exhaustive(gen, n_max, first, m):
    stopped, used = _run(gen, n_max, first, m, 60, seed=7)
    full, full_used = _run(gen, n_max, first, m, 60, seed=7, stopping=False)
    assert full_used == n_max
    # A PASS waits for the 48-item look; a FAIL stops at the first.
    assert used <= (48.5 if m < 3 else 8.5)
    expected = V.PASS if m < 3 else V.FAIL
    assert stopped.count(expected) >= 57
    # Never the opposite decision of the exhaustive run of the same items.
    assert not any({a, b} == {V.PASS, V.FAIL} for a, b in zip(stopped, full))


def test_the_first_looks_larger_share_stops_a_clear_case_sooner():
    # A candidate at about 1.9x the control's flips (SmolLM2 q8_0/q4_0's measured multiple) with
    # the 144-prompt pool: half the PASS error at the first PASS look decides more runs there
    # than an equal split would, from the same 2.5 %.
    half = S.Design.plan(144, 16)
    eligible = sum(1 for e in half.pass_errors if e > 0)
    equal = S.Design(half.looks, tuple(0.025 / eligible if e > 0 else 0.0 for e in half.pass_errors),
                     half.fail_errors, True)
    seeds = np.random.default_rng(11)
    at_first = {"half": 0, "equal": 0}
    for _ in range(80):
        cand, ctrl = flips(144, 1.9, seeds)
        for name, design in (("half", half), ("equal", equal)):
            verdict, n = S.simulate_decision(cand, ctrl, design, _decide)
            at_first[name] += n == 48 and verdict == V.PASS
    assert at_first["half"] > at_first["equal"]
