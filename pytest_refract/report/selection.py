"""What part of the audit a candidate's verdict rests on: per axis, the items selected (after
-k / -m / --deselect) out of the axis's pool, and whether that is the whole default audit.

A verdict on part of the audit is a subset verdict and says so everywhere it is shown; a
candidate with no measured item has no verdict to pass on. Pure functions of the report's facts."""

from __future__ import annotations

from typing import Dict, List, Optional


def candidate_selection(facts, role: str, results: Dict[str, dict], failed: Dict[str, list]) -> dict:
    """{"axes": {axis: {"selected", "pool", "measured"}}, "not_selected": [default axes that did
    not run], "subset": bool, "text": one line, "max_items": the cap or None}.

    Where this process saw no selection (an xdist controller collects nothing), the selection is
    what reached a result: items that ran, failed, or were skipped by a decided axis."""
    s = facts.settings
    pool = facts.pool.get(role, {})
    known_selection = role in facts.selected
    chosen = facts.selected.get(role, {})
    sequential = facts.sequential.get(role, {})
    axes: Dict[str, dict] = {}
    asked = tuple(getattr(s, "axes", ()) or ())
    for name in dict.fromkeys([*asked, *pool, *results]):
        measured = len(results.get(name) or {})
        reached = measured + len(failed.get(name) or []) + len((sequential.get(name) or {}).get("skipped") or [])
        selected = chosen.get(name, 0) if known_selection else reached
        # A record without pools (built by hand, not by a session) has nothing to compare with.
        axes[name] = {"selected": selected, "pool": pool.get(name, 0) if role in facts.pool else selected,
                      "measured": measured}
    default_axes = tuple(getattr(facts, "default_axes", ()) or ())
    not_selected = [a for a in dict.fromkeys([*default_axes, *asked]) if not (axes.get(a) or {}).get("selected")]
    partial = [a for a, c in axes.items() if 0 < c["selected"] < c["pool"]]
    subset = bool(not_selected or partial)
    parts = [f"{a} {c['selected']} of {c['pool']}" for a, c in axes.items() if c["selected"]]
    text = ", ".join(parts) or "no item"
    if not_selected:
        text += f"; not run: {', '.join(not_selected)}"
    max_items = getattr(s, "max_items", None)
    if max_items is not None:
        text += f" (pools capped by --refract-max-items={max_items})"
    return {"axes": axes, "not_selected": not_selected, "subset": subset,
            "max_items": max_items, "text": ("subset: " if subset else "whole audit: ") + text}


def measured_nothing(selection: dict, custom_gates: dict) -> bool:
    """True when the candidate has no measured item and no custom measurement to gate."""
    return not custom_gates and not any(c["measured"] for c in selection["axes"].values())


def selection_reasons(selection: dict, custom_gates: dict, candidate: str, require_complete: bool) -> List[str]:
    """What the selection alone fails: nothing measured (never a pass), and with
    --refract-require-complete anything short of the whole default audit."""
    reasons: List[str] = []
    if selection["axes"] and measured_nothing(selection, custom_gates):
        reasons.append(f"no item of {candidate} was measured ({selection['text']}); a candidate with no measured item "
                       "never passes")
    elif require_complete and (selection["subset"] or selection["max_items"] is not None):
        reasons.append(f"--refract-require-complete: the audit ran only part of the default audit "
                       f"({selection['text']}); run every default axis with no item deselected")
    return reasons


def subset_label(selection: Optional[dict]) -> str:
    """"" for the whole audit, else " (subset verdict: ...)" to follow a verdict."""
    if not selection or not selection.get("subset"):
        return ""
    return f" (subset verdict: {selection['text'][len('subset: '):]})"
