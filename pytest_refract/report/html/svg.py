"""Small SVG charts, returned as markup for the templates.

The only place besides the templates where markup is written: every text that comes from the
report goes through ``escape`` and every coordinate is a number formatted here.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

from markupsafe import Markup

from .escaping import escape as _e
from .fmt import is_num


def nice_ticks(vmax: float, target: int = 5) -> List[float]:
    """Round tick values from 0 covering vmax (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (is_num(vmax) and vmax > 0):
        vmax = 1.0
    raw = vmax / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    count = math.ceil(vmax / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def bars(bars: List[dict], *, width: int, height: int, label: str, y_title: str,
         value_fmt: Callable[[float], str], rotate_labels: bool = False, show_values: bool = True,
         label_every: int = 1, hline: Optional[float] = None) -> Markup:
    """A vertical bar chart. Each bar: label, value (or None), cls, and optionally ghost (a
    faint bar behind, e.g. the full length), err (a ± whisker) and title (hover text). hline: a
    dashed reference line (its label belongs in the legend, where it cannot cover a bar)."""
    left, right, top = 52, 10, 18
    bottom = 80 if rotate_labels else 34
    pw, ph = width - left - right, height - top - bottom
    peaks = [b["value"] for b in bars if is_num(b.get("value"))]
    peaks += [b["ghost"] for b in bars if is_num(b.get("ghost"))]
    peaks += [b["value"] + b["err"] for b in bars if is_num(b.get("value")) and is_num(b.get("err"))]
    ticks = nice_ticks(max(peaks, default=0.0))
    ymax = ticks[-1] or 1.0

    def y(v: float) -> float:
        return top + ph - max(0.0, min(v, ymax)) / ymax * ph

    # width/height attributes make the viewBox the natural size: a chart of six prompts is not
    # blown up to the page width (CSS still shrinks a wide chart on a narrow screen).
    out = _frame(width, height, label, ticks, y, left, right, top + ph / 2, y_title)
    slot = pw / max(len(bars), 1)
    bw = min(slot * 0.72, 46.0)
    for k, b in enumerate(bars):
        cx = left + slot * (k + 0.5)
        x0 = cx - bw / 2
        parts = []
        if b.get("title"):
            parts.append(f"<title>{_e(b['title'])}</title>")
        if not is_num(b.get("ghost")):
            # A transparent full-height hover area, so the title shows even for a tiny bar
            # (a ghost bar behind already gives one).
            parts.append(f'<rect class="hit" x="{left + slot * k:.1f}" y="{top}" width="{slot:.1f}" height="{ph}"/>')
        else:
            parts.append(f'<rect class="ghost" x="{x0:.1f}" y="{y(b["ghost"]):.1f}" width="{bw:.1f}" '
                         f'height="{top + ph - y(b["ghost"]):.1f}"/>')
        value = b.get("value")
        if is_num(value):
            # Never thinner than 1.5 units: a divergence at token 0 must still be visible.
            h = max(top + ph - y(value), 1.5)
            parts.append(f'<rect class="{_e(b.get("cls", "bar"))}" x="{x0:.1f}" y="{top + ph - h:.1f}" '
                         f'width="{bw:.1f}" height="{h:.1f}"/>')
            if is_num(b.get("err")) and b["err"] > 0:
                lo, hi = y(max(value - b["err"], 0.0)), y(value + b["err"])
                parts.append(f'<path class="err" d="M{cx:.1f} {lo:.1f}V{hi:.1f}M{cx - 3:.1f} {hi:.1f}h6'
                             f'M{cx - 3:.1f} {lo:.1f}h6"/>')
            if show_values:
                parts.append(f'<text class="val" x="{cx:.1f}" y="{top + ph - h - 4:.1f}">{_e(value_fmt(value))}</text>')
        elif show_values:
            parts.append(f'<text class="val" x="{cx:.1f}" y="{top + ph - 4:.1f}">n/a</text>')
        if k % label_every == 0:
            if rotate_labels:
                parts.append(f'<text class="xl rot" transform="translate({cx + 3:.1f} {top + ph + 8}) rotate(-50)">'
                             f'{_e(b["label"])}</text>')
            else:
                parts.append(f'<text class="xl" x="{cx:.1f}" y="{top + ph + 15}">{_e(b["label"])}</text>')
        out.append(f'<g>{"".join(parts)}</g>')
    if is_num(hline):
        hy = y(hline)
        out.append(f'<line class="hline" x1="{left}" x2="{width - right}" y1="{hy:.1f}" y2="{hy:.1f}"/>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}"/>')
    out.append("</svg>")
    return Markup("".join(out))


def lines(series: List[dict], x_labels: List[str], *, width: int, height: int, label: str, y_title: str,
          value_fmt: Callable[[float], str], hline: Optional[float] = None, hline_label: str = "") -> Markup:
    """A line chart over categorical x positions. Each series: cls, name, values (None: a gap),
    and optionally lo/hi (interval whiskers per point; hi None: open above, drawn to the top
    with an arrow). hline: a dashed reference line (e.g. the verdict margin), labelled."""
    left, right, top, bottom = 56, 12, 18, 34
    pw, ph = width - left - right, height - top - bottom
    peaks = [v for s in series for v in (s.get("values") or []) if is_num(v)]
    peaks += [v for s in series for v in (s.get("hi") or []) if is_num(v)]
    if is_num(hline):
        peaks.append(float(hline) * 1.15)
    ticks = nice_ticks(max(peaks, default=0.0))
    ymax = ticks[-1] or 1.0

    def y(v: float) -> float:
        return top + ph - max(0.0, min(v, ymax)) / ymax * ph

    slot = pw / max(len(x_labels), 1)

    def x(k: int) -> float:
        return left + slot * (k + 0.5)

    out = _frame(width, height, label, ticks, y, left, right, top + ph / 2, y_title)
    for k, text in enumerate(x_labels):
        out.append(f'<text class="xl" x="{x(k):.1f}" y="{top + ph + 15}">{_e(text)}</text>')
    if is_num(hline):
        hy = y(float(hline))
        out.append(f'<line class="hline" x1="{left}" x2="{width - right}" y1="{hy:.1f}" y2="{hy:.1f}"/>')
        if hline_label:
            out.append(f'<text class="ytl" x="{width - right}" y="{hy - 4:.1f}">{_e(hline_label)}</text>')
    for s in series:
        cls = _e(s.get("cls", "line"))
        values = list(s.get("values") or [])
        los, his = list(s.get("lo") or []), list(s.get("hi") or [])
        path, pen = [], "M"
        for k, v in enumerate(values):
            if not is_num(v):
                pen = "M"
                continue
            path.append(f"{pen}{x(k):.1f} {y(v):.1f}")
            pen = "L"
        if path:
            out.append(f'<path class="{cls}" fill="none" d="{"".join(path)}"/>')
        for k, v in enumerate(values):
            if not is_num(v):
                continue
            lo = los[k] if k < len(los) else None
            hi = his[k] if k < len(his) else None
            title = f"{s.get('name', '')} at {x_labels[k]}: {value_fmt(v)}"
            if is_num(lo):
                title += f" [{value_fmt(lo)}, {value_fmt(hi) if is_num(hi) else 'open'}]"
                yl, yh = y(lo), (y(hi) if is_num(hi) else top)
                arrow = "" if is_num(hi) else f"M{x(k) - 4:.1f} {top + 5:.1f}L{x(k):.1f} {top:.1f}L{x(k) + 4:.1f} {top + 5:.1f}"
                out.append(f'<path class="err" d="M{x(k):.1f} {yl:.1f}V{yh:.1f}M{x(k) - 3:.1f} {yl:.1f}h6'
                           + (f'M{x(k) - 3:.1f} {yh:.1f}h6' if is_num(hi) else arrow) + '"/>')
            out.append(f'<g><title>{_e(title)}</title><circle class="{cls}" cx="{x(k):.1f}" cy="{y(v):.1f}" r="3.5"/></g>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}"/>')
    out.append("</svg>")
    return Markup("".join(out))


def _frame(width: int, height: int, label: str, ticks, y, left: float, right: float, y_mid: float,
           y_title: str) -> list:
    """A chart's opening tag, its horizontal grid with tick labels, and its y-axis title: the
    frame every chart here shares."""
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{_e(label)}">']
    for tv in ticks:
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tv):.1f}" y2="{y(tv):.1f}"/>'
                   f'<text class="ytl" x="{left - 6}" y="{y(tv) + 3.5:.1f}">{_e(format(tv, "g"))}</text>')
    out.append(f'<text class="yt" transform="translate(13 {y_mid:.1f}) rotate(-90)">{_e(y_title)}</text>')
    return out
