"""Build drift: with a reference pack, the current build's own reference config is measured as
one more candidate (the ``drift`` role) against the pack's reference, which another build may
have made. Its damage says how far this build's f16 is from the pack's, as a multiple of what
a rounding-only change does (the pack's control).

The drift role's rows are compared in the form the reference stores them: every logit row its
context hands out is first quantized to the 16-bit log-probs a reference entry holds and read
back. So the same build, with the same settings, gives the very bits the pack holds and a
damage of exactly 0; a candidate's live logits would differ from them by the storage floor."""

from __future__ import annotations

import numpy as np

from ..reference.codec import dequantize_logprobs, quantize_logprobs
from ..scoring.metrics import StoredLogprobs


def stored_form(rows: np.ndarray) -> StoredLogprobs:
    """``rows`` of logits as a reference entry would give them back (float32 log-probs)."""
    return dequantize_logprobs(quantize_logprobs(np.asarray(rows, dtype=np.float32))).view(StoredLogprobs)


class StoredFormContext:
    """A context whose logit rows reach their consumers in the reference's stored form; all
    else (token ids, counters, cache operations) is the wrapped context's."""

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def evaluate_each(self, seq, tokens, start_pos, logits_from, consume):
        return self._ctx.evaluate_each(seq, tokens, start_pos, logits_from,
                                       lambda first, view: consume(first, stored_form(view)))

    def greedy(self, prompts, n_predict, on_row=None, on_finish=None):
        # The tokens stay the engine's own greedy choice; only the rows a caller sees change.
        wrapped = None if on_row is None else (lambda i, step, row: on_row(i, step, stored_form(row[None, :])[0]))
        return self._ctx.greedy(prompts, n_predict, wrapped, on_finish)
