"""Measurements that cannot fail, whatever the cache does: a reference whose output is uniform
(every next token equally likely) gives a KLD of zero against any candidate that is uniform
too, and a trajectory of one token agrees with anything. Scored, they read "EXCELLENT, all
clear"; the gate reads them as what they are: the model cannot show cache damage."""

from __future__ import annotations

from typing import Dict, List, Optional

# A uniform reference: perplexity equal to the vocabulary size (within this fraction) AND a
# candidate that differs from it by nothing (mean KLD at most UNIFORM_MAX_KLD). Perplexity
# alone is not enough: a random-weight model's sits within a few % of the vocabulary size
# (the tiny test model: 1.6 % below on one corpus, 5 % above on another) and still shows
# damage; a flat distribution gives exactly the vocabulary size, and no KLD at all.
UNIFORM_PPL_FRACTION = 1e-3
UNIFORM_MAX_KLD = 1e-6


def vacuous_reasons(axes: Dict[str, dict], n_vocab: Optional[int]) -> List[str]:
    """Gate reasons for axes whose reference behaviour makes the comparison vacuous."""
    reasons = []
    kld = axes.get("kld") or {}
    ppl = kld.get("ppl_ref")
    mean_kld = kld.get("mean_kld")
    if (n_vocab and isinstance(ppl, (int, float)) and abs(ppl / n_vocab - 1) <= UNIFORM_PPL_FRACTION
            and isinstance(mean_kld, (int, float)) and mean_kld <= UNIFORM_MAX_KLD):
        reasons.append(f"the model cannot show cache damage: its reference output is uniform (perplexity {ppl:.1f} "
                       f"over a {n_vocab}-token vocabulary), so any cache scores as perfect on kld; audit a trained model")
    trajectory = axes.get("trajectory") or {}
    longest = trajectory.get("mean_max_len")
    if isinstance(longest, (int, float)) and trajectory.get("score") is not None and longest <= 1:
        reasons.append("the model cannot show cache damage on trajectory: every continuation, the reference's and "
                       "the candidate's, is at most 1 token long; raise --refract-n-predict or audit a trained model")
    return reasons
