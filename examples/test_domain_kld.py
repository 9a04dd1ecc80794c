"""Use case: "KLD on my domain corpus stays under 0.02 nats".

Your own text (here a short maintenance manual we wrote for this example) scored with the same
conventions as the audit's KLD axis and llama-perplexity --kl-divergence.

    pytest examples/test_domain_kld.py --refract-model=smollm2 \
        --refract-candidate=ctk=q8_0,ctv=q8_0 --refract-axes=none
"""

from pathlib import Path

DOMAIN_TEXT = Path(__file__).with_name("domain_manual.txt")
MAX_MEAN_KLD = 0.02  # nats


def test_domain_corpus_kld_stays_small(refract):
    result = refract.kld(DOMAIN_TEXT.read_text(encoding="utf-8"), ctx=256, chunks=4)
    assert result.n_positions == result.n_chunks * (256 - 1 - 128)
    assert result.mean_kld < MAX_MEAN_KLD, (
        f"mean KLD {result.mean_kld:.4f} nats on the domain text (same top token {result.same_top_p_pct:.1f}%)"
    )
    refract.gate("domain-kld", result.score)
