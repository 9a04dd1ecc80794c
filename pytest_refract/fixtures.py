"""Fixtures for users' own regression tests, on the same engine, model and configs as the audit.

    def test_support_answers_survive(refract):
        result = refract.greedy("How do I reset my password?", n_predict=48)
        assert result.full_match, result.explain()

Every measurement made through the fixture is recorded in the report under ``custom`` with the
test's node id; ``refract.gate(name, score)`` adds a score of your own to the composite gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
import pytest

from .errors import UsageProblem
from .scoring.metrics import band_for

# Where a test's own measurements wait for the session: on the test item's stash, one list per item.
CUSTOM_RESULTS = pytest.StashKey[list]()


@dataclass
class Continuation:
    tokens: List[int]
    text: str


@dataclass
class GreedyComparison:
    prompt: str
    ref: Continuation
    cand: Continuation
    prefix_agreement: int
    first_divergence: Optional[int]
    score: float

    @property
    def full_match(self) -> bool:
        return self.ref.tokens == self.cand.tokens

    def explain(self) -> str:
        if self.full_match:
            return "identical greedy continuations"
        return (f"diverges at token {self.first_divergence}: reference {self.ref.text!r} vs candidate "
                f"{self.cand.text!r}")


@dataclass
class KLDResult:
    mean_kld: float
    mean_kld_unc: float
    same_top_p_pct: float
    rms_dp_pct: float
    ppl_ref: float
    ppl_cand: float
    n_chunks: int
    n_positions: int
    score: float
    percentiles: dict = field(default_factory=dict)


@dataclass
class NeedleResult:
    length: int
    position: float
    trials: int
    ref_hits: int
    cand_hits: int
    answers: list

    @property
    def degradation(self) -> float:
        return max(0.0, (self.ref_hits - self.cand_hits) / self.trials)


class RefractFixture:
    """Measurements of the candidate against the reference, for one test."""

    def __init__(self, runner, node, role: str = "cand0"):
        # The runner itself (this is a top-level API over the same engine and contexts); the
        # axes' own functions get its facade, runner.run, as in the audit.
        self.runner = runner
        self._node = node
        self.role = role
        self.reference = runner.settings.reference.label()
        self.candidate = runner.labels[role]

    def _record(self, kind: str, metrics: dict, gate: Optional[str] = None) -> None:
        entries = self._node.stash.setdefault(CUSTOM_RESULTS, [])
        entries.append({"test": self._node.nodeid, "candidate": self.candidate, "kind": kind, "gate": gate,
                        "metrics": metrics})

    # -- measurements -------------------------------------------------------------------

    def greedy(self, prompt: str, n_predict: Optional[int] = None, chat: bool = True) -> GreedyComparison:
        """Greedy continuation of ``prompt`` (chat-rendered by default) under both caches."""
        run = self.runner
        n = n_predict or run.settings.n_predict
        tokens = run.inputs.chat_tokens(prompt) if chat else run.engine.tokenize(prompt, add_special=True)
        need = len(tokens) + n
        # Live on both sides, one prompt in each role's own context.
        ref = run.context("reference", min_ctx=need).greedy([tokens], n)[0]
        cand = run.context(self.role, min_ctx=need).greedy([tokens], n)[0]
        from .axes.trajectory import compare_tokens

        detok = run.detokenize
        agreement = compare_tokens(ref, cand)
        score = agreement["score"]
        result = GreedyComparison(prompt, Continuation(ref, detok(ref)), Continuation(cand, detok(cand)),
                                  agreement["prefix_agreement"], agreement["first_divergence"], score)
        self._record("greedy", {"prompt": prompt, "prefix_agreement": result.prefix_agreement,
                                "first_divergence": result.first_divergence, "score": score,
                                "ref_text": result.ref.text, "cand_text": result.cand.text})
        return result

    def kld(self, text: str, ctx: Optional[int] = None, chunks: Optional[int] = None) -> KLDResult:
        """KL(ref || cand) over your own text, with the KLD axis's (llama-perplexity's) conventions."""
        from .axes.kld import chunk_stats, chunk_tokens, summarize

        run = self.runner
        n_ctx = ctx or run.settings.ctx
        eng = run.engine
        all_tokens = eng.tokenize(text, add_special=True)
        available = len(all_tokens) // n_ctx
        if available < 1:
            raise UsageProblem(f"refract.kld: the text holds {len(all_tokens)} tokens, fewer than one chunk of {n_ctx}")
        n_chunks = min(chunks or available, available)
        # Room for this chunk size in every context the measurement uses.
        for role in ("reference", self.role) + (("floor",) if run.settings.floor else ()):
            run.context(role, min_ctx=n_ctx)
        bos = eng.bos if eng.add_bos else None
        parts = [chunk_stats(run.run, chunk_tokens(all_tokens, i, n_ctx, bos), self.role)[0] for i in range(n_chunks)]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        summary, score = summarize(merged)  # the KLD axis's statistics, and its refusal of a NaN
        result = KLDResult(summary["mean_kld"], summary["mean_kld_unc"], summary["same_top_p_pct"],
                           summary["rms_dp_pct"], summary["ppl_ref"], summary["ppl_cand"], n_chunks,
                           summary["n_positions"], score, summary["kld_percentiles"])
        self._record("kld", asdict(result))
        return result

    def needle(self, length: int, position: float = 0.5, trials: int = 3, needle: Optional[str] = None,
               question: Optional[str] = None, answer: Optional[str] = None, haystack: Optional[str] = None) -> NeedleResult:
        """One R-NIAH cell with your own needle, question, answer pattern and haystack text."""
        from .axes.rniah import run_trials
        from .inputs.haystack import Haystack, strip_reasoning

        run = self.runner
        s = run.settings
        needle = needle or s.rniah_needle
        question = question or s.rniah_question
        answer = answer or s.rniah_answer
        if "{value}" not in needle or "{value}" not in answer:
            raise UsageProblem("refract.needle: needle and answer must contain {value}")
        eng = run.engine
        inputs = run.inputs
        text = haystack or (inputs.haystack_source.text if inputs.haystack_source else
                            (inputs.corpus.text if inputs.corpus else None))
        if text is None:
            from .inputs.data import load_corpus

            text = load_corpus().text
        hay = Haystack.from_text(text, lambda t: eng.tokenize(t, add_special=False))
        head, tail = inputs.chat_parts()
        q_tokens = eng.tokenize("\n\n" + question, add_special=False)
        budget = inputs.rniah_answer_tokens
        need = len(head) + length + len(q_tokens) + len(tail) + budget
        limit = run.info.n_ctx_train
        if limit and need > limit:
            raise UsageProblem(f"refract.needle: {length} tokens need {need} with template, question and answer; "
                               f"the model's context is {limit}")
        def ask(role, tokens):
            # Live on both sides (your needle is not in the reference cache's keys), in a
            # context big enough for this haystack.
            out = run.context(role, min_ctx=need).greedy([tokens], budget)[0]
            text = eng.detokenize(out)
            return {"text": text, "answer": strip_reasoning(text)}

        hits, answers, _ = run_trials(
            run.run, {"reference": "reference", "candidate": self.role}, length=length, position=position,
            trials=trials, needle=needle, answer=answer, haystack=hay,
            prompt_of=lambda body: list(head) + body + q_tokens + list(tail), ask=ask)
        result = NeedleResult(length, position, trials, hits["reference"], hits["candidate"], answers)
        self._record("needle", {"length": length, "position": position, "trials": trials,
                                "ref_hits": result.ref_hits, "cand_hits": result.cand_hits,
                                "degradation": result.degradation})
        return result

    # -- gate -----------------------------------------------------------------------------

    def gate(self, name: str, score: float) -> None:
        """Add ``score`` (0-100) to the composite under ``name``: your measurement then counts in
        the session gate like an axis does."""
        value = float(score)
        if not (0.0 <= value <= 100.0):
            raise ValueError(f"refract.gate({name!r}): score {score} is outside 0-100")
        self._record("gate", {"score": value, "band": band_for(value)}, gate=str(name))
