"""A sweep's two pictures, as inline SVG (no script, nothing fetched): the Pareto chart of KV
bytes per token against the worst axis multiple (intervals as whiskers, points coloured by
verdict, the frontier drawn, the recommendation ringed) and the K x V grid as a heat map
(each cell coloured by its verdict, with its bytes per token). Every text from the report goes
through ``escape``; every coordinate is a number formatted here."""

from __future__ import annotations

import math
from typing import List, Optional

from markupsafe import Markup

from ...sweep import drawn_types
from ..escaping import escape as _e
from ..fmt import as_dict, is_num
from ..svg import nice_ticks

_FILL = {"PASS": "var(--pass)", "FAIL": "var(--fail)", "UNDECIDED": "#d19a00"}
_SOFT = {"PASS": "var(--pass-soft)", "FAIL": "var(--fail-soft)", "UNDECIDED": "#fbefc8"}


def _bound(v) -> str:
    """An interval end; None (an open end, JSON has no infinity) is shown as inf."""
    return format(v, ".3g") if is_num(v) else "inf"


def _cells(sweep: dict) -> List[dict]:
    grid = as_dict(sweep.get("grid"))
    return [as_dict(c) for row in as_dict(grid.get("cells")).values() for c in as_dict(row).values()]


def pareto_chart(sweep: dict, width: int = 680, height: int = 340) -> Optional[Markup]:
    """x: KV bytes per token; y: the worst axis's multiple of the control's damage, whisker
    its interval (an open upper end reaches the top with an arrow); the margin dashed."""
    sweep = as_dict(sweep)
    points = []
    for c in _cells(sweep):
        worst = as_dict(c.get("worst_axis"))
        if c.get("skipped") or not is_num(c.get("kv_bytes_per_token")) or not is_num(worst.get("multiple")):
            continue
        raw_ci = worst.get("ci")
        ci = raw_ci if isinstance(raw_ci, list) and len(raw_ci) == 2 else None
        points.append((float(c["kv_bytes_per_token"]), float(worst["multiple"]), ci, str(c.get("candidate")),
                       c.get("verdict"), str(worst.get("axis"))))
    if not points:
        return None
    left, right, top, bottom = 58, 14, 16, 40
    pw, ph = width - left - right, height - top - bottom
    finite_hi = [p[2][1] for p in points if p[2] and is_num(p[2][1]) and math.isfinite(p[2][1])]
    positive = [v for p in points for v in (p[1], p[2][0] if p[2] and is_num(p[2][0]) else None)
                if v is not None and v > 0]
    # A log scale: the verdict reads multiples as ratios, and a sweep of every type spans
    # 1x to several hundred x, where a linear axis would crush the pairs near the margin.
    ylo = min([0.5, *positive]) / 1.15
    yhi = max([p[1] for p in points] + finite_hi + [3.0]) * 1.15
    xticks = nice_ticks(max(p[0] for p in points) * 1.05)
    xmax = xticks[-1] or 1.0

    def x(v: float) -> float:
        return left + max(0.0, min(v, xmax)) / xmax * pw

    def y(v: float) -> float:
        v = max(ylo, min(v, yhi)) if v > 0 else ylo
        return top + ph - (math.log(v) - math.log(ylo)) / (math.log(yhi) - math.log(ylo)) * ph

    out = [f'<svg class="chart" id="sweep-pareto" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="KV bytes per token against the worst axis multiple">']
    for tv in _log_ticks(ylo, yhi):
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tv):.1f}" y2="{y(tv):.1f}"/>'
                   f'<text class="ytl" x="{left - 6}" y="{y(tv) + 3.5:.1f}">{_e(format(tv, "g"))}</text>')
    for tv in xticks:
        out.append(f'<text class="ytl" x="{x(tv):.1f}" y="{top + ph + 14}" text-anchor="middle">{_e(format(tv, "g"))}</text>')
    out.append(f'<text class="yt" transform="translate(13 {top + ph / 2:.1f}) rotate(-90)">worst axis multiple '
               f'(x control, log scale)</text>')
    out.append(f'<text class="yt" x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">KV bytes per token '
               f'(llama.cpp\'s allocation)</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(3.0):.1f}" y2="{y(3.0):.1f}" stroke="currentColor" '
               f'stroke-dasharray="4 3" opacity="0.6"><title>the 3x margin</title></line>')
    front = [str(f) for f in (sweep.get("frontier") or [])]
    by_label = {p[3]: p for p in points}
    path = [by_label[f] for f in front if f in by_label]
    if len(path) > 1:
        d = "M" + " L".join(f"{x(p[0]):.1f} {y(p[1]):.1f}" for p in path)
        out.append(f'<path id="sweep-frontier" d="{d}" fill="none" stroke="currentColor" stroke-width="1.5" '
                   f'opacity="0.7"><title>Pareto frontier</title></path>')
    rec = as_dict(sweep.get("recommendation")).get("config")
    for kv, mult, ci, label, verdict, axis in points:
        cx, cy = x(kv), y(mult)
        fill = _FILL.get(str(verdict), "gray")
        title = f"{label}: {kv:g} B/token, {axis} {mult:.3g}x" + (f" [{_bound(ci[0])}, {_bound(ci[1])}]" if ci else "") \
            + f", {verdict or 'no verdict'}"
        parts = [f"<title>{_e(title)}</title>"]
        if ci and is_num(ci[0]):
            hi = ci[1] if is_num(ci[1]) and math.isfinite(ci[1]) else None
            y_hi = y(hi) if hi is not None else top
            parts.append(f'<path class="err" d="M{cx:.1f} {y(ci[0]):.1f}V{y_hi:.1f}M{cx - 3:.1f} {y(ci[0]):.1f}h6'
                         + (f'M{cx - 3:.1f} {y_hi:.1f}h6' if hi is not None else f'M{cx - 3:.1f} {top + 5}l3 -5l3 5')
                         + '"/>')
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="{fill}"/>')
        if label == rec:
            parts.append(f'<circle id="sweep-recommended" cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" '
                         f'stroke="{fill}" stroke-width="2"/>')
        out.append(f'<g class="sweep-point" data-verdict="{_e(verdict or "")}">{"".join(parts)}</g>')
    out.append("</svg>")
    return Markup("".join(out))


def _log_ticks(lo: float, hi: float) -> List[float]:
    """1-2-5 ticks (0.5, 1, 2, 5, 10, ...) within [lo, hi], with 3 (the margin) among them."""
    out = []
    decade = 10.0 ** math.floor(math.log10(lo))
    while decade <= hi:
        out += [m * decade for m in (1, 2, 5) if lo <= m * decade <= hi]
        decade *= 10
    return sorted(set(out) | ({3.0} if lo <= 3.0 <= hi else set()))


def heat_map(sweep: dict, reference: Optional[str], cell_w: int = 104, cell_h: int = 40) -> Optional[Markup]:
    """The K x V grid (rows K, columns V): each cell coloured by its verdict with its bytes per
    token; skipped, refused, the control and the reference's own pair are named."""
    sweep = as_dict(sweep)
    grid = as_dict(sweep.get("grid"))
    # A type refused on its side for every pair is named in the refusals, not drawn.
    drawn = drawn_types(grid)
    rows, cols = [str(r) for r in drawn[0]], [str(c) for c in drawn[1]]
    if not rows or not cols:
        return None
    cells = as_dict(grid.get("cells"))
    ref = dict(p.split("=", 1) for p in str(reference or "").split(",") if "=" in p)
    rec = as_dict(sweep.get("recommendation")).get("config")
    left, top = 70, 34
    width, height = left + cell_w * len(cols) + 6, top + cell_h * len(rows) + 6
    out = [f'<svg class="chart" id="sweep-grid" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="K x V grid of verdicts">',
           '<text class="yt" x="4" y="14" text-anchor="start" style="text-anchor: start">K \\ V</text>']
    for j, c in enumerate(cols):
        out.append(f'<text class="ytl" x="{left + cell_w * (j + 0.5):.1f}" y="{top - 8}" text-anchor="middle">{_e(c)}</text>')
    for i, r in enumerate(rows):
        y0 = top + cell_h * i
        out.append(f'<text class="ytl" x="{left - 8}" y="{y0 + cell_h / 2 + 4:.1f}">{_e(r)}</text>')
        for j, c in enumerate(cols):
            cell = as_dict(as_dict(cells.get(r)).get(c))
            x0 = left + cell_w * j
            verdict = None if cell.get("skipped") else cell.get("verdict")
            if (ref.get("ctk"), ref.get("ctv")) == (r, c):
                text, sub, why = "reference", "", "the reference's own config"
            elif not cell:
                text, sub, why = "-", "", "not a pair of the sweep"
            elif cell.get("refused"):
                text, sub, why = "refused", "", str(cell["refused"])
            elif cell.get("excluded"):
                text, sub, why = "control", "", str(cell["excluded"])
            else:
                kv = cell.get("kv_bytes_per_token")
                text = "skipped" if cell.get("skipped") else str(verdict or "n/a")
                sub = f"{kv:.0f} B/token" if is_num(kv) else ""
                why = f"{cell.get('candidate')}: {text}" + (f", family {cell.get('family')}" if cell.get("family") else "")
            fill = _SOFT.get(str(verdict), "none")
            stroke = ' stroke="currentColor" stroke-width="2.5"' if cell.get("candidate") == rec and rec else \
                ' stroke="currentColor" stroke-opacity="0.25"'
            out.append(f'<g class="sweep-cell" data-verdict="{_e(verdict or "")}"><title>{_e(why)}</title>'
                       f'<rect x="{x0 + 1}" y="{y0 + 1}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{fill}"{stroke}/>'
                       f'<text x="{x0 + cell_w / 2:.1f}" y="{y0 + 17}" text-anchor="middle" font-size="12">'
                       f'{_e(("* " if cell.get("candidate") == rec and rec else "") + text)}</text>'
                       f'<text x="{x0 + cell_w / 2:.1f}" y="{y0 + 31}" text-anchor="middle" font-size="10">{_e(sub)}</text></g>')
    out.append("</svg>")
    return Markup("".join(out))

