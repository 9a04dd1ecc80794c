"""Trajectory axis: does greedy decoding under the candidate cache produce the reference's
tokens? Compared as token ids captured at decode time (no detokenize/retokenize)."""

from __future__ import annotations

import statistics
import time
from typing import List

import numpy as np

from ..errors import MeasurementError
from ..scoring import (
    band_for,
    first_divergence,
    is_score,
    kld_positions,
    prefix_agreement,
    top2_margin,
    trajectory_axis_score,
    trajectory_item_score,
)

NAME = "trajectory"
# A divergence where the reference's top two tokens are closer than this in probability is a
# near-tie flip: a rounding change of the logits can reorder them without any real damage.
NEAR_TIE_MARGIN = 0.1


def units(audit) -> List[dict]:
    return [{"id": p.id, "keywords": [p.category], "prompt": p} for p in audit.prompts]


def planned_tokens(audit, unit) -> int:
    """Tokens this item will feed llama.cpp, estimated before it runs (for progress only):
    each side's prompt and continuation, and half a continuation of teacher forcing per
    candidate side (it starts at the first divergence). Zero when its batch already ran."""
    s = audit.settings
    if s.decode_batch > 1:
        if (NAME, unit["candidate"], unit["id"]) in audit.batch_results:
            return 0
        units, roles = audit.batch_of(NAME, unit)
    else:
        units, roles = [unit], [unit["candidate"]]
    sides = len(roles) + bool(s.floor)
    prompts = [len(audit.chat_tokens(u["prompt"].prompt)) for u in units]
    return sum(n + s.n_predict for n in prompts) * (1 + sides) + len(prompts) * sides * (s.n_predict // 2)


def _teacher_forced_logits(cand_ctx, prompt_len, ref_tokens, cand_tokens, cand_logits) -> np.ndarray:
    """The candidate's logits along the *reference's* continuation.

    Up to the first divergence the candidate's own greedy steps saw exactly the reference's
    prefix, so those logits are reused. From there on, the candidate's cache is cut back to
    the shared prefix and the rest of the reference continuation is fed in one batch.
    """
    n_ref = len(ref_tokens)
    d = prefix_agreement(ref_tokens, cand_tokens)
    valid = min(d + 1, len(cand_tokens), n_ref)
    parts = [cand_logits[:valid]]
    if valid < n_ref:
        shared = valid - 1  # tokens of the continuation already in the candidate's cache
        cand_ctx.truncate(prompt_len + shared)
        parts.append(cand_ctx.evaluate(ref_tokens[shared : n_ref - 1], prompt_len + shared, logits_from=0))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _compare(audit, side_ctx, prompt_tokens, ref_tokens, ref_rows, ref_is_logprobs):
    """(greedy tokens, teacher-forced KLD, teacher-forced top-1 agreement in %)."""
    tokens, logits = side_ctx.greedy(prompt_tokens, audit.settings.n_predict, keep_logits=True)
    tf_logits = _teacher_forced_logits(side_ctx, len(prompt_tokens), ref_tokens, tokens, logits)
    stats = kld_positions(ref_rows, tf_logits, ref_tokens, ref_is_logprobs=ref_is_logprobs)
    top1 = np.asarray(tf_logits).argmax(axis=1) == np.asarray(ref_tokens)
    return tokens, float(np.mean(stats["kld"])), 100.0 * float(np.mean(top1))


def _ref_margin(ref_rows, ref_tokens, cand_tokens):
    """The reference's own top-2 probability margin where the candidate first leaves its
    path (None without a divergence, or where the reference has no row there)."""
    d = first_divergence(ref_tokens, cand_tokens)
    if d is None or d >= len(ref_tokens):
        return None
    return top2_margin(np.asarray(ref_rows[d : d + 1], dtype=np.float32)[0])


# Candidates are compared with the reference's 16-bit log-probs (see Audit.reference_trajectory).


def _divergence_texts(engine, ref_tokens, cand_tokens) -> dict:
    """The continuations split at the first differing token, for side-by-side display."""
    d = prefix_agreement(ref_tokens, cand_tokens)
    return {
        "shared_text": engine.detokenize(ref_tokens[:d]),
        "ref_token_text": engine.detokenize(ref_tokens[d : d + 1]),
        "cand_token_text": engine.detokenize(cand_tokens[d : d + 1]),
        "ref_rest": engine.detokenize(ref_tokens[d + 1 :]),
        "cand_rest": engine.detokenize(cand_tokens[d + 1 :]),
    }


def _measure_batch(audit, unit) -> None:
    """Decode the unit's whole batch (see Audit.batch_of) for the reference, every candidate
    that needs it and the floor, one multi-sequence batch per role, and leave each item's
    tokens and teacher-forced KLD in audit.batch_results."""
    units, roles = audit.batch_of(NAME, unit)
    prompts = [audit.chat_tokens(u["prompt"].prompt) for u in units]
    started = time.perf_counter()
    refs = audit.reference_trajectories(prompts)
    seconds = {"reference": time.perf_counter() - started}
    audit.batch_results.clear()
    sides = [(role, role, True) for role in roles]
    if audit.settings.floor:
        sides.append(("floor", "floor", False))
    for role, key, use_logprobs in sides:
        started = time.perf_counter()
        compared = _compare_batch(audit, role, prompts, refs, use_logprobs)
        seconds[role] = time.perf_counter() - started
        for u, p, (ref_tokens, ref_rows, _), (tokens, tf_kld, tf_top1) in zip(units, prompts, refs, compared):
            audit.remember_greedy("reference", p, ref_tokens)
            audit.remember_greedy(role, p, tokens)
            audit.batch_results[(NAME, key, u["id"])] = {
                "ref_tokens": ref_tokens, "tokens": tokens, "tf_kld": tf_kld, "tf_top1": tf_top1,
                "ref_margin": _ref_margin(ref_rows, ref_tokens, tokens)}
    audit.share_batch_time(NAME, units, seconds)


def _compare_batch(audit, role, prompts, refs, ref_is_logprobs):
    """Batched _compare: the role's greedy decodes, with the KLD of each step that still
    follows the reference computed as it comes (no logits are kept). When a sequence that
    left the reference path finishes, its cache is cut back to the shared prefix and fed the
    rest of the reference continuation, as _teacher_forced_logits does for one sequence."""
    klds: List[List[float]] = [[] for _ in prompts]
    top1: List[List[bool]] = [[] for _ in prompts]
    ref_rows = [ref[1] if ref_is_logprobs else ref[2] for ref in refs]
    ref_tokens = [ref[0] for ref in refs]
    decoded: List[List[int]] = [[] for _ in prompts]

    def on_row(i, step, row):
        # Row `step` follows the reference while every earlier token matched it.
        if step < len(ref_tokens[i]) and decoded[i] == ref_tokens[i][:step]:
            stats = kld_positions(ref_rows[i][step : step + 1], row[None, :], ref_tokens[i][step : step + 1],
                                  ref_is_logprobs=ref_is_logprobs)
            klds[i].append(float(stats["kld"][0]))
            top1[i].append(int(np.argmax(row)) == ref_tokens[i][step])
        decoded[i].append(int(np.argmax(row)))

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

    tokens = audit._greedy_batches(role, prompts, audit.settings.n_predict, on_row, on_finish)
    out = []
    for i, toks in enumerate(tokens):
        if len(klds[i]) != len(ref_tokens[i]):
            raise MeasurementError(f"internal: {len(klds[i])} teacher-forced rows for {len(ref_tokens[i])} reference tokens")
        out.append((toks, float(np.mean(klds[i])), 100.0 * float(np.mean(top1[i]))))
    return out


def measure(audit, unit) -> dict:
    prompt = unit["prompt"]
    started = time.perf_counter()
    prompt_tokens = audit.chat_tokens(prompt.prompt)
    batched = audit.settings.decode_batch > 1
    batch_s = 0.0  # time this item spent measuring its whole batch (shared out below)
    if batched:
        if (NAME, unit["candidate"], unit["id"]) not in audit.batch_results:
            _measure_batch(audit, unit)
            batch_s = time.perf_counter() - started
        done = audit.batch_results[(NAME, unit["candidate"], unit["id"])]
        ref_tokens, cand_tokens, tf_kld = done["ref_tokens"], done["tokens"], done["tf_kld"]
        tf_top1, ref_margin = done["tf_top1"], done["ref_margin"]
    else:
        ref_tokens, ref_logprobs, ref_exact = audit.reference_trajectory(prompt_tokens)
        cand_tokens, tf_kld, tf_top1 = _compare(audit, audit.context(unit["candidate"]), prompt_tokens, ref_tokens,
                                                ref_logprobs, True)
        ref_margin = _ref_margin(ref_logprobs, ref_tokens, cand_tokens)
        audit.remember_greedy("reference", prompt_tokens, ref_tokens)
        audit.remember_greedy(unit["candidate"], prompt_tokens, cand_tokens)
    if not is_score(tf_kld):
        raise MeasurementError("the teacher-forced KLD is not a finite number (NaN or Infinity); no score is claimed")
    score = trajectory_item_score(ref_tokens, cand_tokens)
    result = {
        "id": prompt.id,
        "category": prompt.category,
        "prompt": prompt.prompt,
        "prompt_tokens": len(prompt_tokens),
        "ref_len": len(ref_tokens),
        "cand_len": len(cand_tokens),
        "prefix_agreement": prefix_agreement(ref_tokens, cand_tokens),
        "first_divergence": first_divergence(ref_tokens, cand_tokens),
        "full_match": ref_tokens == cand_tokens,
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
        "ref_text": audit.engine.detokenize(ref_tokens),
        "cand_text": audit.engine.detokenize(cand_tokens),
        "divergence": _divergence_texts(audit.engine, ref_tokens, cand_tokens),
    }
    if audit.settings.floor:
        # The floor checks the engine bit for bit: against the exact reference logits.
        if batched:
            floor_done = audit.batch_results[(NAME, "floor", unit["id"])]
            floor_tokens, floor_tf = floor_done["tokens"], floor_done["tf_kld"]
        else:
            floor_tokens, floor_tf, _ = _compare(audit, audit.context("floor"), prompt_tokens, ref_tokens, ref_exact, False)
            audit.remember_greedy("floor", prompt_tokens, floor_tokens)
        result["floor"] = {
            "ref_len": len(ref_tokens),
            "cand_len": len(floor_tokens),
            "prefix_agreement": prefix_agreement(ref_tokens, floor_tokens),
            "teacher_forced_kld": floor_tf,
        }
    result["wall_s"] = time.perf_counter() - started - batch_s + audit.batch_seconds.get((NAME, unit["candidate"], unit["id"]), 0.0)
    return result


def aggregate(results: List[dict]) -> dict:
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
        "n_near_tie_divergences": sum(1 for r in results if r.get("near_tie_divergence")),
        "wall_s": sum(r["wall_s"] for r in results),
        "items": results,
    }
    floors = [r["floor"] for r in results if r.get("floor")]
    section["floor_score"] = trajectory_axis_score(floors) if len(floors) == len(results) else None
    return section


def _weighted_top1(results: List[dict]):
    pairs = [(r.get("teacher_forced_top1_pct"), r["ref_len"]) for r in results]
    if any(p is None for p, _ in pairs) or not sum(n for _, n in pairs):
        return None
    return sum(p * n for p, n in pairs) / sum(n for _, n in pairs)


# --------------------------------------------------------------------------- presentation
# (what the report, the terminal summary, compare and the bootstrap show of this axis)
# Imported here, beside the code that needs them, so this block merges on its own.
from ..scoring import BAND_FLOOR


TITLE = "Trajectory"
ITEMS_KEY = "items"
BATCHED = 1  # decode-batch widths per xdist group (see audit.BATCHED_AXES)


def diagnose(section: dict, axes: dict) -> List[str]:
    if section["score"] >= BAND_FLOOR["PASS"]:
        return []
    md = section.get("median_first_divergence")
    where = f" after a median of {md:g} tokens" if md is not None else ""
    kld = axes.get("kld") or {}
    if kld.get("score") is not None and kld["score"] >= BAND_FLOOR["EXCELLENT"]:
        return [f"Greedy decodes diverge{where} although distributions stay close: near-tie tokens flip, so "
                "generated text changes wording even where the model's beliefs barely move."]
    return [f"Generated text drifts: greedy continuations leave the reference's path{where}."]


def control_diagnosis(section: dict, control_section: dict) -> List[str]:
    """Whether the candidate's greedy divergences are near-tie flips (as the control's are) or
    confident changes of the reference's token."""
    if not section.get("n_divergences"):
        return []
    near, total = section.get("n_near_tie_divergences", 0), section["n_divergences"]
    c_near, c_total = control_section.get("n_near_tie_divergences", 0), control_section.get("n_divergences", 0)
    control_text = f"control: {c_near} of {c_total}" if c_total else "the control never diverges"
    top1 = section.get("teacher_forced_top1_pct")
    c_top1 = control_section.get("teacher_forced_top1_pct")
    along = (f"; teacher-forced top-1 agreement {top1:.1f}% (control {c_top1:.1f}%)"
             if top1 is not None and c_top1 is not None else "")
    if total - near <= c_total - c_near:  # no more confident changes than the control makes
        return [f"Greedy divergences are near-tie flips {'only' if near == total else 'mostly'} ({near} of "
                f"{total} at a reference top-2 margin "
                f"below {NEAR_TIE_MARGIN:g}; {control_text}), like the control's{along}."]
    return [f"Changes confident tokens: {total - near} of {total} greedy divergences happen where the "
            f"reference's top-2 margin is at least {NEAR_TIE_MARGIN:g} ({control_text}){along}."]


def item_detail(item: dict) -> str:
    fd = item.get("first_divergence")
    return f"diverges at token {fd}" if fd is not None else "full match"


def section_detail(section: dict, control: bool = False) -> str:
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


COMPARE_METRICS = (
    ("  full match rate", "full_match_rate", "{:.3f}", True),
    ("  median first divergence", "median_first_divergence", "{:g}", True),
    ("  mean prefix agreement", "mean_prefix_agreement", "{:.2f}", True),
    ("  teacher-forced KLD", "teacher_forced_kld", "{:.5f}", False),
    ("  teacher-forced top-1 %", "teacher_forced_top1_pct", "{:.2f}", True),
    ("  calibrated", "calibrated_score", "{:.2f}", True),
)


def item_table(items):
    """Per prompt: (prefix agreement, longer continuation's length), the two sums the axis
    score is a ratio of."""
    rows = [(float(i["prefix_agreement"]), float(max(i["ref_len"], i["cand_len"]))) for i in items]
    return [str(i["id"]) for i in items], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)


def statistic(table) -> np.ndarray:
    """100 x total prefix agreement / total longest length (100 when nothing was generated),
    of a table (n, 2) or a stack (..., n, 2)."""
    t = np.asarray(table, dtype=np.float64)
    agree, longest = t[..., 0].sum(axis=-1), t[..., 1].sum(axis=-1)
    safe = np.where(longest > 0, longest, 1.0)
    return np.where(longest > 0, 100.0 * agree / safe, 100.0)
