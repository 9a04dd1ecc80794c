"""The sensitivity control in the report: its section (scored like a candidate, with
intervals), each candidate's calibration against it, and what it says about a candidate.

Pure functions of the report's data (see report.build_report); the statistics themselves
are in calibration.py. Axis-specific wording comes from the axis objects, never from here.
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


def calibrate(axes: Dict[str, dict], control: Optional[dict], gates: Dict[str, float], seed: int, registry) -> dict:
    """Intervals on every axis score and the composite; with a control, each axis's
    calibrated score (paired with the control by item) and the calibrated composite."""
    raw_reps, cal_reps, sizes, cal_scores = [], [], [], []
    # In the sections' own order: the composite's replicates pair axis by axis.
    by_name = dict(known(axes, registry))
    for name, section in axes.items():
        axis = by_name[name]
        if section.get("score") is None:
            section.update({"ci95": None, "calibrated_score": None})
            continue
        unc = calibration.axis_uncertainty(axis, axis.section_items(section), seed)
        section["ci95"] = unc["ci95"]
        raw_reps.append(unc["replicates"])
        sizes.append(unc["n_items"])
        ctrl_axis = (control or {}).get("axes", {}).get(name)
        if ctrl_axis is None or ctrl_axis.get("score") is None:
            section["calibrated_score"] = None
            cal_reps.append(None)
            cal_scores.append(None)
            continue
        cal = calibration.calibrate_axis(axis, axis.section_items(section), axis.section_items(ctrl_axis), seed)
        reps = cal.pop("replicates")
        section["calibrated_score"] = cal["calibrated_score"]
        section["calibration"] = dict(cal, control_score=ctrl_axis["score"], control_ci95=ctrl_axis.get("ci95"))
        cal_reps.append(reps)
        cal_scores.append(cal["calibrated_score"])
    out: Dict[str, object] = {}
    scored = [n for n, a in axes.items() if a.get("status") != "n/a"]
    if not axes and gates:
        # Only the user's own gates (no axis ran): nothing for the control to calibrate.
        out["calibrated_composite"] = harmonic_mean(list(gates.values()))
    elif axes and all(axes[n].get("score") is not None for n in scored):
        gate_values = list(gates.values())
        # Custom gates have no control and no items: they enter both composites as they are,
        # and an interval is only given without them.
        raw_composite = harmonic_mean([axes[n]["score"] for n in scored])
        out["composite_ci95"] = (calibration.composite_interval(raw_reps, sizes, raw_composite)
                                 if not gate_values and scored else None)
        if control is not None and cal_scores and all(c is not None for c in cal_scores):
            out["calibrated_composite"] = harmonic_mean(cal_scores + gate_values)
            out["calibrated_composite_ci95"] = (calibration.composite_interval(cal_reps, sizes, out["calibrated_composite"])
                                                if not gate_values else None)
    return out


def calibration_diagnosis(axes: Dict[str, dict], control: Optional[dict], registry,
                          retention_sentences: bool = True) -> List[str]:
    """What the control says about this candidate's drift, axis by axis, then what each axis
    adds about itself (the trajectory axis: near-tie flips or confident changes). Where the
    verdict leads the report, ``retention_sentences=False`` leaves out the older retention
    reading ("indistinguishable", "calibrated ..."), which could contradict it."""
    if control is None:
        return []
    out: List[str] = []
    same, worse = [], []
    for name, a in axes.items():
        cal = a.get("calibration")
        if not cal:
            continue
        if cal.get("indistinguishable"):
            same.append(name)
        elif cal.get("indistinguishable") is False:
            lo, hi = cal["excess_damage_ci95"]
            worse.append(f"{name} {a['score']:.2f} vs control {cal['control_score']:.2f} (excess damage {lo:.2f} to "
                         f"{hi:.2f} points, calibrated {cal['calibrated_score']:.2f})")
    control_name = control["config"]
    if not retention_sentences:
        same, worse = [], []
    if same:
        out.append(f"Within the model's rounding sensitivity on {', '.join(same)}: statistically indistinguishable from "
                   f"the control ({control_name}).")
    if worse:
        out.append(f"Beyond the control ({control_name}): " + "; ".join(worse) + ".")
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
