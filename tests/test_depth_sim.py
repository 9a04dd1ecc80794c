"""The depth axis's verdict across depth buckets and sequential looks (scoring/depth.py): at a
true multiple on the margin, a wrong PASS and a wrong FAIL each stay within 5 %, with chunks
whose buckets share their difficulty (positions of one chunk are not independent), at the
chunk counts the bundled corpus gives (9) and beyond. Seeded, vectorised over runs (seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from test_verdict_sim import binomial_quantile

from pytest_refract.scoring import depth as D
from pytest_refract.scoring import sequential as S
from pytest_refract.scoring import verdict as V

RUNS = 400
# Positions per bucket at depth 4096, stride 16: 256-512, 512-1024, 1024-2048, 2048-4096.
POSITIONS = np.array([16, 32, 64, 127], dtype=float)


def _ln(rng, sigma, shape):
    return rng.lognormal(-sigma ** 2 / 2, sigma, shape)


def tables(runs, n, multiples, rng):
    """(candidate, control), each (runs, n, buckets, 2): per chunk a log-normal(0.6) difficulty
    shared by every bucket and both sides, per bucket of a chunk a shared log-normal(0.3), and
    per side log-normal(0.15) noise; the candidate's KLD is ``multiples[b]`` x the control's."""
    b = len(multiples)
    chunk = 0.004 * _ln(rng, 0.6, (runs, n, 1))
    bucket = chunk * _ln(rng, 0.3, (runs, n, b))
    ctrl = bucket * _ln(rng, 0.15, (runs, n, b))
    cand = np.asarray(multiples)[None, None, :] * bucket * _ln(rng, 0.15, (runs, n, b))
    pos = np.broadcast_to(POSITIONS[:b], (runs, n, b))
    return np.stack([cand * pos, pos], -1), np.stack([ctrl * pos, pos], -1)


def decide(split_fail=True):
    def at(cand, ctrl, err_pass, err_fail):
        n_b = cand.shape[2]
        e_pass, e_fail = D.bucket_errors(err_pass, err_fail, n_b) if split_fail else (err_pass, err_fail)
        per = [V.margin_test(cand[:, :, k], ctrl[:, :, k], 3.0, e_pass, e_fail, exact_zero=True).verdict
               for k in range(n_b)]
        return D.combine(per)
    return at


def outcomes(n, multiples, sequential, seed, split_fail=True):
    rng = np.random.default_rng(seed)
    cand, ctrl = tables(RUNS, n, multiples, rng)
    design = S.Design.plan(n, 8, stopping=sequential)
    verdicts, _used = S.simulate_decisions(cand, ctrl, design, decide(split_fail))
    return verdicts


@pytest.mark.parametrize("sequential", [False, True], ids=["fixed", "sequential"])
@pytest.mark.parametrize("n", [9, 16, 48, 96])
def test_every_bucket_on_the_margin_decides_within_five_percent(n, sequential):
    """All buckets at exactly 3x: any PASS and any FAIL is wrong."""
    limit = binomial_quantile(RUNS, 0.05)
    verdicts = outcomes(n, [3.0, 3.0, 3.0, 3.0], sequential, seed=n)
    assert int((verdicts == V.PASS).sum()) <= limit
    assert int((verdicts == V.FAIL).sum()) <= limit


@pytest.mark.parametrize("sequential", [False, True], ids=["fixed", "sequential"])
@pytest.mark.parametrize("n", [48, 96, 192])
def test_one_deep_bucket_on_the_margin_is_not_passed(n, sequential):
    """The shallow buckets are harmless (1x), the deepest at 3x: a PASS is wrong, and the
    intersection-union test keeps it within 5 % without any correction."""
    limit = binomial_quantile(RUNS, 0.05)
    verdicts = outcomes(n, [1.0, 1.0, 1.0, 3.0], sequential, seed=100 + n)
    assert int((verdicts == V.PASS).sum()) <= limit


def test_harmless_depth_passes_with_enough_chunks_and_not_with_nine():
    """The rule can PASS: every bucket at 1x over 96 chunks PASSes mostly; at 9 chunks (the
    bundled corpus at depth 4096) no PASS is possible (MIN_ITEMS_FOR_PASS)."""
    assert (outcomes(96, [1.0] * 4, True, seed=7) == V.PASS).mean() > 0.5
    assert not (outcomes(9, [1.0] * 4, True, seed=8) == V.PASS).any()


def test_damage_at_depth_fails_at_nine_chunks():
    """A cache whose damage grows with depth (1x shallow, 12x deep) FAILs on 9 chunks."""
    assert (outcomes(9, [1.0, 2.0, 5.0, 12.0], True, seed=9) == V.FAIL).mean() > 0.9


def test_the_fail_split_matters_when_every_bucket_sits_on_the_margin():
    """Without the Bonferroni split, four buckets at the margin each spend a whole FAIL error,
    and a wrong FAIL comes more often than with it (the split is what holds the 5 %)."""
    split = (outcomes(16, [3.0] * 4, False, seed=11) == V.FAIL).sum()
    whole = (outcomes(16, [3.0] * 4, False, seed=11, split_fail=False) == V.FAIL).sum()
    assert whole > split
