"""The verdict's error rates and price in seeded simulations, the previous rule beside the
current one. Pure numpy on the generators of tests/sim_generators.py; no model, no llama.cpp,
seconds to minutes on a laptop (timings are not the point: the rates are).

    python benchmarks/bench_verdict_sim.py table [--runs 2000]   # P(PASS | M=3), P(FAIL | M=3)
    python benchmarks/bench_verdict_sim.py price [--runs 1000]   # mean items to decide M = 1, 2, 6, 12

"old" is the rule of earlier releases: a jackknife-t interval on log M (variance scaled by
(n + 3) / n), switching to an absolute tolerance on the candidate's own damage when the control
has damage on fewer than 2 items (or KLD at most 1e-6 nats), sequential looks at F, 2F, ... with
half of a two-sided 5 % at the first. "new" is scoring/verdict.margin_test with the current
sequential design (scoring/sequential.py). Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pytest_refract.scoring import sequential as S  # noqa: E402
from pytest_refract.scoring import verdict as V  # noqa: E402
from tests.sim_generators import GENERATORS, scale_for  # noqa: E402

SIZES = (8, 16, 32, 75, 144)
KLD_LIKE = {name for name in GENERATORS if name.startswith("KLD")}


# --------------------------------------------------------------------------- the previous rule


def _old_damage_interval(t, level, exact):
    n = t.shape[-2]
    a, b = t[..., 0], t[..., 1]
    big_a, big_b = a.sum(-1), b.sum(-1)
    point = big_a / big_b
    loo = (big_a[..., None] - a) / (big_b[..., None] - b)
    se = np.sqrt((n + 3) / n * (n - 1) / n * ((loo - loo.mean(-1, keepdims=True)) ** 2).sum(-1))
    q = V.t_quantile(0.5 + level / 2, n - 1)
    lo, hi = np.maximum(0.0, point - q * se), point + q * se
    zero_hi = 0.0 if exact else -math.log((1 - level) / 2) / np.maximum(big_b, 1.0)
    return point, np.where(point <= 0, 0.0, lo), np.where(point <= 0, zero_hi, hi)


def old_decide(cand, ctrl, level, kld):
    """The previous axis_verdict, vectorised over runs (trajectory-like or KLD-like axis)."""
    n = cand.shape[-2]
    tolerance, resolution = (0.012, 1e-6) if kld else (0.05, 0.0)
    d_c, c_lo, c_hi = _old_damage_interval(cand, level, kld)
    d_k, k_lo, k_hi = _old_damage_interval(ctrl, level, kld)
    damaged = (ctrl[..., 0] > 0).sum(-1)
    use_multiple = (d_k > resolution) & (damaged >= 2)
    a_c, b_c, a_k, b_k = cand[..., 0], cand[..., 1], ctrl[..., 0], ctrl[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        m = d_c / d_k
        loo = (np.log((a_c.sum(-1, keepdims=True) - a_c) / (b_c.sum(-1, keepdims=True) - b_c))
               - np.log((a_k.sum(-1, keepdims=True) - a_k) / (b_k.sum(-1, keepdims=True) - b_k)))
        finite = np.all(np.isfinite(loo), -1)
        loo = np.where(np.isfinite(loo), loo, 0.0)
        se = np.sqrt((n + 3) / n * (n - 1) / n * ((loo - loo.mean(-1, keepdims=True)) ** 2).sum(-1))
        t = V.t_quantile(0.5 + level / 2, n - 1)
        lo, hi = m * np.exp(-t * se), m * np.exp(t * se)
        # One item carries the candidate's damage: the ratio of the two sides' own intervals.
        lo = np.where(finite, lo, c_lo / k_hi)
        hi = np.where(finite, hi, np.where(k_lo > 0, c_hi / np.where(k_lo > 0, k_lo, 1.0), np.inf))
        # No damage on the candidate: 0 up to the zero-event bound over the control's damage.
        lo = np.where(d_c <= 0, 0.0, lo)
        hi = np.where(d_c <= 0, c_hi / d_k, hi)
    multiple = np.where(hi <= 3.0, V.PASS, np.where(lo > 3.0, V.FAIL, V.UNDECIDED))
    absolute = np.where(c_hi <= tolerance, V.PASS, np.where(c_lo > tolerance, V.FAIL, V.UNDECIDED))
    return np.where(use_multiple, multiple, absolute).astype(object)


def old_run(cand, ctrl, first, kld, stopping):
    n_max = cand.shape[1]
    if stopping:
        looks, levels = [], []
        n = max(S.MIN_FIRST_LOOK, first)
        while n < n_max:
            looks.append(n)
            n *= 2
        looks.append(n_max)
        k = len(looks)
        levels = [0.95] if k == 1 else [0.975] + [1 - 0.025 / (k - 1)] * (k - 1)
    else:
        looks, levels = [n_max], [0.95]
    runs = cand.shape[0]
    verdict = np.full(runs, V.UNDECIDED, dtype=object)
    used = np.zeros(runs, dtype=int)
    open_ = np.ones(runs, dtype=bool)
    for at, level in zip(looks, levels):
        now = old_decide(cand[:, :at], ctrl[:, :at], level, kld)
        verdict, used = np.where(open_, now, verdict), np.where(open_, at, used)
        if stopping:
            open_ &= now == V.UNDECIDED
    return verdict, used


# --------------------------------------------------------------------------- the current rule


def new_run(cand, ctrl, first, kld, stopping):
    design = S.Design.plan(cand.shape[1], first, stopping=stopping)

    def decide(c, k, err_pass, err_fail):
        return V.margin_test(c, k, 3.0, err_pass, err_fail, exact_zero=kld, counts=not kld).verdict

    return S.simulate_decisions(cand, ctrl, design, decide)


def _rates(verdict):
    return 100 * float((verdict == V.PASS).mean()), 100 * float((verdict == V.FAIL).mean())


def table(runs: int) -> None:
    print(f"P(PASS | M=3) / P(FAIL | M=3) in %, {runs} seeded runs per cell; first look 8 items")
    print(f"{'generator':<24} {'n':>4}  {'old fixed':>12} {'old seq':>12}  {'new fixed':>12} {'new seq':>12}")
    for name, gen in GENERATORS.items():
        kld = name in KLD_LIKE
        for n in SIZES:
            cand, ctrl = gen(runs, n, scale_for(name, 3.0), np.random.default_rng(n))
            cells = []
            for run in (old_run, new_run):
                for stopping in (False, True):
                    verdict, _ = run(cand, ctrl, 8, kld, stopping)
                    cells.append("%5.1f /%5.1f" % _rates(verdict))
            print(f"{name:<24} {n:>4}  {cells[0]:>12} {cells[1]:>12}  {cells[2]:>12} {cells[3]:>12}")


PRICE_CASES = (("gamma hazards", 144, 16, "trajectory-like: 144 prompts, first look 16"),
               ("KLD control 1e-6", 74, 8, "KLD-like: 74 chunks, first look 8 (any control scale)"))


def price(runs: int) -> None:
    print(f"sequential, {runs} seeded runs per cell: mean items measured, and % PASS / % FAIL")
    for name, n_max, first, what in PRICE_CASES:
        print(f"\n{what} ({name})")
        print(f"{'M':>5}  {'old items':>10} {'old PASS/FAIL':>15}  {'new items':>10} {'new PASS/FAIL':>15}")
        for multiple in (1.0, 2.0, 6.0, 12.0):
            cand, ctrl = GENERATORS[name](runs, n_max, scale_for(name, multiple), np.random.default_rng(int(multiple * 10)))
            cells = []
            for run in (old_run, new_run):
                verdict, used = run(cand, ctrl, first, name in KLD_LIKE, True)
                cells.append((float(used.mean()), "%5.1f /%5.1f" % _rates(verdict)))
            print(f"{multiple:>5g}  {cells[0][0]:>10.1f} {cells[0][1]:>15}  {cells[1][0]:>10.1f} {cells[1][1]:>15}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("table", "price"))
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    if args.what == "table":
        table(args.runs or 2000)
    else:
        price(args.runs or 1000)


if __name__ == "__main__":
    main()
