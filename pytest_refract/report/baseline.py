"""``--refract-baseline``: gate a run against a previous report of the same model and reference.

A baseline from another model or another reference configuration would compare unrelated
numbers, so it is refused up front rather than silently compared."""

from __future__ import annotations

from typing import List, Optional

from ..errors import UsageProblem
from .schema import ReportFileError, load_report


def load_baseline(path: str, model_summary: dict, reference_label: str) -> dict:
    try:
        baseline = load_report(path)
    except ReportFileError as exc:
        raise UsageProblem(f"--refract-baseline: {exc}") from None
    if baseline.get("complete") is False:
        raise UsageProblem(f"--refract-baseline {path} is from an interrupted run (complete: false); an incomplete "
                           "audit is no baseline: use a report of a run that finished")
    if baseline.get("composite") is None and not any(
            (a or {}).get("score") is not None for s in [baseline, *(baseline.get("candidates") or [])]
            if isinstance(s, dict) for a in (s.get("axes") or {}).values() if isinstance(a, dict)):
        raise UsageProblem(f"--refract-baseline {path} holds no score at all; a baseline gate needs a measured baseline")
    theirs = baseline.get("model") or {}
    if (theirs.get("sha256_first_mib"), theirs.get("size_bytes")) != (
        model_summary["sha256_first_mib"], model_summary["size_bytes"]
    ):
        raise UsageProblem(
            f"--refract-baseline {path} was measured on another model ({theirs.get('path')}, "
            f"{theirs.get('size_bytes')} bytes) than {model_summary['path']}; use a baseline of the same model"
        )
    # The model is identified by the sha256 of all its bytes, never by a sample: a file of the
    # same size and first MiB may hold other weights.
    if not model_summary.get("sha256"):
        raise UsageProblem(f"--refract-baseline {path}: this run could not hash {model_summary['path']}, so the "
                           "baseline cannot be shown to be of the same model")
    if not isinstance(theirs.get("sha256"), str):
        raise UsageProblem(f"--refract-baseline {path} does not name its model's whole-file sha256 (written without "
                           "one), so it cannot be shown to be of the same model; measure a new baseline")
    if theirs["sha256"] != model_summary["sha256"]:
        raise UsageProblem(
            f"--refract-baseline {path} was measured on another model: {theirs.get('path')} has the same size and "
            f"first MiB as {model_summary['path']} but another whole-file sha256; use a baseline of the same model"
        )
    for section in [baseline, *(s for s in baseline.get("candidates") or [] if isinstance(s, dict))]:
        if isinstance(section.get("candidate"), str):
            section["candidate"] = canonical_label(section["candidate"])
    if isinstance(baseline.get("reference"), str):
        baseline["reference"] = canonical_label(baseline["reference"])
    if baseline.get("reference") != reference_label:
        raise UsageProblem(
            f"--refract-baseline {path} used reference {baseline.get('reference')!r}, this run uses "
            f"{reference_label!r}; scores against different references are not comparable"
        )
    return baseline


def canonical_label(label: str) -> str:
    """A KV-config label as this version writes it: earlier reports spelled out the default
    flash attention (fa=on) when it was given, which names the same computation."""
    return ",".join(part for part in label.split(",") if part.strip() != "fa=on")


def baseline_for(baseline: dict, candidate_label: str):
    """The baseline's result for this candidate: its own section in a matrix report, the top
    level of a single-candidate report; None when the baseline never measured this candidate."""
    sections = baseline.get("candidates")
    if not sections:
        return baseline
    for section in sections:
        if section.get("candidate") == candidate_label:
            return section
    return None


def drops(baseline: dict, axes: dict, composite, max_drop: float) -> List[str]:
    """Reasons to fail: every score that fell more than ``max_drop`` points below the baseline."""
    reasons = []
    base_axes = baseline.get("axes") or {}
    for name, section in axes.items():
        before = (base_axes.get(name) or {}).get("score")
        now = section.get("score")
        if before is not None and now is not None and before - now > max_drop:
            reasons.append(f"{name} dropped {before - now:.2f} points vs baseline ({before:.2f} -> {now:.2f}; "
                           f"--refract-max-drop={max_drop:g})")
    # The composite is only comparable when the same axes were scored in both runs.
    scored_now = {n for n, a in axes.items() if a.get("score") is not None}
    scored_before = {n for n, a in base_axes.items() if (a or {}).get("score") is not None}
    before = baseline.get("composite")
    if scored_now == scored_before and before is not None and composite is not None and before - composite > max_drop:
        reasons.append(f"composite dropped {before - composite:.2f} points vs baseline ({before:.2f} -> "
                       f"{composite:.2f}; --refract-max-drop={max_drop:g})")
    return reasons


# Settings that change what a score measures: a baseline measured with others is named so.
_COMPARED_SETTINGS = ("axes", "ctx", "chunks", "n_predict", "seed", "n_batch", "n_ubatch", "gate_basis", "sensitivity",
                      "decode")


def _settings_differences(baseline: dict, settings: Optional[dict]) -> List[str]:
    theirs = baseline.get("settings") if isinstance(baseline.get("settings"), dict) else {}
    ours = settings or {}
    return [f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in _COMPARED_SETTINGS
            if k in theirs and k in ours and theirs.get(k) != ours.get(k)]


def baseline_reasons(baseline: dict, candidate_label: str, axes: dict, composite, max_drop: float,
                     settings: Optional[dict] = None) -> List[str]:
    """Every reason the baseline gate fails, never none by default: a baseline that never
    measured this candidate, or has no score comparable with this run's, is a reason itself
    (a gate that compared nothing would pass anything). A baseline measured with other
    settings is named in each reason."""
    base = baseline_for(baseline, candidate_label)
    if base is None:
        measured = [str(s.get("candidate")) for s in baseline.get("candidates") or [] if isinstance(s, dict)]
        return [f"--refract-baseline never measured {candidate_label} (it holds {', '.join(measured) or 'no candidate'}); "
                "a baseline gate needs a baseline of the same candidate"]
    if not baseline.get("candidates") and baseline.get("candidate") not in (None, candidate_label):
        return [f"--refract-baseline measured {baseline.get('candidate')}, not {candidate_label}; a baseline gate "
                "needs a baseline of the same candidate"]
    base_axes = base.get("axes") or {}
    comparable = [n for n, a in axes.items() if a.get("score") is not None
                  and (base_axes.get(n) or {}).get("score") is not None]
    if not comparable and not (base.get("composite") is not None and composite is not None):
        return [f"--refract-baseline has no score comparable with this run's (it scored "
                f"{', '.join(n for n, a in base_axes.items() if (a or {}).get('score') is not None) or 'nothing'}; "
                f"this run scored {', '.join(n for n, a in axes.items() if a.get('score') is not None) or 'nothing'})"]
    reasons = drops(base, axes, composite, max_drop)
    differences = _settings_differences(baseline, settings)
    if differences:
        reasons = [f"{r} (the baseline was measured with other settings: {'; '.join(differences)})" for r in reasons]
    return reasons


def no_composite_reason(axes: dict) -> str:
    """The gate's line when there is no composite: which axes failed to measure, or, when none
    did, that no axis had anything to score (and why, as each axis said)."""
    broken = [n for n, a in axes.items() if a.get("score") is None and a.get("status") not in ("n/a", "stopped")]
    if broken:
        return f"no composite: {', '.join(broken)} could not be scored (items failed to measure)"
    why = "; ".join(f"{n}: {a['error']}" if a.get("error") else n for n, a in axes.items())
    return f"no composite: no axis had anything to score ({why})"
