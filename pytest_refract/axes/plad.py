"""PLAD axis: does a small prompt change (typo, case, punctuation, one-word paraphrase) move
the candidate's greedy output more than it moves the reference's?

Drift is the token-level edit distance between the continuation of the original prompt (the
anchor: the same greedy decode the trajectory axis makes) and that of the perturbed prompt,
over decode-time token ids, divided by the anchor's length and capped at 1. Only the excess
over the reference's own drift counts against the candidate.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

from ..errors import MeasurementError
from ..inputs.perturb import PERTURBATIONS, drift, perturb
from ..scoring.metrics import band_for, is_score

NAME = "plad"
# The axis's random stream for bootstrap draws (scoring.calibration.stream_of).
STREAM = 4
NEEDS = ("prompts",)
# Decode-batch widths of units per batch: PLAD keeps only token ids, so a longer queue keeps
# its batch full for longer.
UNIT_NOUN = ""
BATCHED = 4
EXCESS_WEIGHT = 5.0


def units(run) -> List[dict]:
    out = []
    for p in run.inputs.prompts:
        for kind in PERTURBATIONS:
            text = perturb(p.prompt, kind, seed=run.settings.seed, prompt_id=p.id)
            out.append({"id": f"{p.id}-{kind}", "keywords": [kind, p.category], "prompt": p, "kind": kind,
                        "perturbed": text})
    return out


def cache_reads(run) -> dict:
    """The settings an item's result depends on (for the control's cache key)."""
    s = run.settings
    return {"n_predict": s.n_predict, "decode_batch": s.decode_batch, "seed": s.seed}


def section_facts(run) -> dict:
    return {}


def settings_facts(run) -> dict:
    return {}


def planned_tokens(run, unit) -> int:
    """Tokens this item will feed llama.cpp (progress only): anchor and perturbed prompt with
    their continuations, per side, for the whole batch where batched (zero once it ran). Anchors
    the trajectory axis already decoded are reused, so it is often fewer."""
    s = run.settings
    if unit["perturbed"] is None or (NAME, unit["candidate"], unit["id"]) in run.batch_seconds:
        return 0
    units, roles = run.batch_of(NAME, unit)
    sides = 1 + len(roles) + bool(s.floor)
    chat = run.inputs.chat_tokens
    total = 0
    for u in units:
        if u["perturbed"] is not None:
            total += len(chat(u["prompt"].prompt)) + len(chat(u["perturbed"])) + 2 * s.n_predict
    return total * sides


def item_score(excess: float) -> Optional[float]:
    if not is_score(excess):
        return None  # a drift that is not a number is no measurement
    return 100.0 * math.exp(-EXCESS_WEIGHT * excess)


def measure(run, unit) -> dict:
    prompt, kind, perturbed = unit["prompt"], unit["kind"], unit["perturbed"]
    base = {"id": unit["id"], "prompt_id": prompt.id, "perturbation": kind}
    if perturbed is None:
        base.update({"skipped": True, "reason": f"{kind} does not apply to this prompt", "score": None, "band": None})
        return base
    started = time.perf_counter()
    anchor_tokens = run.inputs.chat_tokens(prompt.prompt)
    perturbed_tokens = run.inputs.chat_tokens(perturbed)
    # Report keys stay "reference"/"candidate"/"floor" whichever candidate of a matrix runs.
    roles = {"reference": "reference", "candidate": unit["candidate"]}
    if run.settings.floor:
        roles["floor"] = "floor"
    batch_s = 0.0  # time this item spent decoding its whole batch (shared out below)
    if (NAME, unit["candidate"], unit["id"]) not in run.batch_seconds:
        _prefetch_batch(run, unit, roles)
        batch_s = time.perf_counter() - started
    drifts: Dict[str, float] = {}
    for name, role in roles.items():
        anchor = run.greedy_tokens(role, anchor_tokens)
        moved = run.greedy_tokens(role, perturbed_tokens)
        drifts[name] = drift(anchor, moved)
    if not all(is_score(d) for d in drifts.values()):
        # max(0, NaN) is 0: an unchecked NaN drift would score as "no excess drift".
        raise MeasurementError(f"the drift is not a finite number ({drifts})")
    excess = max(0.0, drifts["candidate"] - drifts["reference"])
    score = item_score(excess)
    base.update({
        "skipped": False,
        "perturbed_prompt": perturbed,
        "ref_drift": drifts["reference"],
        "cand_drift": drifts["candidate"],
        "excess": excess,
        "score": score,
        "band": band_for(score),
    })
    if "floor" in drifts:
        base["floor_excess"] = max(0.0, drifts["floor"] - drifts["reference"])
    base["wall_s"] = time.perf_counter() - started - batch_s + run.batch_seconds.get((NAME, unit["candidate"], unit["id"]), 0.0)
    return base


def _prefetch_batch(run, unit, roles) -> None:
    """Decode the anchors and perturbed prompts of the unit's whole batch together, per role
    (a unit in no batch is a batch of one; anchors the trajectory axis already decoded are
    reused)."""
    units, cand_roles = run.batch_of(NAME, unit)
    prompts = []
    for u in units:
        if u["perturbed"] is not None:
            prompts.append(run.inputs.chat_tokens(u["prompt"].prompt))
            prompts.append(run.inputs.chat_tokens(u["perturbed"]))
    seconds = {}
    # batch_of's roles include this unit's candidate (it is in the plan, or the batch is itself).
    for role in ["reference", *cand_roles] + (["floor"] if "floor" in roles.values() else []):
        started = time.perf_counter()
        run.prefetch_greedy(role, prompts)
        seconds[role] = time.perf_counter() - started
    run.share_batch_time(NAME, [u for u in units if u["perturbed"] is not None], seconds)


def aggregate(results: List[dict]) -> dict:
    scored = [r for r in results if not r.get("skipped")]
    per_kind = {}
    for kind in PERTURBATIONS:
        mine = [r["score"] for r in scored if r["perturbation"] == kind]
        # A perturbation that never applied has no score: null, never NaN or 100.
        per_kind[kind] = sum(mine) / len(mine) if mine else None
    score = sum(r["score"] for r in scored) / len(scored) if scored else None
    section = {
        "score": score,
        "band": band_for(score),
        "status": "scored" if score is not None else "n/a",
        "per_perturbation": per_kind,
        "n_pairs": len(scored),
        "n_skipped": len(results) - len(scored),
        "items": results,
        "wall_s": sum(r.get("wall_s", 0.0) for r in results),
    }
    if scored and all("floor_excess" in r for r in scored):
        section["floor_score"] = sum(item_score(r["floor_excess"]) for r in scored) / len(scored)
    else:
        section["floor_score"] = None
    return section


# --------------------------------------------------------------------------- presentation
# (what the report, the terminal summary, compare and the bootstrap show of this axis)
# Imported here, beside the code that needs them, so this block merges on its own.
import numpy as np

from ..scoring.metrics import BAND_FLOOR

TITLE = "PLAD"
ITEMS_KEY = "items"


def diagnose(section: dict, axes: dict) -> List[str]:
    if section["score"] >= BAND_FLOOR["PASS"]:
        return []
    worst = sorted(((v, k) for k, v in section.get("per_perturbation", {}).items() if v is not None))
    named = f", most under {worst[0][1]} perturbations ({worst[0][0]:.1f})" if worst else ""
    return [f"Brittleness: small prompt changes move the candidate's output more than the reference's{named}."]


def control_diagnosis(section: dict, control_section: dict) -> List[str]:
    return []


def item_detail(item: dict) -> str:
    return f"drift {item['cand_drift']:.2f} vs reference {item['ref_drift']:.2f}"


def section_detail(section: dict, control: bool = False) -> str:
    # An aggregated section (scored or n/a); a failed or interrupted one has no pairs.
    if control or section.get("status") not in ("scored", "n/a"):
        return ""
    kinds = ", ".join(f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in section["per_perturbation"].items())
    return f"  {kinds}; {section['n_pairs']} pairs, {section['n_skipped']} skipped"


COMPARE_METRICS = tuple((f"  {kind}", f"per_perturbation.{kind}", "{:.2f}", True) for kind in PERTURBATIONS)


def item_table(items):
    """Per applied perturbation: the pair's score (skipped pairs are left out)."""
    scored = [i for i in items if not i.get("skipped") and i.get("score") is not None]
    rows = [(float(i["score"]),) for i in scored]
    return [str(i["id"]) for i in scored], np.asarray(rows, dtype=np.float64).reshape(len(rows), 1)


def statistic(table) -> np.ndarray:
    """The mean pair score, of a table (n, 1) or a stack (..., n, 1)."""
    return np.asarray(table, dtype=np.float64)[..., 0].mean(axis=-1)


# --------------------------------------------------------------------------- the verdict's damage
# (scoring/verdict.py; the README's "What the verdict means" gives the numbers' reasons)
from ..scoring.verdict import ratio_of_sums as damage  # noqa: E402

DAMAGE_LABEL = "excess drift"
MARGIN = 3.0
ABSOLUTE_TOLERANCE = 0.05
DAMAGE_RESOLUTION = 0.0
ZERO_DAMAGE_EXACT = False  # 0 damaged units can still hide some: the zero-event bound qualifies it
CONTROL_MAX_DAMAGE = 0.25


def damage_table(items):
    """Per applied perturbation: (excess drift over the reference's, 1): the damage is the mean
    excess drift."""
    scored = [i for i in items if not i.get("skipped") and i.get("excess") is not None]
    rows = [(float(i["excess"]), 1.0) for i in scored]
    return [str(i["id"]) for i in scored], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)
