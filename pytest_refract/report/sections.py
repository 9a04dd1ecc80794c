"""Axis sections and composites from per-item results: the arithmetic the report, the
sensitivity control and the gate share. Pure functions of plain data."""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional

from ..scoring.metrics import harmonic_mean, is_score

HEALTHY_MAX_STDEV = 1.0
NOISY_MAX_STDEV = 3.0


def build_axes(results: Dict[str, Dict[str, dict]], failed: Dict[str, List[str]], registry,
               repeats: Optional[Dict[str, Dict[str, List[dict]]]] = None) -> Dict[str, dict]:
    """Axis sections from per-item results, in the registry's order. An axis with any item
    that failed to measure has no score: scoring the rest would claim a number for what was
    not measured. ``repeats`` (axis -> unit id -> further results) adds each axis's spread
    over --refract-repeat runs."""
    sections = {}
    for name, axis in registry.items():
        items = results.get(name) or {}
        errors = failed.get(name) or []
        if not items and not errors:
            continue
        keys = sorted(items)
        ordered = [items[k] for k in keys]
        if errors or not ordered:
            sections[name] = {
                "score": None,
                "band": None,
                "error": f"{len(errors)} item(s) failed to measure: {', '.join(sorted(errors)[:5])}",
                # "items" whatever the axis's ITEMS_KEY: what the JSON has always held here.
                "items": [_public(axis, r) for r in ordered],
            }
            continue
        section = axis.aggregate(ordered)
        again = [((repeats or {}).get(name) or {}).get(k) for k in keys]
        if again and all(again):
            scores = [section["score"]] + [
                axis.aggregate([runs[i] for runs in again])["score"] for i in range(len(again[0]))
            ]
            section["repeat"] = repeat_stats(scores)
        key = axis.ITEMS_KEY
        if key in section:
            section[key] = [_public(axis, r) for r in section[key]]
        compute: Dict[str, Dict[str, int]] = {}
        for r in ordered:
            for role, counts in r.get("compute", {}).items():
                into = compute.setdefault(role, {})
                for count, value in counts.items():
                    into[count] = into.get(count, 0) + value
        section["compute"] = compute
        sections[name] = section
    return sections


def custom_gates(custom: List[dict]) -> Dict[str, float]:
    """Scores users put into the gate with refract.gate(name, score); the lowest per name."""
    gates: Dict[str, float] = {}
    for entry in custom:
        if entry.get("gate"):
            score = entry["metrics"]["score"]
            gates[entry["gate"]] = min(score, gates.get(entry["gate"], score))
    return gates


def repeat_stats(scores: List[Optional[float]]) -> dict:
    """Spread of one score over --refract-repeat runs: on a CPU build it must be exactly 0."""
    values = [s for s in scores if is_score(s)]
    if len(values) != len(scores) or not values:
        return {"n": len(scores), "scores": scores, "mean": None, "stdev": None, "range": None, "verdict": None}
    mean = sum(values) / len(values)
    stdev = statistics.stdev(values) if len(values) > 1 else 0.0
    verdict = "HEALTHY" if stdev <= HEALTHY_MAX_STDEV else "NOISY" if stdev <= NOISY_MAX_STDEV else "UNSTABLE"
    return {"n": len(values), "scores": values, "mean": mean, "stdev": stdev,
            "range": max(values) - min(values), "verdict": verdict}


def composite_of(axes: Dict[str, dict], gates: Optional[Dict[str, float]] = None) -> Optional[float]:
    # An axis with nothing to score (status n/a: e.g. the reference never retrieves the needle)
    # is left out, like an axis that did not run; a failed axis (no status) blocks the composite.
    scores = [a["score"] for a in axes.values() if a.get("status") != "n/a"] + list((gates or {}).values())
    if not scores or not all(is_score(s) for s in scores):
        return None  # a missing or non-finite axis score never becomes part of a composite
    return harmonic_mean(scores)


def floor_of(axes: Dict[str, dict]) -> Optional[float]:
    # An axis that says no floor applies to it (the decode axis: its reference is the batched
    # path, which a second reference context cannot check bit for bit) is left out.
    floors = [a.get("floor_score") for a in axes.values()
              if a.get("status") != "n/a" and a.get("floor_applies") is not False]
    if not floors or not all(is_score(f) for f in floors):
        return None
    return harmonic_mean(floors)


def _public(axis, result: dict) -> dict:
    """An item result as the report shows it: without what only the axis's aggregate reads."""
    private = getattr(axis, "PRIVATE_KEYS", ())
    return {k: v for k, v in result.items() if k not in private}
