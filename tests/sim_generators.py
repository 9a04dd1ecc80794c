"""Seeded generators of paired item tables (candidate, control) for simulations of the verdict,
vectorised over runs: each returns two arrays (runs, n, 2) whose rows are (damage, exposure)
per item, item i of both being the same item. ``m`` scales the candidate; ``true_multiple``
gives the population multiple E[candidate damage] / E[control damage] of a scale (by a large
fixed-seed Monte Carlo where clipping at a hazard of 1 matters), and ``scale_for`` the scale
whose true multiple is a given value. Used by tests/test_verdict_sim.py and
benchmarks/bench_verdict_sim.py."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Dict

import numpy as np

L = 128          # reference tokens per prompt (trajectory-like flips)
POSITIONS = 255  # scored positions per chunk (KLD-like)


def _flip_tables(h_ctrl, h_cand, rng, expected=False):
    if expected:  # the expected flips: what the true multiple is a ratio of
        ctrl, cand = L * np.clip(h_ctrl, 0.0, 1.0), L * np.clip(h_cand, 0.0, 1.0)
    else:
        ctrl = rng.binomial(L, np.clip(h_ctrl, 0.0, 1.0))
        cand = rng.binomial(L, np.clip(h_cand, 0.0, 1.0))
    exposure = np.full(ctrl.shape, float(L))
    return np.stack([cand, exposure], -1).astype(float), np.stack([ctrl, exposure], -1).astype(float)


def _kld_tables(ctrl, cand):
    pos = np.full(ctrl.shape, float(POSITIONS))
    return np.stack([cand * pos, pos], -1), np.stack([ctrl * pos, pos], -1)


def _ln(rng, sigma, shape):
    """Log-normal noise with mean 1."""
    return rng.lognormal(-sigma ** 2 / 2, sigma, shape)


def gamma_hazards(runs, n, m, rng, expected=False):
    """Per-prompt flip hazards Gamma(0.7), mean 2 %: the original generator."""
    h = rng.gamma(0.7, 0.02 / 0.7, (runs, n))
    return _flip_tables(h, m * h, rng, expected)


def lognormal_hazards(runs, n, m, rng, expected=False):
    """Log-normal hazards (sigma 1.3, mean 2 %), each side's hazard with its own log-normal
    noise (sigma 0.3)."""
    h = 0.02 * _ln(rng, 1.3, (runs, n))
    return _flip_tables(h * _ln(rng, 0.3, (runs, n)), m * h * _ln(rng, 0.3, (runs, n)), rng, expected)


def zero_prompts(runs, n, m, rng, expected=False):
    """60 % of prompts never flip on either side; the rest Gamma(0.7) hazards of mean 2 %."""
    h = rng.gamma(0.7, 0.02 / 0.7, (runs, n)) * (rng.random((runs, n)) >= 0.6)
    return _flip_tables(h, m * h, rng, expected)


def candidate_noise(runs, n, m, rng, expected=False):
    """Gamma(0.7) hazards; the candidate's hazard alone has log-normal noise (sigma 1.0): its
    damage is right-skewed where the control's is not."""
    h = rng.gamma(0.7, 0.02 / 0.7, (runs, n))
    return _flip_tables(h, m * h * _ln(rng, 1.0, (runs, n)), rng, expected)


def rare_prompts(runs, n, m, rng, expected=False):
    """A cache that breaks on 10 % of prompts: there the candidate's hazard is 10x."""
    h = rng.gamma(0.7, 0.02 / 0.7, (runs, n))
    hot = np.where(rng.random((runs, n)) < 0.10, 10.0, 1.0)
    return _flip_tables(h, m * h * hot, rng, expected)


def precise_control(runs, n, m, rng, expected=False):
    """A precise control: bf16 flips 0.25 % of tokens (Gamma(0.7) hazards)."""
    h = rng.gamma(0.7, 0.0025 / 0.7, (runs, n))
    return _flip_tables(h, m * h, rng, expected)


def kld_heavy(runs, n, m, rng, expected=False):
    """KLD chunks: log-normal(1.0) difficulty shared by both sides (mean 0.004 nats), the
    control's noise log-normal(0.15), the candidate's log-normal(1.0)."""
    d = 0.004 * _ln(rng, 1.0, (runs, n))
    return _kld_tables(d * _ln(rng, 0.15, (runs, n)), m * d * _ln(rng, 1.0, (runs, n)))


def kld_rare_chunks(runs, n, m, rng, expected=False):
    """KLD chunks (log-normal(0.6) difficulty, noise 0.15 per side); on 10 % of chunks the
    candidate's KLD is 20x."""
    d = 0.004 * _ln(rng, 0.6, (runs, n))
    hot = np.where(rng.random((runs, n)) < 0.10, 20.0, 1.0)
    return _kld_tables(d * _ln(rng, 0.15, (runs, n)), m * d * hot * _ln(rng, 0.15, (runs, n)))


def kld_tiny_control(runs, n, m, rng, expected=False):
    """A KLD control at 1e-6 nats per position (log-normal(0.6) difficulty, noise 0.15 per side)."""
    d = 1e-6 * _ln(rng, 0.6, (runs, n))
    return _kld_tables(d * _ln(rng, 0.15, (runs, n)), m * d * _ln(rng, 0.15, (runs, n)))


GENERATORS: Dict[str, Callable] = {
    "gamma hazards": gamma_hazards,
    "log-normal hazards": lognormal_hazards,
    "60 % zero prompts": zero_prompts,
    "candidate-only noise": candidate_noise,
    "10 % prompts at 10x": rare_prompts,
    "KLD heavy-tailed": kld_heavy,
    "KLD 10 % chunks at 20x": kld_rare_chunks,
    "precise control": precise_control,
    "KLD control 1e-6": kld_tiny_control,
}


def true_multiple(name: str, m: float, items: int = 400_000) -> float:
    """E[candidate damage] / E[control damage] at scale m: a Monte Carlo of 400,000 items (seed
    fixed) over the expected damage per item (flip hazards times tokens, without the binomial
    draw, so only the hazards' spread is sampled)."""
    cand, ctrl = GENERATORS[name](1, items, m, np.random.default_rng(12345), expected=True)
    return float(cand[..., 0].sum() / ctrl[..., 0].sum())


# Scales that are exact without a Monte Carlo: no hazard is clipped (or too rarely to matter:
# a Gamma(0.7) hazard of mean 2 % beyond 1/3 has probability below 1e-9) and every noise has
# mean 1, so the true multiple is m times the mean of the fixed factors.
EXACT_FACTOR = {"gamma hazards": 1.0, "60 % zero prompts": 1.0, "precise control": 1.0, "KLD heavy-tailed": 1.0,
                "KLD 10 % chunks at 20x": 0.9 + 0.1 * 20.0, "KLD control 1e-6": 1.0}


@lru_cache(maxsize=None)
def scale_for(name: str, multiple: float) -> float:
    """The scale m whose true multiple is ``multiple``: exact where nothing clips, else the
    secant method on the fixed-seed Monte Carlo (smooth and increasing in m under common random
    numbers), to a relative 1e-4."""
    if name in EXACT_FACTOR:
        return multiple / EXACT_FACTOR[name]
    a, b = multiple, multiple * 0.9
    fa, fb = true_multiple(name, a) - multiple, true_multiple(name, b) - multiple
    for _ in range(12):
        if abs(fb) < 1e-4 * multiple or fb == fa:
            break
        a, b, fa = b, b - fb * (b - a) / (fb - fa), fb
        fb = true_multiple(name, b) - multiple
    return b
