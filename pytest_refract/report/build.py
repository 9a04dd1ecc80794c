"""The audit's result as data: ``build_report`` turns the measured results and the run's facts
(plain data, see record.py) into the report dict, gate included, and touches nothing else: no
llama.cpp, no session, no clock but the timestamp. The JSON file, the terminal summary, compare
and the HTML page read only that dict. Axis-specific wording comes from the axis objects.
"""

from __future__ import annotations

import copy
import dataclasses
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .. import __version__
from ..axes import DIAGNOSIS_ORDER, known
from ..record import RunRecord
from ..scoring.metrics import BAND_FLOOR, band_for
from .context import context_evidence
from .jsonio import SCHEMA
from .ran import NO_OP, no_op_reason
from .sections import build_axes, composite_of, custom_gates, floor_of, repeat_stats
from .selection import candidate_selection, selection_reasons
from .sensitivity import (
    control_diagnosis,
    control_section,
    intervals,
    pair_items_with_control,
    sensitivity_json,
)
from .verdicts import UNDECIDED_PASS_NOTE, candidate_verdict, family_recommendation, gate_reasons, pareto, rank

FLOOR_WARN_BELOW = 99.5


def diagnose(axes: Dict[str, dict], registry, self_reference: bool = False, verdict_led: bool = False,
             reference: Optional[str] = None) -> List[str]:
    """Plain-English reading of the axis pattern, most important first: what holds for any
    axis here, each scored axis's own sentences from its ``diagnose``. ``reference``: the
    reference's config label, named in every sentence about it.

    Where a verdict leads the report (``verdict_led``), nothing here reads the raw bands: no
    "catastrophic" or "all clear" from the REFRACT bands, and an axis whose verdict is PASS adds
    no damage story of its own (its raw band would tell one the gate did not read)."""
    named = f"the reference ({reference})" if reference else "the reference"
    out: List[str] = []
    if self_reference:
        out.append(f"Self-reference: the candidate computes as {named} does (the same cache types "
                   "as llama.cpp allocated them, flash attention and rotation), so this run measures the noise floor.")
    for name, a in axes.items():
        if a.get("status") == "n/a":
            out.append(f"{name}: nothing to score (the reference itself never succeeds there); left out of the composite.")
    # An interrupted run's axes are "incomplete" and a stopped one "stopped" (another axis's FAIL
    # decided the candidate): their items did not run, nothing failed.
    broken = [n for n, a in axes.items()
              if a.get("score") is None and a.get("status") not in ("n/a", "incomplete", "stopped")]
    if broken:
        out.append(f"No score for {', '.join(broken)}: some items failed to measure (see the failed tests).")
    scored = {n: a for n, a in axes.items() if a.get("score") is not None}
    if not scored:
        return out
    if verdict_led:
        # Each axis's own story where the verdict found damage or could not decide.
        told = {n: a for n, a in scored.items() if (a.get("verdict") or {}).get("verdict") != "PASS"}
        by_name = dict(known(scored, registry))
        for name in [n for n in DIAGNOSIS_ORDER if n in told] + [n for n in told if n not in DIAGNOSIS_ORDER]:
            out += by_name[name].diagnose(scored[name], axes)
        return out
    low = {n for n, a in scored.items() if a["score"] < BAND_FLOOR["PASS"]}
    if all(a["score"] < BAND_FLOOR["DEGRADED"] for a in scored.values()):
        out.append("Catastrophic: every axis is in the FAIL band; the candidate cache does not preserve the model's behaviour.")
    by_name = dict(known(scored, registry))
    for name in [n for n in DIAGNOSIS_ORDER if n in scored] + [n for n in scored if n not in DIAGNOSIS_ORDER]:
        out += by_name[name].diagnose(scored[name], axes)
    if not low and all(a["score"] >= BAND_FLOOR["EXCELLENT"] for a in scored.values()):
        out.append(f"All clear: the candidate cache tracks {named} on every axis that ran.")
    elif not low:
        out.append("Minor drift: every axis that ran is PASS or better.")
    return out


def _candidate_section(facts: RunRecord, role: str, results, failed, gates, complete: bool,
                       control: Optional[dict], registry, repeats=None) -> dict:
    """Everything about one candidate: axes, composite, floor, diagnosis, its own gate."""
    s = facts.settings
    axes = build_axes(results, failed, registry, repeats)
    sequential = facts.sequential.get(role, {})
    for name, design in sequential.items():
        if design.get("pruned") and name not in axes:
            # A sweep's pair the family can no longer recommend, skipped before this axis measured.
            axes[name] = {"score": None, "band": None, "status": "stopped", "items": [],
                          "not_measured": f"not measured: {design['pruned']}"}
        elif design.get("stopped_by") and name not in axes:
            # Another axis's FAIL decided the candidate before this axis measured anything: it
            # stays in the report, unscored, saying why; so the raw composite has no score.
            axes[name] = {"score": None, "band": None, "status": "stopped", "items": [],
                          "not_measured": f"not measured: the verdict is FAIL on {design['stopped_by']}"}
    axes = {name: axes[name] for name in [*registry, *axes] if name in axes}  # the registry's order
    composite = composite_of(axes, gates) if complete else None
    if not complete:
        # What was measured stays (items); no axis claims a score for what was not.
        _mark_not_run(facts, role, axes, results, failed)
    raw_intervals = intervals(axes, gates, s.seed, registry) if complete else {}
    if complete:
        pair_items_with_control(axes, control, registry)
    # What the default gate reads: each axis's damage as a multiple of the control's.
    for name, design in sequential.items():
        if name in axes:
            # The design fixed before the first item, where it stopped, and the items skipped.
            axes[name]["sequential"] = copy.deepcopy(design)
    # Each axis's interval at its design's look level (the fixed-sample 95 % with one look).
    levels = {name: d["look_level"] for name, d in sequential.items()}
    # An axis another axis's FAIL stopped between its looks claims no verdict of its own.
    stopped = {name: d["stopped_by"] for name, d in sequential.items() if d.get("stopped_by")}
    pruned = {name: d["pruned"] for name, d in sequential.items() if d.get("pruned")}
    verdict = (candidate_verdict(axes, control, registry, facts.self_reference[role], levels, stopped,
                                 designs=dict(sequential), pruned=pruned)
               if complete else None)
    requested = dict(zip(facts.candidate_roles, s.candidates)).get(role)
    no_op = no_op_reason(axes, requested, s.reference) if complete else None
    if no_op and verdict is not None:
        # Whatever the axes say of what ran, it was not this config: never a PASS of it.
        verdict["no_op"] = no_op
        if verdict["verdict"] == "PASS":
            verdict["verdict"] = "UNDECIDED"
        verdict["headline"] = f"{verdict['verdict']} ({NO_OP}): {verdict['headline']}"
    floor = floor_of(axes) if s.floor else None
    self_reference = facts.self_reference[role]
    for name, inputs in facts.axis_inputs.items():
        if name in axes:
            axes[name].update(copy.deepcopy(inputs))  # e.g. the KLD axis's corpus
    selection = candidate_selection(facts, role, results, failed)
    if verdict is not None:
        verdict["subset"] = selection["subset"]
    section = {
        "candidate": facts.labels[role],
        "self_reference": self_reference,
        "selection": selection,
        "verdict": verdict,
        "composite": composite,
        "band": band_for(composite),
        "composite_ci95": raw_intervals.get("composite_ci95"),
        "diagnosis": _diagnosis_led_by(verdict, diagnose(axes, registry, self_reference, verdict is not None,
                                                          s.reference.label() if hasattr(s, "reference") else None),
                                       self_reference)
                     + control_diagnosis(axes, control, registry),
        "axes": axes,
        "floor": floor,
        "custom_gates": gates,
        "kv_cache": facts.kv_cache.get(role),
        **_context_facts(facts, role),
        # What really ran: cache types, flash attention, rotation, library, warnings.
        "ran": facts.ran.get(role),
        "no_op": no_op,
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
    for source in facts.text_inputs:
        if source.get("replaced_invalid_utf8"):
            diagnosis.append(f"{source['name']} is not valid UTF-8: undecodable bytes were replaced (U+FFFD) before tokenizing.")
    if not complete:
        diagnosis.insert(0, f"INCOMPLETE: {facts.stopped_early or 'the run was interrupted'}; items measured so far "
                            "are listed, no score is claimed. " + _ran_text(axes))
    if no_op:
        diagnosis.insert(0, f"NO-OP: {no_op}.")
    if floor is not None and floor < FLOOR_WARN_BELOW:
        diagnosis.insert(0, f"WARNING: the noise floor (reference vs reference) is {floor:.2f}, below "
                            f"{FLOOR_WARN_BELOW}: deltas are not trustworthy.")
    elif floor is not None:
        diagnosis.append(f"Noise floor (reference vs reference): {floor:.2f}.")
    section["gate"] = _gate(facts, section, complete)
    return section


def _mark_not_run(facts: RunRecord, role: str, axes: Dict[str, dict], results, failed) -> None:
    """An interrupted run: every axis is unscored and says how many of its items ran; the
    items that did not run are "not run", never "failed to measure"."""
    selected = facts.selected.get(role, {})
    for name in facts.settings.axes:
        wanted = selected.get(name)
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
    not_run = [m for m in missing if m is not None]
    if missing and len(not_run) == len(missing):
        return f"{ran} of {ran + sum(not_run)} selected items ran; {sum(not_run)} were not run."
    return f"{ran} items ran."


def _context_facts(facts: RunRecord, role: str) -> dict:
    """What llama.cpp logged when it created the role's context: the attention rotation it
    applied ({"k": bool, "v": bool}, null where the build has none), the cache it allocated,
    and every LLAMA_*/GGML_* variable in effect then."""
    if facts.rotation is None:
        return {}
    return {"rotation": facts.rotation.get(role), "kv_allocation": (facts.kv_allocation or {}).get(role),
            "context_env": (facts.context_env or {}).get(role, {})}


def _diagnosis_led_by(verdict: Optional[dict], lines: List[str], self_reference: bool) -> List[str]:
    """The verdict leads, after only the one fact that changes how to read it (a self-reference)."""
    first = lines[:1] if self_reference else []
    return first + _verdict_diagnosis(verdict) + lines[len(first):]


def _verdict_diagnosis(verdict: Optional[dict]) -> List[str]:
    """The verdict first: what it is, on what, and what an UNDECIDED one asks for."""
    if verdict is None:
        return []
    out = [f"Verdict {verdict['headline']}."]
    if verdict.get("subset"):
        out = [f"Subset verdict {verdict['headline']}: only part of the default audit ran, so this is not the "
               "audit's verdict."]
    out += [f"The yardstick is broken: {p}." for p in verdict["control_problems"]]
    out += [f"To decide: {a}." for a in verdict.get("advice", []) if "fix the control" not in a]
    return out


def _gate(facts: RunRecord, section: dict, complete: bool) -> dict:
    s = facts.settings
    basis = s.gate_basis
    if basis == "verdict":
        return _verdict_gate(facts, section, complete)
    gated = section["composite"]
    reasons = _ungated_reasons(section, complete, facts.stopped_early)
    if reasons is None:
        reasons = []
        if gated < s.fail_under:
            reasons.append(f"composite {gated:.2f} is below --refract-fail-under={s.fail_under_text} ({s.fail_under:g})")
    reasons += _trust_reasons(facts, section, complete)
    return {"passed": not reasons, "threshold": s.fail_under, "basis": basis, "reasons": reasons}


def _ungated_reasons(section: dict, complete: bool, stopped_early: Optional[str] = None) -> Optional[List[str]]:
    """What every gate says before it reads its basis: an interrupted run fails, fixture
    measurements without a gate have nothing to gate on (no reason), and a composite that could
    not be formed fails naming why (axes stopped by another's FAIL are not such a failure: the
    verdict gate reads that FAIL). None when the section can be gated."""
    if not complete:
        return [f"{stopped_early or 'the run was interrupted'}; an incomplete audit never passes the gate"]
    if section["composite"] is None and not section["axes"] and not section["custom_gates"]:
        return []
    statuses = [a.get("status") for a in section["axes"].values() if a.get("score") is None]
    if section["composite"] is None and statuses and all(st == "stopped" for st in statuses):
        # Axes stopped because another FAILed: nothing failed to measure, the verdict gates.
        return None
    if section["composite"] is None:
        from .baseline import no_composite_reason

        return [no_composite_reason(section["axes"])]
    return None


def _trust_reasons(facts: RunRecord, section: dict, complete: bool) -> List[str]:
    """What fails any gate, whatever it reads: a model that cannot show cache damage, and a
    baseline that was not met (or never measured this candidate)."""
    from .vacuous import vacuous_reasons

    s, axes = facts.settings, section["axes"]
    reasons = selection_reasons(section["selection"], section["custom_gates"], section["candidate"],
                                getattr(s, "require_complete", False)) if complete else []
    reasons += vacuous_reasons(axes, (facts.model or {}).get("n_vocab"))
    if section.get("no_op"):
        reasons.append(section["no_op"])
    if facts.cache_tampered:
        reasons.append(f"the reference cache failed its spot check ({facts.cache_tampered}); run again")
    if facts.baseline is not None and complete:
        from .baseline import baseline_reasons

        reasons += baseline_reasons(facts.baseline, section["candidate"], axes, section["composite"], s.max_drop,
                                    s.as_dict())
    return reasons


def _verdict_gate(facts: RunRecord, section: dict, complete: bool) -> dict:
    """The default gate: the verdict (FAIL fails, UNDECIDED fails unless --refract-undecided=pass,
    a broken control fails), and the verdict score against --refract-fail-under."""
    s = facts.settings
    composite, axes = section["composite"], section["axes"]
    verdict = section.get("verdict")
    ungated = _ungated_reasons(section, complete, facts.stopped_early)
    reasons: List[str] = ungated or []
    if ungated is None and not axes:
        # Only custom gates: no axis for a verdict; their own scores against the threshold.
        if composite < s.fail_under:
            reasons.append(f"composite {composite:.2f} is below --refract-fail-under={s.fail_under_text} ({s.fail_under:g})")
    elif ungated is None:
        reasons += gate_reasons(verdict, s.undecided)
        score = (verdict or {}).get("score")
        if score is not None and score < s.fail_under:
            reasons.append(f"verdict score {score:.2f} is below --refract-fail-under={s.fail_under_text} "
                           f"({s.fail_under:g})")
        low_gates = {n: g for n, g in section["custom_gates"].items() if g < s.fail_under}
        for name, g in low_gates.items():
            reasons.append(f"custom gate {name} {g:.2f} is below --refract-fail-under={s.fail_under_text} "
                           f"({s.fail_under:g})")
    reasons += _trust_reasons(facts, section, complete)
    return {"passed": not reasons, "threshold": s.fail_under, "basis": "verdict", "undecided": s.undecided,
            **({"note": UNDECIDED_PASS_NOTE} if s.undecided == "pass" else {}),
            "verdict": (verdict or {}).get("verdict"), "reasons": reasons}


def build_report(
    *,
    facts: RunRecord,
    results: Dict[str, Dict[str, Dict[str, dict]]],
    failed: Dict[str, Dict[str, List[str]]],
    custom: Optional[List[dict]] = None,
    invocation_args: List[str],
    complete: bool,
    registry,
    repeats: Optional[Dict[str, Dict[str, Dict[str, List[dict]]]]] = None,
) -> dict:
    """The whole report, gate included, from plain data: ``results`` (candidate role -> axis ->
    unit id -> item result), ``failed`` (role -> axis -> unit ids), ``repeats`` (role -> axis ->
    unit id -> the further results of --refract-repeat), the fixtures' ``custom``
    measurements, the run's ``facts``, the command line, whether the run completed, and the
    axes (``registry``: name -> axis object, as axes.resolve gives). Inputs are not modified.

    Top-level ``candidate``/``axes``/``composite``/``band``/``diagnosis``/``floor`` describe
    the first candidate (the only one outside a matrix); ``candidates`` has one section per
    candidate and ``ranking`` orders them; ``gate`` passes only if every candidate passes."""
    s = facts.settings
    # A control result re-measured against the cache and found different (audit/control.py):
    # the cache was altered, and what this run read from it cannot be trusted.
    tampered = next((r["cache_tampered"] for per_axis in results.get(facts.control_role or "", {}).values()
                     for r in per_axis.values() if isinstance(r, dict) and r.get("cache_tampered")),
                    (facts.cache_spot_check or {}).get("tampered"))
    if tampered:
        facts = dataclasses.replace(facts, cache_tampered=tampered)
    custom = sorted(custom or [], key=lambda e: e["test"])
    control = control_section(facts, results, failed, complete, registry)
    sections = []
    for role in facts.candidate_roles:
        label = facts.labels[role]
        gates = custom_gates([e for e in custom if e.get("candidate", label) == label])
        sections.append(_candidate_section(facts, role, results.get(role, {}), failed.get(role, {}), gates, complete,
                                           control, registry, (repeats or {}).get(role)))
    first = sections[0]
    multi = len(sections) > 1
    reasons = [(f"{sec['candidate']}: " if multi else "") + r for sec in sections for r in sec["gate"]["reasons"]]
    drift = None
    if facts.drift_role is not None:
        # This build's own reference against the pack's, gated like a candidate, reported first.
        drift_section = _candidate_section(facts, facts.drift_role, results.get(facts.drift_role, {}),
                                           failed.get(facts.drift_role, {}), {}, complete, control, registry)
        drift = build_drift(drift_section)
        reasons = [f"build drift: {r}" for r in drift_section["gate"]["reasons"]] + reasons
    sweep, recommendation = _sweep_and_recommendation(facts, sections, control, registry, complete)
    if sweep is not None:
        # A sweep's gate reads its answer, not every pair: most pairs of a sweep FAIL by design.
        from .sweep import gate_reasons as sweep_reasons

        reasons = [r for r in reasons if r.startswith("build drift: ")] + sweep_reasons(sweep)
    elif s.require is not None:
        req = next((sec for sec in sections if sec["candidate"] == s.require.label()), None)
        verdict = ((req or {}).get("verdict") or {}).get("verdict")
        if verdict != "PASS":
            reasons.append(f"--refract-require={s.require.label()}: its verdict is {verdict or 'missing'}, not PASS")
    settings = s.as_dict()
    if facts.chunks_note:
        settings["chunks_note"] = facts.chunks_note
    if facts.gpu_note:
        settings["gpu_layers_note"] = facts.gpu_note  # settings.gpu_layers is what ran: 0
    for name, as_run in facts.axis_settings.items():
        settings.setdefault(name, {}).update(as_run)  # e.g. R-NIAH's lengths as capped to the model
    # Ranked by what the gate reads: by default the verdict (the smallest cache that PASSes
    # first, then the rest by damage); otherwise the composite the gate compares.
    if s.gate_basis == "verdict":
        ranked = rank(sections)
    else:
        ranked = sorted(sections, key=lambda sec: (sec["composite"] is None, -(sec["composite"] or 0.0)))
    front = pareto(sections)
    all_items = [r for per_axis in results.values() for items in per_axis.values() for r in items.values()]
    report = {
        "schema": SCHEMA,
        "plugin_version": __version__,
        "llama_cpp_python_version": facts.binding_version,
        "llama_cpp_build": dict(facts.llama_build),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "host": dict(facts.host),
        "model": dict(facts.model),
        "reference": s.reference.label(),
        "reference_kv_bytes_per_token": facts.reference_kv_bytes_per_token,
        **({"reference_rotation": facts.rotation.get("reference"),
            "reference_kv_allocation": (facts.kv_allocation or {}).get("reference"),
            "rotation": first.get("rotation"), "kv_allocation": first.get("kv_allocation"),
            "context_env": first.get("context_env")} if facts.rotation is not None else {}),
        # What really ran, for the reference and (as each candidate section has it) the first candidate.
        "reference_ran": facts.ran.get("reference"),
        "ran": first.get("ran"),
        "no_op": first.get("no_op"),
        # The most KV-cache memory this process held at once (under xdist: the controller's,
        # which measures nothing; see each worker's own run).
        "kv_cache_bytes_peak": facts.kv_bytes_peak or None,
        # The first candidate's KV cache against the reference's (full and SWA caches apart).
        "kv_cache": first.get("kv_cache"),
        "candidate": first["candidate"],
        "self_reference": first["self_reference"],
        "verdict": first["verdict"],
        "settings": settings,
        "repro_command": "pytest " + " ".join(shlex.quote(a) for a in _portable_args(invocation_args)),
        "composite": first["composite"],
        "band": first["band"],
        "composite_ci95": first["composite_ci95"],
        "gate": {"passed": not reasons, "threshold": s.fail_under, "basis": s.gate_basis, "reasons": reasons,
                 **({"reads": SWEEP_GATE} if sweep is not None else {}),
                 **({"undecided": s.undecided} if s.gate_basis == "verdict" else {}),
                 **({"note": UNDECIDED_PASS_NOTE} if s.gate_basis == "verdict" and s.undecided == "pass" else {})},
        "sensitivity": sensitivity_json(facts, control, registry),
        "diagnosis": first["diagnosis"],
        "axes": first["axes"],
        "custom": {"gates": first["custom_gates"], "measurements": custom},
        "floor": first["floor"],
        "candidates": sections,
        # Which config to ship, decided as a family over the candidates (additive, schema 1.x).
        "recommendation": recommendation,
        **({"sweep": sweep} if sweep is not None else {}),
        "ranking": [{"candidate": sec["candidate"],
                     "verdict": (sec["verdict"] or {}).get("verdict"),
                     "selection": sec["selection"]["text"], "subset": sec["selection"]["subset"],
                     "verdict_score": (sec["verdict"] or {}).get("score"),
                     "multiples": {n: {k: v.get(k) for k in ("basis", "multiple", "multiple_ci95", "damage",
                                                              "damage_ci95", "verdict")}
                                   for n, v in ((sec["verdict"] or {}).get("axes") or {}).items()},
                     "kv_bytes_per_token": _kv_bytes(sec),
                     "pareto": front.get(sec["candidate"], False),
                     "composite": sec["composite"], "band": sec["band"],
                     "composite_ci95": sec["composite_ci95"],
                     "passed": sec["gate"]["passed"],
                     "kv_vs_reference": (sec["kv_cache"] or {}).get("vs_reference"),
                     "rotation": sec.get("rotation"),
                     "no_op": sec.get("no_op"),
                     "axes": {n: a.get("score") for n, a in sec["axes"].items()}} for sec in ranked],
        "reference_cache": {
            "enabled": facts.reference_cache_enabled,
            "read": facts.reference_cache_read,
            "spot_check": facts.cache_spot_check,
            "tampered": facts.cache_tampered,
            "hits": sum(r.get("reference_cache", {}).get("hits", 0) for r in all_items),
            "misses": sum(r.get("reference_cache", {}).get("misses", 0) for r in all_items),
            "format": ("16-bit log-probs per position as llama-perplexity --kl-divergence-base quantizes them, "
                       "stored sparse: the entries within 16 nats of each row's maximum"),
            **(facts.reference_cache_size or {"bytes_written": None, "bytes_read": None, "folder_bytes": None}),
        },
    }
    report["selection"] = first["selection"]
    if "repeat" in first:
        report["repeat"] = first["repeat"]
    if facts.reference_pack is not None:
        # Right after the reference: the pack is the run's reference, and the drift is read first.
        at = list(report).index("reference") + 1
        items = list(report.items())
        items[at:at] = [("reference_pack", copy.deepcopy(facts.reference_pack)), ("build_drift", drift)]
        report = dict(items)
    if facts.saved_pack is not None:
        report["saved_reference_pack"] = copy.deepcopy(facts.saved_pack)
    for sec in sections:
        sec.pop("custom_gates", None)
    if not multi:
        # One candidate: its full result is the top level; no second copy.
        del report["candidates"]
    report["context_evidence"] = context_evidence(facts.context_by_axis, settings.get("depth"))
    report["wall_s"] = facts.wall_s
    # How far an interrupted run got: items with a result or a failure (the control's
    # included), of those selected.
    report["items_run"] = (sum(len(per_axis) for axes in results.values() for per_axis in axes.values())
                           + sum(len(units) for axes in failed.values() for units in axes.values()))
    report["items_selected"] = facts.items_selected
    # Selected items a decided axis did not need (sequential stopping; never counted as run).
    report["items_skipped_decided"] = sum(len(d.get("skipped") or []) for axes in facts.sequential.values()
                                          for d in axes.values())
    if facts.baseline is not None:
        report["baseline"] = {"path": s.baseline_path, "composite": facts.baseline.get("composite"),
                              "timestamp": facts.baseline.get("timestamp"), "max_drop": s.max_drop}
    return _gate_first(report)


# What a sweep's gate reads instead of every pair's verdict.
SWEEP_GATE = ("the sweep's answer: it passes when a config PASSes as a family (the recommendation), and within "
              "--refract-kv-budget and with --refract-require's config PASSing where those are given")


# Where the gate read a verdict, the raw scores are reference figures: the JSON says so once.
RAW_SCORES_NOTE = ("composite, band and every axis's score and band are raw seed-defined scores (REFRACT-comparable, "
                   "not the verdict); the gate reads the verdict")


def _gate_first(report: dict) -> dict:
    """The report's keys with what the gate read first: the schema, the candidate, the gate and
    what it read (the verdict, or under --refract-gate=raw the composite and its band); then
    everything else in its own order."""
    read = ["verdict"] if report["gate"]["basis"] == "verdict" else ["composite", "band"]
    lead = ["schema", "candidate", "gate", *read]
    out = {k: report[k] for k in lead if k in report}
    if report.get("verdict") is not None and report["gate"]["basis"] == "verdict":
        out["raw_scores_note"] = RAW_SCORES_NOTE
    out.update((k, v) for k, v in report.items() if k not in out)
    return out


def build_drift(section: dict) -> dict:
    """The report's "build_drift": this build's reference config against the pack's, as a
    candidate. ``multiple``: the largest of its axes' multiples of the control's damage (the
    pack's control: what a rounding-only change does), with that axis's interval; 0 when this
    build reproduces the pack's bits."""
    verdict = section.get("verdict") or {}
    axes = copy.deepcopy(verdict.get("axes") or {})
    with_multiple = [(name, a) for name, a in axes.items() if a.get("multiple") is not None]
    worst: Tuple[Optional[str], dict] = max(with_multiple, key=lambda item: item[1]["multiple"], default=(None, {}))
    return {"config": section["candidate"], "verdict": verdict.get("verdict"),
            "multiple": worst[1].get("multiple"), "multiple_ci95": worst[1].get("multiple_ci95"),
            "multiple_axis": worst[0], "axes": axes, "gate": section["gate"],
            "diagnosis": section["diagnosis"], "scores": {name: a.get("score") for name, a in section["axes"].items()}}


def _sweep_and_recommendation(facts: RunRecord, sections: List[dict], control: Optional[dict], registry,
                              complete: bool) -> Tuple[Optional[dict], Optional[dict]]:
    """The family's recommendation (Holm over every candidate in a sweep, scoring/family.py) and
    the sweep section (report/sweep.py; None without a sweep)."""
    s = facts.settings
    if facts.sweep is None:
        return None, (family_recommendation(sections, control, registry)
                      if s.gate_basis == "verdict" and complete else None)
    from .sweep import build_sweep, skipped_roles

    skipped = skipped_roles(facts.sequential, facts.labels)
    recommendation = (family_recommendation(sections, control, registry, by_rows=True,
                                            unmeasured=frozenset(skipped)) if complete else None)
    budget = None
    if s.kv_budget is not None:
        ref = facts.reference_kv_bytes_per_token
        limit = (s.kv_budget * ref if ref else None) if s.kv_budget_fraction else s.kv_budget
        budget = {"asked": s.kv_budget, "fraction_of_reference": s.kv_budget_fraction, "bytes_per_token": limit}
    sweep = build_sweep(facts.sweep, sections, recommendation, skipped, facts.reference_kv_bytes_per_token, budget,
                        s.require.label() if s.require is not None else None, s.reference.label())
    return sweep, recommendation


def _kv_bytes(section: dict):
    from .verdicts import kv_bytes

    return kv_bytes(section)


def _portable_args(args: List[str]) -> List[str]:
    """No home directories in a report that may be shared: show ~ instead. Only the whole
    folder is replaced (at the start of an argument or of a value after =, : or a comma, and
    followed by / or the end): with HOME=/home/al, /home/alice stays /home/alice."""
    import re

    home = str(Path.home()).rstrip("/")
    if not home:
        return list(args)
    whole = re.compile(r"(?:^|(?<=[=:,]))" + re.escape(home) + r"(?=/|$|[:,])")
    return [whole.sub("~", a) for a in args]
