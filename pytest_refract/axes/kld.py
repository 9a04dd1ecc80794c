"""KLD axis: KL(reference || candidate) of next-token distributions over a text corpus, with
llama.cpp's ``llama-perplexity --kl-divergence`` conventions:

- the corpus is tokenized once (BOS added where the vocabulary adds one) and cut into chunks of
  ctx tokens; the first token of each chunk is replaced by BOS;
- positions ctx/2 .. ctx-2 are scored, each predicting the next token.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import MeasurementError
from ..inputs.data import measuring_order
from ..scoring.metrics import (
    BAND_FLOOR,
    band_for,
    kld_positions,
    kld_score,
    kld_summary,
)
from .base import Axis, Unit

NON_FINITE_KLD = "the KLD is not a finite number (NaN or Infinity in the log-probabilities); no score is claimed"
RAW_KEYS = ("kld", "p_diff", "nll_ref", "nll_cand", "same_top")


def chunk_tokens(corpus_tokens: List[int], index: int, n_ctx: int, bos: Optional[int]) -> List[int]:
    """Chunk ``index`` of ``n_ctx`` tokens, its first token replaced by BOS where the
    vocabulary adds one (``bos`` is None otherwise)."""
    tokens = list(corpus_tokens[index * n_ctx : (index + 1) * n_ctx])
    if bos is not None:
        tokens[0] = bos
    return tokens


def chunk_stats(run, tokens: List[int], role: str) -> Tuple[dict, Optional[dict]]:
    """As measured_chunk, without the identity check."""
    stats, floor_stats, _same = measured_chunk(run, tokens, role)
    return stats, floor_stats


def measured_chunk(run, tokens: List[int], role: str) -> Tuple[dict, Optional[dict], Optional[bool]]:
    """Per-position statistics of one chunk for the candidate ``role`` (and the floor, when
    asked). Candidates are compared with the reference's 16-bit log-probs, as llama-perplexity
    does with its stored base; the floor with the exact logits (see ReferenceStore.chunk)."""
    next_tokens = tokens[len(tokens) // 2 + 1 :]
    ref_logprobs, ref_exact = run.reference.chunk(tokens, lambda ctx, consume: _evaluate(ctx, tokens, consume))
    digest = hashlib.sha256()
    stats = _streamed_stats(run.context(role), tokens, ref_logprobs, next_tokens, ref_is_logprobs=True, digest=digest)
    # Bit-identical logits on every scored position: the cache config changed nothing (see
    # report "no_op"); None where the reference's fingerprint is unknown (an older cache entry).
    fingerprint = getattr(run.reference, "chunk_fingerprint", lambda t: None)(tokens)
    same = None if fingerprint is None else digest.hexdigest() == fingerprint
    floor_stats = None
    if run.settings.floor:
        floor_stats = _streamed_stats(run.context("floor"), tokens, ref_exact, next_tokens, ref_is_logprobs=False)
    return stats, floor_stats, same


def _evaluate(ctx, tokens: List[int], consume) -> None:
    """Run a chunk from a cleared cache; rows for positions n/2 .. n-2 go to ``consume`` batch
    by batch (the last position predicts nothing inside the chunk)."""
    ctx.reset()
    ctx.evaluate_each(0, tokens[:-1], 0, len(tokens) // 2, consume)


def _streamed_stats(ctx, tokens, ref_rows, next_tokens, ref_is_logprobs: bool, digest=None) -> dict:
    """KLD statistics computed straight from llama.cpp's output buffer, one batch at a time:
    no float copy of the candidate's chunk is made (it would be rows x vocabulary x 4 bytes).
    ``digest``: a hashlib object fed the exact logit rows, in order."""
    pieces: List[dict] = []

    def take(first_row, view):
        if digest is not None:
            digest.update(np.ascontiguousarray(view).data)
        rows = slice(first_row, first_row + view.shape[0])
        pieces.append(kld_positions(ref_rows[rows], view, next_tokens[rows], ref_is_logprobs=ref_is_logprobs))

    _evaluate(ctx, tokens, take)
    if sum(len(p["kld"]) for p in pieces) != len(next_tokens):
        raise MeasurementError(f"internal: {len(next_tokens)} KLD positions expected, llama.cpp returned a different count")
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def summarize(stats: dict) -> Tuple[dict, float]:
    """llama-perplexity's statistics of per-position values (one chunk, or several merged),
    and the KLD score; a KLD that is not a finite number is no measurement."""
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN is refused below, not warned about
        summary = kld_summary(**stats)
    score = kld_score(summary["mean_kld"])
    if score is None:
        raise MeasurementError(NON_FINITE_KLD)
    return summary, score


def chunk_item(unit, summary: dict, score: float) -> Dict[str, Any]:
    """The fields every per-chunk KLD item carries, whichever path computed its logits (the
    KLD axis's batches, the decode axis's one-token steps)."""
    return {
        "id": unit.id,
        "chunk": unit.payload["chunk"],
        "score": score,
        "band": band_for(score),
        "mean_kld": summary["mean_kld"],
        "mean_kld_unc": summary["mean_kld_unc"],
        "max_kld": summary["kld_percentiles"]["max"],
        "same_top_p_pct": summary["same_top_p_pct"],
        "n_positions": summary["n_positions"],
    }


def merged_section(results: List[dict]) -> Dict[str, Any]:
    """An axis section's head from its chunks' raw per-position values, merged as
    llama-perplexity merges chunks: score, band, chunk count and the summary statistics."""
    raw = {k: np.concatenate([np.asarray(r["_raw"][k]) for r in results]) for k in RAW_KEYS}
    raw["same_top"] = raw["same_top"].astype(bool)
    with np.errstate(invalid="ignore", over="ignore"):
        summary = kld_summary(**raw)
    score = kld_score(summary["mean_kld"])  # None when not finite: the axis then has no score
    section: Dict[str, Any] = {"score": score, "band": band_for(score), "n_chunks": len(results)}
    if score is None:
        section["error"] = NON_FINITE_KLD
    section.update(summary)
    return section


# Below this mean KLD (nats) a lower candidate perplexity is noise, not worth a warning.
PPL_HIDES_MIN_KLD = 0.01


class KLDAxis(Axis):
    NAME = "kld"
    ITEMS_NOUN = "chunks"
    NEEDS = ("corpus",)
    TITLE = "KLD"
    COMPARE_METRICS: Tuple[tuple, ...] = (
        ("  mean KLD", "mean_kld", "{:.6f}", False),
        ("  KLD p99", "kld_percentiles.99", "{:.5f}", False),
        ("  same top p %", "same_top_p_pct", "{:.3f}", True),
        ("  RMS dp %", "rms_dp_pct", "{:.3f}", False),
        ("  mean dp %", "mean_dp_pct", "{:.3f}", None),
        ("  PPL ref", "ppl_ref", "{:.4f}", None),
        ("  PPL cand", "ppl_cand", "{:.4f}", False),
    )
    STREAM = 2
    EXTRA_KEYS: Tuple[str, ...] = ("score", "band", "mean_kld", "same_top_p_pct")
    # Per-position values travel to the aggregator (also across xdist workers) so the axis
    # statistics are computed over all positions, exactly as llama-perplexity does; they are
    # dropped from the written report.
    PRIVATE_KEYS: Tuple[str, ...] = ("_raw",)

    def units(self, run) -> List[Unit]:
        # In a seeded order over the whole corpus, so the chunks a sequential audit stops after
        # are a sample of all its texts, not the first essays.
        # Only distinct chunks: one repeated token for token is the same evidence (inputs/distinct.py).
        units = [Unit(f"chunk-{i:02d}", payload={"chunk": i}) for i in run.inputs.chunks]
        order = measuring_order([u.id for u in units], ["chunk"] * len(units), run.settings.seed)
        return [units[i] for i in order]

    def cache_reads(self, run) -> dict:
        """The settings and inputs an item's result depends on (for the control's cache key)."""
        corpus = run.inputs.corpus
        return {"ctx": run.settings.ctx, "corpus": corpus.sha256 if corpus else None}

    def section_facts(self, run) -> dict:
        """Added to the report's section: the corpus the chunks came from."""
        corpus = run.inputs.corpus
        return {"corpus": corpus.describe()} if corpus is not None else {}

    def planned_tokens(self, run, unit) -> int:
        """Tokens this item will feed llama.cpp (progress only): the chunk under the reference,
        the candidate and the floor (the reference may come from a cache, then it is fewer)."""
        return (run.settings.ctx - 1) * (2 + bool(run.settings.floor))

    def measure(self, run, unit) -> dict:
        inputs = run.inputs
        bos = inputs.bos if inputs.add_bos else None
        tokens = chunk_tokens(inputs.corpus_tokens, unit.payload["chunk"], run.settings.ctx, bos)
        stats, floor_stats, same_logits = measured_chunk(run, tokens, unit.candidate)
        summary, score = summarize(stats)
        result = chunk_item(unit, summary, score)
        result.update({
            "p99_kld": summary["kld_percentiles"]["99"],
            "rms_dp_pct": summary["rms_dp_pct"],
            "ppl_ref": summary["ppl_ref"],
            "ppl_cand": summary["ppl_cand"],
            "logits_identical_to_reference": same_logits,
            "_raw": {k: np.asarray(stats[k]).astype(float).tolist() for k in RAW_KEYS},
        })
        if floor_stats is not None:
            result["floor"] = {"mean_kld": float(np.mean(floor_stats["kld"])), "n_positions": len(floor_stats["kld"])}
        return result

    def aggregate(self, results: List[dict]) -> dict:
        section = merged_section(results)
        section["wall_s"] = sum(r["wall_s"] for r in results)
        section["items"] = [{k: v for k, v in r.items() if k not in self.PRIVATE_KEYS} for r in results]
        # True: every chunk's logits were bit-identical to the reference's; None: unknown somewhere.
        same = [r.get("logits_identical_to_reference") for r in results]
        section["logits_identical_to_reference"] = None if (not same or None in same) else all(same)
        floors = [r["floor"] for r in results if r.get("floor")]
        if len(floors) == len(results):
            total = sum(f["mean_kld"] * f["n_positions"] for f in floors)
            positions = sum(f["n_positions"] for f in floors)
            section["floor_score"] = kld_score(total / positions) if positions else None
        else:
            section["floor_score"] = None
        return section

    def diagnose(self, section: dict, axes: dict) -> List[str]:
        out = []
        if section["score"] < BAND_FLOOR["PASS"]:
            out.append(
                f"Short-context drift: next-token distributions move (mean KLD {section['mean_kld']:.4f} nats, "
                f"same top token {section['same_top_p_pct']:.1f}% of positions)."
            )
        # Only where the drift is material: at tiny KLD, PPL moving either way is noise.
        if section["mean_kld"] >= PPL_HIDES_MIN_KLD and section["ppl_cand"] <= section["ppl_ref"]:
            out.append(
                f"Perplexity hides the damage: PPL {section['ppl_cand']:.3f} vs {section['ppl_ref']:.3f} for the reference, "
                f"yet mean KLD is {section['mean_kld']:.4f} nats."
            )
        return out

    def item_detail(self, item: dict) -> str:
        return f"mean KLD {item['mean_kld']:.4f}, max {item['max_kld']:.3f}"

    def section_detail(self, section: dict, control: bool = False) -> str:
        if section.get("score") is None:
            return ""
        if control:
            return f"  mean KLD {section['mean_kld']:.5f}, same top {section['same_top_p_pct']:.2f}%"
        return (f"  mean KLD {section['mean_kld']:.5f} ± {section['mean_kld_unc']:.5f}, same top "
                f"{section['same_top_p_pct']:.2f}%, RMS Δp {section['rms_dp_pct']:.3f}%, PPL {section['ppl_ref']:.3f} → "
                f"{section['ppl_cand']:.3f}")

    def item_table(self, items) -> Tuple[List[str], np.ndarray]:
        """Per chunk: (mean KLD x positions, positions), so the statistic weighs every position
        equally, as the axis score does."""
        rows = [(float(i["mean_kld"]) * float(i["n_positions"]), float(i["n_positions"])) for i in items]
        return [str(i["id"]) for i in items], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)

    def statistic(self, table) -> np.ndarray:
        """100 x exp(-mean KLD over all positions), of a table (n, 2) or a stack (..., n, 2)."""
        t = np.asarray(table, dtype=np.float64)
        mean = t[..., 0].sum(axis=-1) / t[..., 1].sum(axis=-1)
        return 100.0 * np.exp(-np.maximum(0.0, mean))

    # -- the verdict's damage (scoring/verdict.py; README "What the verdict means" gives the
    # numbers' reasons); the damage itself is the default ratio of the table's sums.
    DAMAGE_LABEL = "next-token KLD"
    MARGIN = 3.0
    # Without a control: about 3x a bf16 control's 0.004 nats on SmolLM2 (q8_0/q4_0's measured 0.010).
    ABSOLUTE_TOLERANCE = 0.012
    # The 16-bit storage floor of the reference log-probs is ~1e-7 nats.
    DAMAGE_RESOLUTION = 1e-6
    # A KLD of 0 on every position is bit-identical logits, not a sample that could hide damage.
    ZERO_DAMAGE_EXACT = True
    # A q4_0/q4_0 cache measures 0.047 nats on SmolLM2; a rounding-only control beyond 0.05 is broken.
    CONTROL_MAX_DAMAGE = 0.05

    def item_damage_text(self, row, control_row) -> str:
        """ "KLD 0.012 vs 0.004 in the control (3.0x)": the chunk's mean KLD and the control's. A
        mean at or below DAMAGE_RESOLUTION (the 16-bit storage of the reference log-probs can even
        make it slightly negative) is shown as below it, and gives no ratio."""
        mine = row[0] / row[1] if row[1] else 0.0
        theirs = control_row[0] / control_row[1] if control_row[1] else 0.0

        def shown(value: float) -> str:
            return f"{value:.3g}" if value > self.DAMAGE_RESOLUTION else f"<{self.DAMAGE_RESOLUTION:g}"

        measurable = theirs > self.DAMAGE_RESOLUTION and mine > self.DAMAGE_RESOLUTION
        times = f" ({mine / theirs:.1f}\u00d7)" if measurable else ""
        return f"KLD {shown(mine)} vs {shown(theirs)} in the control{times}"

    def damage_table(self, items):
        """Per chunk: (mean KLD x positions, positions): the damage is the mean KLD over all positions."""
        return self.item_table(items)
