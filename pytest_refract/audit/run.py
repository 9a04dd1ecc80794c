"""What an axis sees of the audit: the ``run`` argument of every axis method.

The runner keeps its state to itself; an axis reads the options and inputs, asks for greedy
decodes and reference results, and runs its decode batches through ``batch``, which keeps each
batch's results until all of its items have run and times them. Timing and compute counting
are the runner's: an axis never writes ``wall_s`` or touches another axis's memory.

Members (the public API for axes of your own, see axes/base.py):

- ``settings``: the parsed options (settings.Settings); ``inputs``: prompts, corpus, haystack
  and the chat template (``chat_tokens(text)``, ``plain_tokens(text)``, ``prompts``, ...);
- ``detokenize(tokens)``;
- ``context(role, min_ctx=0)``: the role's one-sequence engine context, for evaluation of
  your own;
- ``greedy(role, prompts, n_predict, on_row=None, on_finish=None)``: greedy token ids per
  prompt under ``role``'s KV config, decoded together up to --refract-decode-batch sequences;
- ``greedy_tokens(role, prompt)`` / ``prefetch_greedy(role, prompts)``: the role's
  continuation of --refract-n-predict tokens, decoded once and shared between axes;
- ``reference``: the reference's results, from the reference cache when it holds them:
  ``greedy(prompts, n_predict)``, ``trajectories(prompts)``, ``chunk(tokens, evaluate)``;
- ``batch(axis, unit, decode)``, ``batch_done(axis, unit)``, ``batch_units(axis, unit)``:
  decode batches (see audit/batches.py).
"""

from __future__ import annotations

from typing import List

from ..axes.base import Unit
from .roles import Role


class Run:
    def __init__(self, runner):
        self._runner = runner
        self.reference = ReferenceResults(runner)

    @property
    def settings(self):
        return self._runner.settings

    @property
    def inputs(self):
        return self._runner.inputs

    def detokenize(self, tokens) -> str:
        return self._runner.detokenize(tokens)

    def context(self, role: str, min_ctx: int = 0):
        return self._runner.context(role, min_ctx)

    def greedy(self, role: str, prompts: List[List[int]], n_predict: int, on_row=None, on_finish=None):
        return self._runner.greedy(role, prompts, n_predict, on_row, on_finish)

    def greedy_tokens(self, role: str, prompt: List[int]) -> List[int]:
        return self._runner.greedy_tokens(role, prompt)

    def prefetch_greedy(self, role: str, prompts: List[List[int]]) -> None:
        self._runner.prefetch_greedy(role, prompts)

    def batch(self, axis: str, unit: Unit, decode):
        return self._runner.batches.batch(axis, unit, decode)

    def batch_done(self, axis: str, unit: Unit) -> bool:
        return self._runner.batches.batch_done(axis, unit)

    def batch_units(self, axis: str, unit: Unit):
        """(units, candidate roles) decoded together with ``unit``, in plan order."""
        return self._runner.batches.batch_of(axis, unit)


class ReferenceResults:
    """The reference store's results as axes ask for them, with the greedy continuations
    remembered for the other axes (a trajectory read from the cache is PLAD's anchor too)."""

    def __init__(self, runner):
        self._runner = runner

    def trajectories(self, prompts: List[List[int]]) -> list:
        value = self._runner.reference.trajectories(prompts)
        self._runner.remember_greedy(Role.REFERENCE, prompts, self._runner.settings.n_predict,
                                     [tokens for tokens, _rows, _exact in value])
        return value

    def chunk(self, tokens: List[int], evaluate, variant: tuple = ()):
        return self._runner.reference.chunk(tokens, evaluate, variant)

    def chunk_fingerprint(self, tokens: List[int]):
        """sha256 of the reference's exact logits of the chunk's scored positions, or None."""
        return self._runner.reference.chunk_fingerprint(tokens)

    def greedy(self, prompts: List[List[int]], n_predict: int) -> List[List[int]]:
        known = self._runner.remembered_greedy(Role.REFERENCE, prompts, n_predict)
        if known is not None:
            return known
        tokens = self._runner.reference.greedy(prompts, n_predict)
        self._runner.remember_greedy(Role.REFERENCE, prompts, n_predict, tokens)
        return tokens
