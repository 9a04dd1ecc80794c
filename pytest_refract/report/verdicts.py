"""The verdict in the report: per candidate, each axis's damage as a multiple of the control's
with its interval and PASS / FAIL / UNDECIDED (scoring/verdict.py), the run's verdict, what the
gate reads of it, and the ranking by it. Pure functions of the report's data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..axes import known
from ..scoring import verdict as V
from ..scoring.sequential import errors_of

if TYPE_CHECKING:  # a type hint only
    import numpy as np


def candidate_verdict(axes: Dict[str, dict], control: Optional[dict], registry,
                      self_reference: bool = False, levels: Optional[Dict[str, float]] = None,
                      stopped_by: Optional[Dict[str, str]] = None,
                      designs: Optional[Dict[str, dict]] = None, pruned: Optional[Dict[str, str]] = None) -> Optional[dict]:
    """The run verdict of one candidate (JSON-able), each axis's written into its section under
    "verdict"; None without a control (no yardstick: the gate says so). ``designs``: per axis
    its sequential design's JSON (the errors of the look it was read at, scoring/sequential.py);
    without one, ``levels`` (per axis, default the fixed-sample 95 %) gives 2.5 % per side, the
    FAIL side's split over the axes judged.
    ``stopped_by``: axis -> the axis whose FAIL stopped it (stopping.py); such an axis is
    UNDECIDED, its interval shown for what it is, since it stopped where no look was planned."""
    stopped_by = stopped_by or {}
    if control is None:
        return None
    per_axis: Dict[str, V.AxisVerdict] = {}
    judged = sum(1 for name, _axis in known(axes, registry) if axes[name].get("status") != "n/a")
    for name, axis in known(axes, registry):
        section = axes[name]
        if section.get("status") == "n/a":
            continue
        ctrl = (control.get("axes") or {}).get(name)
        if section.get("score") is None or ctrl is None or ctrl.get("score") is None:
            side = "the candidate" if section.get("score") is None else "the control"
            v = V.AxisVerdict(name, V.member(axis, "DAMAGE_LABEL", name), V.UNDECIDED, "multiple",
                              float(V.member(axis, "MARGIN", V.DEFAULT_MARGIN)), 0,
                              reason=f"{side} has no score on {name}")
        else:
            design = (designs or {}).get(name)
            if design is not None:
                pass_error, fail_error, pass_from = errors_of(design)
                v = V.axis_verdict(axis, axis.section_items(section), axis.section_items(ctrl),
                                   control_score=ctrl["score"], same_computation=self_reference,
                                   errors=(pass_error, fail_error), min_pass_items=pass_from)
            else:
                v = V.axis_verdict(axis, axis.section_items(section), axis.section_items(ctrl),
                                   control_score=ctrl["score"], same_computation=self_reference,
                                   level=(levels or {}).get(name, V.LEVEL), n_axes=judged)
        if name in stopped_by and v.basis != "broken control":
            v.verdict, v.items_needed = V.UNDECIDED, None
            v.reason = f"not measured further: the verdict is FAIL on {stopped_by[name]}"
        elif name in (pruned or {}) and v.basis != "broken control":
            # Stopped between planned looks: its interval claims no verdict (sweep.py).
            v.verdict, v.items_needed = V.UNDECIDED, None
            v.reason = (pruned or {})[name]
        section["verdict"] = v.as_json()
        _merge_detail(section, v.detail)
        per_axis[name] = v
    run = V.run_verdict(per_axis)
    out = run.as_json()
    out["band"] = _band_of_score(run.score)
    out["advice"] = [f"{v.axis}: {v.reason} (--refract-sweep-exhaustive measures it anyway)" if v.axis in (pruned or {})
                     else f"{v.axis}: {v.reason} (--refract-exhaustive measures it anyway)" if v.axis in stopped_by
                     else V.undecided_advice(v) for v in per_axis.values() if v.verdict == V.UNDECIDED]
    return out


def _merge_detail(section: dict, detail: Optional[dict]) -> None:
    """An axis verdict's own figures into its section: the depth axis's per-bucket multiples and
    verdicts beside each bucket's measured KLD, and its growth figure."""
    if not detail:
        return
    rows = section.get("buckets")
    if isinstance(rows, list):
        for row, b in zip(rows, detail.get("buckets") or []):
            row.update({k: b[k] for k in ("control_mean_kld", "multiple", "multiple_ci95", "verdict")})
    if "growth" in detail:
        section["growth"] = detail["growth"]


def _band_of_score(score: Optional[float]) -> Optional[str]:
    from ..scoring.metrics import band_for

    return band_for(score)


# What --refract-undecided=pass does to the gate, said wherever the gate is shown.
UNDECIDED_PASS_NOTE = ("--refract-undecided=pass: this gate no longer certifies a PASS. An UNDECIDED verdict (the "
                       "data cannot tell whether the damage is within the margin) passes it, so it fails only what "
                       "is shown beyond the margin; a config at the margin passes it about 98 % of the time")


def gate_reasons(verdict: Optional[dict], undecided: str) -> List[str]:
    """Why the verdict gate fails (empty: it passes)."""
    if verdict is None:
        return ["no verdict: without the sensitivity control there is no yardstick to measure damage against; "
                "keep the control or use --refract-gate=raw"]
    reasons = [f"the yardstick is broken: {p}" for p in verdict["control_problems"]]
    axes = verdict["axes"].values()
    failed = [a for a in axes if a["verdict"] == V.FAIL]
    if failed:
        reasons.append("verdict FAIL: " + "; ".join(_beyond(a) for a in failed))
    undecided_axes = [a for a in axes if a["verdict"] == V.UNDECIDED and a["basis"] != "broken control"]
    if undecided_axes and not failed and undecided == "fail":
        reasons.append("verdict UNDECIDED: the data cannot yet tell whether the damage is within the margin ("
                       + "; ".join(_open(a) for a in undecided_axes) + "); measure more items, or accept with "
                       "--refract-undecided=pass")
    return reasons


def _beyond(a: dict) -> str:
    if a["basis"] == "absolute":
        lo = a["damage_ci95"][0]
        return f"{a['axis']} {a['label']} at least {lo:.4g}, beyond the absolute tolerance {a['margin']:g}"
    ci = a.get("multiple_ci95")
    if not ci:
        return (f"{a['axis']} {a['label']} {a.get('damage') or 0:.4g} where the control has none on the same items: "
                f"beyond any multiple of it")
    return f"{a['axis']} {a['label']} at least {ci[0]:.3g}x the control's, beyond the {a['margin']:g}x margin"


def _open(a: dict) -> str:
    v = V.AxisVerdict(**a)
    return f"{v.headline()}; {V.undecided_advice(v)}"


def headline(verdict: Optional[dict]) -> str:
    """One line: the verdict and every axis's multiple with its interval."""
    if verdict is None:
        return "no verdict (no sensitivity control)"
    return verdict["headline"]


_ORDER = {V.PASS: 0, V.UNDECIDED: 1, V.FAIL: 2, None: 3}


def kv_bytes(section: dict) -> Optional[float]:
    """The candidate's KV cache per token: llama.cpp's allocation where it logged one, else the
    computed size (kv_cache)."""
    alloc = section.get("kv_allocation") or {}
    if alloc.get("bytes_per_token"):
        return float(alloc["bytes_per_token"])
    own = (section.get("kv_cache") or {}).get("bytes_per_token")
    return float(own) if own else None


def rank(sections: List[dict]) -> List[dict]:
    """Which config to ship: the PASSing candidates from the smallest KV cache up, then the rest
    by damage (UNDECIDED before FAIL, then the higher verdict score first)."""
    def key(sec):
        v = sec.get("verdict") or {}
        verdict = v.get("verdict")
        kv = kv_bytes(sec)
        score = v.get("score")
        if verdict == V.PASS:
            return (0, kv is None, kv or 0.0, -(score or 0.0))
        return (1 + _ORDER.get(verdict, 3), score is None, -(score or 0.0), kv or 0.0)

    return sorted(sections, key=key)


def pareto(sections: List[dict]) -> Dict[str, bool]:
    """Candidate label -> on the memory/damage Pareto front (no other candidate has a cache at
    most as large and a verdict score at least as high, one of them strictly)."""
    points = {s["candidate"]: (kv_bytes(s), (s.get("verdict") or {}).get("score")) for s in sections}
    out = {}
    for name, (kv, score) in points.items():
        if kv is None or score is None:
            out[name] = False
            continue
        out[name] = not any(k is not None and sc is not None and k <= kv and sc >= score and (k < kv or sc > score)
                            for other, (k, sc) in points.items() if other != name)
    return out


def family_recommendation(sections: List[dict], control: Optional[dict], registry, by_rows: bool = False,
                          unmeasured=frozenset()) -> Optional[dict]:
    """Which config to ship, decided as a family (scoring/family.py): the chance of recommending
    a config at or beyond the margin stays at the PASS side's error however many candidates
    compete. None without a control. ``by_rows``: Holm over rows, a fixed sequence within each (a sweep's
    procedure) instead of gatekeeping by size; ``unmeasured``: labels of candidates a sweep
    skipped, which never pass."""
    from ..scoring import family

    if control is None:
        return None
    contenders = []
    used_axes = {}
    for sec in sections:
        tables: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        errors: Dict[str, float] = {}
        for name, axis in known(sec["axes"], registry):
            section = sec["axes"][name]
            ctrl = (control.get("axes") or {}).get(name)
            if section.get("status") == "n/a":
                continue
            if section.get("score") is None or ctrl is None or ctrl.get("score") is None:
                tables = {}
                break
            parts: List[Tuple[str, Any]] = [(name, axis)]
            if callable(getattr(axis, "bucket_verdict", None)):
                # A PASS of the depth axis is every bucket's PASS (scoring/depth.py), so each
                # bucket is a test of its own here, at the axis's PASS error.
                from ..scoring.depth import bucket_axes

                parts = [(f"{name}[{b.DAMAGE_LABEL}]", b) for b in bucket_axes(axis, axis.section_items(section))]
            for key, part in parts:
                _ids, cand_t, ctrl_t = V.paired_tables(part, axis.section_items(section), axis.section_items(ctrl))
                tables[key] = (cand_t, ctrl_t)
                used_axes[key] = part
                if section.get("sequential"):
                    errors[key] = errors_of(section["sequential"])[0]
        if sec["candidate"] in unmeasured:
            tables = {}
        contenders.append(family.Contender(sec["candidate"], kv_bytes(sec), tables, errors,
                                           exact=bool(sec.get("self_reference")),
                                           score=(sec.get("verdict") or {}).get("score")))
    return family.recommend(contenders, used_axes, by_rows=by_rows).as_json()
