"""The sensitivity control in the report: its section (scored like a candidate, with
intervals), each candidate item beside the control's same item, and what it says about a
candidate. (The verdict against it is in verdicts.py.)

Pure functions of the report's data (see report.build_report); the statistics themselves
are in scoring/calibration.py. Axis-specific wording comes from the axis objects, never from here.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..axes import known
from ..scoring import calibration
from ..scoring.metrics import band_for, harmonic_mean
from .sections import build_axes, composite_of


def control_section(facts, results, failed, complete: bool, registry) -> Optional[dict]:
    """The sensitivity control's axes (with intervals), measured like a candidate; None
    without a control."""
    role = facts.control_role
    if role is None:
        return None
    control_failed = {axis: list(units) for axis, units in failed.get(role, {}).items()}
    # A unit a candidate ran but the control has no result for (its item crashed before the
    # control's result was handed over) would leave the control scored on fewer items than
    # the candidates: it counts as a failed control item instead.
    for cand in facts.candidate_roles:
        for axis, units in list(results.get(cand, {}).items()) + list(failed.get(cand, {}).items()):
            have = results.get(role, {}).get(axis, {})
            for unit in units:
                if unit not in have and unit not in control_failed.setdefault(axis, []):
                    control_failed[axis].append(unit)
    axes = build_axes(results.get(role, {}), control_failed, registry)
    if not complete:
        for section in axes.values():
            section.update({"score": None, "band": None, "status": "incomplete"})
    reps, sizes = [], []
    by_name = dict(known(axes, registry))
    for name, section in axes.items():
        axis = by_name[name]
        unc = (calibration.axis_uncertainty(axis, axis.section_items(section), facts.settings.seed)
               if section.get("score") is not None else None)
        section["ci95"] = unc["ci95"] if unc else None
        if section.get("status") != "n/a":
            reps.append(unc["replicates"] if unc else None)
            sizes.append(unc["n_items"] if unc else 0)
    composite = composite_of(axes) if complete else None
    return {"config": facts.labels[role], "note": facts.settings.sensitivity_note, "axes": axes,
            "composite": composite, "band": band_for(composite),
            "composite_ci95": calibration.composite_interval(reps, sizes, composite) if composite is not None else None,
            "cached": bool(results.get(role)) and all(r.get("control_cached") for per_axis in results[role].values()
                                                      for r in per_axis.values())}


def intervals(axes: Dict[str, dict], gates: Dict[str, float], seed: int, registry) -> dict:
    """The raw scores' 95 % intervals: each axis's (written into its section as "ci95") and the
    raw composite's ({"composite_ci95": ...}). Reference figures beside the verdict; the
    verdict's own intervals are of the damage multiple (verdicts.py)."""
    reps, sizes = [], []
    # In the sections' own order: the composite's replicates pair axis by axis.
    by_name = dict(known(axes, registry))
    for name, section in axes.items():
        axis = by_name[name]
        if section.get("score") is None:
            section["ci95"] = None
            continue
        unc = calibration.axis_uncertainty(axis, axis.section_items(section), seed)
        section["ci95"] = unc["ci95"]
        reps.append(unc["replicates"])
        sizes.append(unc["n_items"])
    scored = [n for n, a in axes.items() if a.get("status") != "n/a"]
    if not scored or not all(axes[n].get("score") is not None for n in scored) or gates:
        # Custom gates have no items to resample: no interval for a composite that holds them.
        return {"composite_ci95": None}
    raw_composite = harmonic_mean([axes[n]["score"] for n in scored])
    return {"composite_ci95": calibration.composite_interval(reps, sizes, raw_composite)}


def pair_items_with_control(axes: Dict[str, dict], control: Optional[dict], registry) -> None:
    """Each candidate item's damage beside the control's on the same item (written into the item
    as "vs_control": the two damages and the axis's sentence for them), so a per-item row says
    how this item compares with the yardstick instead of showing a raw band."""
    if control is None:
        return
    for name, axis in known(axes, registry):
        ctrl = (control.get("axes") or {}).get(name)
        if not ctrl:
            continue
        items = axis.section_items(axes[name])
        ids, table = axis.damage_table(items)
        ctrl_ids, ctrl_table = axis.damage_table(axis.section_items(ctrl))
        ctrl_rows = {i: ctrl_table[k] for k, i in enumerate(ctrl_ids)}
        rows = {i: table[k] for k, i in enumerate(ids)}
        for item in items:
            key = str(item.get("id"))
            if key not in rows or key not in ctrl_rows:
                continue
            row, ctrl_row = rows[key], ctrl_rows[key]
            item["vs_control"] = {"damage": _own(row), "control_damage": _own(ctrl_row),
                                  "text": axis.item_damage_text(row, ctrl_row)}


def _own(row) -> float:
    """One item's damage: its numerator over its exposure."""
    return float(row[0]) / float(row[1]) if float(row[1]) > 0 else 0.0


def control_diagnosis(axes: Dict[str, dict], control: Optional[dict], registry) -> List[str]:
    """What each axis adds about the candidate beside the control (the trajectory axis: near-tie
    flips or confident changes)."""
    if control is None:
        return []
    out: List[str] = []
    for name, axis in known(axes, registry):
        section, ctrl = axes[name], control["axes"].get(name)
        if section and ctrl:
            out += axis.control_diagnosis(section, ctrl)
    return out


def sensitivity_json(facts, control: Optional[dict], registry) -> Optional[dict]:
    if control is None:
        return {"config": None, "note": facts.settings.sensitivity_note, "axes": {}, "composite": None}
    axes = {}
    by_name = dict(known(control["axes"], registry))
    for name, a in control["axes"].items():
        summary = {k: v for k, v in a.items() if not isinstance(v, (list, dict)) or k in ("ci95",)}
        axes[name] = dict(summary, items=[_slim(i) for i in by_name[name].section_items(a)])
    return {"config": control["config"], "note": control["note"], "role": "control", "ranked": False,
            "cached": control["cached"], "axes": axes, "composite": control["composite"], "band": control["band"],
            "composite_ci95": control["composite_ci95"],
            # What really ran for the control's config (audit.runner.Runner.ran).
            "ran": (getattr(facts, "ran", None) or {}).get(facts.control_role)}


def _slim(item: dict) -> dict:
    """A control item without what the candidates' items already show (texts, token ids)."""
    drop = ("ref_tokens", "cand_tokens", "ref_text", "cand_text", "divergence", "prompt", "answers")
    return {k: v for k, v in item.items() if k not in drop and not k.startswith("_")}
