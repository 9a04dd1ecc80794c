"""Decode axis: teacher-forced KLD measured one token per ``llama_decode`` call (one sequence,
batch of one), the kernel path text generation takes and a batched evaluation never does.

Why an axis of its own: llama-perplexity's ``--kl-divergence`` (and the KLD axis) evaluates a
chunk in batches of hundreds of tokens, so a bug in the one-token decode kernels (a fork's
fused attention for a quantized V, say) leaves its numbers untouched while every generated
token after the first is wrong.

Per item (a KLD chunk of ``ctx`` tokens, its first token replaced by BOS as the KLD axis does):

- the reference rows are the KLD axis's own batched reference of that chunk (the same cache
  entry), so the decode path is compared with the batched path position by position;
- the candidate evaluates the chunk's first ``ctx/2 + W`` tokens in batches (prompt
  processing), giving the *batched* rows of positions ``ctx/2 .. ctx/2+W-1``;
- the cache is cut back to the first ``ctx/2`` positions and positions ``ctx/2 ..
  ctx/2+W-1`` are fed again one token per ``llama_decode``, each step's row being the
  *decode* row of that position.

The axis's damage is the decode rows' mean KLD (as the KLD axis's), its verdict the multiple of
the sensitivity control's, measured the same way. Beside it the section holds the batched
rows' mean KLD on the very same positions: where the two intervals do not overlap, the decode
path computes something the batched path does not (``decode_batched_disagree``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..errors import MeasurementError
from ..inputs.data import measuring_order
from ..scoring.metrics import kld_positions, mean_and_uncertainty
from ..scoring.verdict import LEVEL, damage_interval, ratio_of_sums
from .base import Unit
from .kld import NON_FINITE_KLD, RAW_KEYS, KLDAxis, chunk_item, chunk_tokens, merged_section, summarize
from .kld import _evaluate as evaluate_chunk


def window_of(n_tokens: int, wanted: int) -> int:
    """Positions measured per chunk: ``wanted``, capped at the chunk's scored half (positions
    n/2 .. n-2 predict a token inside the chunk)."""
    return max(0, min(int(wanted), n_tokens - 1 - n_tokens // 2))


def decode_and_batched(ctx, tokens: List[int], window: int, ref_rows, next_tokens) -> Tuple[dict, dict]:
    """(decode statistics, batched statistics) of positions n/2 .. n/2+window-1 of ``tokens``
    in ``ctx`` against ``ref_rows`` (16-bit reference log-probs of those positions)."""
    half = len(tokens) // 2
    batched: List[dict] = []

    def take_batched(first_row, view):
        rows = slice(first_row, first_row + view.shape[0])
        batched.append(kld_positions(ref_rows[rows], view, next_tokens[rows], ref_is_logprobs=True))

    ctx.reset()
    # Prompt processing of the prefix and the window together, cut at n_batch as everywhere.
    ctx.evaluate_each(0, tokens[: half + window], 0, half, take_batched)
    # Back to the prefix (its cells kept), then the window again, one token per llama_decode.
    ctx.truncate(0, half)
    decoded: List[dict] = []
    for j in range(window):
        def take_decoded(first_row, view, j=j):
            if view.shape[0] != 1:
                raise MeasurementError(f"internal: a one-token decode returned {view.shape[0]} rows")
            decoded.append(kld_positions(ref_rows[j : j + 1], view, next_tokens[j : j + 1], ref_is_logprobs=True))

        ctx.evaluate_each(0, tokens[half + j : half + j + 1], half + j, 0, take_decoded)
    for name, parts in (("batched", batched), ("decode", decoded)):
        if sum(len(p["kld"]) for p in parts) != window:
            raise MeasurementError(f"internal: {window} {name} positions expected, llama.cpp returned a different count")
    return _joined(decoded), _joined(batched)


def _joined(parts: List[dict]) -> dict:
    """Per-position arrays of consecutive pieces, concatenated key by key."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def intervals_disagree(a: Optional[List[float]], b: Optional[List[float]]) -> Optional[bool]:
    """Whether two intervals are disjoint; None when either is missing."""
    if not a or not b or None in a or None in b:
        return None
    return bool(a[0] > b[1] or b[0] > a[1])


def _interval(table: np.ndarray) -> Optional[List[float]]:
    est = damage_interval(table, ratio_of_sums, LEVEL, zero_is_exact=True)
    if est.lo is None or est.hi is None:
        return None
    return [est.lo, est.hi]


class DecodeAxis(KLDAxis):
    NAME = "decode"
    TITLE = "decode"
    ITEMS_NOUN = "chunks"
    NEEDS = ("corpus",)
    STREAM = 5
    EXTRA_KEYS = ("score", "band", "mean_kld", "batched_mean_kld")
    PRIVATE_KEYS = ("_raw", "_raw_batched")
    COMPARE_METRICS = (
        ("  decode mean KLD", "mean_kld", "{:.6f}", False),
        ("  batched mean KLD", "batched.mean_kld", "{:.6f}", False),
        ("  same top p %", "same_top_p_pct", "{:.3f}", True),
    )
    DAMAGE_LABEL = "one-token-decode KLD"

    def units(self, run) -> List[Unit]:
        # The KLD axis's chunks in the KLD axis's seeded order, the first --refract-decode-chunks
        # of them: their reference rows are the KLD axis's (one cache entry serves both).
        n = min(run.inputs.n_chunks, run.settings.decode_chunks)
        chunks = run.inputs.chunks
        ids = [f"chunk-{i:02d}" for i in chunks]
        order = measuring_order(ids, ["chunk"] * len(ids), run.settings.seed)
        return [Unit(ids[i], payload={"chunk": chunks[i]}) for i in order[:n]]

    def cache_reads(self, run) -> dict:
        corpus = run.inputs.corpus
        return {"ctx": run.settings.ctx, "corpus": corpus.sha256 if corpus else None,
                "window": run.settings.decode_window}

    def section_facts(self, run) -> dict:
        corpus = run.inputs.corpus
        facts = {"window": window_of(run.settings.ctx, run.settings.decode_window),
                 "first_position": run.settings.ctx // 2}
        if corpus is not None:
            facts["corpus"] = corpus.describe()
        return facts

    def planned_tokens(self, run, unit) -> int:
        """The candidate's prefix and window in batches, the window again one token at a time,
        and the reference's chunk (fewer when cached)."""
        ctx = run.settings.ctx
        window = window_of(ctx, run.settings.decode_window)
        return ctx // 2 + 2 * window + ctx - 1

    def measure(self, run, unit) -> dict:
        inputs = run.inputs
        bos = inputs.bos if inputs.add_bos else None
        tokens = chunk_tokens(inputs.corpus_tokens, unit.payload["chunk"], run.settings.ctx, bos)
        window = window_of(len(tokens), run.settings.decode_window)
        if window < 1:
            raise MeasurementError(f"a chunk of {len(tokens)} tokens has no position to decode; raise --refract-ctx")
        half = len(tokens) // 2
        next_tokens = tokens[half + 1 : half + 1 + window]
        # The KLD axis's reference of this chunk, evaluated exactly as that axis does.
        ref_logprobs, _exact = run.reference.chunk(tokens, lambda ctx, consume: evaluate_chunk(ctx, tokens, consume))
        decoded, batched = decode_and_batched(run.context(unit.candidate), tokens, window, ref_logprobs[0:window],
                                              next_tokens)
        summary, score = summarize(decoded)
        batched_mean = float(np.mean(batched["kld"]))
        if not np.isfinite(batched_mean):
            raise MeasurementError(NON_FINITE_KLD)
        return {
            **chunk_item(unit, summary, score),
            "batched_mean_kld": batched_mean,
            "batched_same_top_p_pct": 100.0 * float(np.mean(batched["same_top"])),
            "_raw": {k: np.asarray(decoded[k]).astype(float).tolist() for k in RAW_KEYS},
            "_raw_batched": {k: np.asarray(batched[k]).astype(float).tolist() for k in ("kld", "same_top")},
        }

    def aggregate(self, results: List[dict]) -> dict:
        section = merged_section(results)
        batched_kld = np.concatenate([np.asarray(r["_raw_batched"]["kld"], dtype=np.float64) for r in results])
        batched_top = np.concatenate([np.asarray(r["_raw_batched"]["same_top"], dtype=bool) for r in results])
        items = [{k: v for k, v in r.items() if k not in self.PRIVATE_KEYS} for r in results]
        decode_ci = _interval(self.damage_table(items)[1])
        batched_ci = _interval(self._batched_table(items))
        batched_mean, batched_unc = mean_and_uncertainty(batched_kld)
        section["batched"] = {
            "mean_kld": batched_mean,
            "mean_kld_unc": batched_unc,
            "same_top_p_pct": 100.0 * float(np.count_nonzero(batched_top)) / max(1, batched_top.size),
            "n_positions": int(batched_kld.size),
        }
        # Intervals over chunks (jackknife-t, as the verdict's): positions of one chunk share
        # their context and are not independent draws.
        section["decode_vs_batched"] = {"level": LEVEL, "decode_ci": decode_ci, "batched_ci": batched_ci,
                                        "ratio": (section["mean_kld"] / batched_mean) if batched_mean > 0 else None}
        section["decode_batched_disagree"] = intervals_disagree(decode_ci, batched_ci)
        # The floor checks a second reference context bit for bit; this axis compares two paths.
        section["floor_applies"] = False
        section["wall_s"] = sum(r.get("wall_s", 0.0) for r in results)
        section["items"] = items
        return section

    @staticmethod
    def _batched_table(items) -> np.ndarray:
        rows = [(float(i["batched_mean_kld"]) * float(i["n_positions"]), float(i["n_positions"])) for i in items]
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)

    def diagnose(self, section: dict, axes: dict) -> List[str]:
        if not section.get("decode_batched_disagree"):
            return []
        d = section.get("decode_vs_batched") or {}
        b = section.get("batched") or {}
        return [disagreement_sentence(section.get("mean_kld"), d.get("decode_ci"), b.get("mean_kld"),
                                      d.get("batched_ci"))]

    def control_diagnosis(self, section: dict, control_section: dict) -> List[str]:
        if control_section.get("decode_batched_disagree"):
            return ["The control's one-token decode and batched KLD disagree too: the decode path of this build "
                    "differs from its batched path for a rounding-only cache change."]
        return []

    def item_detail(self, item: dict) -> str:
        return f"decode mean KLD {item['mean_kld']:.4f}, batched {item['batched_mean_kld']:.4f}"

    def section_detail(self, section: dict, control: bool = False) -> str:
        if section.get("score") is None:
            return ""
        batched = (section.get("batched") or {}).get("mean_kld")
        text = f"  decode mean KLD {section['mean_kld']:.5f}"
        if not control:
            text += f" ± {section['mean_kld_unc']:.5f}"
        if batched is not None:
            text += f", batched {batched:.5f} on the same positions"
        if section.get("decode_batched_disagree"):
            text += "  DECODE ≠ BATCHED"
        return text


def disagreement_sentence(decode_mean, decode_ci, batched_mean, batched_ci) -> str:
    def shown(mean, ci):
        return f"{mean:.5f} [{ci[0]:.5f}, {ci[1]:.5f}]"

    return (f"Decode and batched KLD disagree: one token per llama_decode gives mean KLD "
            f"{shown(decode_mean, decode_ci)}, the same positions evaluated in a batch {shown(batched_mean, batched_ci)} "
            f"(95 % intervals over chunks, disjoint): the one-token decode kernels compute something the batched "
            f"path does not, the signature of a decode-kernel bug in this build.")
