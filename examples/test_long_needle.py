"""Use case: "my needle at 3000 tokens is still found".

A fact buried 3000 tokens deep in a long document must be retrieved by the candidate wherever
the reference retrieves it.

    pytest examples/test_long_needle.py --refract-model=smollm2 \
        --refract-candidate=ctk=q8_0,ctv=q8_0 --refract-axes=none
"""


def test_needle_at_3000_tokens_is_still_found(refract):
    cell = refract.needle(length=3000, position=0.5, trials=2,
                          needle="The access code for the archive room is {value}.",
                          question="What is the access code for the archive room?")
    assert cell.ref_hits > 0, "the reference itself does not retrieve this needle: pick another"
    assert cell.cand_hits >= cell.ref_hits, cell.answers
