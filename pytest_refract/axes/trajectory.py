"""Trajectory axis: does greedy decoding under the candidate cache produce the reference's
tokens? Compared as token ids captured at decode time (no detokenize/retokenize)."""

from __future__ import annotations

import statistics
import time
from typing import List

import numpy as np

from ..errors import MeasurementError
from ..scoring.metrics import (
    BAND_FLOOR,
    band_for,
    first_divergence,
    is_score,
    kld_positions,
    prefix_agreement,
    top2_margin,
    trajectory_axis_score,
    trajectory_item_score,
)
from .base import Axis, Unit

# A divergence where the reference's top two tokens are closer than this in probability is a
# near-tie flip: a rounding change of the logits can reorder them without any real damage.
NEAR_TIE_MARGIN = 0.1
# What a greedy divergence was, by the reference's top-2 margin where the candidate left its path.
NEAR_TIE, CONFIDENT = "near-tie", "confident"


def divergence_kind(item: dict):
    """NEAR_TIE (margin below NEAR_TIE_MARGIN), CONFIDENT (at least that), or None (no
    divergence, or none with a measurable margin). Every count of divergences by kind, the
    candidate's and the control's alike, comes from this one predicate, so a sentence that sets
    two such counts side by side compares the same thing."""
    if item.get("first_divergence") is None or item.get("near_tie_divergence") is None:
        return None
    return NEAR_TIE if item["near_tie_divergence"] else CONFIDENT


def divergence_counts(items) -> dict:
    """Greedy divergences per kind, and all of them ("all": with or without a margin)."""
    kinds = [divergence_kind(i) for i in items]
    return {NEAR_TIE: kinds.count(NEAR_TIE), CONFIDENT: kinds.count(CONFIDENT),
            "all": sum(1 for i in items if i.get("first_divergence") is not None)}


def _ref_margin(ref_rows, ref_tokens, cand_tokens):
    """The reference's own top-2 probability margin where the candidate first leaves its
    path (None without a divergence, or where the reference has no row there)."""
    d = first_divergence(ref_tokens, cand_tokens)
    if d is None or d >= len(ref_tokens):
        return None
    return top2_margin(np.asarray(ref_rows[d : d + 1], dtype=np.float32)[0])


# Candidates are compared with the reference's 16-bit log-probs (see ReferenceStore.trajectories).


def _divergence_texts(detokenize, ref_tokens, cand_tokens) -> dict:
    """The continuations split at the first differing token, for side-by-side display."""
    d = prefix_agreement(ref_tokens, cand_tokens)
    return {
        "shared_text": detokenize(ref_tokens[:d]),
        "ref_token_text": detokenize(ref_tokens[d : d + 1]),
        "cand_token_text": detokenize(cand_tokens[d : d + 1]),
        "ref_rest": detokenize(ref_tokens[d + 1 :]),
        "cand_rest": detokenize(cand_tokens[d + 1 :]),
    }


def _decode_batch(run, units, roles):
    """Decode a whole batch (see Runner.batch; a unit in no batch is a batch of one) for the
    reference, every role that needs it and the floor, one multi-sequence batch per role:
    per (role, unit id) the tokens and teacher-forced KLD, with the floor's beside them."""
    prompts = [run.inputs.chat_tokens(u.payload["prompt"].prompt) for u in units]
    started = time.perf_counter()
    refs = run.reference.trajectories(prompts)
    seconds = {"reference": time.perf_counter() - started}
    measured = {}
    sides = [(role, True) for role in roles]
    if run.settings.floor:
        sides.append(("floor", False))
    for role, use_logprobs in sides:
        started = time.perf_counter()
        compared = _compare_batch(run, role, prompts, refs, use_logprobs)
        seconds[role] = time.perf_counter() - started
        for u, (ref_tokens, ref_rows, _), (tokens, tf_kld, tf_top1) in zip(units, refs, compared):
            measured[(role, u.id)] = {
                "ref_tokens": ref_tokens, "tokens": tokens, "tf_kld": tf_kld, "tf_top1": tf_top1,
                "ref_margin": _ref_margin(ref_rows, ref_tokens, tokens)}
    values = {(role, u.id): dict(measured[(role, u.id)], floor=measured.get(("floor", u.id)))
              for role in roles for u in units}
    return values, seconds


def compare_tokens(ref_tokens: List[int], cand_tokens: List[int]) -> dict:
    """How a candidate's greedy continuation agrees with the reference's: the trajectory
    item's own figures, shared with the refract fixture's greedy comparison."""
    return {"prefix_agreement": prefix_agreement(ref_tokens, cand_tokens),
            "first_divergence": first_divergence(ref_tokens, cand_tokens),
            "full_match": ref_tokens == cand_tokens,
            "score": trajectory_item_score(ref_tokens, cand_tokens)}


def _compare_batch(run, role, prompts, refs, ref_is_logprobs):
    """The role's greedy decodes, with the KLD of each step that still follows the reference
    computed as it comes (no logits are kept): (tokens, teacher-forced KLD, teacher-forced
    top-1 agreement in %) per prompt. Up to the first divergence the candidate's own greedy
    steps saw exactly the reference's prefix, so those rows are the teacher-forced ones; when
    a sequence that left the reference path finishes, its cache is cut back to the shared
    prefix and fed the rest of the reference continuation."""
    klds: List[List[float]] = [[] for _ in prompts]
    top1: List[List[bool]] = [[] for _ in prompts]
    ref_rows = [ref[1] if ref_is_logprobs else ref[2] for ref in refs]
    ref_tokens = [ref[0] for ref in refs]
    decoded: List[List[int]] = [[] for _ in prompts]

    def on_row(i, step, row):
        # Row `step` follows the reference while every earlier token matched it.
        top = int(np.argmax(row))
        if step < len(ref_tokens[i]) and decoded[i] == ref_tokens[i][:step]:
            stats = kld_positions(ref_rows[i][step : step + 1], row[None, :], ref_tokens[i][step : step + 1],
                                  ref_is_logprobs=ref_is_logprobs)
            klds[i].append(float(stats["kld"][0]))
            top1[i].append(top == ref_tokens[i][step])
        decoded[i].append(top)

    def on_finish(ctx, i, slot):
        n_ref, valid = len(ref_tokens[i]), len(klds[i])
        if valid >= n_ref:
            return
        shared = valid - 1  # tokens of the continuation already in the sequence's cache
        ctx.truncate(slot, len(prompts[i]) + shared)

        def take(first, view):
            rows = slice(valid + first, valid + first + view.shape[0])
            stats = kld_positions(ref_rows[i][rows], view, ref_tokens[i][rows], ref_is_logprobs=ref_is_logprobs)
            klds[i].extend(float(k) for k in stats["kld"])
            top1[i].extend(bool(x) for x in view.argmax(axis=1) == np.asarray(ref_tokens[i][rows]))

        ctx.evaluate_each(slot, ref_tokens[i][shared : n_ref - 1], len(prompts[i]) + shared, 0, take)

    tokens = run.greedy(role, prompts, run.settings.n_predict, on_row, on_finish)
    out = []
    for i, toks in enumerate(tokens):
        if len(klds[i]) != len(ref_tokens[i]):
            raise MeasurementError(f"internal: {len(klds[i])} teacher-forced rows for {len(ref_tokens[i])} reference tokens")
        out.append((toks, float(np.mean(klds[i])), 100.0 * float(np.mean(top1[i]))))
    return out


def _weighted_top1(results: List[dict]):
    pairs = [(r.get("teacher_forced_top1_pct"), r["ref_len"]) for r in results]
    if any(p is None for p, _ in pairs) or not sum(n for _, n in pairs):
        return None
    return sum(p * n for p, n in pairs) / sum(n for _, n in pairs)


class TrajectoryAxis(Axis):
    NAME = "trajectory"
    ITEMS_NOUN = "prompts"
    NEEDS = ("prompts",)
    BATCHED = 1
    TITLE = "Trajectory"
    COMPARE_METRICS = (
        ("  full match rate", "full_match_rate", "{:.3f}", True),
        ("  median first divergence", "median_first_divergence", "{:g}", True),
        ("  mean prefix agreement", "mean_prefix_agreement", "{:.2f}", True),
        ("  teacher-forced KLD", "teacher_forced_kld", "{:.5f}", False),
        ("  teacher-forced top-1 %", "teacher_forced_top1_pct", "{:.2f}", True),
    )
    STREAM = 1
    EXTRA_KEYS = ("score", "band", "first_divergence", "prefix_agreement", "teacher_forced_kld")

    def units(self, run) -> List[Unit]:
        return [Unit(p.id, keywords=(p.category,), payload={"prompt": p}) for p in run.inputs.prompts]

    def cache_reads(self, run) -> dict:
        """The settings an item's result depends on (for the control's cache key)."""
        return {"n_predict": run.settings.n_predict, "decode_batch": run.settings.decode_batch}

    def planned_tokens(self, run, unit) -> int:
        """Tokens this item will feed llama.cpp, estimated before it runs (for progress only):
        each side's prompt and continuation, and half a continuation of teacher forcing per
        candidate side (it starts at the first divergence). Zero when its batch already ran."""
        s = run.settings
        if run.batch_done(self.NAME, unit):
            return 0
        units, roles = run.batch_units(self.NAME, unit)
        sides = len(roles) + bool(s.floor)
        prompts = [len(run.inputs.chat_tokens(u.payload["prompt"].prompt)) for u in units]
        return sum(n + s.n_predict for n in prompts) * (1 + sides) + len(prompts) * sides * (s.n_predict // 2)

    def measure(self, run, unit) -> dict:
        prompt = unit.payload["prompt"]
        prompt_tokens = run.inputs.chat_tokens(prompt.prompt)
        done = run.batch(self.NAME, unit, lambda units, roles: _decode_batch(run, units, roles))
        ref_tokens, cand_tokens, tf_kld = done["ref_tokens"], done["tokens"], done["tf_kld"]
        tf_top1, ref_margin = done["tf_top1"], done["ref_margin"]
        if not is_score(tf_kld):
            raise MeasurementError("the teacher-forced KLD is not a finite number (NaN or Infinity); no score is claimed")
        agreement = compare_tokens(ref_tokens, cand_tokens)
        score = agreement["score"]
        result = {
            "id": prompt.id,
            "category": prompt.category,
            "prompt": prompt.prompt,
            "prompt_tokens": len(prompt_tokens),
            "ref_len": len(ref_tokens),
            "cand_len": len(cand_tokens),
            "prefix_agreement": agreement["prefix_agreement"],
            "first_divergence": agreement["first_divergence"],
            "full_match": agreement["full_match"],
            "teacher_forced_kld": tf_kld,
            "teacher_forced_top1_pct": tf_top1,
            # The reference's p(top 1) - p(top 2) where the candidate first left its path: small
            # means a near-tie flipped, large means the candidate changed a confident token.
            "ref_margin_at_divergence": ref_margin,
            "near_tie_divergence": None if ref_margin is None else ref_margin < NEAR_TIE_MARGIN,
            "score": score,
            "band": band_for(score),
            "ref_tokens": ref_tokens,
            "cand_tokens": cand_tokens,
            "ref_text": run.detokenize(ref_tokens),
            "cand_text": run.detokenize(cand_tokens),
            "divergence": _divergence_texts(run.detokenize, ref_tokens, cand_tokens),
        }
        if run.settings.floor:
            # The floor checks the engine bit for bit: against the exact reference logits.
            floor_tokens, floor_tf = done["floor"]["tokens"], done["floor"]["tf_kld"]
            result["floor"] = {
                "ref_len": len(ref_tokens),
                "cand_len": len(floor_tokens),
                "prefix_agreement": prefix_agreement(ref_tokens, floor_tokens),
                "teacher_forced_kld": floor_tf,
            }
        return result

    def aggregate(self, results: List[dict]) -> dict:
        score = trajectory_axis_score(results)
        divergences = [r["first_divergence"] for r in results if r["first_divergence"] is not None]
        section = {
            "score": score,
            "band": band_for(score),
            "n_items": len(results),
            "full_match_rate": sum(r["full_match"] for r in results) / len(results),
            # Prompts that never diverge are left out of the median: it answers "when it goes
            # wrong, how soon", and is null when nothing went wrong.
            "median_first_divergence": statistics.median(divergences) if divergences else None,
            "mean_prefix_agreement": sum(r["prefix_agreement"] for r in results) / len(results),
            "mean_max_len": sum(max(r["ref_len"], r["cand_len"]) for r in results) / len(results),
            "teacher_forced_kld": sum(r["teacher_forced_kld"] for r in results) / len(results),
            # Positions along the reference continuation where the candidate's argmax is the
            # reference's token (every prompt's continuation counts by its length).
            "teacher_forced_top1_pct": _weighted_top1(results),
            "n_divergences": len(divergences),
            "n_near_tie_divergences": divergence_counts(results)[NEAR_TIE],
            "n_confident_divergences": divergence_counts(results)[CONFIDENT],
            "wall_s": sum(r["wall_s"] for r in results),
            "items": results,
        }
        floors = [r["floor"] for r in results if r.get("floor")]
        section["floor_score"] = trajectory_axis_score(floors) if len(floors) == len(results) else None
        return section

    def diagnose(self, section: dict, axes: dict) -> List[str]:
        if section["score"] >= BAND_FLOOR["PASS"]:
            return []
        md = section.get("median_first_divergence")
        where = f" after a median of {md:g} tokens" if md is not None else ""
        kld = axes.get("kld") or {}
        if kld.get("score") is not None and kld["score"] >= BAND_FLOOR["EXCELLENT"]:
            return [f"Greedy decodes diverge{where} although distributions stay close: near-tie tokens flip, so "
                    "generated text changes wording even where the model's beliefs barely move."]
        return [f"Generated text drifts: greedy continuations leave the reference's path{where}."]

    def control_diagnosis(self, section: dict, control_section: dict) -> List[str]:
        """Whether the candidate's greedy divergences are near-tie flips (as the control's are) or
        confident changes of the reference's token. Each sentence sets the candidate's count of
        one kind of divergence beside the control's count of the same kind, both out of all
        greedy divergences (divergence_counts)."""
        mine = divergence_counts(self.section_items(section))
        theirs = divergence_counts(self.section_items(control_section))
        if not mine["all"]:
            return []
        top1 = section.get("teacher_forced_top1_pct")
        c_top1 = control_section.get("teacher_forced_top1_pct")
        along = (f"; teacher-forced top-1 agreement {top1:.1f}% (control {c_top1:.1f}%)"
                 if top1 is not None and c_top1 is not None else "")

        def control_text(kind: str) -> str:
            return f"control: {theirs[kind]} of {theirs['all']}" if theirs["all"] else "the control never diverges"

        if mine[NEAR_TIE] == mine["all"]:
            return [f"Greedy divergences are near-tie flips only ({mine[NEAR_TIE]} of {mine['all']} at a reference "
                    f"top-2 margin below {NEAR_TIE_MARGIN:g}; {control_text(NEAR_TIE)}){along}."]
        if mine[CONFIDENT] <= theirs[CONFIDENT]:
            return [f"No more confident tokens changed than the control changes: {mine[CONFIDENT]} of {mine['all']} "
                    f"greedy divergences happen where the reference's top-2 margin is at least "
                    f"{NEAR_TIE_MARGIN:g} ({control_text(CONFIDENT)}){along}."]
        return [f"Changes confident tokens: {mine[CONFIDENT]} of {mine['all']} greedy divergences happen where the "
                f"reference's top-2 margin is at least {NEAR_TIE_MARGIN:g} ({control_text(CONFIDENT)}){along}."]

    def item_detail(self, item: dict) -> str:
        fd = item.get("first_divergence")
        return f"diverges at token {fd}" if fd is not None else "full match"

    def section_detail(self, section: dict, control: bool = False) -> str:
        if section.get("score") is None:
            return ""
        top1 = section.get("teacher_forced_top1_pct")
        top1_text = "-" if top1 is None else f"{top1:.1f}%"
        ties = f"near-tie divergences {section.get('n_near_tie_divergences', 0)}/{section.get('n_divergences', 0)}"
        if control:
            return f"  full match {100 * section['full_match_rate']:.0f}%, teacher-forced top-1 {top1_text}, {ties}"
        md = section.get("median_first_divergence")
        return (f"  full match {100 * section['full_match_rate']:.0f}%, median first divergence "
                f"{'-' if md is None else f'{md:g}'}, teacher-forced KLD {section['teacher_forced_kld']:.5f}, "
                f"teacher-forced top-1 {top1_text}, {ties}")

    def item_table(self, items):
        """Per prompt: (prefix agreement, longer continuation's length), the two sums the axis
        score is a ratio of."""
        rows = [(float(i["prefix_agreement"]), float(max(i["ref_len"], i["cand_len"]))) for i in items]
        return [str(i["id"]) for i in items], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)

    def statistic(self, table) -> np.ndarray:
        """100 x total prefix agreement / total longest length (100 when nothing was generated),
        of a table (n, 2) or a stack (..., n, 2)."""
        t = np.asarray(table, dtype=np.float64)
        agree, longest = t[..., 0].sum(axis=-1), t[..., 1].sum(axis=-1)
        safe = np.where(longest > 0, longest, 1.0)
        return np.where(longest > 0, 100.0 * agree / safe, 100.0)

    # -- the verdict's damage (scoring/verdict.py; README "What the verdict means" gives the
    # numbers' reasons); the damage itself is the default ratio of the table's sums.
    DAMAGE_LABEL = "greedy flips"
    MARGIN = 3.0
    ABSOLUTE_TOLERANCE = 0.05
    DAMAGE_RESOLUTION = 0.0
    ZERO_DAMAGE_EXACT = False  # 0 damaged units can still hide some: the zero-event bound qualifies it
    DAMAGE_COUNTS = True  # whole units (tokens / retrievals): the FAIL side's Poisson guard applies
    # The bf16 control flips 2 % of reference tokens on SmolLM2, q4_0/q4_0 9 %: a control beyond 10 %
    # is not rounding.
    CONTROL_MAX_DAMAGE = 0.10

    def item_damage_text(self, row, control_row) -> str:
        """ "3 flips vs 1 in the control": reference tokens whose top-1 the cache changed under
        teacher forcing, on this prompt's same reference continuation."""
        flips, tokens, control_flips = int(row[0]), int(row[1]), int(control_row[0])
        return (f"{flips} flip{'' if flips == 1 else 's'} vs {control_flips} in the control "
                f"(of {tokens} reference tokens)")

    def damage_table(self, items):
        """Per prompt: (reference tokens whose top-1 the candidate changes under teacher forcing,
        reference tokens). A per-token flip rate: it does not saturate the way prefix agreement
        does after the first flip, and it sees every position, not only the first divergence."""
        kept = [i for i in items if i.get("teacher_forced_top1_pct") is not None]
        rows = [(round((100.0 - float(i["teacher_forced_top1_pct"])) / 100.0 * float(i["ref_len"])),
                 float(i["ref_len"])) for i in kept]
        return [str(i["id"]) for i in kept], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)
