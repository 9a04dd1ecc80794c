"""Pure scoring functions: bands, thresholds, harmonic mean, trajectory and KLD statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pytest_refract.scoring.metrics import (
    band_for,
    first_divergence,
    harmonic_mean,
    kld_positions,
    kld_score,
    kld_summary,
    llama_percentile,
    parse_threshold,
    prefix_agreement,
    trajectory_axis_score,
    trajectory_item_score,
)

# --------------------------------------------------------------------------- bands


@pytest.mark.parametrize(
    "score, band",
    [
        (0.0, "FAIL"),
        (59.999, "FAIL"),
        (60.0, "DEGRADED"),
        (79.99, "DEGRADED"),
        (80.0, "PASS"),
        (89.999, "PASS"),
        (90.0, "EXCELLENT"),
        (100.0, "EXCELLENT"),
        (None, None),
    ],
)
def test_band_for_edges(score, band):
    assert band_for(score) == band


@pytest.mark.parametrize(
    "text, expected",
    [
        ("FAIL", 60.0),
        ("fail", 60.0),
        ("DEGRADED", 60.0),
        ("Degraded", 60.0),
        ("PASS", 80.0),
        (" pass ", 80.0),
        ("EXCELLENT", 90.0),
        ("excellent", 90.0),
        ("0", 0.0),
        ("72.5", 72.5),
        ("100", 100.0),
        (85, 85.0),
    ],
)
def test_parse_threshold(text, expected):
    assert parse_threshold(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("abc", "neither a band"),
        ("101", "outside 0-100"),
        ("-1", "outside 0-100"),
        ("nan", "outside 0-100"),
        ("inf", "outside 0-100"),
        ("", "neither a band"),
    ],
)
def test_parse_threshold_errors(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_threshold(text)
    assert fragment in str(info.value)
    assert repr(text) in str(info.value)


# --------------------------------------------------------------------------- harmonic mean

positive = st.floats(min_value=1e-3, max_value=100.0, allow_nan=False, allow_infinity=False)
positive_lists = st.lists(positive, min_size=1, max_size=8)


@given(positive_lists)
def test_harmonic_mean_between_min_and_max(values):
    h = harmonic_mean(values)
    assert min(values) * (1 - 1e-12) <= h <= max(values) * (1 + 1e-12)


@given(positive_lists)
def test_harmonic_mean_at_most_arithmetic_mean(values):
    assert harmonic_mean(values) <= sum(values) / len(values) * (1 + 1e-12)


@given(positive, st.integers(min_value=1, max_value=8))
def test_harmonic_mean_of_equal_values(value, n):
    assert harmonic_mean([value] * n) == pytest.approx(value, rel=1e-12)


@given(positive_lists, st.data())
def test_harmonic_mean_monotone_in_each_input(values, data):
    i = data.draw(st.integers(min_value=0, max_value=len(values) - 1))
    bigger = data.draw(st.floats(min_value=values[i], max_value=1000.0))
    raised = list(values)
    raised[i] = bigger
    assert harmonic_mean(raised) >= harmonic_mean(values)


@given(st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=0, max_size=6), st.data())
def test_harmonic_mean_zero_when_any_input_is_zero(values, data):
    pos = data.draw(st.integers(min_value=0, max_value=len(values)))
    with_zero = values[:pos] + [0.0] + values[pos:]
    assert harmonic_mean(with_zero) == 0.0


def test_harmonic_mean_hand_values():
    assert harmonic_mean([]) is None
    assert harmonic_mean([50.0]) == 50.0
    assert harmonic_mean([100.0, 50.0]) == pytest.approx(2 / (1 / 100 + 1 / 50))  # 66.67
    assert harmonic_mean((90, 60)) == pytest.approx(72.0)
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([50.0, -1.0])


# --------------------------------------------------------------------------- trajectory


@pytest.mark.parametrize(
    "a, b, agree, diverge",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 4, None),
        ([1, 2, 3, 4], [1, 2, 9, 4], 2, 2),
        ([1, 2, 3, 4], [1, 2], 2, 2),
        ([1, 2], [1, 2, 3, 4], 2, 2),
        ([5, 2], [1, 2], 0, 0),
        ([], [], 0, None),
        ([], [7], 0, 0),
    ],
)
def test_prefix_agreement_and_first_divergence(a, b, agree, diverge):
    assert prefix_agreement(a, b) == agree
    assert first_divergence(a, b) == diverge


@pytest.mark.parametrize(
    "ref, cand, score",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 100.0),
        ([1, 2, 3, 4], [1, 2], 50.0),  # stopping early must not score 100
        ([1, 2], [1, 2, 3, 4], 50.0),
        ([1, 2, 3, 4], [1, 2, 3, 9], 75.0),
        ([1, 2, 3, 4], [9, 2, 3, 4], 0.0),
        ([], [], 100.0),
        ([1], [], 0.0),
    ],
)
def test_trajectory_item_score(ref, cand, score):
    assert trajectory_item_score(ref, cand) == pytest.approx(score)


def _item(ref, cand):
    return {"prefix_agreement": prefix_agreement(ref, cand), "ref_len": len(ref), "cand_len": len(cand)}


def test_trajectory_axis_score():
    assert trajectory_axis_score([]) is None
    items = [_item([1, 2, 3, 4], [1, 2]), _item([1, 2, 3, 4], [1, 2, 3, 4])]
    # mean agreement (2 + 4) / 2 = 3 over mean longest (4 + 4) / 2 = 4
    assert trajectory_axis_score(items) == pytest.approx(75.0)
    # ratio of means, not mean of ratios: (1 + 8) / 2 over (2 + 8) / 2 = 90, not (50 + 100) / 2
    items = [_item([1, 9], [1, 2]), _item(list(range(8)), list(range(8)))]
    assert trajectory_axis_score(items) == pytest.approx(90.0)
    assert trajectory_axis_score(iter([_item([], [])])) == 100.0
    assert trajectory_axis_score([_item([1, 2, 3, 4], [1, 2])]) == pytest.approx(50.0)


# --------------------------------------------------------------------------- KLD per position


def _log_softmax_by_hand(row):
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def test_kld_positions_hand_computed():
    ref = [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    cand = [[1.0, 2.0, 0.5], [1.0, 0.0, -1.0]]
    next_tokens = [0, 2]

    exp_kld, exp_pdiff, exp_nll_ref, exp_nll_cand, exp_same = [], [], [], [], []
    for r, c, t in zip(ref, cand, next_tokens):
        lr, lc = _log_softmax_by_hand(r), _log_softmax_by_hand(c)
        exp_kld.append(sum(math.exp(a) * (a - b) for a, b in zip(lr, lc)))
        exp_pdiff.append(math.exp(lc[t]) - math.exp(lr[t]))
        exp_nll_ref.append(-lr[t])
        exp_nll_cand.append(-lc[t])
        exp_same.append(max(range(3), key=lambda i: r[i]) == max(range(3), key=lambda i: c[i]))

    # Sanity of the hand computation itself on row 1: p = (1/3, 1/3, 1/3).
    assert exp_nll_ref[1] == pytest.approx(math.log(3))
    assert exp_same == [False, True]

    out = kld_positions(np.array(ref), np.array(cand), next_tokens)
    assert set(out) == {"kld", "p_diff", "nll_ref", "nll_cand", "same_top"}
    assert out["kld"].tolist() == pytest.approx(exp_kld, rel=1e-5)
    assert out["p_diff"].tolist() == pytest.approx(exp_pdiff, rel=1e-5)
    assert out["nll_ref"].tolist() == pytest.approx(exp_nll_ref, rel=1e-6)
    assert out["nll_cand"].tolist() == pytest.approx(exp_nll_cand, rel=1e-6)
    assert out["same_top"].tolist() == exp_same
    assert all(k > 0 for k in out["kld"])


def test_kld_positions_identical_logits_give_exact_zero():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 11)).astype(np.float32) * 4
    out = kld_positions(logits, logits.copy(), [0, 1, 2, 3, 4])
    assert out["kld"].tolist() == [0.0] * 5
    assert out["p_diff"].tolist() == [0.0] * 5
    assert out["same_top"].all()
    assert np.array_equal(out["nll_ref"], out["nll_cand"])


def test_kld_log_prob_cutoff_drops_tiny_reference_tokens():
    # Token 2 has reference log-prob ~ -30.7 (< -16): its term p*(log p - log q) ~ 1.4e-12 is
    # positive without the cutoff, but must contribute nothing. Tokens 0 and 1 have the same
    # log-probs on both sides in float32, so the KLD is exactly 0.
    out = kld_positions(np.array([[0.0, 0.0, -30.0]]), np.array([[0.0, 0.0, -60.0]]), [0])
    lr = _log_softmax_by_hand([0.0, 0.0, -30.0])
    lc = _log_softmax_by_hand([0.0, 0.0, -60.0])
    assert math.exp(lr[2]) * (lr[2] - lc[2]) > 1e-12  # what the cutoff removes
    assert out["kld"][0] == 0.0


def test_kld_log_prob_above_cutoff_still_counts():
    # Reference log-prob of token 1 is ~ -14.3 (> -16): it must count.
    ref, cand = [0.0, -14.3], [0.0, -30.0]
    lr, lc = _log_softmax_by_hand(ref), _log_softmax_by_hand(cand)
    expected = sum(math.exp(a) * (a - b) for a, b in zip(lr, lc))
    assert expected > 5e-6
    out = kld_positions(np.array([ref]), np.array([cand]), [0])
    assert out["kld"][0] == pytest.approx(expected, rel=1e-3)


def test_kld_positions_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        kld_positions(np.zeros((2, 3)), np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="one next token per position"):
        kld_positions(np.zeros((2, 3)), np.zeros((2, 3)), [0])


# --------------------------------------------------------------------------- KLD summary


def _summary(kld, p_diff=None, nll_ref=None, nll_cand=None, same_top=None):
    n = len(kld)
    return kld_summary(
        np.array(kld, dtype=float),
        np.array(p_diff if p_diff is not None else [0.0] * n),
        np.array(nll_ref if nll_ref is not None else [1.0] * n),
        np.array(nll_cand if nll_cand is not None else [1.0] * n),
        np.array(same_top if same_top is not None else [True] * n),
    )


def test_kld_summary_small_array():
    kld = [0.4, 0.1, 0.3, 0.2]  # sorted: 0.1 0.2 0.3 0.4
    p_diff = [0.1, -0.2, 0.0, 0.1]
    nll_ref = [1.0, 2.0, 3.0, 2.0]
    nll_cand = [1.5, 2.5, 3.0, 1.0]
    same_top = [True, False, True, True]
    s = _summary(kld, p_diff, nll_ref, nll_cand, same_top)

    assert s["n_positions"] == 4
    assert s["mean_kld"] == pytest.approx(0.25)
    assert s["mean_kld_unc"] == 0.0  # llama-perplexity reports no uncertainty for n <= 10
    pct = s["kld_percentiles"]
    assert pct["max"] == pytest.approx(0.4)
    # linear interpolation at f * (n - 1): 0.99 * 3 = 2.97 -> 0.3 + 0.97 * 0.1
    assert pct["99"] == pytest.approx(0.397)
    assert pct["99.9"] == pytest.approx(0.3997)
    assert pct["95"] == pytest.approx(0.385)  # 2.85
    assert pct["90"] == pytest.approx(0.37)  # 2.7
    assert pct["median"] == pytest.approx(0.25)  # even n: mean of the middle two
    # rms of p_diff: sqrt((0.01 + 0.04 + 0 + 0.01) / 4)
    assert s["rms_dp_pct"] == pytest.approx(100 * math.sqrt(0.015))
    assert s["mean_dp_pct"] == pytest.approx(0.0, abs=1e-12)
    assert s["same_top_p_pct"] == pytest.approx(75.0)
    assert s["same_top_p_pct_unc"] == pytest.approx(100 * math.sqrt(0.75 * 0.25 / 3))
    assert s["ppl_ref"] == pytest.approx(math.exp(2.0))
    assert s["ppl_cand"] == pytest.approx(math.exp(2.0))


def test_kld_summary_median_odd_and_ppl():
    s = _summary([0.5, 0.1, 0.3], nll_ref=[1.0, 1.0, 1.0], nll_cand=[1.0, 2.0, 3.0])
    assert s["kld_percentiles"]["median"] == pytest.approx(0.3)
    assert s["kld_percentiles"]["max"] == pytest.approx(0.5)
    assert s["ppl_ref"] == pytest.approx(math.e)
    assert s["ppl_cand"] == pytest.approx(math.exp(2.0))


def test_kld_summary_uncertainty_with_more_than_ten_samples():
    kld = [0.01 * i for i in range(1, 12)]  # n = 11
    n = len(kld)
    mean = sum(kld) / n
    mean_sq = sum(x * x for x in kld) / n
    s = _summary(kld)
    assert s["mean_kld"] == pytest.approx(mean)
    assert s["mean_kld_unc"] == pytest.approx(math.sqrt((mean_sq - mean * mean) / (n - 1)))
    assert s["mean_kld_unc"] > 0
    # 0.9 * 10 = 9 exactly -> the 10th order statistic
    assert s["kld_percentiles"]["90"] == pytest.approx(0.10)
    assert s["kld_percentiles"]["95"] == pytest.approx(0.105)
    assert s["kld_percentiles"]["median"] == pytest.approx(0.06)


def test_kld_summary_ten_samples_has_no_uncertainty():
    assert _summary([0.01 * i for i in range(10)])["mean_kld_unc"] == 0.0


def test_kld_summary_single_position_and_empty():
    s = _summary([0.2], same_top=[False])
    assert s["kld_percentiles"] == pytest.approx(
        {"max": 0.2, "99.9": 0.2, "99": 0.2, "95": 0.2, "90": 0.2, "median": 0.2}
    )
    assert s["same_top_p_pct"] == 0.0
    assert s["same_top_p_pct_unc"] == 0.0
    with pytest.raises(ValueError, match="no scored positions"):
        _summary([])


# The KLD median was once computed by hand; it is np.median now. The hand-written version is
# kept here as the oracle, so the replacement is proven not to move a reported bit.
def _old_median(sorted_values):
    n = len(sorted_values)
    if n % 2 == 0:
        return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


def _old_percentile(sorted_values, fraction):
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def _bits(x):
    return np.float64(x).tobytes()


finite_arrays = st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=64)
REPORTED_FRACTIONS = {"99.9": 0.999, "99": 0.99, "95": 0.95, "90": 0.90}


@given(finite_arrays)
def test_np_median_equals_the_old_median_bit_for_bit(values):
    v = np.sort(np.array(values, dtype=np.float64))
    with np.errstate(over="ignore"):
        # "+ 0.0" maps only -0.0 to 0.0: np.median never returns -0.0, and a per-position KLD
        # is never -0.0 (see test_kld_positions_never_gives_negative_zero).
        assert _bits(np.median(v)) == _bits(_old_median(v) + 0.0)


@given(finite_arrays.map(lambda xs: [x + 0.0 for x in xs]))
def test_reported_kld_percentiles_unchanged_bit_for_bit(values):
    with np.errstate(over="ignore", invalid="ignore"):
        pct = _summary(values)["kld_percentiles"]
    v = np.sort(np.array(values, dtype=np.float64))
    expected = {name: _old_percentile(v, f) for name, f in REPORTED_FRACTIONS.items()}
    expected.update(max=float(v[-1]), median=_old_median(v))
    assert {k: _bits(x) for k, x in pct.items()} == {k: _bits(x) for k, x in expected.items()}


@given(st.lists(st.floats(min_value=-1e300, max_value=1e300), min_size=1, max_size=64),
       st.sampled_from(sorted(REPORTED_FRACTIONS.values())))
def test_llama_percentile_is_numpys_linear_method_up_to_rounding(values, fraction):
    v = np.sort(np.array(values, dtype=np.float64))
    ours, theirs = llama_percentile(v, fraction), float(np.percentile(v, 100 * fraction))
    scale = float(np.max(np.abs(v)))
    # Besides the last-bit arithmetic, numpy computes the fractional index q * (n - 1) with
    # its own rounding: the weight between two order statistics can differ by ~1e-13 (found
    # by hypothesis on [0] * 1000 + [1] at 0.999), which moves the value by that share of the gap.
    gap = float(v[-1] - v[0])
    assert abs(ours - theirs) <= 8 * np.finfo(np.float64).eps * scale + 1e-9 * gap


def test_llama_percentile_is_not_numpys_arithmetic():
    # Why scoring.llama_percentile was not replaced by np.percentile: numpy interpolates as
    # a + (b - a) * t, llama.cpp as (1 - t) * a + t * b, and the last bit differs.
    v = np.array([1.0, 36.0])
    assert llama_percentile(v, 0.999) == (1 - 0.999) * 1.0 + 0.999 * 36.0
    assert llama_percentile(v, 0.999) != float(np.quantile(v, 0.999))


@given(st.integers(min_value=2, max_value=6), st.data())
def test_kld_positions_never_gives_negative_zero(vocab, data):
    rows = st.lists(st.floats(min_value=-30, max_value=30, width=32), min_size=vocab, max_size=vocab)
    ref = np.array(data.draw(st.lists(rows, min_size=1, max_size=4)), dtype=np.float32)
    # candidates equal to the reference or one float32 step away: the closest a sum can get to 0
    cand = np.nextafter(ref, data.draw(st.sampled_from([np.float32(-np.inf), np.float32(np.inf), ref])))
    kld = kld_positions(ref, cand, [0] * len(ref))["kld"]
    assert not np.any((kld == 0) & np.signbit(kld))


# --------------------------------------------------------------------------- KLD score


def test_kld_score_values():
    assert kld_score(0.0) == 100.0
    assert kld_score(0.01) == pytest.approx(100 * math.exp(-0.01))
    assert kld_score(1.0) == pytest.approx(100 / math.e)
    assert kld_score(-0.001) == 100.0  # float noise below zero does not exceed 100


@given(
    st.floats(min_value=0.0, max_value=50.0),
    st.floats(min_value=0.0, max_value=50.0),
)
def test_kld_score_monotone_decreasing(a, b):
    assume(a < b)
    assert kld_score(a) >= kld_score(b)
    assert 0.0 <= kld_score(b) <= 100.0


def test_kld_score_strictly_decreasing_on_a_grid():
    grid = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0, 2.0]
    scores = [kld_score(x) for x in grid]
    assert all(a > b for a, b in zip(scores, scores[1:]))
