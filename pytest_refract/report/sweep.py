"""The report's "sweep": which cache to ship, read at a glance. Pure functions of the report's
data: the K x V grid of verdicts with each pair's KV bytes per token, the pairs measured,
skipped (and why) and refused by llama.cpp (and why), the Pareto frontier of KV bytes against
the worst axis multiple, the recommendation (the family's, scoring/family.py: Holm over every
candidate) and, with a budget, the best config within it."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..scoring import verdict as V
from .verdicts import kv_bytes


def skipped_roles(sequential: Dict[str, Dict[str, dict]], labels: Dict[str, str]) -> Dict[str, str]:
    """Candidate label -> why a sweep stopped measuring it (sweep.py), from the designs."""
    out = {}
    for role, axes in sequential.items():
        why = next((d["pruned"] for d in axes.values() if d.get("pruned")), None)
        if why and role in labels:
            out[labels[role]] = why
    return out


def worst_axis(section: dict) -> Optional[dict]:
    """The axis with the largest multiple of the control's damage: {"axis", "multiple", "ci"}."""
    axes = ((section.get("verdict") or {}).get("axes") or {})
    scored = [(name, a) for name, a in axes.items() if a.get("multiple") is not None]
    if not scored:
        return None
    name, a = max(scored, key=lambda item: item[1]["multiple"])
    return {"axis": name, "multiple": a["multiple"], "ci": a.get("multiple_ci95")}


def frontier(points: Dict[str, tuple]) -> List[str]:
    """Labels on the Pareto frontier of (KV bytes per token, worst multiple), smallest cache
    first: no other point has a cache at most as large and a multiple at most as large, one of
    them strictly."""
    out = []
    for name, (kv, mult) in points.items():
        if any(k <= kv and m <= mult and (k < kv or m < mult) for other, (k, m) in points.items() if other != name):
            continue
        out.append(name)
    return sorted(out, key=lambda n: (points[n][0], points[n][1], n))


def _pct(bytes_per_token: Optional[float], reference: Optional[float]) -> Optional[float]:
    return None if not bytes_per_token or not reference else 100.0 * bytes_per_token / reference


def build_sweep(plan: dict, sections: List[dict], recommendation: Optional[dict], skipped: Dict[str, str],
                reference_bytes: Optional[float], budget: Optional[dict], require: Optional[str],
                reference: str = "ctk=f16,ctv=f16") -> dict:
    """The sweep section. ``plan``: audit/sweep.py's SweepPlan as JSON; ``sections``: every
    candidate's section; ``recommendation``: the family's decision (None without a verdict);
    ``skipped``: label -> why (sweep.py); ``budget``: {"bytes_per_token", "asked"} or None."""
    by_label = {sec["candidate"]: sec for sec in sections}
    decisions = (recommendation or {}).get("decisions") or {}
    cells: Dict[str, Dict[str, dict]] = {}
    points: Dict[str, tuple] = {}
    pairs = set(plan["pairs"])
    for sec in sections:
        label = sec["candidate"]
        verdict = (sec.get("verdict") or {}).get("verdict")
        worst = worst_axis(sec)
        kv = kv_bytes(sec)
        cell = {"candidate": label, "verdict": None if label in skipped else verdict,
                "family": decisions.get(label), "kv_bytes_per_token": kv,
                "percent_of_reference": _pct(kv, reference_bytes),
                "worst_axis": worst, "skipped": label in skipped, "swept": label in pairs}
        ctk, ctv = _types(label)
        cells.setdefault(ctk, {})[ctv] = cell
        if label not in skipped and worst is not None and kv is not None:
            points[label] = (kv, worst["multiple"])
    for entry in plan.get("refused", []):
        ctk, ctv = _types(entry["candidate"])
        cells.setdefault(ctk, {})[ctv] = {"candidate": entry["candidate"], "verdict": None, "refused": entry["why"]}
    for entry in plan.get("excluded", []):
        ctk, ctv = _types(entry["candidate"])
        cells.setdefault(ctk, {})[ctv] = {"candidate": entry["candidate"], "verdict": None, "excluded": entry["why"]}
    best = (recommendation or {}).get("recommended")
    # "of f16's cache" where the reference is f16 (the usual case), else of the reference's own.
    whose = "f16's cache" if _types(reference) == ("f16", "f16") else f"the reference's cache ({reference})"
    rec = _recommendation(best, by_label, reference_bytes, decisions, skipped, whose) if best else None
    return {
        "types": list(plan["types"]),
        "pairs": list(plan["pairs"]),
        "measured": [sec["candidate"] for sec in sections if sec["candidate"] not in skipped],
        "skipped": [{"candidate": label, "why": why} for label, why in skipped.items()]
                   + [dict(e) for e in plan.get("excluded", [])],
        "refused": [dict(e) for e in plan.get("refused", [])],
        "recommendation": rec,
        "budget": _within_budget(budget, sections, decisions, rec, skipped) if budget else None,
        "require": _required(require, by_label) if require else None,
        "frontier": frontier(points),
        "grid": {"rows": _axis_order(plan["types"], cells, 0), "columns": _axis_order(plan["types"], cells, 1),
                 "cells": cells},
        "family": {k: recommendation[k] for k in ("method", "family_error", "guarantee")} if recommendation else None,
    }


def drawn_types(grid: dict) -> Tuple[List[str], List[str]]:
    """The grid's rows and columns worth drawing: a type llama.cpp refused on its side refuses
    its whole row (K) or column (V) with one reason, so it is left out of a drawn grid and
    named with that reason instead (a sweep of every type offers two dozen types, half of them
    refused for a model's heads)."""
    rows, cols = list(grid.get("rows") or []), list(grid.get("columns") or [])
    cells = grid.get("cells") or {}

    def all_refused(found: List[Optional[dict]]) -> bool:
        there = [c for c in found if c]
        return bool(there) and len(there) == len(found) and all(c.get("refused") for c in there)

    keep_rows = [r for r in rows if not all_refused([(cells.get(r) or {}).get(c) for c in cols])]
    keep_cols = [c for c in cols if not all_refused([(cells.get(r) or {}).get(c) for r in rows])]
    return keep_rows, keep_cols


def reasons(entries: List[dict]) -> List[Tuple[str, List[str]]]:
    """(why, the pairs it names) per distinct reason, in first-seen order: a sweep's skipped or
    refused pairs share a handful of reasons between a hundred pairs."""
    out: Dict[str, List[str]] = {}
    for entry in entries:
        out.setdefault(str(entry.get("why")), []).append(str(entry.get("candidate")))
    return list(out.items())


def _types(label: str) -> tuple:
    parts = dict(p.split("=", 1) for p in label.split(",") if "=" in p)
    return parts.get("ctk", "?"), parts.get("ctv", "?")


def _axis_order(types: List[str], cells: Dict[str, Dict[str, dict]], side: int) -> List[str]:
    """The sweep's types, then any other type a given candidate used (rows: K, columns: V)."""
    seen = list(cells) if side == 0 else [v for row in cells.values() for v in row]
    return list(dict.fromkeys([*types, *seen]))


def _recommendation(best: str, by_label: Dict[str, dict], reference_bytes, decisions, skipped, whose: str) -> dict:
    sec = by_label[best]
    kv = kv_bytes(sec)
    smaller = [s for s in by_label.values()
               if kv is not None and kv_bytes(s) is not None and kv_bytes(s) < kv]  # type: ignore[operator]
    failed_axes: Dict[str, List[str]] = {}
    other: List[str] = []
    not_measured = 0
    for s in smaller:
        if s["candidate"] in skipped:
            not_measured += 1
            continue
        axes = (s.get("verdict") or {}).get("axes") or {}
        fails = [n for n, a in axes.items() if a.get("verdict") == V.FAIL]
        for n in fails:
            failed_axes.setdefault(n, []).append(s["candidate"])
        if not fails:
            other.append(f"{s['candidate']} {decisions.get(s['candidate']) or (s.get('verdict') or {}).get('verdict')}")
    pct = _pct(kv, reference_bytes)
    line = (f"recommended: {best} ({pct:.0f} % of {whose}), PASS on every axis" if pct is not None
            else f"recommended: {best}, PASS on every axis")
    if failed_axes:
        line += "; smaller caches FAIL on " + "; ".join(f"{n} ({_listed(c)})" for n, c in failed_axes.items())
    elif not smaller:
        line += "; no smaller cache was a candidate"
    if other:
        line += f"; not PASS: {_listed(other)}"
    if not_measured:
        # A sweep of every type skips most smaller pairs: a count, the reasons are in sweep.skipped.
        line += (f"; {not_measured} smaller pair{'s' if not_measured > 1 else ''} skipped (the procedure could no "
                 f"longer recommend {'them' if not_measured > 1 else 'it'})")
    return {"config": best, "kv_bytes_per_token": kv, "percent_of_reference": pct,
            "verdict_score": (sec.get("verdict") or {}).get("score"), "line": line,
            "smaller_fail_on": {n: c for n, c in failed_axes.items()}}


def _listed(labels: List[str], most: int = 3) -> str:
    shown = ", ".join(labels[:most])
    return shown + (f" and {len(labels) - most} more" if len(labels) > most else "")


def _within_budget(budget: dict, sections: List[dict], decisions, rec: Optional[dict], skipped) -> dict:
    """The best config within the budget: among those the family PASSed, the highest verdict
    score at most the budget's bytes (then the smaller cache). None fits: say so and name the
    smallest PASS config."""
    limit = budget.get("bytes_per_token")
    fits = [s for s in sections if decisions.get(s["candidate"]) == V.PASS and s["candidate"] not in skipped
            and kv_bytes(s) is not None and limit is not None and kv_bytes(s) <= limit]
    out = dict(budget)
    if fits:
        best = max(fits, key=lambda s: ((s.get("verdict") or {}).get("score") or 0.0, -(kv_bytes(s) or 0.0)))
        out.update({"config": best["candidate"], "kv_bytes_per_token": kv_bytes(best),
                    "line": f"within the budget of {limit:g} B/token: {best['candidate']} "
                            f"({kv_bytes(best):g} B/token), the best verdict score that PASSes"})
    else:
        out.update({"config": None,
                    "line": (f"no PASS config fits the budget of {limit:g} B/token" if limit is not None else
                             "the budget could not be turned into bytes (the reference's cache size is unknown)")
                    + (f"; the smallest PASS config is {rec['config']} ({rec['kv_bytes_per_token']:g} B/token)"
                       if rec else "; no config PASSes")})
    return out


def _required(require: str, by_label: Dict[str, dict]) -> dict:
    sec = by_label.get(require)
    verdict = (sec.get("verdict") or {}).get("verdict") if sec else None
    return {"config": require, "verdict": verdict, "passed": verdict == V.PASS}


def gate_reasons(sweep: dict) -> List[str]:
    """Why a sweep's gate fails: no recommendation, no config within the budget, or the
    required config not PASS."""
    reasons = []
    if sweep["recommendation"] is None:
        reasons.append("the sweep recommends nothing: no candidate PASSes on every axis at the family's error")
    if sweep.get("budget") and sweep["budget"].get("config") is None:
        reasons.append(sweep["budget"]["line"])
    req = sweep.get("require")
    if req and not req["passed"]:
        reasons.append(f"--refract-require={req['config']}: its verdict is {req['verdict'] or 'missing'}, not PASS")
    return reasons
