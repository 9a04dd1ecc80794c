"""Use case: "my support answers keep their greedy answer under the quantized cache".

A support bot's canned questions must get the same first sentence from the q8_0/q4_0 cache as
from f16. We check the shared prefix covers the first sentence of the reference answer, and put
the mean agreement into the session gate.

    pytest examples/test_support_prompts.py --refract-model=smollm2 \
        --refract-candidate=ctk=q8_0,ctv=q8_0 --refract-axes=none
"""

import pytest

SUPPORT_PROMPTS = {
    "capital": "What is the capital of France? Answer in one sentence.",
    "week": "How many days are in a week? Answer in one sentence.",
    "reset-password": "How do I reset my password? Answer in one sentence.",
}
SCORES = {}


def _first_sentence_tokens(comparison):
    """Reference tokens up to the first sentence end (estimated from the text's share)."""
    ends = [i for i, ch in enumerate(comparison.ref.text) if ch in ".!?"]
    if not ends:
        return len(comparison.ref.tokens)
    share = (ends[0] + 1) / max(len(comparison.ref.text), 1)
    return max(1, round(share * len(comparison.ref.tokens)))


@pytest.mark.parametrize("name", sorted(SUPPORT_PROMPTS))
def test_support_answer_keeps_its_first_sentence(refract, name):
    comparison = refract.greedy(SUPPORT_PROMPTS[name], n_predict=40)
    SCORES[name] = comparison.score
    needed = _first_sentence_tokens(comparison)
    assert comparison.prefix_agreement >= min(needed, 8), comparison.explain()


def test_support_prompts_join_the_gate(refract):
    if len(SCORES) < len(SUPPORT_PROMPTS):
        pytest.skip("run together with the per-prompt tests")
    refract.gate("support-prompts", sum(SCORES.values()) / len(SCORES))
