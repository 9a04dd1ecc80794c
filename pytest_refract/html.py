"""A self-contained HTML page for a JSON report (schema ``pytest-refract.report.v1``).

The page has to open anywhere a CI artifact ends up, offline included: CSS and charts (SVG) are
inline, nothing is fetched, and there is no JavaScript (``<details>`` shows things on demand).

Safety rule: the report carries text written by the model and by the user (prompts,
continuations, answers, file names, the command line). Every string from it goes through
``html.escape(..., quote=True)`` at the point where it is inserted, and numbers are inserted only
after formatting a real ``int``/``float``, so a string in a numeric field cannot carry markup in.

Robustness rule: older reports lack newer fields and a failed axis is only
``{"score": null, "band": null, "error": ...}``, so every field is optional here.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .scoring import band_for

AXIS_ORDER = ("trajectory", "kld", "rniah", "plad")
AXIS_TITLES = {
    "trajectory": ("Trajectory", "greedy-decode agreement"),
    "kld": ("KLD", "next-token distribution drift"),
    "rniah": ("R-NIAH", "long-context retrieval"),
    "plad": ("PLAD", "robustness to small prompt changes"),
}
BANDS = ("EXCELLENT", "PASS", "DEGRADED", "FAIL")
PERTURBATIONS = ("typo", "case", "punct", "paraphrase")
KLD_PERCENTILES = (("median", "median"), ("90", "p90"), ("95", "p95"), ("99", "p99"), ("99.9", "p99.9"),
                   ("max", "max"))
# Token-id lists are most of a full report's bytes and say nothing a reader can use on a page.
OMITTED_KEYS = ("ref_tokens", "cand_tokens")
TRAJECTORY_TEXT_KEYS = ("prompt", "ref_text", "cand_text", "divergence")
MISSING = "\u2014"  # em dash: "not in this report"


# --------------------------------------------------------------------------- small helpers


def _t(value: Any) -> str:
    """Escaped text of any value ("" for None): the one way report strings enter the page."""
    return "" if value is None else html.escape(str(value), quote=True)


def _esc(value: Any) -> str:
    """Like _t, but a missing value shows as a dash rather than vanishing."""
    return MISSING if value is None or value == "" else _t(value)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, spec: str = ".2f", missing: str = MISSING) -> str:
    if not _is_num(x):
        return missing
    if spec == "d" and isinstance(x, float):  # a count written as 6.0 by some other producer
        return format(int(x), "d") if x.is_integer() else format(x, "g")
    return format(x, spec)


def _pct(fraction: Any, spec: str = ".0f") -> str:
    return format(100.0 * fraction, spec) + "%" if _is_num(fraction) else MISSING


def _int(x: Any) -> int:
    return int(x) if _is_num(x) else 0


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _dicts(x: Any) -> List[dict]:
    return [i for i in _list(x) if isinstance(i, dict)]


def _str(x: Any) -> str:
    return x if isinstance(x, str) else ""


def _duration(seconds: Any) -> str:
    if not _is_num(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _si(x: Any, unit: str = "") -> str:
    """98362432 -> '98.4 M' (decimal, as the terminal summary prints model sizes)."""
    if not _is_num(x):
        return MISSING
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.1f} {prefix}{unit}"
    return f"{x:g} {unit}".strip()


def _band(section: dict) -> Optional[str]:
    """The section's band; derived from its score when an older report left the band out."""
    band = section.get("band")
    if isinstance(band, str) and band.upper() in BANDS:
        return band.upper()
    score = section.get("score")
    return band_for(score) if _is_num(score) else None


def _band_class(band: Optional[str]) -> str:
    # Only our own class names reach the class attribute, whatever the report's band says.
    return "b-" + band.lower() if band in BANDS else "b-na"


def _badge(band: Optional[str], missing: str = "n/a") -> str:
    label = band if band in BANDS else missing
    return f'<span class="badge {_band_class(band)}">{_t(label)}</span>'


def _ruler(score: Any) -> str:
    """A 0-100 strip split at the band floors with a tick at the score: shows how close the
    score is to the next band, which the number alone does not."""
    segments = "".join(f'<span class="{c}" style="flex:{w}"></span>'
                       for c, w in (("b-fail", 60), ("b-degraded", 20), ("b-pass", 10), ("b-excellent", 10)))
    tick = ""
    if _is_num(score):
        tick = f'<span class="tick" style="left:{min(max(score, 0.0), 100.0):.2f}%"></span>'
    return f'<div class="ruler" aria-hidden="true">{segments}{tick}</div>'


def _stats(pairs: Sequence[Tuple[str, str]]) -> str:
    """Key figures as a row of labelled values. Values are already-escaped HTML."""
    cells = "".join(f'<div class="stat"><span class="k">{_t(k)}</span><span class="v">{v}</span></div>'
                    for k, v in pairs)
    return f'<div class="stats">{cells}</div>'


def _kv_table(rows: Sequence[Tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{_t(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _callout(kind: str, html_text: str) -> str:
    return f'<div class="callout {kind}">{html_text}</div>'


def _empty(message: str) -> str:
    return f'<p class="muted empty">{_t(message)}</p>'


def _value(v: Any) -> str:
    """Any settings-like value as escaped, readable text."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if _is_num(v):
        return _num(v, "d") if isinstance(v, int) else _num(v, "g")
    if isinstance(v, float):  # NaN or infinity in a hand-made report
        return MISSING
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(i) for i in v) or MISSING
    if isinstance(v, dict):
        return "; ".join(f"{_t(k)}={_value(i)}" for k, i in v.items()) or MISSING
    return _t(v)


# --------------------------------------------------------------------------- SVG charts


def _nice_ticks(vmax: float, target: int = 5) -> List[float]:
    """Round tick values from 0 covering vmax (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (_is_num(vmax) and vmax > 0):
        vmax = 1.0
    raw = vmax / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    count = math.ceil(vmax / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def _bars_svg(bars: List[dict], *, width: int, height: int, label: str, y_title: str,
              value_fmt: Callable[[float], str], rotate_labels: bool = False, show_values: bool = True,
              label_every: int = 1, hline: Optional[float] = None) -> str:
    """A vertical bar chart. Each bar: label, value (or None), cls, and optionally ghost (a
    faint bar behind, e.g. the full length), err (a ± whisker) and title (hover text). hline: a
    dashed reference line (its label belongs in the legend, where it cannot cover a bar)."""
    left, right, top = 52, 10, 18
    bottom = 80 if rotate_labels else 34
    pw, ph = width - left - right, height - top - bottom
    peaks = [b["value"] for b in bars if _is_num(b.get("value"))]
    peaks += [b["ghost"] for b in bars if _is_num(b.get("ghost"))]
    peaks += [b["value"] + b["err"] for b in bars if _is_num(b.get("value")) and _is_num(b.get("err"))]
    ticks = _nice_ticks(max(peaks, default=0.0))
    ymax = ticks[-1] or 1.0

    def y(v: float) -> float:
        return top + ph - max(0.0, min(v, ymax)) / ymax * ph

    # width/height attributes make the viewBox the natural size: a chart of six prompts is not
    # blown up to the page width (CSS still shrinks a wide chart on a narrow screen).
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{_t(label)}">']
    for tv in ticks:
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tv):.1f}" y2="{y(tv):.1f}"/>'
                   f'<text class="ytl" x="{left - 6}" y="{y(tv) + 3.5:.1f}">{_t(format(tv, "g"))}</text>')
    out.append(f'<text class="yt" transform="translate(13 {top + ph / 2:.1f}) rotate(-90)">{_t(y_title)}</text>')
    slot = pw / max(len(bars), 1)
    bw = min(slot * 0.72, 46.0)
    for k, b in enumerate(bars):
        cx = left + slot * (k + 0.5)
        x0 = cx - bw / 2
        parts = []
        if b.get("title"):
            parts.append(f"<title>{_t(b['title'])}</title>")
        if not _is_num(b.get("ghost")):
            # A transparent full-height hover area, so the title shows even for a tiny bar
            # (a ghost bar behind already gives one).
            parts.append(f'<rect class="hit" x="{left + slot * k:.1f}" y="{top}" width="{slot:.1f}" height="{ph}"/>')
        if _is_num(b.get("ghost")):
            parts.append(f'<rect class="ghost" x="{x0:.1f}" y="{y(b["ghost"]):.1f}" width="{bw:.1f}" '
                         f'height="{top + ph - y(b["ghost"]):.1f}"/>')
        value = b.get("value")
        if _is_num(value):
            # Never thinner than 1.5 units: a divergence at token 0 must still be visible.
            h = max(top + ph - y(value), 1.5)
            parts.append(f'<rect class="{b.get("cls", "bar")}" x="{x0:.1f}" y="{top + ph - h:.1f}" '
                         f'width="{bw:.1f}" height="{h:.1f}"/>')
            if _is_num(b.get("err")) and b["err"] > 0:
                lo, hi = y(max(value - b["err"], 0.0)), y(value + b["err"])
                parts.append(f'<path class="err" d="M{cx:.1f} {lo:.1f}V{hi:.1f}M{cx - 3:.1f} {hi:.1f}h6'
                             f'M{cx - 3:.1f} {lo:.1f}h6"/>')
            if show_values:
                parts.append(f'<text class="val" x="{cx:.1f}" y="{top + ph - h - 4:.1f}">{_t(value_fmt(value))}</text>')
        elif show_values:
            parts.append(f'<text class="val" x="{cx:.1f}" y="{top + ph - 4:.1f}">n/a</text>')
        if k % label_every == 0:
            if rotate_labels:
                parts.append(f'<text class="xl rot" transform="translate({cx + 3:.1f} {top + ph + 8}) rotate(-50)">'
                             f'{_t(b["label"])}</text>')
            else:
                parts.append(f'<text class="xl" x="{cx:.1f}" y="{top + ph + 15}">{_t(b["label"])}</text>')
        out.append(f'<g>{"".join(parts)}</g>')
    if _is_num(hline):
        hy = y(hline)
        out.append(f'<line class="hline" x1="{left}" x2="{width - right}" y1="{hy:.1f}" y2="{hy:.1f}"/>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}"/>')
    out.append("</svg>")
    return "".join(out)


def _legend(entries: Sequence[Tuple[str, str]]) -> str:
    keys = "".join(f'<span class="key"><span class="sw {cls}"></span>{_t(text)}</span>' for cls, text in entries)
    return f'<div class="legend">{keys}</div>'


# --------------------------------------------------------------------------- page top


def _header(report: dict) -> str:
    model = _dict(report.get("model"))
    name = model.get("name") or model.get("path") or "unknown model"
    return (
        '<header class="top">'
        '<div class="eyebrow">pytest-refract &middot; KV-cache quantization audit</div>'
        f"<h1>{_t(name)}</h1>"
        '<p class="sub">candidate <code class="cfg">'
        f'{_esc(report.get("candidate"))}</code> against reference <code class="cfg">'
        f'{_esc(report.get("reference"))}</code><span class="when">{_esc(report.get("timestamp"))}</span></p>'
        "</header>"
    )


def _nav(axes: List[Tuple[str, dict]]) -> str:
    links = ['<a href="#glance">At a glance</a>']
    links += [f'<a href="#section-{_t(n)}">{_t(AXIS_TITLES.get(n, (n,))[0])}</a>' for n, _ in axes]
    links += ['<a href="#run-details">Run details</a>', '<a href="#reproduce">Reproduce</a>',
              '<a href="#raw-json">Raw JSON</a>']
    return f'<nav class="toc">{"".join(links)}</nav>'


def _incomplete_banner(report: dict) -> str:
    # Older reports have no "complete" key; only an explicit false means the run stopped early.
    if report.get("complete") is not False:
        return ""
    return _callout(
        "warn banner",
        "<strong>Incomplete run.</strong> The audit was interrupted before every selected item ran, so "
        "there is no composite and the gate does not pass. Scores below cover only what ran.",
    )


def _axis_headline(name: str, section: dict) -> str:
    """One line of the figure that best explains an axis score."""
    if section.get("error"):
        return f'<span class="err-text">{_t(section["error"])}</span>'
    if section.get("status") == "incomplete":
        return '<span class="err-text">incomplete: the run stopped before every item ran</span>'
    if name == "trajectory":
        return (f'full match {_pct(section.get("full_match_rate"))} &middot; median first divergence '
                f'{_num(section.get("median_first_divergence"), "g")}')
    if name == "kld":
        return (f'mean KLD {_num(section.get("mean_kld"), ".4f")} &middot; same top '
                f'{_num(section.get("same_top_p_pct"), ".1f")}%')
    if name == "rniah":
        line = (f'candidate hits {_pct(section.get("cand_hit_rate"))}, reference {_pct(section.get("ref_hit_rate"))} '
                f'&middot; {_num(section.get("n_scored_cells"), "d")}/{_num(section.get("n_cells"), "d")} cells scored')
        if section.get("status") == "n/a":
            line = "reference never retrieves: nothing to score"
        if section.get("confidence") == "low":
            line += ' <span class="chip low">low confidence</span>'
        return line
    if name == "plad":
        per = {k: v for k, v in _dict(section.get("per_perturbation")).items() if _is_num(v)}
        worst = f" &middot; worst: {_t(min(per, key=per.get))}" if per else ""
        return f'{_num(section.get("n_pairs"), "d")} pairs, {_num(section.get("n_skipped"), "d")} skipped{worst}'
    return ""


def _axis_card(name: str, section: dict) -> str:
    band = _band(section)
    score = section.get("score")
    if _is_num(score):
        shown = _num(score, ".1f")
    else:
        shown = "n/a" if section.get("status") == "n/a" else MISSING
    title, what = AXIS_TITLES.get(name, (name, ""))
    return (
        f'<a class="card axis-card {_band_class(band)}" id="axis-{_t(name)}" href="#section-{_t(name)}">'
        f'<div class="axis-name">{_t(title)} <span class="what">{_t(what)}</span></div>'
        f'<div class="axis-score"><span class="num">{shown}</span>{_badge(band)}</div>'
        f"{_ruler(score)}"
        f'<div class="headline">{_axis_headline(name, section)}</div>'
        f"{_calibration_line(section)}"
        "</a>"
    )


def _ci(interval: Any, spec: str = ".1f") -> str:
    pair = _list(interval)
    if len(pair) != 2 or not all(_is_num(v) for v in pair):
        return ""
    return f" [{_num(pair[0], spec)}, {_num(pair[1], spec)}]"


def _calibration_line(section: dict) -> str:
    """The axis score's interval, and the control beside it with the calibrated score."""
    parts = []
    if _ci(section.get("ci95")):
        parts.append(f"95% CI{_ci(section.get('ci95'))}")
    cal = _dict(section.get("calibration"))
    if cal:
        parts.append(f"control {_num(cal.get('control_score'), '.1f')}{_ci(cal.get('control_ci95'))}")
        verdict = "like the control" if cal.get("indistinguishable") else "beyond the control"
        parts.append(f"calibrated <b>{_num(section.get('calibrated_score'), '.1f')}</b> ({verdict})")
    return f'<div class="muted small calib">{" &middot; ".join(parts)}</div>' if parts else ""


def _control_section(report: dict, axes: List[Tuple[str, dict]]) -> str:
    """The sensitivity control beside the (first) candidate on every axis: labelled as the
    yardstick, never ranked."""
    control = _dict(report.get("sensitivity"))
    if not control.get("config"):
        note = control.get("note")
        return (f'<section id="control" class="section"><h2>Sensitivity control</h2><p class="muted">'
                f'{_t(note or "No sensitivity control in this report.")}</p></section>')
    rows = []
    for name, section in axes:
        c = _dict(_dict(control.get("axes")).get(name))
        cal = _dict(section.get("calibration"))
        verdict = ("indistinguishable" if cal.get("indistinguishable") else
                   "beyond the control" if cal.get("indistinguishable") is False else MISSING)
        extra = ""
        if name == "trajectory":
            extra = (f"near-tie divergences {_num(c.get('n_near_tie_divergences'), 'd')}/{_num(c.get('n_divergences'), 'd')}"
                     f" (candidate {_num(section.get('n_near_tie_divergences'), 'd')}/"
                     f"{_num(section.get('n_divergences'), 'd')}); teacher-forced top-1 "
                     f"{_num(c.get('teacher_forced_top1_pct'), '.1f')}% (candidate "
                     f"{_num(section.get('teacher_forced_top1_pct'), '.1f')}%)")
        elif name == "kld":
            extra = f"mean KLD {_num(c.get('mean_kld'), '.5f')} (candidate {_num(section.get('mean_kld'), '.5f')})"
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{_num(section.get('score'))}{_ci(section.get('ci95'), '.2f')}</td>"
            f"<td>{_num(c.get('score'))}{_ci(c.get('ci95'), '.2f')}</td>"
            f"<td><b>{_num(section.get('calibrated_score'))}</b>{_ci(_list(cal.get('retention_ci95')) and [100 * v for v in cal['retention_ci95']], '.2f')}</td>"
            f"<td>{_esc(verdict)}</td><td class=\"small\">{extra}</td></tr>")
    composite = (f"<tr><td><b>composite</b></td><td>{_num(report.get('composite'))}{_ci(report.get('composite_ci95'), '.2f')}</td>"
                 f"<td>{_num(control.get('composite'))}{_ci(control.get('composite_ci95'), '.2f')}</td>"
                 f"<td><b>{_num(report.get('calibrated_composite'))}</b>{_ci(report.get('calibrated_composite_ci95'), '.2f')}</td>"
                 f"<td>{_badge(report.get('calibrated_band'))}</td><td></td></tr>")
    cached = " Read from the reference cache: this run paid nothing for it." if control.get("cached") else ""
    return (
        '<section id="control" class="section"><h2>Candidate beside the sensitivity control</h2>'
        f'<p class="muted">Control <code>{_esc(control.get("config"))}</code>: {_t(control.get("note"))}. '
        "It measures how far this model moves under a change that is rounding only; it is never ranked. "
        "The calibrated score is 100 &times; the upper end of the 95% interval of the candidate's score over the "
        f"control's (paired by item), 100 where the two cannot be told apart.{_t(cached)}</p>"
        '<div class="scroll"><table class="grid-table"><thead><tr><th>axis</th><th>candidate [95% CI]</th>'
        "<th>control [95% CI]</th><th>calibrated [retention CI]</th><th>verdict</th><th>detail</th></tr></thead>"
        f"<tbody>{''.join(rows)}{composite}</tbody></table></div></section>"
    )


def _composite_card(report: dict, axes: List[Tuple[str, dict]]) -> str:
    score = report.get("composite")
    band = report.get("band") if report.get("band") in BANDS else (band_for(score) if _is_num(score) else None)
    counted = [n for n, s in axes if s.get("status") != "n/a"]
    gates = _custom_gates(report)
    if _is_num(score):
        note = f"harmonic mean of {len(counted)} ax{'i' if len(counted) == 1 else 'e'}s: {_t(', '.join(counted))}"
        if gates:
            note += f" and {len(gates)} custom gate{'s' if len(gates) > 1 else ''}"
    elif report.get("complete") is False:
        note = "no composite: the run is incomplete"
    elif any(s.get("score") is None and s.get("status") != "n/a" for _, s in axes):
        note = "no composite: an axis has no score"
    else:
        note = "no composite in this report"
    floor = report.get("floor")
    floor_line = f'<div class="muted small">noise floor {_num(floor, ".2f")}</div>' if _is_num(floor) else ""
    repeat = _repeat_line(report.get("repeat"))
    repeat_line = f'<div class="muted small">{repeat}</div>' if repeat else ""
    calibrated = report.get("calibrated_composite")
    calibrated_line = ""
    if _is_num(calibrated):
        calibrated_line = (f'<div class="calibrated">calibrated <b>{_num(calibrated, ".1f")}</b>'
                           f'{_ci(report.get("calibrated_composite_ci95"))} {_badge(report.get("calibrated_band"))}</div>')
    ci = _ci(report.get("composite_ci95"))
    ci_line = f'<div class="muted small">raw 95% CI{ci}</div>' if ci else ""
    return (
        f'<div class="card composite {_band_class(band)}" id="composite">'
        '<div class="label">Composite score</div>'
        f'<div class="big">{_num(score, ".1f", "n/a")}</div>'
        f'{_badge(band, "no band")}{_ruler(score)}{ci_line}{calibrated_line}'
        f'<div class="muted small">{note}</div>{floor_line}{repeat_line}'
        "</div>"
    )


def _repeat_line(repeat: Any) -> str:
    """--refract-repeat: the spread of a score over repeated runs (0 on a deterministic build)."""
    r = _dict(repeat)
    if not _is_num(r.get("n")):
        return ""
    if not _is_num(r.get("stdev")):
        return f"{_num(r['n'], 'd')} repeats: spread not available"
    return (f"{_num(r['n'], 'd')} repeats: stdev {r['stdev']:.2f}, range {_num(r.get('range'), '.2f')} "
            f"&middot; {_esc(r.get('verdict'))}")


def _custom_gates(report: dict) -> Dict[str, Any]:
    """Scores users added to the composite with refract.gate(name, score)."""
    return _dict(_dict(report.get("custom")).get("gates"))


def _gate_card(report: dict) -> str:
    gate = _dict(report.get("gate"))
    passed = gate.get("passed")
    if passed is True:
        head, cls = "Gate passed", "b-excellent"
    elif passed is False:
        head, cls = "Gate failed", "b-fail"
    else:
        head, cls = "No gate result", "b-na"
    threshold = gate.get("threshold")
    reasons = "".join(f"<li>{_t(r)}</li>" for r in _list(gate.get("reasons")))
    reasons = f'<ul class="reasons">{reasons}</ul>' if reasons else ""
    custom = [(str(name), f'{_num(score, ".1f")} {_badge(band_for(score) if _is_num(score) else None)}')
              for name, score in _custom_gates(report).items()]
    custom_html = f'<div class="label custom">Custom gates</div>{_kv_table(custom)}' if custom else ""
    return (
        f'<div class="card gate {cls}" id="gate"><div class="label">CI gate</div>'
        f'<div class="gate-head"><span class="dot"></span>{head}</div>'
        f'<div class="muted small">fails under {_num(threshold, "g")} '
        f'({"calibrated composite" if gate.get("basis") == "calibrated" else "raw composite"})</div>'
        f'{reasons}{custom_html}</div>'
    )


def _diagnosis_card(report: dict) -> str:
    items = "".join(f"<li>{_t(d)}</li>" for d in _list(report.get("diagnosis")))
    body = f"<ul>{items}</ul>" if items else _empty("No diagnosis in this report.")
    return f'<div class="card diagnosis" id="diagnosis"><div class="label">Diagnosis</div>{body}</div>'


def _glance(report: dict, axes: List[Tuple[str, dict]]) -> str:
    cards = "".join(_axis_card(n, s) for n, s in axes) or _empty("No axes ran.")
    return (
        '<section id="glance" class="glance-wrap"><h2 class="visually-hidden">At a glance</h2>'
        f'<div class="glance">{_composite_card(report, axes)}<div class="axis-cards">{cards}</div></div>'
        f'<div class="glance2">{_gate_card(report)}{_diagnosis_card(report)}</div>'
        "</section>"
    )


def _ranking(report: dict) -> str:
    """Candidate matrix: which config to ship. Empty for a single candidate."""
    ranking = _dicts(report.get("ranking"))
    if len(_dicts(report.get("candidates"))) < 2 or not ranking:
        return ""
    names = [n for n in ("trajectory", "kld", "rniah", "plad") if any(n in _dict(r.get("axes")) for r in ranking)]
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = []
    for i, r in enumerate(ranking, start=1):
        scores = "".join(f"<td>{_num(_dict(r.get('axes')).get(n))}</td>" for n in names)
        gate = "passed" if r.get("passed") else "failed"
        kv = r.get("kv_vs_reference")
        kv_cell = "?" if not isinstance(kv, (int, float)) else f"{100 * kv:.0f}%"
        rows.append(
            f"<tr><td>{i}</td><td><code>{_esc(r.get('candidate'))}</code></td>"
            f"<td><b>{_num(r.get('calibrated_composite'))}</b>{_ci(r.get('calibrated_composite_ci95'), '.2f')}</td>"
            f"<td>{_badge(r.get('calibrated_band'))}</td>"
            f"<td>{_num(r.get('composite'))}{_ci(r.get('composite_ci95'), '.2f')}</td>"
            f"<td>{_badge(r.get('band'))}</td>{scores}<td>{_esc(kv_cell)}</td><td>{_esc(gate)}</td></tr>"
        )
    return (
        '<section id="ranking" class="section"><h2>Candidates ranked</h2>'
        f'<p class="muted">Sections below show the first candidate, <code>{_esc(report.get("candidate"))}</code>; '
        "the JSON report holds every candidate in full.</p>"
        f'<div class="scroll"><table class="grid-table"><thead><tr><th>#</th><th>candidate</th>'
        '<th>calibrated [95% CI]</th><th>calibrated band</th><th>raw composite [95% CI]</th><th>raw band</th>{head}'
        '<th title="KV cache bytes per token, relative to the reference">KV memory</th>'
        f"<th>gate</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>"
    )


# --------------------------------------------------------------------------- axis sections


def _section(name: str, section: dict, body: str) -> str:
    band = _band(section)
    title, what = AXIS_TITLES.get(name, (name, ""))
    score = section.get("score")
    shown = _num(score, ".1f") if _is_num(score) else ("n/a" if section.get("status") == "n/a" else MISSING)
    notes = ""
    if section.get("error"):
        notes += _callout("error", f"<strong>No score:</strong> {_t(section['error'])}")
    if section.get("status") == "incomplete":
        notes += _callout("warn", "<strong>Incomplete:</strong> the run stopped before every item of this axis ran; "
                                  "the items measured so far are shown, no score is claimed.")
    repeat = _repeat_line(section.get("repeat"))
    if repeat:
        notes += f'<p class="muted small">Over {repeat}</p>'
    return (
        f'<section class="axis-section {_band_class(band)}" id="section-{_t(name)}">'
        f'<h2>{_t(title)} <span class="what">{_t(what)}</span>'
        f'<span class="h-score"><span class="num">{shown}</span>{_badge(band)}</span></h2>'
        f"{notes}{body}</section>"
    )


# trajectory -------------------------------------------------------------------------


def _full_match(item: dict) -> bool:
    if isinstance(item.get("full_match"), bool):
        return item["full_match"]
    return item.get("first_divergence") is None and _int(item.get("ref_len")) == _int(item.get("cand_len")) > 0


def _trajectory_chart(items: List[dict]) -> str:
    if not items:
        return _empty("No prompts in this report.")
    bars = []
    for item in items:
        length = max(_int(item.get("ref_len")), _int(item.get("cand_len")))
        pid = _str(item.get("id")) or "?"
        if _full_match(item):
            bars.append({"label": pid, "value": length, "cls": "bar-full",
                         "title": f"{pid}: identical for all {length} tokens"})
        else:
            fd = item.get("first_divergence")
            fd = fd if _is_num(fd) else None
            where = f"diverges at token {fd:g}" if fd is not None else "no divergence index"
            margin = item.get("ref_margin_at_divergence")
            tie = item.get("near_tie_divergence") is True
            how = (f"; reference top-2 margin {margin:.3f}" + (" (near-tie flip)" if tie else " (confident token changed)")
                   if _is_num(margin) else "")
            bars.append({"label": pid, "value": fd, "ghost": length or None, "cls": "bar-tie" if tie else "bar-div",
                         "title": f"{pid}: {where} of {length}{how}"})
    n = len(bars)
    width = max(640, min(1100, 90 + 26 * n))
    chart = _bars_svg(bars, width=width, height=330, label="First divergence per prompt",
                      y_title="token index", value_fmt=lambda v: format(v, "g"), rotate_labels=True,
                      show_values=n <= 60, label_every=max(1, math.ceil(n / 60)))
    legend = _legend((("bar-div", "first divergence at a confident reference token"),
                      ("bar-tie", "first divergence at a near-tie (reference top-2 margin < 0.1)"),
                      ("bar-full", "full match (drawn at full length)"),
                      ("ghost", "continuation length")))
    return f'<figure class="fig fit">{chart}{legend}</figure>'


def _split_by_chars(ref: str, cand: str) -> Tuple[str, str, str, str, str]:
    """Fallback for reports without token-level "divergence": split at the first differing
    character, widened to whole words so the highlight reads like a token."""
    n = len(os.path.commonprefix([ref, cand]))
    start = n
    while start > 0 and not ref[start - 1].isspace():
        start -= 1

    def word_end(text: str) -> int:
        i = start
        while i < len(text) and text[i].isspace():
            i += 1
        while i < len(text) and not text[i].isspace():
            i += 1
        return i

    re_, ce = word_end(ref), word_end(cand)
    return ref[:start], ref[start:re_], cand[start:ce], ref[re_:], cand[ce:]


def _divergence(item: dict) -> Tuple[Tuple[str, str, str, str, str], bool]:
    """(shared, ref token, cand token, ref rest, cand rest), and whether it is token-exact."""
    d = item.get("divergence")
    keys = ("shared_text", "ref_token_text", "cand_token_text", "ref_rest", "cand_rest")
    if isinstance(d, dict) and all(isinstance(d.get(k), str) for k in keys):
        return tuple(d[k] for k in keys), True  # type: ignore[return-value]
    return _split_by_chars(_str(item.get("ref_text")), _str(item.get("cand_text"))), False


def _continuation(shared: str, token: str, rest: str) -> str:
    if token == "":
        # This side stopped at the split point; the label comes from CSS so it is not mistaken
        # for model text (and is not copied with it).
        mark = '<mark class="end" title="this continuation ends here"></mark>'
    else:
        cls = ""
        if not token.strip():  # a whitespace token would be an invisible highlight
            cls = ' class="ws nl"' if "\n" in token else ' class="ws"'
        mark = f"<mark{cls}>{_t(token)}</mark>"
    return f'<div class="cont">{_t(shared)}{mark}<span class="rest">{_t(rest)}</span></div>'


def _trajectory_row(item: dict, report: dict) -> str:
    full = _full_match(item)
    fd = item.get("first_divergence")
    length = max(_int(item.get("ref_len")), _int(item.get("cand_len")))
    if full:
        where = f"full match ({length} tokens)"
    elif _is_num(fd):
        where = f"diverges at token {fd:g} / {length}"
    else:
        where = MISSING
    band = _band(item)
    summary = (
        f'<summary class="row"><span class="pid">{_esc(item.get("id"))}</span>'
        f'<span class="cat">{_esc(item.get("category"))}</span>'
        f'<span class="num">{_num(item.get("score"), ".1f")}</span>{_badge(band)}'
        f'<span class="where">{where}</span></summary>'
    )
    (shared, ref_tok, cand_tok, ref_rest, cand_rest), exact = _divergence(item)
    if full:
        texts = (f'<div class="side one"><div class="side-h">both caches</div>'
                 f'<div class="cont">{_t(shared + ref_rest if exact else _str(item.get("ref_text")))}</div></div>')
    else:
        texts = (
            f'<div class="side"><div class="side-h">reference <code>{_esc(report.get("reference"))}</code>'
            f'<span class="muted">{_num(item.get("ref_len"), "d")} tokens</span></div>'
            f"{_continuation(shared, ref_tok, ref_rest)}</div>"
            f'<div class="side"><div class="side-h">candidate <code>{_esc(report.get("candidate"))}</code>'
            f'<span class="muted">{_num(item.get("cand_len"), "d")} tokens</span></div>'
            f"{_continuation(shared, cand_tok, cand_rest)}</div>"
        )
    approx = "" if exact or full else (
        '<p class="muted small">Split at the first differing character (this report has no '
        "token-level divergence).</p>")
    meta = (f'<p class="muted small">prefix agreement {_num(item.get("prefix_agreement"), "d")} tokens &middot; '
            f'teacher-forced KLD {_num(item.get("teacher_forced_kld"), ".5f")} nats</p>')
    return (
        f'<details class="item">{summary}<div class="item-body">'
        f'<div class="prompt"><span class="side-h">prompt</span>{_esc(item.get("prompt"))}</div>'
        f'<div class="sides">{texts}</div>{approx}{meta}</div></details>'
    )


def _trajectory(section: dict, report: dict) -> str:
    items = _dicts(section.get("items"))
    stats = _stats([
        ("full match", _pct(section.get("full_match_rate"))),
        ("median first divergence", _num(section.get("median_first_divergence"), "g")),
        ("mean prefix agreement", _num(section.get("mean_prefix_agreement"), ".1f") + " tokens"),
        ("teacher-forced KLD", _num(section.get("teacher_forced_kld"), ".5f")),
        ("prompts", str(len(items))),
    ])
    rows = "".join(_trajectory_row(i, report) for i in items)
    listing = (f'<h3>Per prompt</h3><p class="muted small">Open a row for both continuations; '
               "the first token where they differ is highlighted.</p>"
               f'<div class="items">{rows}</div>') if rows else ""
    return (f"{stats}<h3>First divergence per prompt</h3>{_trajectory_chart(items)}{listing}")


# kld --------------------------------------------------------------------------------


def _kld_charts(section: dict) -> str:
    pcts = _dict(section.get("kld_percentiles"))
    pct_bars = [{"label": label, "value": pcts.get(key), "cls": "bar-kld",
                 "title": f"{label}: {_num(pcts.get(key), '.5f')} nats"} for key, label in KLD_PERCENTILES]
    if any(_is_num(b["value"]) for b in pct_bars):
        pct_chart = _bars_svg(pct_bars, width=440, height=260, label="KLD percentiles", y_title="KLD (nats)",
                              value_fmt=lambda v: format(v, ".3g"))
    else:
        pct_chart = _empty("No KLD percentiles in this report.")
    chunks = _dicts(section.get("items"))
    if chunks:
        bars = []
        for k, c in enumerate(chunks):
            index = c.get("chunk") if _is_num(c.get("chunk")) else k
            bars.append({"label": format(index, "g"), "value": c.get("mean_kld"), "err": c.get("mean_kld_unc"),
                         "cls": "bar-chunk",
                         "title": f"chunk {index:g}: mean KLD {_num(c.get('mean_kld'), '.5f')}"
                                  f" ± {_num(c.get('mean_kld_unc'), '.5f')}"})
        mean = section.get("mean_kld")
        chunk_chart = _bars_svg(bars, width=680, height=260, label="Mean KLD per chunk", y_title="mean KLD (nats)",
                                value_fmt=lambda v: format(v, ".3g"), show_values=False,
                                label_every=max(1, math.ceil(len(bars) / 32)), hline=mean)
        if _is_num(mean):
            chunk_chart += _legend((("bar-chunk", "chunk mean KLD"), ("hline", f"overall mean {mean:.4f}"),))
    else:
        chunk_chart = _empty("No per-chunk results in this report.")
    return (
        '<div class="chart-pair">'
        f'<figure class="fig"><figcaption>KLD percentiles over all scored positions</figcaption>{pct_chart}</figure>'
        f'<figure class="fig"><figcaption>Mean KLD per corpus chunk (whiskers: &plusmn; standard error)'
        f"</figcaption>{chunk_chart}</figure></div>"
    )


def _pm(value: Any, unc: Any, spec: str, unit: str = "") -> str:
    if not _is_num(value):
        return MISSING
    text = format(value, spec) + unit
    return text + (f" &plusmn; {format(unc, spec)}{unit}" if _is_num(unc) else "")


def _kld_table(section: dict, report: dict) -> str:
    ppl_ref, ppl_cand = section.get("ppl_ref"), section.get("ppl_cand")
    ppl = f"{_num(ppl_ref, '.3f')} &rarr; {_num(ppl_cand, '.3f')}"
    if _is_num(ppl_ref) and _is_num(ppl_cand) and ppl_ref > 0:
        ppl += f' <span class="muted">({100.0 * (ppl_cand / ppl_ref - 1.0):+.2f}%)</span>'
    corpus = _dict(section.get("corpus"))
    corpus_text = _esc(corpus.get("name"))
    if corpus:
        corpus_text += (f' <span class="muted">({_si(corpus.get("bytes"), "B")}, sha256 '
                        f'{_t(_str(corpus.get("sha256"))[:12]) or MISSING})</span>')
    rows = [
        ("mean KLD", _pm(section.get("mean_kld"), section.get("mean_kld_unc"), ".5f") + " nats"),
        ("same top token", _pm(section.get("same_top_p_pct"), section.get("same_top_p_pct_unc"), ".2f", "%")),
        ("RMS \u0394p", _pm(section.get("rms_dp_pct"), section.get("rms_dp_pct_unc"), ".3f", "%")),
        ("mean \u0394p", _pm(section.get("mean_dp_pct"), section.get("mean_dp_pct_unc"), ".3f", "%")),
        ("PPL reference \u2192 candidate", ppl),
        ("chunks", _num(section.get("n_chunks"), "d")),
        ("positions scored", _num(section.get("n_positions"), "d")),
        ("corpus", corpus_text),
    ]
    note = _dict(report.get("settings")).get("chunks_note")
    if note:
        rows.append(("note", _t(note)))
    return _kv_table(rows)


def _kld_chunk_table(section: dict) -> str:
    chunks = _dicts(section.get("items"))
    if not chunks:
        return ""
    head = "<tr><th>chunk</th><th>mean KLD</th><th>max KLD</th><th>same top</th><th>RMS \u0394p</th>" \
           "<th>PPL ref \u2192 cand</th><th>score</th></tr>"
    body = "".join(
        f'<tr><td>{_esc(c.get("id"))}</td><td class="r">{_num(c.get("mean_kld"), ".5f")}</td>'
        f'<td class="r">{_num(c.get("max_kld"), ".4f")}</td><td class="r">{_num(c.get("same_top_p_pct"), ".2f")}%</td>'
        f'<td class="r">{_num(c.get("rms_dp_pct"), ".3f")}%</td>'
        f'<td class="r">{_num(c.get("ppl_ref"), ".3f")} &rarr; {_num(c.get("ppl_cand"), ".3f")}</td>'
        f'<td class="r">{_num(c.get("score"), ".2f")} {_badge(_band(c))}</td></tr>'
        for c in chunks
    )
    return (f'<details class="more"><summary>Per-chunk table ({len(chunks)} chunks)</summary>'
            f'<div class="scroll"><table class="grid-table">{head}{body}</table></div></details>')


def _kld(section: dict, report: dict) -> str:
    return (f'{_kld_charts(section)}<div class="kld-stats"><h3>Statistics</h3>{_kld_table(section, report)}'
            f"{_kld_chunk_table(section)}</div>")


# rniah ------------------------------------------------------------------------------


def _cell_na(cell: dict) -> bool:
    return cell.get("status") == "n/a" or (_is_num(cell.get("ref_hits")) and cell["ref_hits"] == 0)


def _degradation(cell: dict) -> Optional[float]:
    d = cell.get("degradation")
    if _is_num(d):
        return min(max(float(d), 0.0), 1.0)
    ref, cand, trials = cell.get("ref_hits"), cell.get("cand_hits"), cell.get("trials")
    if _is_num(ref) and _is_num(cand) and _is_num(trials) and trials > 0:
        return min(max((ref - cand) / trials, 0.0), 1.0)
    return None


def _heat_cell(cell: Optional[dict]) -> str:
    if cell is None:
        return f'<td class="heat missing">{MISSING}</td>'
    trials = _num(cell.get("trials"), "d", "?")
    hits = (f'<span class="hits">{_num(cell.get("cand_hits"), "d", "?")}/{trials}'
            f'<span class="vs"> vs </span>{_num(cell.get("ref_hits"), "d", "?")}/{trials}</span>')
    if _cell_na(cell):
        return (f'<td class="heat na" title="the reference never retrieves here: not scored">{hits}'
                '<span class="sub">n/a &middot; reference misses</span></td>')
    d = _degradation(cell)
    if d is None:
        return f'<td class="heat missing">{hits}<span class="sub">{MISSING}</span></td>'
    # The colour is computed in CSS from --d so light and dark themes can pick their own lightness.
    return (f'<td class="heat" style="--d:{d:.3f}" title="degradation {d:.2f}">{hits}'
            f'<span class="sub">degradation {d:.2f}</span></td>')


def _rniah_heatmap(cells: List[dict]) -> str:
    lengths = sorted({c["length"] for c in cells if _is_num(c.get("length"))})
    positions = sorted({round(c["position"], 6) for c in cells if _is_num(c.get("position"))})
    if not lengths or not positions:
        # The id stays, so a link or a test looking for the heatmap finds this explanation.
        return '<p class="muted empty" id="rniah-heatmap">No R-NIAH cells in this report.</p>'
    grid: Dict[Tuple[float, float], dict] = {}
    for c in cells:
        if _is_num(c.get("length")) and _is_num(c.get("position")):
            grid[(c["length"], round(c["position"], 6))] = c
    head = "".join(f"<th>{p * 100:g}%</th>" for p in positions)
    rows = "".join(
        f'<tr><th class="len">{_num(length, "d")} tokens</th>'
        f'{"".join(_heat_cell(grid.get((length, p))) for p in positions)}</tr>'
        for length in lengths
    )
    return (
        '<figure class="fig heat-fig">'
        '<figcaption>Candidate hits vs reference hits per (haystack length &times; needle position) cell'
        "</figcaption>"
        # In a scroll box: on a phone a grid of many positions scrolls itself, not the page.
        f'<div class="scroll"><table class="heatmap" id="rniah-heatmap"><thead><tr><th class="corner">'
        f'length \\ needle at</th>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
        '<div class="legend"><span class="key"><span class="sw heat-scale"></span>degradation 0 &rarr; 1</span>'
        '<span class="key"><span class="sw heat-na"></span>n/a: the reference never retrieves</span></div>'
        "</figure>"
    )


def _rniah_answers(cells: List[dict]) -> str:
    blocks = []
    for c in cells:
        trials = _dicts(c.get("answers"))
        if not trials:
            continue
        rows = []
        for t in trials:
            sides = []
            for role in ("reference", "candidate"):
                r = _dict(t.get(role))
                hit = r.get("hit")
                mark = ('<span class="hit yes">hit</span>' if hit is True else
                        '<span class="hit no">miss</span>' if hit is False else "")
                sides.append(f'<td>{mark}<span class="ans">{_esc(r.get("answer"))}</span></td>')
            rows.append(f'<tr><td class="mono">{_esc(t.get("value"))}</td>{"".join(sides)}</tr>')
        where = f'{_num(c.get("length"), "g")} tokens, needle at {_pct(c.get("position"))}'
        blocks.append(f'<h4>{where}</h4><div class="scroll"><table class="grid-table answers"><tr><th>value</th>'
                      f'<th>reference answer</th><th>candidate answer</th></tr>{"".join(rows)}</table></div>')
    if not blocks:
        return ""
    return f'<details class="more"><summary>Answers per cell and trial</summary>{"".join(blocks)}</details>'


def _rniah(section: dict, report: dict) -> str:
    cells = _dicts(section.get("cells"))
    low = section.get("confidence") == "low"
    stats = _stats([
        ("reference hit rate", _pct(section.get("ref_hit_rate"))),
        ("candidate hit rate", _pct(section.get("cand_hit_rate"))),
        ("cells scored", f'{_num(section.get("n_scored_cells"), "d")} / {_num(section.get("n_cells"), "d")}'),
        ("confidence", '<span class="chip low">low confidence</span>' if low else _esc(section.get("confidence"))),
    ])
    notes = ""
    if section.get("status") == "n/a":
        notes += _callout("info", "<strong>n/a:</strong> the reference never retrieves the needle, so there is "
                                  "nothing to compare the candidate with; this axis is left out of the composite.")
    if low:
        notes += _callout("warn", "<strong>Low confidence:</strong> the reference itself rarely retrieves the "
                                  "needle, so this score rests on few trials.")
    return f"{stats}{notes}{_rniah_heatmap(cells)}{_rniah_answers(cells)}"


# plad -------------------------------------------------------------------------------


def _plad_per_perturbation(section: dict) -> str:
    per = _dict(section.get("per_perturbation"))
    kinds = [k for k in PERTURBATIONS if k in per] + [k for k in per if k not in PERTURBATIONS]
    if not kinds:
        return _empty("No per-perturbation scores in this report.")
    rows = []
    for kind in kinds:
        v = per.get(kind)
        band = band_for(v) if _is_num(v) else None
        bar = (f'<span class="meter {_band_class(band)}"><span style="width:{min(max(v, 0.0), 100.0):.1f}%">'
               "</span></span>") if _is_num(v) else ""
        rows.append(f'<tr><th>{_t(kind)}</th><td class="r">{_num(v, ".1f", "n/a")}</td><td>{_badge(band)}</td>'
                    f"<td>{bar}</td></tr>")
    return (f'<table class="grid-table per-kind"><tr><th>perturbation</th><th>score</th><th>band</th>'
            f'<th class="meter-col"></th></tr>{"".join(rows)}</table>')


def _plad_items(section: dict) -> str:
    items = _dicts(section.get("items"))
    if not items:
        return ""
    rows = []
    for i in items:
        if i.get("skipped"):
            rows.append(
                f'<tr class="skipped"><td>{_esc(i.get("prompt_id"))}</td><td>{_esc(i.get("perturbation"))}</td>'
                f'<td colspan="4">skipped: {_esc(i.get("reason"))}</td><td>skipped</td></tr>')
            continue
        rows.append(
            f'<tr><td>{_esc(i.get("prompt_id"))}</td><td>{_esc(i.get("perturbation"))}</td>'
            f'<td>{_esc(i.get("perturbed_prompt"))}</td><td>{_num(i.get("ref_drift"), ".3f")}</td>'
            f'<td>{_num(i.get("cand_drift"), ".3f")}</td><td>{_num(i.get("excess"), ".3f")}</td>'
            f'<td>{_num(i.get("score"), ".1f")} {_badge(_band(i))}</td></tr>')
    n_skipped = sum(1 for i in items if i.get("skipped"))
    return (
        f'<details class="more"><summary>All perturbed prompts ({len(items) - n_skipped} pairs, '
        f"{n_skipped} skipped)</summary>"
        '<p class="muted small">Drift: token edit distance between the continuations of the original and the '
        "perturbed prompt, relative to the original's length. Excess: candidate drift beyond the reference's; "
        "only that counts against the candidate.</p>"
        '<div class="scroll"><table class="grid-table plad-items"><tr><th>prompt</th><th>perturbation</th>'
        "<th>perturbed prompt</th><th>ref drift</th><th>cand drift</th><th>excess</th><th>score</th></tr>"
        f'{"".join(rows)}</table></div></details>'
    )


def _plad(section: dict, report: dict) -> str:
    stats = _stats([
        ("pairs", _num(section.get("n_pairs"), "d")),
        ("skipped", _num(section.get("n_skipped"), "d")),
    ])
    notes = ""
    if section.get("status") == "n/a":
        notes = _callout("info", "<strong>n/a:</strong> no perturbation applied to any prompt.")
    return f"{stats}{notes}<h3>Per perturbation</h3>{_plad_per_perturbation(section)}{_plad_items(section)}"


def _unknown_axis(section: dict, report: dict) -> str:
    return _empty("This viewer has no dedicated view for this axis; its data is in the raw JSON below.")


AXIS_VIEWS = {"trajectory": _trajectory, "kld": _kld, "rniah": _rniah, "plad": _plad}


def _axis_section(name: str, section: dict, report: dict) -> str:
    # A failed axis with nothing measured is just its error: empty charts would only add noise.
    # One with some items measured still shows those.
    if section.get("error") and not any(section.get(k) for k in ("items", "cells", "kld_percentiles")):
        # (R-NIAH keeps its heatmap element, as a one-line placeholder, so its id is always there.)
        return _section(name, section, _rniah_heatmap([]) if name == "rniah" else "")
    view = AXIS_VIEWS.get(name, _unknown_axis)
    return _section(name, section, _guarded(view, section, report))


def _guarded(view: Callable[..., str], *args: Any) -> str:
    """Render one part; if unexpected data breaks it, say so in place and keep the rest of the
    page: a report viewer that dies on one odd field shows nothing at all."""
    try:
        return view(*args)
    except Exception as exc:  # noqa: BLE001 - deliberately broad, see docstring
        return _callout("error", f"Could not render this part of the report ({_t(type(exc).__name__)}: {_t(exc)}).")


# --------------------------------------------------------------------------- run details


def _model_table(report: dict) -> str:
    m = _dict(report.get("model"))
    sha = _str(m.get("sha256_first_mib"))
    return _kv_table([
        ("name", _esc(m.get("name"))),
        ("file", f'<span class="mono">{_esc(m.get("path"))}</span>'),
        ("size", _si(m.get("size_bytes"), "B")),
        ("architecture", _esc(m.get("architecture"))),
        ("parameters", _si(m.get("n_params"))),
        ("training context", _num(m.get("n_ctx_train"), "d")),
        ("sha256 (first MiB)",
         f'<span class="mono" title="{_t(sha)}">{_t(sha[:16])}&hellip;</span>' if sha else MISSING),
    ])


def _config_table(report: dict) -> str:
    return _kv_table([
        ("reference", f'<code>{_esc(report.get("reference"))}</code>'),
        ("candidate", f'<code>{_esc(report.get("candidate"))}</code>'),
        ("self-reference", _value(report.get("self_reference"))),
        ("noise floor", _num(report.get("floor"), ".2f", "not measured")),
    ])


def _versions_table(report: dict) -> str:
    build = _dict(report.get("llama_cpp_build"))
    host = _dict(report.get("host"))
    rows = [
        ("pytest-refract", _esc(report.get("plugin_version"))),
        ("llama-cpp-python", _esc(build.get("llama_cpp_python") or report.get("llama_cpp_python_version"))),
        ("ggml version", _esc(build.get("ggml_version"))),
        ("ggml commit", f'<span class="mono">{_esc(build.get("ggml_commit"))}</span>'),
        ("host", " ".join(_t(host.get(k)) for k in ("system", "machine") if host.get(k)) or MISSING),
        ("CPUs", _value(host.get("cpus"))),
        ("schema", _esc(report.get("schema"))),
    ]
    info = build.get("system_info")
    if info:
        rows.append(("system info", f'<span class="mono small wrap">{_t(info)}</span>'))
    return _kv_table(rows)


def _settings_table(report: dict) -> str:
    settings = _dict(report.get("settings"))
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict):  # one level of nesting (e.g. rniah) as its own rows
            rows += [(f"{key}.{k}", _value(v)) for k, v in value.items()]
        else:
            rows.append((str(key), _value(value)))
    return _kv_table(rows) if rows else _empty("No settings in this report.")


def _timing_table(report: dict, axes: List[Tuple[str, dict]]) -> str:
    rows = [(AXIS_TITLES.get(n, (n,))[0], _duration(s.get("wall_s"))) for n, s in axes]
    rows.append(("total (whole session)", _duration(report.get("wall_s"))))
    # May break after the date's "T" (a narrow card has no room for the whole ISO timestamp
    # next to its label); it never breaks inside the date or the time.
    stamp = _esc(report.get("timestamp"))
    date, sep, clock = stamp.partition("T")
    shown = f'<span class="nowrap">{date}T</span><wbr><span class="nowrap">{clock}</span>' if sep else stamp
    rows.append(("finished", shown))
    return _kv_table(rows)


def _run_details(report: dict, axes: List[Tuple[str, dict]]) -> str:
    cards = [("Model", _model_table, (report,)), ("KV caches", _config_table, (report,)),
             ("Wall time", _timing_table, (report, axes)), ("Versions and host", _versions_table, (report,)),
             ("Settings", _settings_table, (report,))]
    body = "".join(f'<div class="card detail"><h3>{_t(title)}</h3>{_guarded(view, *args)}</div>'
                   for title, view, args in cards)
    return f'<section id="run-details"><h2>Run details</h2><div class="details-grid">{body}</div></section>'


def _repro(report: dict) -> str:
    cmd = report.get("repro_command")
    body = f'<pre class="repro"><code>{_t(cmd)}</code></pre>' if cmd else _empty("No command in this report.")
    return ('<section id="reproduce"><h2>Reproduce</h2><p class="muted small">Same model, caches and settings '
            f"(numbers change with batch size, threads and flash attention):</p>{body}</section>")


# --------------------------------------------------------------------------- raw JSON


def _strip(value: Any) -> Any:
    """The report without token-id lists, wherever they occur."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in OMITTED_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _embedded_copy(report: dict) -> dict:
    """The report as embedded in the page. Besides token ids it leaves out what the page shows
    verbatim (prompts, continuations, perturbed prompts, answers) and the per-item compute
    counters (each axis keeps their totals): with those, a default audit's page is about 400 KB
    instead of under 300 KB, for no information a reader of the page lacks. Only these known
    places are touched; everything else stays exactly as written."""
    out = _strip(report)
    axes = _dict(out.get("axes"))
    for section in axes.values():
        for item in _dicts(_dict(section).get("items")) + _dicts(_dict(section).get("cells")):
            item.pop("compute", None)
    for item in _dicts(_dict(axes.get("trajectory")).get("items")):
        for key in TRAJECTORY_TEXT_KEYS:
            item.pop(key, None)
    for item in _dicts(_dict(axes.get("plad")).get("items")):
        item.pop("perturbed_prompt", None)
    for cell in _dicts(_dict(axes.get("rniah")).get("cells")):
        for trial in _dicts(cell.get("answers")):
            for role in ("reference", "candidate", "floor"):
                if isinstance(trial.get(role), dict):
                    trial[role].pop("answer", None)
    return out


def _pretty_json(value: Any, level: int = 0, record: bool = False) -> str:
    """Indented JSON with small values on one line and each object in a list (an item, a
    cell) on one line of its own, like a table. Reads as well as indent=2 at well under half
    the bytes, which is what keeps a full audit's page small."""
    flat = json.dumps(value, ensure_ascii=False, default=str)
    if not isinstance(value, (dict, list)) or not value or record or len(flat) + 2 * level <= 100:
        return flat
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(value, dict):
        inner = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_pretty_json(v, level + 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(inner) + "\n" + end + "}"
    return "[\n" + ",\n".join(pad + _pretty_json(v, level + 1, isinstance(v, dict)) for v in value) + "\n" + end + "]"


def _raw_json(report: dict) -> str:
    text = _pretty_json(_embedded_copy(report))
    return (
        '<section id="raw"><h2>Raw data</h2><details class="more" id="raw-json">'
        "<summary>The JSON report</summary>"
        '<p class="muted small">Left out here to keep the page small: token-id lists (<code>ref_tokens</code>, '
        "<code>cand_tokens</code>), per-item compute counters (axis totals stay) and the texts shown verbatim "
        "above; the JSON file written by <code>--refract-json</code> has everything.</p>"
        f'<pre class="json">{_t(text)}</pre></details></section>'
    )


# --------------------------------------------------------------------------- page


def _present_axes(report: dict) -> List[Tuple[str, dict]]:
    """Axis sections in the canonical order, then any axis this viewer does not know."""
    axes = _dict(report.get("axes"))
    names = [n for n in AXIS_ORDER if n in axes] + [n for n in axes if n not in AXIS_ORDER]
    # A section that is not an object is as good as a failed axis.
    return [(str(n), axes[n] if isinstance(axes[n], dict) else {"error": "malformed axis section"}) for n in names]


def render_html(report: dict) -> str:
    """The report as one self-contained HTML5 document (no external resources, no script)."""
    report = report if isinstance(report, dict) else {}
    axes = _present_axes(report)
    model = _dict(report.get("model"))
    name = model.get("name") or model.get("path") or "report"
    title = f"refract audit: {name} \u00b7 {report.get('candidate') or ''}"
    parts = [
        _header(report),
        _nav(axes),
        _incomplete_banner(report),
        _guarded(_glance, report, axes),
        _guarded(_ranking, report),
        _guarded(_control_section, report, axes),
        *(_axis_section(n, s, report) for n, s in axes),
        _guarded(_run_details, report, axes),
        _repro(report),
        _guarded(_raw_json, report),
        f'<footer class="muted small">pytest-refract {_esc(report.get("plugin_version"))} &middot; '
        f'{_esc(report.get("schema"))}</footer>',
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        # An empty icon: otherwise browsers ask for /favicon.ico, which logs an error offline.
        '<link rel="icon" href="data:,">\n'
        f"<title>{_t(title)}</title>\n<style>{_CSS_MIN}</style>\n</head>\n"
        f'<body>\n<main>{"".join(parts)}</main>\n</body>\n</html>\n'
    )


CSS = """
:root {
  --bg: #f5f6f8; --surface: #ffffff; --surface-2: #f0f2f5; --fg: #1d2330; --muted: #5b6472;
  --border: #dde1e7; --accent: #5b5bd6; --accent-2: #2f7fd8; --ghost: #dfe3ea; --mark: #ffd866;
  --mark-fg: #1d2330; --code-bg: #eef0f4;
  --excellent: #1f8a3d; --excellent-soft: #dcf5e3;
  --pass: #0f8a85; --pass-soft: #d5f3f0;
  --degraded: #a86a00; --degraded-soft: #fff0cc;
  --fail: #cf2e2e; --fail-soft: #fde4e3;
  --na: #7b8490; --na-soft: #e8ebef;
  --heat-s: 62%; --heat-l: 84%;
  --shadow: 0 1px 2px rgba(16, 24, 40, .06), 0 1px 3px rgba(16, 24, 40, .08);
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0f1217; --surface: #171b22; --surface-2: #1e232c; --fg: #e5e9f0; --muted: #9aa3b0;
    --border: #2c333e; --accent: #8b8cf5; --accent-2: #5aa6f0; --ghost: #2a313c; --mark: #b58900;
    --mark-fg: #fffbea; --code-bg: #222833;
    --excellent: #46c767; --excellent-soft: #143322;
    --pass: #2fc9bf; --pass-soft: #0f302e;
    --degraded: #e5a935; --degraded-soft: #3a2c0b;
    --fail: #f26461; --fail-soft: #3d1718;
    --na: #8b94a1; --na-soft: #262c35;
    --heat-s: 45%; --heat-l: 27%;
    --shadow: none;
  }
}
* { box-sizing: border-box; }
html { background: var(--bg); color: var(--fg); }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 28px 24px 48px; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: .88em; }
code { background: var(--code-bg); padding: 1px 5px; border-radius: 4px; }
a { color: var(--accent); }
h2 { font-size: 1.3rem; margin: 0 0 14px; display: flex; align-items: center; gap: 10px; flex-wrap: wrap; }
h3 { font-size: 1rem; margin: 22px 0 10px; }
h4 { font-size: .9rem; margin: 16px 0 6px; color: var(--muted); }
.muted { color: var(--muted); }
.small { font-size: .85rem; }
.nowrap { white-space: nowrap; }
.wrap { overflow-wrap: anywhere; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
.what { font-weight: 400; color: var(--muted); font-size: .85em; }

/* band colour plumbing: a b-* class sets --band/--band-soft, components use them */
.b-excellent { --band: var(--excellent); --band-soft: var(--excellent-soft); }
.b-pass { --band: var(--pass); --band-soft: var(--pass-soft); }
.b-degraded { --band: var(--degraded); --band-soft: var(--degraded-soft); }
.b-fail { --band: var(--fail); --band-soft: var(--fail-soft); }
.b-na { --band: var(--na); --band-soft: var(--na-soft); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: .72rem; font-weight: 700;
  letter-spacing: .04em; color: var(--band); background: var(--band-soft); border: 1px solid var(--band); white-space: nowrap; }
.chip { display: inline-block; padding: 0 7px; border-radius: 999px; font-size: .72rem; font-weight: 600; }
.chip.low { background: var(--degraded-soft); color: var(--degraded); border: 1px dashed var(--degraded); }

header.top { margin-bottom: 14px; }
.eyebrow { text-transform: uppercase; letter-spacing: .08em; font-size: .75rem; color: var(--muted); font-weight: 600; }
header h1 { margin: 4px 0 6px; font-size: 1.75rem; line-height: 1.2; overflow-wrap: anywhere; }
.sub { margin: 0; color: var(--muted); }
.sub .when { margin-left: 12px; font-size: .85rem; }
nav.toc { display: flex; flex-wrap: wrap; gap: 4px 16px; padding: 10px 0 14px; margin-bottom: 18px;
  border-bottom: 1px solid var(--border); font-size: .88rem; }
nav.toc a { text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }

.card { background: var(--surface); border: 1px solid var(--border); border-radius: 12px; padding: 14px 16px;
  box-shadow: var(--shadow); }
.label { text-transform: uppercase; letter-spacing: .07em; font-size: .72rem; font-weight: 700; color: var(--muted); }
.callout { border-radius: 10px; padding: 10px 14px; margin: 0 0 14px; border: 1px solid; overflow-wrap: anywhere; }
.callout.warn { background: var(--degraded-soft); border-color: var(--degraded); }
.callout.error { background: var(--fail-soft); border-color: var(--fail); }
.callout.info { background: var(--na-soft); border-color: var(--na); }
.callout.banner { font-size: 1rem; margin-bottom: 18px; }

.glance { display: grid; grid-template-columns: minmax(220px, 260px) 1fr; gap: 14px; }
.composite { border-top: 5px solid var(--band); display: flex; flex-direction: column; gap: 6px; }
.composite .big { font-size: 3.6rem; font-weight: 800; line-height: 1; color: var(--band); font-variant-numeric: tabular-nums; }
.composite .badge { align-self: flex-start; font-size: .85rem; padding: 2px 12px; }
.axis-cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(180px, 1fr)); gap: 14px; }
.axis-card { display: flex; flex-direction: column; gap: 6px; text-decoration: none; color: inherit;
  border-top: 4px solid var(--band); }
.axis-card:hover { border-color: var(--band); }
.axis-name { font-weight: 700; }
.axis-name .what { display: block; font-size: .8rem; }
.axis-score { display: flex; flex-wrap: wrap; align-items: baseline; gap: 2px 8px; }
.axis-score .num { font-size: 1.9rem; font-weight: 750; color: var(--band); font-variant-numeric: tabular-nums; line-height: 1.1; }
.headline { font-size: .82rem; color: var(--muted); overflow-wrap: anywhere; }
.err-text { color: var(--fail); }
.ruler { position: relative; display: flex; height: 6px; border-radius: 3px; overflow: visible; margin: 4px 0 2px; }
.ruler > span:not(.tick) { background: var(--band); opacity: .35; }
.ruler > span:first-child { border-radius: 3px 0 0 3px; }
.ruler > span:nth-child(4) { border-radius: 0 3px 3px 0; }
.ruler .tick { position: absolute; top: -4px; width: 3px; height: 14px; margin-left: -1.5px; background: var(--fg); border-radius: 2px; }
.glance2 { display: grid; grid-template-columns: minmax(220px, 260px) 1fr; gap: 14px; margin-top: 14px; }
.gate { border-left: 5px solid var(--band); }
.gate-head { font-size: 1.15rem; font-weight: 700; margin: 4px 0; color: var(--band); display: flex; align-items: center; gap: 8px; }
.gate .dot { width: 10px; height: 10px; border-radius: 50%; background: var(--band); display: inline-block; }
.gate .custom { margin-top: 10px; }
.gate .kv td { white-space: nowrap; }
.reasons { margin: 6px 0 0; padding-left: 18px; font-size: .88rem; overflow-wrap: anywhere; }
.diagnosis ul { margin: 6px 0 0; padding-left: 20px; }
.diagnosis li { margin: 3px 0; overflow-wrap: anywhere; }

section.axis-section, #run-details, #reproduce, #raw { margin-top: 34px; padding-top: 18px; border-top: 1px solid var(--border); }
.axis-section > h2 { border-left: 5px solid var(--band); padding-left: 10px; }
.h-score { display: inline-flex; align-items: center; gap: 8px; margin-left: auto; }
.h-score .num { font-size: 1.4rem; color: var(--band); font-variant-numeric: tabular-nums; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 6px; }
.stat { background: var(--surface); border: 1px solid var(--border); border-radius: 10px; padding: 6px 12px; min-width: 120px; }
.stat .k { display: block; font-size: .75rem; color: var(--muted); }
.stat .v { font-weight: 650; font-variant-numeric: tabular-nums; }

.fig { margin: 0; background: var(--surface); border: 1px solid var(--border); border-radius: 12px; padding: 12px 14px 10px; }
.fig figcaption { font-size: .85rem; color: var(--muted); margin-bottom: 4px; }
.chart { max-width: 100%; height: auto; display: block; }
.chart text { fill: var(--muted); font-size: 11px; font-family: inherit; }
.chart .ytl { text-anchor: end; }
.chart .yt { text-anchor: middle; font-size: 11px; }
.chart .xl { text-anchor: middle; }
.chart .xl.rot { text-anchor: end; font-size: 10.5px; }
.chart .val { text-anchor: middle; font-size: 10px; fill: var(--fg); }
.chart .grid { stroke: var(--border); stroke-width: 1; }
.chart .axis { stroke: var(--muted); stroke-width: 1; }
.chart .hit { fill: transparent; }
.chart g:hover .hit { fill: var(--surface-2); }
.chart .ghost, .sw.ghost { fill: var(--ghost); background: var(--ghost); }
.chart .bar-div, .sw.bar-div { fill: var(--accent); background: var(--accent); }
.chart .bar-full, .sw.bar-full { fill: var(--excellent); background: var(--excellent); }
.chart .bar-tie, .sw.bar-tie { fill: var(--mark); background: var(--mark); }
.chart .bar-kld, .chart .bar-chunk { fill: var(--accent-2); }
.chart .err { stroke: var(--fg); stroke-width: 1; opacity: .55; fill: none; }
.chart .hline { stroke: var(--degraded); stroke-width: 1.5; stroke-dasharray: 5 4; }
.sw.bar-chunk { background: var(--accent-2); }
.sw.hline { height: 0; border-top: 2px dashed var(--degraded); border-radius: 0; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 18px; font-size: .8rem; color: var(--muted); margin-top: 6px; }
.legend .key { display: inline-flex; align-items: center; gap: 6px; }
.sw { display: inline-block; width: 14px; height: 10px; border-radius: 2px; }
.chart-pair { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 3fr); gap: 14px; }

.items { border: 1px solid var(--border); border-radius: 12px; overflow: hidden; background: var(--surface); }
details.item + details.item { border-top: 1px solid var(--border); }
summary { cursor: pointer; }
summary.row { list-style: none; display: grid; grid-template-columns: 14px minmax(80px, 150px) minmax(70px, 130px) 52px 96px 1fr;
  align-items: center; gap: 10px; padding: 8px 14px; font-size: .9rem; }
summary.row::-webkit-details-marker { display: none; }
summary.row::before { content: "\\25B8"; color: var(--muted); transition: transform .15s; }
details[open] > summary.row::before { transform: rotate(90deg); }
summary.row:hover { background: var(--surface-2); }
summary.row .pid { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; overflow-wrap: anywhere; }
summary.row .cat { color: var(--muted); overflow-wrap: anywhere; }
summary.row .num { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
summary.row .where { color: var(--muted); }
summary.row .badge { justify-self: start; }
.item-body { padding: 4px 16px 14px 38px; }
.prompt { background: var(--surface-2); border-radius: 8px; padding: 8px 12px; margin-bottom: 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
.side-h { display: block; font-size: .72rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); font-weight: 700; margin-bottom: 4px; white-space: normal; }
.side-h code { text-transform: none; letter-spacing: 0; font-weight: 500; }
.side-h .muted { float: right; text-transform: none; letter-spacing: 0; font-weight: 500; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.side { border: 1px solid var(--border); border-radius: 8px; padding: 8px 12px; min-width: 0; }
.side.one { grid-column: 1 / -1; }
.cont { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.55; }
.cont .rest { color: var(--muted); }
mark { background: var(--mark); color: var(--mark-fg); border-radius: 3px; padding: 0 2px; font-weight: 600; }
mark.ws { outline: 1px dashed var(--mark-fg); min-width: .6em; display: inline-block; }
mark.nl::before { content: "\\21B5"; }
mark.end::before { content: "end of output"; font-size: .75em; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; }
mark.end { background: var(--fail-soft); color: var(--fail); border: 1px solid var(--fail); padding: 0 5px; }

table { border-collapse: collapse; }
.kv { width: 100%; font-size: .88rem; }
.kv th { text-align: left; font-weight: 500; color: var(--muted); padding: 4px 12px 4px 0; vertical-align: top; white-space: nowrap; width: 1%; }
.kv td { padding: 4px 0; overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
.kv tr + tr > * { border-top: 1px solid var(--border); }
.kld-stats { max-width: 760px; }
.kld-stats .kv { background: var(--surface); border: 1px solid var(--border); border-radius: 12px; border-collapse: separate; padding: 6px 14px; }
.grid-table { width: 100%; font-size: .86rem; background: var(--surface); }
.grid-table th, .grid-table td { border: 1px solid var(--border); padding: 5px 9px; text-align: left; vertical-align: top; }
.grid-table th { background: var(--surface-2); font-weight: 600; }
.grid-table .r { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
/* PLAD rows carry no per-cell classes (144 rows of them): the columns set the alignment */
.plad-items td:first-child { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .8rem; white-space: nowrap; }
.plad-items td:nth-child(3) { overflow-wrap: anywhere; min-width: 240px; }
.plad-items td:nth-child(n+4) { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.plad-items tr.skipped td { text-align: left; }
.grid-table tr.skipped td { color: var(--muted); font-style: italic; background: var(--surface-2); }
.per-kind { max-width: 620px; }
.per-kind th:first-child { width: 1%; white-space: nowrap; }
.meter-col { width: 45%; }
.meter { display: block; height: 8px; border-radius: 4px; background: var(--surface-2); overflow: hidden; min-width: 80px; }
.meter > span { display: block; height: 100%; background: var(--band); }
.scroll { overflow-x: auto; }
details.more { margin-top: 14px; }
details.more > summary { font-weight: 600; color: var(--accent); padding: 4px 0; }
.empty { font-style: italic; }

.heat-fig, .fig.fit { display: inline-block; max-width: 100%; }
.heatmap { border-collapse: separate; border-spacing: 4px; }
.heatmap th { font-size: .8rem; color: var(--muted); font-weight: 600; padding: 4px 8px; }
.heatmap th.len { text-align: right; white-space: nowrap; }
.heatmap th.corner { font-weight: 500; font-style: italic; }
.heat { min-width: 132px; padding: 10px 12px; border-radius: 8px; text-align: center; border: 1px solid var(--border);
  background: hsl(calc(130 - 130 * var(--d, 0)) var(--heat-s) var(--heat-l)); color: var(--fg); }
.heat .hits { display: block; font-size: 1.1rem; font-weight: 700; font-variant-numeric: tabular-nums; white-space: nowrap; }
.heat .vs { font-weight: 400; font-size: .8rem; color: var(--muted); }
.heat .sub { display: block; font-size: .72rem; color: var(--muted); }
.heat.na, .sw.heat-na { background: repeating-linear-gradient(45deg, var(--na-soft) 0 6px, var(--surface) 6px 12px); color: var(--muted); }
.heat.na .hits { font-weight: 500; }
.heat.missing { background: var(--surface-2); color: var(--muted); }
.sw.heat-scale { width: 64px; background: linear-gradient(90deg, hsl(130 var(--heat-s) var(--heat-l)), hsl(65 var(--heat-s) var(--heat-l)), hsl(0 var(--heat-s) var(--heat-l))); border: 1px solid var(--border); }
.sw.heat-na { border: 1px solid var(--border); }
.answers { table-layout: fixed; }
.answers th:first-child { width: 80px; }
.answers td { overflow-wrap: anywhere; }
.grid-table td.mono { white-space: nowrap; }
.hit { display: inline-block; font-size: .7rem; font-weight: 700; padding: 0 6px; border-radius: 999px; margin-right: 6px; }
.hit.yes { background: var(--excellent-soft); color: var(--excellent); }
.hit.no { background: var(--fail-soft); color: var(--fail); }

.details-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(340px, 100%), 1fr)); gap: 14px; }
/* A grid item's automatic minimum is its content's width: without min-width 0 one long value
   widens the whole card past its column instead of wrapping inside it. */
.detail { min-width: 0; }
.detail h3 { margin-top: 0; }
pre { background: var(--code-bg); border: 1px solid var(--border); border-radius: 10px; padding: 12px 14px; overflow-x: auto; }
pre.repro { white-space: pre-wrap; overflow-wrap: anywhere; }
pre.json { max-height: 600px; overflow: auto; font-size: .8rem; line-height: 1.45; }
pre code { background: none; padding: 0; }
footer { margin-top: 40px; padding-top: 12px; border-top: 1px solid var(--border); }

@media (max-width: 820px) {
  .glance, .glance2, .chart-pair, .sides { grid-template-columns: 1fr; }
  summary.row { grid-template-columns: 14px 1fr 1fr 52px 96px; }
  summary.row .where { grid-column: 2 / -1; }
  .heat { min-width: 0; padding: 8px 6px; }
}
/* A phone: the per-perturbation meters repeat the score beside them; the score and band stay. */
@media (max-width: 480px) {
  .per-kind .meter-col, .per-kind td:last-child { display: none; }
}
"""

# The stylesheet above is written to be read; the page gets it with runs of whitespace collapsed.
_CSS_MIN = re.sub(r"\s+", " ", CSS).strip()
