"""R-NIAH axis: does the candidate still retrieve a fact that the reference retrieves?

One item per (haystack length, needle position) cell. Each cell runs several trials with
different seeded values, so a single lucky token cannot decide it. Only cells where the
reference retrieves at least once are scored: a cell the reference fails says nothing about
the candidate's cache.
"""

from __future__ import annotations

import re
from typing import List, Optional

import numpy as np

from ..errors import UsageProblem
from ..inputs.answer import MATCH_TIMEOUT_S, PatternTimeout, answer_regex, search
from ..inputs.data import measuring_order
from ..inputs.haystack import strip_reasoning, trial_value
from ..scoring.metrics import BAND_FLOOR, band_for
from .base import Axis, Unit

LOW_CONFIDENCE_BELOW = 0.2


def cell_id(length: int, position: float) -> str:
    return f"{length}-{position:.2f}"


def answer_pattern(template: str, value: str) -> "re.Pattern":
    return re.compile(template.replace("{value}", re.escape(value)), re.IGNORECASE)


def _found(regex: str, template: str, reply: str) -> bool:
    """Whether the answer pattern finds the value in ``reply``, searched with a time bound: the
    pattern is the user's, and one that backtracks without end fails the item, named."""
    try:
        return search(regex, reply)
    except PatternTimeout:
        raise UsageProblem(f"--refract-rniah-answer={template!r} took longer than {MATCH_TIMEOUT_S:g} s on a "
                           f"{len(reply)}-character reply (it backtracks without end); simplify it, e.g. "
                           "'{value}'") from None


def _ask(run, role: str, tokens: List[int]) -> dict:
    budget = run.inputs.rniah_answer_tokens
    if role == "reference":
        answer = run.reference.greedy([tokens], budget)[0]
    else:
        answer = run.greedy(role, [tokens], budget)[0]
    text = run.detokenize(answer)
    return {"tokens": len(answer), "text": text, "answer": strip_reasoning(text)}


def run_trials(run, roles: dict, *, length: int, position: float, trials: int, needle: str, answer: str,
               haystack, prompt_of, ask):
    """The trials of one (length, position) cell, shared by the axis and the refract.needle
    fixture: per trial a seeded value, the needle with it spliced into the haystack, the
    prompt ``prompt_of(body)``, and each role's reply from ``ask(role, tokens)`` checked
    against the answer pattern. Returns (hits per role name, trial records, last prompt)."""
    s = run.settings
    hits = {name: 0 for name in roles}
    records = []
    tokens: List[int] = []
    for trial in range(trials):
        value = trial_value(s.seed, length, position, trial, s.rniah_values)
        body, offset = haystack.build(length, position, run.inputs.plain_tokens(" " + needle.replace("{value}", value)))
        tokens = prompt_of(body)
        regex = answer_regex(answer, value)
        record = {"value": value, "needle_offset": offset}
        for name, role in roles.items():
            reply = ask(role, tokens)
            hit = _found(regex, answer, reply["answer"])
            hits[name] += hit
            record[name] = {"answer": reply["text"], "hit": hit}
        records.append(record)
    return hits, records, tokens


def _axis_score(cells: List[dict], cand_key: str) -> Optional[float]:
    scored = [c for c in cells if c["ref_hits"] > 0]
    if not scored:
        return None
    losses = [max(0.0, (c["ref_hits"] - c[cand_key]) / c["trials"]) for c in scored]
    return 100.0 * (1.0 - sum(losses) / len(losses))


class RNIAHAxis(Axis):
    NAME = "rniah"
    ITEMS_NOUN = "cells"
    NEEDS = ("haystack",)
    UNIT_NOUN = "cell"  # the progress line says "rniah cell 1024-0.50"
    TITLE = "R-NIAH"
    ITEMS_KEY = "cells"
    COMPARE_METRICS = (
        ("  reference hit rate", "ref_hit_rate", "{:.3f}", None),
        ("  candidate hit rate", "cand_hit_rate", "{:.3f}", True),
    )
    STREAM = 3
    EXTRA_KEYS = ("score", "band", "ref_hits", "cand_hits")

    def units(self, run) -> List[Unit]:
        s = run.settings
        # A cell whose needles land where an earlier cell's do is that cell again: measured once
        # (inputs/distinct.py; the report names the merge).
        merged = run.inputs.merged_cells
        units = [
            Unit(cell_id(length, pos), payload={"length": length, "position": pos})
            for length in run.inputs.rniah_lengths
            for pos in s.rniah_positions
            if (length, pos) not in merged
        ]
        # Lengths interleaved, positions in a seeded order within each (see measuring_order).
        order = measuring_order([u.id for u in units], [str(u.payload["length"]) for u in units], s.seed)
        return [units[i] for i in order]

    def cache_reads(self, run) -> dict:
        """The settings and inputs an item's result depends on (for the control's cache key)."""
        s, inputs = run.settings, run.inputs
        return {"seed": s.seed, "trials": s.rniah_trials, "needle": s.rniah_needle, "question": s.rniah_question,
                "answer": s.rniah_answer, "values": s.rniah_values, "answer_tokens": inputs.rniah_answer_tokens,
                "haystack": inputs.haystack_source.sha256 if inputs.haystack_source else None}

    def settings_facts(self, run) -> dict:
        """Merged into the report's settings["rniah"]: what the cells ran with beyond the options."""
        inputs = run.inputs
        if not inputs.rniah_lengths:
            return {}
        facts = {"lengths": list(inputs.rniah_lengths), "effective_answer_tokens": inputs.rniah_answer_tokens,
                 "thinking_template": inputs.rniah_thinking}
        if inputs.merged_cells:
            facts["merged_cells"] = [{"cell": cell_id(*cell), "same_as": cell_id(*first)}
                                     for cell, first in inputs.merged_cells.items()]
        return facts

    def planned_tokens(self, run, unit) -> int:
        """Tokens this cell will feed llama.cpp (progress only): per trial and side, the prompt
        and the whole answer budget (an answer that ends early, or a reused prefix, makes it fewer)."""
        s, inputs = run.settings, run.inputs
        per_trial = unit.payload["length"] + len(inputs.rniah_prompt([])) + inputs.rniah_answer_tokens
        return s.rniah_trials * (2 + bool(s.floor)) * per_trial

    def measure(self, run, unit) -> dict:
        s = run.settings
        length, position = unit.payload["length"], unit.payload["position"]
        # Report keys stay "reference"/"candidate"/"floor" whichever candidate of a matrix runs.
        roles = {"reference": "reference", "candidate": unit.candidate}
        if s.floor:
            roles["floor"] = "floor"
        hits, trials, tokens = run_trials(
            run, roles, length=length, position=position, trials=s.rniah_trials, needle=s.rniah_needle,
            answer=s.rniah_answer, haystack=run.inputs.haystack, prompt_of=run.inputs.rniah_prompt,
            ask=lambda role, toks: _ask(run, role, toks))
        n = s.rniah_trials
        ref_rate, cand_rate = hits["reference"] / n, hits["candidate"] / n
        scored = hits["reference"] > 0
        degradation = max(0.0, ref_rate - cand_rate)
        score = 100.0 * (1.0 - degradation) if scored else None
        result = {
            "id": unit.id,
            "length": length,
            "position": position,
            "prompt_tokens": len(tokens),
            "trials": n,
            "ref_hits": hits["reference"],
            "cand_hits": hits["candidate"],
            "degradation": degradation if scored else None,
            "status": "scored" if scored else "n/a",
            "score": score,
            "band": band_for(score),
            "answers": trials,
        }
        if s.floor:
            result["floor_hits"] = hits["floor"]
        return result

    def aggregate(self, results: List[dict]) -> dict:
        cells = sorted(results, key=lambda c: (c["length"], c["position"]))
        total = sum(c["trials"] for c in cells)
        ref_rate = sum(c["ref_hits"] for c in cells) / total
        cand_rate = sum(c["cand_hits"] for c in cells) / total
        score = _axis_score(cells, "cand_hits")
        section = {
            "score": score,
            "band": band_for(score),
            "status": "scored" if score is not None else "n/a",
            "confidence": "low" if ref_rate < LOW_CONFIDENCE_BELOW else "ok",
            "ref_hit_rate": ref_rate,
            "cand_hit_rate": cand_rate,
            "n_cells": len(cells),
            "n_scored_cells": sum(1 for c in cells if c["status"] == "scored"),
            "cells": cells,
            "wall_s": sum(c["wall_s"] for c in cells),
        }
        if all("floor_hits" in c for c in cells):
            section["floor_score"] = _axis_score(cells, "floor_hits") if score is not None else None
        else:
            section["floor_score"] = None
        return section

    def diagnose(self, section: dict, axes: dict) -> List[str]:
        out = []
        if section["score"] < BAND_FLOOR["PASS"]:
            lost = [f"{c['length']} tokens at {c['position']:.0%}" for c in section.get("cells", [])
                    if c.get("degradation") and c["degradation"] > 0]
            out.append(
                "Long-context retrieval loss: the candidate misses a needle the reference finds"
                + (f" ({', '.join(lost[:6])})" if lost else "") + "."
            )
        if section.get("confidence") == "low":
            out.append(
                f"R-NIAH confidence is low: the reference retrieves the needle in only {100 * section['ref_hit_rate']:.0f}% "
                "of trials, so the composite rests partly on a low-confidence axis."
            )
        return out

    def item_detail(self, item: dict) -> str:
        return f"reference {item['ref_hits']}/{item['trials']}, candidate {item['cand_hits']}/{item['trials']}"

    def section_detail(self, section: dict, control: bool = False) -> str:
        # An aggregated section (scored or n/a); a failed or interrupted one has no hit rates.
        if control or section.get("status") not in ("scored", "n/a"):
            return ""
        return (f"  reference hit rate {100 * section['ref_hit_rate']:.0f}%, candidate {100 * section['cand_hit_rate']:.0f}%, "
                f"{section['n_scored_cells']}/{section['n_cells']} cells scored"
                + ("  LOW CONFIDENCE" if section.get("confidence") == "low" else ""))

    def item_table(self, items):
        """Per cell the reference retrieves in: the candidate's loss, (ref hits - cand hits) / trials
        (a cell the reference never retrieves in is not scored)."""
        scored = [i for i in items if i.get("ref_hits")]
        rows = [(max(0.0, (i["ref_hits"] - i["cand_hits"]) / i["trials"]),) for i in scored]
        return [str(i["id"]) for i in scored], np.asarray(rows, dtype=np.float64).reshape(len(rows), 1)

    def statistic(self, table) -> np.ndarray:
        """100 x (1 - mean loss over cells), of a table (n, 1) or a stack (..., n, 1)."""
        return 100.0 * (1.0 - np.asarray(table, dtype=np.float64)[..., 0].mean(axis=-1))

    # -- the verdict's damage (scoring/verdict.py; README "What the verdict means" gives the
    # numbers' reasons); the damage itself is the default ratio of the table's sums.
    DAMAGE_LABEL = "retrieval loss"
    MARGIN = 3.0
    # A control usually loses no needle: the candidate may then lose at most 5 % of the reference's.
    ABSOLUTE_TOLERANCE = 0.05
    DAMAGE_RESOLUTION = 0.0
    ZERO_DAMAGE_EXACT = False  # 0 damaged units can still hide some: the zero-event bound qualifies it
    DAMAGE_COUNTS = True  # whole units (tokens / retrievals): the FAIL side's Poisson guard applies
    CONTROL_MAX_DAMAGE = 0.25

    def item_damage_text(self, row, control_row) -> str:
        """Retrievals this cell lost of the reference's, and the control's of the same."""
        return f"{int(row[0])} of the reference's {int(row[1])} retrievals lost vs {int(control_row[0])} in the control"

    def damage_table(self, items):
        """Per cell the reference retrieves in: (retrievals lost, the reference's retrievals)."""
        scored = [i for i in items if i.get("ref_hits")]
        rows = [(float(max(0, i["ref_hits"] - i["cand_hits"])), float(i["ref_hits"])) for i in scored]
        return [str(i["id"]) for i in scored], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)
