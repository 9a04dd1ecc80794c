"""Depth axis: the KLD axis's measurement over long chunks, scored by how deep in the context a
position is. A PASS of the KLD axis (chunks of 512 tokens) is evidence for short contexts only;
quantized caches are shipped to fit long ones, where every attention step reads thousands of
quantized keys and values.

Per item (one chunk of ``--refract-depth`` = N tokens, cut and ordered exactly as the KLD axis
cuts them at ``--refract-ctx=N``, its first token replaced by BOS):

- positions 256 .. N-2 at ``--refract-depth-stride`` are scored (inputs/depth.py lays them
  out); llama.cpp computes logits at those positions only (Context.evaluate_at), and the
  reference stores its 16-bit rows at those positions only (sparse, as the KLD reference);
- each position's KL(reference || candidate) falls in a depth bucket (256-512, 512-1024, ...,
  N/2-N); the last bucket is the second half the KLD axis (and llama-perplexity -c N) scores;
- per bucket the item keeps the KLD sum, the positions and the same-top count, so the verdict
  is the declared test per bucket over chunks (scoring/depth.py).

Rows are reduced batch by batch straight from llama.cpp's output buffer: no float array of a
whole chunk's rows exists on either side.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from ..errors import MeasurementError
from ..inputs.data import measuring_order
from ..inputs.depth import FIRST_BUCKET, bucket_edges, bucket_of, scored_positions
from ..scoring.depth import bucket_verdict
from ..scoring.metrics import band_for, kld_positions, kld_score
from .base import Unit
from .kld import NON_FINITE_KLD, KLDAxis, chunk_tokens


def depth_stats(ctx, tokens: List[int], positions: List[int], ref_rows) -> Dict[str, np.ndarray]:
    """Per scored position: kld, same_top (and the rest of kld_positions) of ``ctx`` against
    ``ref_rows`` (the reference's rows at ``positions``, in order), batch by batch."""
    next_tokens = np.asarray([tokens[p + 1] for p in positions], dtype=np.int64)
    pieces: List[dict] = []

    def take(first_row, view):
        rows = slice(first_row, first_row + view.shape[0])
        pieces.append(kld_positions(ref_rows[rows], view, next_tokens[rows], ref_is_logprobs=True))

    evaluate_positions(ctx, tokens, positions, take)
    if sum(len(p["kld"]) for p in pieces) != len(positions):
        raise MeasurementError(f"internal: {len(positions)} depth positions expected, llama.cpp returned a different count")
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def evaluate_positions(ctx, tokens: List[int], positions: List[int], consume) -> None:
    """The chunk from a cleared cache (the last token predicts nothing inside it), logits only
    at ``positions``, cut at n_batch as the KLD axis's evaluation is."""
    ctx.reset()
    ctx.evaluate_at(0, tokens[:-1], 0, positions, consume)


def bucket_sums(kld: np.ndarray, same_top: np.ndarray, positions: List[int], edges: List[int]) -> dict:
    """Per bucket: KLD sum, positions, same-top count."""
    which = bucket_of(positions, edges)
    n = len(edges) - 1
    return {"bucket_kld_sum": np.bincount(which, weights=kld, minlength=n)[:n].tolist(),
            "bucket_positions": np.bincount(which, minlength=n)[:n].astype(int).tolist(),
            "bucket_same_top": np.bincount(which, weights=same_top.astype(float), minlength=n)[:n].astype(int).tolist()}


class DepthAxis(KLDAxis):
    NAME = "depth"
    TITLE = "depth"
    ITEMS_NOUN = "chunks"
    NEEDS = ("corpus",)
    STREAM = 6
    EXTRA_KEYS = ("score", "band", "mean_kld", "same_top_p_pct")
    PRIVATE_KEYS = ("_raw",)
    COMPARE_METRICS = (
        ("  mean KLD (all depths)", "mean_kld", "{:.6f}", False),
        ("  same top p %", "same_top_p_pct", "{:.3f}", True),
    )
    DAMAGE_LABEL = "long-context KLD"

    def units(self, run) -> List[Unit]:
        # The KLD axis's cut at N tokens, in the same seeded order over the corpus.
        chunks = run.inputs.depth_chunks  # distinct chunks only (inputs/distinct.py)
        ids = [f"chunk-{i:02d}" for i in chunks]
        order = measuring_order(ids, ["chunk"] * len(ids), run.settings.seed)
        return [Unit(ids[i], payload={"chunk": chunks[i]}) for i in order]

    def cache_reads(self, run) -> dict:
        corpus = run.inputs.corpus
        return {"depth": run.inputs.depth, "stride": run.settings.depth_stride,
                "corpus": corpus.sha256 if corpus else None}

    def section_facts(self, run) -> dict:
        corpus = run.inputs.corpus
        facts: Dict[str, Any] = {"depth": run.inputs.depth, "stride": run.settings.depth_stride,
                                 "bucket_edges": bucket_edges(run.inputs.depth)}
        if corpus is not None:
            facts["corpus"] = corpus.describe()
        return facts

    def planned_tokens(self, run, unit) -> int:
        """The chunk under the candidate and the reference (fewer when the reference is cached)."""
        return 2 * (run.inputs.depth - 1)

    def measure(self, run, unit) -> dict:
        inputs = run.inputs
        depth, stride = inputs.depth, run.settings.depth_stride
        bos = inputs.bos if inputs.add_bos else None
        tokens = chunk_tokens(inputs.corpus_tokens, unit.payload["chunk"], depth, bos)
        positions = scored_positions(depth, stride)
        edges = bucket_edges(depth)
        ref_rows, _exact = run.reference.chunk(
            tokens, lambda ctx, consume: evaluate_positions(ctx, tokens, positions, consume),
            variant=("depth", stride, FIRST_BUCKET))
        stats = depth_stats(run.context(unit.candidate), tokens, positions, ref_rows)
        kld = np.asarray(stats["kld"], dtype=np.float64)
        mean = float(np.mean(kld))
        score = kld_score(mean)
        if score is None:
            raise MeasurementError(NON_FINITE_KLD)
        same = np.asarray(stats["same_top"], dtype=bool)
        return {
            "id": unit.id,
            "chunk": unit.payload["chunk"],
            "score": score,
            "band": band_for(score),
            "mean_kld": mean,
            "same_top_p_pct": 100.0 * float(np.mean(same)),
            "n_positions": int(kld.size),
            "bucket_edges": edges,
            **bucket_sums(kld, same, positions, edges),
            "_raw": {"kld": kld.tolist()},
        }

    def aggregate(self, results: List[dict]) -> dict:
        items = [{k: v for k, v in r.items() if k not in self.PRIVATE_KEYS} for r in results]
        edges = list(results[0]["bucket_edges"])
        n_b = len(edges) - 1
        kld_sum = np.sum([r["bucket_kld_sum"] for r in results], axis=0)
        counts = np.sum([r["bucket_positions"] for r in results], axis=0)
        same = np.sum([r["bucket_same_top"] for r in results], axis=0)
        # Each item's positions in order, so its raw KLDs split into buckets by the same layout.
        raw = [np.asarray(r["_raw"]["kld"], dtype=np.float64) for r in results]
        per_bucket: List[List[np.ndarray]] = [[] for _ in range(n_b)]
        for r, values in zip(results, raw):
            bounds = np.cumsum([0, *r["bucket_positions"]])
            for b in range(n_b):
                per_bucket[b].append(values[bounds[b]:bounds[b + 1]])
        buckets = []
        for b in range(n_b):
            values = np.concatenate(per_bucket[b]) if per_bucket[b] else np.zeros(0)
            buckets.append({"from": edges[b], "to": edges[b + 1], "positions": int(counts[b]),
                            "mean_kld": float(kld_sum[b] / counts[b]) if counts[b] else None,
                            "control_mean_kld": None, "multiple": None, "multiple_ci95": None, "verdict": None,
                            "same_top_pct": 100.0 * float(same[b]) / float(counts[b]) if counts[b] else None,
                            "kld_p999": float(np.percentile(values, 99.9)) if values.size else None})
        total = float(kld_sum.sum())
        n_pos = int(counts.sum())
        mean = total / n_pos if n_pos else float("nan")
        score = kld_score(mean)
        section: Dict[str, Any] = {"score": score, "band": band_for(score), "n_chunks": len(results),
                                   "mean_kld": mean if score is not None else None,
                                   "same_top_p_pct": 100.0 * float(same.sum()) / n_pos if n_pos else None,
                                   "n_positions": n_pos, "buckets": buckets, "growth": None}
        if score is None:
            section["error"] = NON_FINITE_KLD
        # The floor checks a second reference context bit for bit at the KLD axis's positions.
        section["floor_applies"] = False
        section["wall_s"] = sum(r.get("wall_s", 0.0) for r in results)
        section["items"] = items
        return section

    def bucket_verdict(self, candidate_items, control_items, control_score, err_pass, err_fail, same_computation,
                       min_pass_items):
        """One declared test per depth bucket (scoring/depth.py)."""
        return bucket_verdict(self, candidate_items, control_items, control_score, err_pass, err_fail,
                              same_computation, min_pass_items)

    def diagnose(self, section: dict, axes: dict) -> List[str]:
        where = ((section.get("verdict") or {}).get("detail") or {}).get("where")
        return [f"Damage by depth: {where}."] if where else []

    def control_diagnosis(self, section: dict, control_section: dict) -> List[str]:
        return []

    def item_detail(self, item: dict) -> str:
        return f"mean KLD {item['mean_kld']:.4f} over {item['n_positions']} positions"

    def section_detail(self, section: dict, control: bool = False) -> str:
        if section.get("score") is None:
            return ""
        buckets = section.get("buckets") or []
        deepest = buckets[-1]["to"] if buckets else section.get("depth")
        # The control's section in the report keeps no bucket list: no depth range to name there.
        where = f" over depth {FIRST_BUCKET}\u2013{deepest}" if deepest else ""
        return f"  mean KLD {section['mean_kld']:.5f}{where}"

    def item_table(self, items) -> Tuple[List[str], np.ndarray]:
        rows = [(float(i["mean_kld"]) * float(i["n_positions"]), float(i["n_positions"])) for i in items]
        return [str(i["id"]) for i in items], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)


def bucket_lines(section: dict) -> List[str]:
    """One compact line per depth bucket for the terminal summary."""
    out = []
    for b in section.get("buckets") or []:
        mean = b.get("mean_kld")
        ctrl = b.get("control_mean_kld")
        m, ci = b.get("multiple"), b.get("multiple_ci95")
        ci_text = ""
        if ci:
            ci_text = f" [{ci[0]:.2f}, {'inf' if ci[1] is None else format(ci[1], '.2f')}]"
        out.append(f"    depth {b['from']:>6}\u2013{b['to']:<6} {b['positions']:>6} pos  KLD "
                   f"{'n/a' if mean is None else format(mean, '.5f')}"
                   f"{'' if ctrl is None else ' vs ' + format(ctrl, '.5f')}"
                   f"{'' if m is None else f'  {m:.2f}x' + ci_text}"
                   f"  same top {'n/a' if b.get('same_top_pct') is None else format(b['same_top_pct'], '.1f')}%"
                   f"  p99.9 {'n/a' if b.get('kld_p999') is None else format(b['kld_p999'], '.4f')}"
                   f"{'' if not b.get('verdict') else '  ' + b['verdict']}")
    return out
