"""The audit's result as data: axis sections, composite, diagnosis, and the strict-JSON file.

Strict means ``json.loads(..., parse_constant=reject)`` accepts it: no NaN or Infinity ever;
anything not measured is ``null``. Files are written to a temp file and renamed, so a crash
mid-write leaves the previous report intact.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from . import __version__, files
from .axes import AXES, ORDER
from . import calibration
from .axes.trajectory import NEAR_TIE_MARGIN
from .scoring import band_for, harmonic_mean, is_score

SCHEMA = "pytest-refract.report.v1"
FLOOR_WARN_BELOW = 99.5
PPL_HIDES_MIN_KLD = 0.01  # nats; below this a lower candidate PPL is not worth a warning


def _clean(value):
    """Replace non-finite floats by None (and numpy scalars by Python ones) recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _clean(value.item())
    return value


def dumps(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, allow_nan=False, ensure_ascii=False)


def write_atomic(path, text: str) -> Path:
    return files.write_atomic(path, text)


def build_axes(results: Dict[str, Dict[str, dict]], failed: Dict[str, List[str]]) -> Dict[str, dict]:
    """Axis sections from per-item results. An axis with any item that failed to measure has
    no score: scoring the rest would claim a number for what was not measured."""
    sections = {}
    for name in ORDER:
        items = results.get(name) or {}
        errors = failed.get(name) or []
        if not items and not errors:
            continue
        ordered = [items[k] for k in sorted(items)]
        if errors or not ordered:
            sections[name] = {
                "score": None,
                "band": None,
                "error": f"{len(errors)} item(s) failed to measure: {', '.join(sorted(errors)[:5])}",
                "items": [{k: v for k, v in r.items() if k != "_raw"} for r in ordered],
            }
            continue
        section = AXES[name].aggregate(ordered)
        repeats = [r.get("_repeats") for r in ordered]
        if repeats and all(repeats):
            scores = [section["score"]] + [
                AXES[name].aggregate([r["_repeats"][k] for r in ordered])["score"] for k in range(len(repeats[0]))
            ]
            section["repeat"] = repeat_stats(scores)
        if "items" in section:
            section["items"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in section["items"]]
        if "cells" in section:
            section["cells"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in section["cells"]]
        compute: Dict[str, Dict[str, int]] = {}
        for r in ordered:
            for role, counts in r.get("compute", {}).items():
                into = compute.setdefault(role, {})
                for key, value in counts.items():
                    into[key] = into.get(key, 0) + value
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


HEALTHY_MAX_STDEV = 1.0
NOISY_MAX_STDEV = 3.0


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
    floors = [a.get("floor_score") for a in axes.values() if a.get("status") != "n/a"]
    if not floors or not all(is_score(f) for f in floors):
        return None
    return harmonic_mean(floors)


def diagnose(axes: Dict[str, dict], self_reference: bool = False) -> List[str]:
    """Plain-English reading of the axis pattern, most important first."""
    out: List[str] = []
    if self_reference:
        out.append("Self-reference: the candidate configuration equals the reference, so this run measures the noise floor.")
    for name, a in axes.items():
        if a.get("status") == "n/a":
            out.append(f"{name}: nothing to score (the reference itself never succeeds there); left out of the composite.")
    # An interrupted run's axes are "incomplete": their items did not run, nothing failed.
    broken = [n for n, a in axes.items() if a.get("score") is None and a.get("status") not in ("n/a", "incomplete")]
    if broken:
        out.append(f"No score for {', '.join(broken)}: some items failed to measure (see the failed tests).")
    scored = {n: a for n, a in axes.items() if a.get("score") is not None}
    if not scored:
        return out
    low = {n for n, a in scored.items() if a["score"] < 80}
    if scored and all(a["score"] < 60 for a in scored.values()):
        out.append("Catastrophic: every axis is in the FAIL band; the candidate cache does not preserve the model's behaviour.")
    traj, kld = scored.get("trajectory"), scored.get("kld")
    if kld is not None:
        if kld["score"] < 80:
            out.append(
                f"Short-context drift: next-token distributions move (mean KLD {kld['mean_kld']:.4f} nats, "
                f"same top token {kld['same_top_p_pct']:.1f}% of positions)."
            )
        # Only where the drift is material: at tiny KLD, PPL moving either way is noise.
        if kld["mean_kld"] >= PPL_HIDES_MIN_KLD and kld["ppl_cand"] <= kld["ppl_ref"]:
            out.append(
                f"Perplexity hides the damage: PPL {kld['ppl_cand']:.3f} vs {kld['ppl_ref']:.3f} for the reference, "
                f"yet mean KLD is {kld['mean_kld']:.4f} nats."
            )
    if traj is not None and traj["score"] < 80:
        md = traj.get("median_first_divergence")
        where = f" after a median of {md:g} tokens" if md is not None else ""
        if kld is not None and kld["score"] >= 90:
            out.append(
                f"Greedy decodes diverge{where} although distributions stay close: near-tie tokens flip, so "
                "generated text changes wording even where the model's beliefs barely move."
            )
        else:
            out.append(f"Generated text drifts: greedy continuations leave the reference's path{where}.")
    rniah, plad = scored.get("rniah"), scored.get("plad")
    if rniah is not None and rniah["score"] < 80:
        lost = [f"{c['length']} tokens at {c['position']:.0%}" for c in rniah.get("cells", [])
                if c.get("degradation") and c["degradation"] > 0]
        out.append(
            "Long-context retrieval loss: the candidate misses a needle the reference finds"
            + (f" ({', '.join(lost[:6])})" if lost else "") + "."
        )
    if rniah is not None and rniah.get("confidence") == "low":
        out.append(
            f"R-NIAH confidence is low: the reference retrieves the needle in only {100 * rniah['ref_hit_rate']:.0f}% "
            "of trials, so the composite rests partly on a low-confidence axis."
        )
    if plad is not None and plad["score"] < 80:
        worst = sorted(((v, k) for k, v in plad.get("per_perturbation", {}).items() if v is not None))
        named = f", most under {worst[0][1]} perturbations ({worst[0][0]:.1f})" if worst else ""
        out.append(f"Brittleness: small prompt changes move the candidate's output more than the reference's{named}.")
    if not low and all(a["score"] >= 90 for a in scored.values()):
        out.append("All clear: the candidate cache tracks the f16 reference on every axis that ran.")
    elif not low:
        out.append("Minor drift: every axis that ran is PASS or better.")
    return out


def _candidate_section(audit, role: str, results, failed, gates, complete: bool,
                       control: Optional[dict] = None) -> dict:
    """Everything about one candidate: axes, composite, floor, diagnosis, its own gate."""
    s = audit.settings
    axes = build_axes(results, failed)
    composite = composite_of(axes, gates) if complete else None
    if not complete:
        # What was measured stays (items); no axis claims a score for what was not.
        _mark_not_run(audit, role, axes, results, failed)
    calibrated = _calibrate(axes, control, gates, s.seed) if complete else {}
    floor = floor_of(axes) if s.floor else None
    self_reference = audit.self_reference[role]
    if audit.inputs.corpus is not None and "kld" in axes:
        axes["kld"]["corpus"] = {"name": audit.inputs.corpus.name, "sha256": audit.inputs.corpus.sha256, "bytes": audit.inputs.corpus.bytes,
                                 "replaced_invalid_utf8": audit.inputs.corpus.replaced_invalid_utf8}
    section = {
        "candidate": audit.labels[role],
        "self_reference": self_reference,
        "composite": composite,
        "band": band_for(composite),
        "composite_ci95": calibrated.get("composite_ci95"),
        "calibrated_composite": calibrated.get("calibrated_composite"),
        "calibrated_band": band_for(calibrated.get("calibrated_composite")),
        "calibrated_composite_ci95": calibrated.get("calibrated_composite_ci95"),
        "diagnosis": diagnose(axes, self_reference) + calibration_diagnosis(axes, control),
        "axes": axes,
        "floor": floor,
        "custom_gates": gates,
        "kv_cache": audit.kv_cache_facts(role),
        **_context_facts(audit, role),
    }
    diagnosis = section["diagnosis"]
    repeats = [a.get("repeat") for a in axes.values()]
    if s.repeat > 1 and repeats and all(repeats) and complete:
        per_run = [composite_of({n: {"score": a["repeat"]["scores"][k]} for n, a in axes.items()
                                 if a.get("status") != "n/a"}, gates)
                   for k in range(s.repeat)]
        section["repeat"] = repeat_stats(per_run)
        for name, a in axes.items():
            r = a["repeat"]
            if r["verdict"] and r["verdict"] != "HEALTHY":
                diagnosis.insert(0, f"WARNING: {name} is {r['verdict']} over {r['n']} repeats "
                                    f"(stdev {r['stdev']:.2f}): single runs are not trustworthy.")
    for source in {id(x): x for x in (audit.inputs.corpus, audit.inputs.haystack_source) if x is not None}.values():
        if source.replaced_invalid_utf8:
            diagnosis.append(f"{source.name} is not valid UTF-8: undecodable bytes were replaced (U+FFFD) before tokenizing.")
    if not complete:
        diagnosis.insert(0, "INCOMPLETE: the run was interrupted; items measured so far are listed, no score is claimed. "
                            + _ran_text(axes))
    if floor is not None and floor < FLOOR_WARN_BELOW:
        diagnosis.insert(0, f"WARNING: the noise floor (reference vs reference) is {floor:.2f}, below "
                            f"{FLOOR_WARN_BELOW}: deltas are not trustworthy.")
    elif floor is not None:
        diagnosis.append(f"Noise floor (reference vs reference): {floor:.2f}.")
    section["gate"] = _gate(audit, section, complete)
    return section


def _mark_not_run(audit, role: str, axes: Dict[str, dict], results, failed) -> None:
    """An interrupted run: every axis is unscored and says how many of its items ran; the
    items that did not run are "not run", never "failed to measure"."""
    selected = getattr(audit, "selected", {}) or {}
    for name in audit.settings.axes:
        wanted = selected.get((role, name))
        if name not in axes and wanted:
            axes[name] = {"score": None, "band": None, "items": []}
        if name not in axes:
            continue
        section = axes[name]
        ran = len(results.get(name) or {}) + len(failed.get(name) or [])
        section.update({"score": None, "band": None, "status": "incomplete", "n_run": ran,
                        "n_not_run": max(0, wanted - ran) if wanted is not None else None})
        failures = len(failed.get(name) or [])
        failed_text = f" ({failures} of them failed to measure)" if failures else ""
        if wanted is not None and ran >= wanted:
            section["error"] = f"all {ran} item(s) ran{failed_text}, but the run was interrupted: no score is claimed"
        else:
            shown = f"{ran} of {wanted}" if wanted is not None else f"{ran}"
            section["error"] = (f"not all items ran: {shown} item(s) ran before the interruption{failed_text}; "
                                "the rest were not run")


def _ran_text(axes: Dict[str, dict]) -> str:
    ran = sum(a.get("n_run") or 0 for a in axes.values())
    missing = [a.get("n_not_run") for a in axes.values()]
    if missing and all(m is not None for m in missing):
        return f"{ran} of {ran + sum(missing)} selected items ran; {sum(missing)} were not run."
    return f"{ran} items ran."


def _context_facts(audit, role: str) -> dict:
    """What llama.cpp logged when it created the role's context: the attention rotation it
    applied ({"k": bool, "v": bool}, null where the build has none), the cache it allocated,
    and every LLAMA_*/GGML_* variable in effect then."""
    if not hasattr(audit, "kv_facts"):
        return {}
    return {"rotation": audit.rotation(role), "kv_allocation": audit.kv_allocation(role),
            "context_env": audit.context_env.get(role, {})}


def _gate(audit, section: dict, complete: bool) -> dict:
    s = audit.settings
    composite, axes = section["composite"], section["axes"]
    basis = s.gate_basis
    gated = section["calibrated_composite"] if basis == "calibrated" else composite
    name = "calibrated composite" if basis == "calibrated" else "composite"
    reasons = []
    if not complete:
        reasons.append("the run was interrupted; an incomplete audit never passes the gate")
    elif composite is None and not axes and not section["custom_gates"]:
        pass  # only fixture measurements without a gate: nothing to gate on
    elif composite is None:
        broken = [n for n, a in axes.items() if a.get("score") is None and a.get("status") != "n/a"]
        reasons.append(f"no composite: {', '.join(broken)} could not be scored (items failed to measure)")
    elif gated is None:
        reasons.append("no calibrated composite: the sensitivity control has no score on every axis that ran (its "
                       "items failed or were deselected); the gate never substitutes the raw composite silently: "
                       "select the control's items or use --refract-gate=raw")
    elif gated < s.fail_under:
        reasons.append(f"{name} {gated:.2f} is below --refract-fail-under={s.fail_under_text} ({s.fail_under:g})")
    if audit.baseline is not None and complete:
        from .baseline import baseline_for, drops

        base = baseline_for(audit.baseline, section["candidate"])
        if base is not None:
            reasons += drops(base, axes, composite, s.max_drop)
    return {"passed": not reasons, "threshold": s.fail_under, "basis": basis, "reasons": reasons}


def build_report(
    *,
    audit,
    results: Dict[str, Dict[str, Dict[str, dict]]],
    failed: Dict[str, Dict[str, List[str]]],
    custom: Optional[List[dict]] = None,
    invocation_args: List[str],
    complete: bool,
    llama_build: dict,
) -> dict:
    """The whole report. Top-level ``candidate``/``axes``/``composite``/``band``/``diagnosis``/
    ``floor`` describe the first candidate (the only one outside a matrix); ``candidates`` has
    one section per candidate and ``ranking`` orders them; ``gate`` passes only if every
    candidate passes."""
    s = audit.settings
    custom = sorted(custom or [], key=lambda e: e["test"])
    control = _control_section(audit, results, failed, complete)
    sections = []
    for role in audit.candidate_roles:
        label = audit.labels[role]
        gates = custom_gates([e for e in custom if e.get("candidate", label) == label])
        sections.append(_candidate_section(audit, role, results.get(role, {}), failed.get(role, {}), gates, complete,
                                           control))
    first = sections[0]
    multi = len(sections) > 1
    reasons = [(f"{sec['candidate']}: " if multi else "") + r for sec in sections for r in sec["gate"]["reasons"]]
    settings = s.as_dict()
    if audit.inputs.chunks_note:
        settings["chunks_note"] = audit.inputs.chunks_note
    if getattr(audit, "gpu_note", None):
        settings["gpu_layers_note"] = audit.gpu_note  # settings.gpu_layers is what ran: 0
    if audit.inputs.rniah_lengths:
        settings["rniah"].update({"lengths": list(audit.inputs.rniah_lengths), "effective_answer_tokens": audit.inputs.rniah_answer_tokens,
                                  "thinking_template": audit.inputs.rniah_thinking})
    # Ranked by what the gate reads: the calibrated composite by default.
    rank_key = "calibrated_composite" if s.gate_basis == "calibrated" else "composite"
    ranked = sorted(sections, key=lambda sec: (sec[rank_key] is None, -(sec[rank_key] or 0.0),
                                               sec["composite"] is None, -(sec["composite"] or 0.0)))
    all_items = [r for per_axis in results.values() for items in per_axis.values() for r in items.values()]
    report = {
        "schema": SCHEMA,
        "plugin_version": __version__,
        "llama_cpp_python_version": audit.engine_mod.library_version(),
        "llama_cpp_build": llama_build,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
        "model": audit.model_facts(),
        "reference": s.reference.label(),
        "reference_kv_bytes_per_token": audit.kv_bytes_per_token("reference"),
        **({"reference_rotation": audit.rotation("reference"), "reference_kv_allocation": audit.kv_allocation("reference"),
            "rotation": first.get("rotation"), "kv_allocation": first.get("kv_allocation"),
            "context_env": first.get("context_env")} if hasattr(audit, "kv_facts") else {}),
        # The most KV-cache memory this process held at once (under xdist: the controller's,
        # which measures nothing; see each worker's own run).
        "kv_cache_bytes_peak": getattr(audit, "kv_bytes_peak", 0) or None,
        "candidate": first["candidate"],
        "self_reference": first["self_reference"],
        "settings": settings,
        "repro_command": "pytest " + " ".join(shlex.quote(a) for a in _portable_args(invocation_args)),
        "composite": first["composite"],
        "band": first["band"],
        "composite_ci95": first["composite_ci95"],
        "calibrated_composite": first["calibrated_composite"],
        "calibrated_band": first["calibrated_band"],
        "calibrated_composite_ci95": first["calibrated_composite_ci95"],
        "gate": {"passed": not reasons, "threshold": s.fail_under, "basis": s.gate_basis, "reasons": reasons},
        "sensitivity": _sensitivity_json(audit, control),
        "diagnosis": first["diagnosis"],
        "axes": first["axes"],
        "custom": {"gates": first["custom_gates"], "measurements": custom},
        "floor": first["floor"],
        "candidates": sections,
        "ranking": [{"candidate": sec["candidate"], "composite": sec["composite"], "band": sec["band"],
                     "composite_ci95": sec["composite_ci95"], "calibrated_composite": sec["calibrated_composite"],
                     "calibrated_band": sec["calibrated_band"],
                     "calibrated_composite_ci95": sec["calibrated_composite_ci95"],
                     "passed": sec["gate"]["passed"],
                     "kv_vs_reference": (sec["kv_cache"] or {}).get("vs_reference"),
                     "rotation": sec.get("rotation"),
                     "axes": {n: a.get("score") for n, a in sec["axes"].items()}} for sec in ranked],
        "reference_cache": {
            "enabled": audit.reference.cache.enabled,
            "read": audit.reference.read,
            "hits": sum(r.get("reference_cache", {}).get("hits", 0) for r in all_items),
            "misses": sum(r.get("reference_cache", {}).get("misses", 0) for r in all_items),
            "format": "16-bit log-probs per position (llama-perplexity --kl-divergence-base layout)",
        },
    }
    if "repeat" in first:
        report["repeat"] = first["repeat"]
    for sec in sections:
        sec.pop("custom_gates", None)
    if not multi:
        # One candidate: its full result is the top level; no second copy.
        del report["candidates"]
    return report


# --------------------------------------------------------------------------- calibration


def _control_section(audit, results, failed, complete: bool) -> Optional[dict]:
    """The sensitivity control's axes (with intervals), measured like a candidate; None
    without a control."""
    role = audit.control_role
    if role is None:
        return None
    control_failed = {axis: list(units) for axis, units in failed.get(role, {}).items()}
    # A unit a candidate ran but the control has no result for (its item crashed before the
    # control's result was handed over) would leave the control scored on fewer items than
    # the candidates: it counts as a failed control item instead.
    for cand in audit.candidate_roles:
        for axis, units in list(results.get(cand, {}).items()) + list(failed.get(cand, {}).items()):
            have = results.get(role, {}).get(axis, {})
            for unit in units:
                if unit not in have and unit not in control_failed.setdefault(axis, []):
                    control_failed[axis].append(unit)
    axes = build_axes(results.get(role, {}), control_failed)
    if not complete:
        for section in axes.values():
            section.update({"score": None, "band": None, "status": "incomplete"})
    reps, sizes = [], []
    for name, section in axes.items():
        unc = calibration.axis_uncertainty(name, _items(section), audit.settings.seed) if section.get("score") is not None else None
        section["ci95"] = unc["ci95"] if unc else None
        if section.get("status") != "n/a":
            reps.append(unc["replicates"] if unc else None)
            sizes.append(unc["n_items"] if unc else 0)
    composite = composite_of(axes) if complete else None
    return {"config": audit.labels[role], "note": audit.settings.sensitivity_note, "axes": axes,
            "composite": composite, "band": band_for(composite),
            "composite_ci95": calibration.composite_interval(reps, sizes, composite) if composite is not None else None,
            "cached": bool(results.get(role)) and all(r.get("control_cached") for per_axis in results[role].values()
                                                      for r in per_axis.values())}


def _items(section: dict) -> List[dict]:
    return section.get("items") or section.get("cells") or []


def _calibrate(axes: Dict[str, dict], control: Optional[dict], gates: Dict[str, float], seed: int) -> dict:
    """Intervals on every axis score and the composite; with a control, each axis's
    calibrated score (paired with the control by item) and the calibrated composite."""
    raw_reps, cal_reps, sizes, cal_scores = [], [], [], []
    for name, section in axes.items():
        if section.get("score") is None:
            section.update({"ci95": None, "calibrated_score": None})
            continue
        unc = calibration.axis_uncertainty(name, _items(section), seed)
        section["ci95"] = unc["ci95"]
        raw_reps.append(unc["replicates"])
        sizes.append(unc["n_items"])
        ctrl_axis = (control or {}).get("axes", {}).get(name)
        if ctrl_axis is None or ctrl_axis.get("score") is None:
            section["calibrated_score"] = None
            cal_reps.append(None)
            cal_scores.append(None)
            continue
        cal = calibration.calibrate_axis(name, _items(section), _items(ctrl_axis), seed)
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


def calibration_diagnosis(axes: Dict[str, dict], control: Optional[dict]) -> List[str]:
    """What the control says about this candidate's drift, axis by axis, and whether its
    greedy divergences are near-tie flips (as the control's are) or confident changes."""
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
    if same:
        out.append(f"Within the model's rounding sensitivity on {', '.join(same)}: statistically indistinguishable from "
                   f"the control ({control_name}).")
    if worse:
        out.append(f"Beyond the control ({control_name}): " + "; ".join(worse) + ".")
    traj, ctrl_traj = axes.get("trajectory"), control["axes"].get("trajectory")
    if traj and ctrl_traj and traj.get("n_divergences"):
        near, total = traj.get("n_near_tie_divergences", 0), traj["n_divergences"]
        c_near, c_total = ctrl_traj.get("n_near_tie_divergences", 0), ctrl_traj.get("n_divergences", 0)
        control_text = f"control: {c_near} of {c_total}" if c_total else "the control never diverges"
        top1 = traj.get("teacher_forced_top1_pct")
        c_top1 = ctrl_traj.get("teacher_forced_top1_pct")
        along = (f"; teacher-forced top-1 agreement {top1:.1f}% (control {c_top1:.1f}%)"
                 if top1 is not None and c_top1 is not None else "")
        if total - near <= c_total - c_near:  # no more confident changes than the control makes
            out.append(f"Greedy divergences are near-tie flips {'only' if near == total else 'mostly'} ({near} of "
                       f"{total} at a reference top-2 margin "
                       f"below {NEAR_TIE_MARGIN:g}; {control_text}), like the control's{along}.")
        else:
            out.append(f"Changes confident tokens: {total - near} of {total} greedy divergences happen where the "
                       f"reference's top-2 margin is at least {NEAR_TIE_MARGIN:g} ({control_text}){along}.")
    return out


def _sensitivity_json(audit, control: Optional[dict]) -> Optional[dict]:
    if control is None:
        return {"config": None, "note": audit.settings.sensitivity_note, "axes": {}, "composite": None}
    axes = {}
    for name, a in control["axes"].items():
        summary = {k: v for k, v in a.items() if not isinstance(v, (list, dict)) or k in ("ci95",)}
        axes[name] = dict(summary, items=[_slim(i) for i in _items(a)])
    return {"config": control["config"], "note": control["note"], "role": "control", "ranked": False,
            "cached": control["cached"], "axes": axes, "composite": control["composite"], "band": control["band"],
            "composite_ci95": control["composite_ci95"]}


def _slim(item: dict) -> dict:
    """A control item without what the candidates' items already show (texts, token ids)."""
    drop = ("ref_tokens", "cand_tokens", "ref_text", "cand_text", "divergence", "prompt", "answers")
    return {k: v for k, v in item.items() if k not in drop and not k.startswith("_")}


def _portable_args(args: List[str]) -> List[str]:
    """No home directories in a report that may be shared: show ~ instead."""
    home = str(Path.home())
    return [a.replace(home, "~") if home and home != "/" else a for a in args]
