"""``--refract-baseline``: gate a run against a previous report of the same model and reference.

A baseline from another model or another reference configuration would compare unrelated
numbers, so it is refused up front rather than silently compared."""

from __future__ import annotations

from typing import List

from ..errors import UsageProblem
from .schema import ReportFileError, load_report


def load_baseline(path: str, model_facts: dict, reference_label: str) -> dict:
    try:
        baseline = load_report(path)
    except ReportFileError as exc:
        raise UsageProblem(f"--refract-baseline: {exc}") from None
    theirs = baseline.get("model") or {}
    if (theirs.get("sha256_first_mib"), theirs.get("size_bytes")) != (
        model_facts["sha256_first_mib"], model_facts["size_bytes"]
    ):
        raise UsageProblem(
            f"--refract-baseline {path} was measured on another model ({theirs.get('path')}, "
            f"{theirs.get('size_bytes')} bytes) than {model_facts['path']}; use a baseline of the same model"
        )
    if theirs.get("sha256") and model_facts.get("sha256") and theirs["sha256"] != model_facts["sha256"]:
        raise UsageProblem(
            f"--refract-baseline {path} was measured on another model: {theirs.get('path')} has the same size and "
            f"first MiB as {model_facts['path']} but another whole-file sha256; use a baseline of the same model"
        )
    if baseline.get("reference") != reference_label:
        raise UsageProblem(
            f"--refract-baseline {path} used reference {baseline.get('reference')!r}, this run uses "
            f"{reference_label!r}; scores against different references are not comparable"
        )
    return baseline


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
