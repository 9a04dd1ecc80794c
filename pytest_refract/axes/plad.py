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

import numpy as np

from ..errors import MeasurementError
from ..inputs.perturb import PERTURBATIONS, drift, perturb
from ..scoring.metrics import BAND_FLOOR, band_for, is_score
from .base import Axis, Unit

EXCESS_WEIGHT = 5.0


def item_score(excess: float) -> Optional[float]:
    if not is_score(excess):
        return None  # a drift that is not a number is no measurement
    return 100.0 * math.exp(-EXCESS_WEIGHT * excess)


def _decode_batch(run, units, roles):
    """Decode the anchors and perturbed prompts of a whole batch together, per role (a unit in
    no batch is a batch of one; anchors the trajectory axis already decoded are reused). The
    continuations are kept by the runner (greedy_tokens); per (role, unit id) nothing else."""
    measured = [u for u in units if u.payload["perturbed"] is not None]
    prompts = []
    for u in measured:
        prompts.append(run.inputs.chat_tokens(u.payload["prompt"].prompt))
        prompts.append(run.inputs.chat_tokens(u.payload["perturbed"]))
    seconds = {}
    for role in ["reference", *roles] + (["floor"] if run.settings.floor else []):
        started = time.perf_counter()
        run.prefetch_greedy(role, prompts)
        seconds[role] = time.perf_counter() - started
    return {(role, u.id): None for role in roles for u in measured}, seconds


class PLADAxis(Axis):
    NAME = "plad"
    ITEMS_NOUN = "perturbations"
    NEEDS = ("prompts",)
    BATCHED = 4
    TITLE = "PLAD"
    COMPARE_METRICS = tuple((f"  {kind}", f"per_perturbation.{kind}", "{:.2f}", True) for kind in PERTURBATIONS)
    STREAM = 4
    EXTRA_KEYS = ("score", "band", "ref_drift", "cand_drift", "excess", "perturbed_prompt")

    def units(self, run) -> List[Unit]:
        out = []
        for p in run.inputs.prompts:
            for kind in PERTURBATIONS:
                text = perturb(p.prompt, kind, seed=run.settings.seed, prompt_id=p.id)
                out.append(Unit(f"{p.id}-{kind}", keywords=(kind, p.category),
                                payload={"prompt": p, "kind": kind, "perturbed": text}))
        return out

    def cache_reads(self, run) -> dict:
        """The settings an item's result depends on (for the control's cache key)."""
        s = run.settings
        return {"n_predict": s.n_predict, "decode_batch": s.decode_batch, "seed": s.seed}

    def planned_tokens(self, run, unit) -> int:
        """Tokens this item will feed llama.cpp (progress only): anchor and perturbed prompt with
        their continuations, per side, for the whole batch where batched (zero once it ran). Anchors
        the trajectory axis already decoded are reused, so it is often fewer."""
        s = run.settings
        if unit.payload["perturbed"] is None or run.batch_done(self.NAME, unit):
            return 0
        units, roles = run.batch_units(self.NAME, unit)
        sides = 1 + len(roles) + bool(s.floor)
        chat = run.inputs.chat_tokens
        total = 0
        for u in units:
            if u.payload["perturbed"] is not None:
                total += len(chat(u.payload["prompt"].prompt)) + len(chat(u.payload["perturbed"])) + 2 * s.n_predict
        return total * sides

    def measure(self, run, unit) -> dict:
        prompt, kind, perturbed = unit.payload["prompt"], unit.payload["kind"], unit.payload["perturbed"]
        base = {"id": unit.id, "prompt_id": prompt.id, "perturbation": kind}
        if perturbed is None:
            base.update({"skipped": True, "reason": f"{kind} does not apply to this prompt", "score": None, "band": None})
            return base
        anchor_tokens = run.inputs.chat_tokens(prompt.prompt)
        perturbed_tokens = run.inputs.chat_tokens(perturbed)
        # Report keys stay "reference"/"candidate"/"floor" whichever candidate of a matrix runs.
        roles = {"reference": "reference", "candidate": unit.candidate}
        if run.settings.floor:
            roles["floor"] = "floor"
        run.batch(self.NAME, unit, lambda units, batch_roles: _decode_batch(run, units, batch_roles))
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
        return base

    def aggregate(self, results: List[dict]) -> dict:
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
            floor_scores = [item_score(r["floor_excess"]) for r in scored]
            section["floor_score"] = (sum(s for s in floor_scores if s is not None) / len(scored)
                                      if all(s is not None for s in floor_scores) else None)
        else:
            section["floor_score"] = None
        return section

    def diagnose(self, section: dict, axes: dict) -> List[str]:
        if section["score"] >= BAND_FLOOR["PASS"]:
            return []
        worst = sorted(((v, k) for k, v in section.get("per_perturbation", {}).items() if v is not None))
        named = f", most under {worst[0][1]} perturbations ({worst[0][0]:.1f})" if worst else ""
        return [f"Brittleness: small prompt changes move the candidate's output more than the reference's{named}."]

    def item_detail(self, item: dict) -> str:
        return f"drift {item['cand_drift']:.2f} vs reference {item['ref_drift']:.2f}"

    def section_detail(self, section: dict, control: bool = False) -> str:
        # An aggregated section (scored or n/a); a failed or interrupted one has no pairs.
        if control or section.get("status") not in ("scored", "n/a"):
            return ""
        kinds = ", ".join(f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in section["per_perturbation"].items())
        return f"  {kinds}; {section['n_pairs']} pairs, {section['n_skipped']} skipped"

    def item_table(self, items):
        """Per applied perturbation: the pair's score (skipped pairs are left out)."""
        scored = [i for i in items if not i.get("skipped") and i.get("score") is not None]
        rows = [(float(i["score"]),) for i in scored]
        return [str(i["id"]) for i in scored], np.asarray(rows, dtype=np.float64).reshape(len(rows), 1)

    def statistic(self, table) -> np.ndarray:
        """The mean pair score, of a table (n, 1) or a stack (..., n, 1)."""
        return np.asarray(table, dtype=np.float64)[..., 0].mean(axis=-1)

    # -- the verdict's damage (scoring/verdict.py; README "What the verdict means" gives the
    # numbers' reasons); the damage itself is the default ratio of the table's sums.
    DAMAGE_LABEL = "excess drift"
    MARGIN = 3.0
    ABSOLUTE_TOLERANCE = 0.05
    DAMAGE_RESOLUTION = 0.0
    ZERO_DAMAGE_EXACT = False  # 0 damaged units can still hide some: the zero-event bound qualifies it
    CONTROL_MAX_DAMAGE = 0.25

    def damage_table(self, items):
        """Per applied perturbation: (excess drift over the reference's, 1): the damage is the
        mean excess drift."""
        scored = [i for i in items if not i.get("skipped") and i.get("excess") is not None]
        rows = [(float(i["excess"]), 1.0) for i in scored]
        return [str(i["id"]) for i in scored], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)
