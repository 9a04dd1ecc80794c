"""``python -m pytest_refract compare A.json B.json [...]``: reports side by side.

The first report is the base; every other column shows its value and the change from the
base, so a PR comment (``--markdown``) answers "what moved since the last build".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ..axes import BUILTIN, generic
from ..report.schema import ReportFileError, load_report

# (row label, getter, format, higher_is_better)
Metric = Tuple[str, Callable[[dict], Optional[float]], str, Optional[bool]]


def _axis(name: str, key: str) -> Callable[[dict], Optional[float]]:
    def get(report: dict):
        section = report.get("axes", {}).get(name) or {}
        value = section
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return get


HEADLINE: List[Metric] = [
    # What the gate reads by default (null in reports from before the verdict, or without a control).
    ("verdict score", lambda r: (r.get("verdict") or {}).get("score"), "{:.2f}", True),
    ("raw composite (REFRACT-comparable, not the verdict)", lambda r: r.get("composite"), "{:.2f}", True),
    ("KV memory vs reference", lambda r: (r.get("kv_cache") or {}).get("vs_reference"), "{:.3f}", False),
]


def metrics(reports: List[dict], registry=None) -> List[Metric]:
    """The rows: the headline numbers, then per axis its score and the axis's own
    COMPARE_METRICS. Axes run in the registry's order (the built-ins: compare reads reports
    offline), then axes only the reports know, which show their score row alone."""
    registry = BUILTIN if registry is None else registry
    names = {n: None for r in reports for n in (r.get("axes") or {})}
    rows = list(HEADLINE)
    for name, axis in list(registry.items()) + [(n, generic(n)) for n in names if n not in registry]:
        rows.append((f"{name} score", _axis(name, "score"), "{:.2f}", True))
        rows.append(("  multiple of the control's", _axis(name, "verdict.multiple"), "{:.2f}x", False))
        rows += [(label, _axis(name, key), fmt, better) for label, key, fmt, better in axis.COMPARE_METRICS]
    return rows


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _delta(base, value, fmt: str, better: Optional[bool]) -> str:
    if base is None or value is None:
        return ""
    diff = value - base
    if diff == 0:
        return "="
    text = ("+" if diff > 0 else "") + fmt.format(diff)
    if better is not None:
        text += " ▲" if (diff > 0) == better else " ▼"
    return text


def table(reports: List[dict], names: List[str]) -> List[List[str]]:
    """Rows of cells: header, band row, metric rows (value and change from the first)."""
    header = ["metric"] + names
    rows = [header, ["model"] + [r.get("model", {}).get("path", "?") for r in reports],
            ["candidate"] + [r.get("candidate", "?") for r in reports],
            ["band"] + [r.get("band") or "n/a" for r in reports]]
    if any(r.get("verdict") for r in reports):
        # The verdict leads; the band is the raw composite's, a REFRACT-comparable reference figure.
        rows[3][0] = "raw band (REFRACT-comparable, not the verdict)"
        rows.insert(3, ["verdict"] + [(r.get("verdict") or {}).get("verdict") or "n/a" for r in reports])
    for label, get, fmt, better in metrics(reports):
        values = [get(r) for r in reports]
        if all(v is None for v in values):
            continue
        cells = [label, _fmt(values[0], fmt)]
        for v in values[1:]:
            d = _delta(values[0], v, fmt, better)
            cells.append(_fmt(v, fmt) + (f" ({d})" if d else ""))
        rows.append(cells)
    return rows


def expand_candidates(reports: List[dict], names: List[str]) -> Tuple[List[dict], List[str]]:
    """One column per candidate: a matrix report contributes each of its candidates (named
    ``file[candidate]``), so one matrix report alone already compares its configurations."""
    columns, labels = [], []
    for report, name in zip(reports, names):
        sections = report.get("candidates") or []
        if len(sections) < 2:
            columns.append(report)
            labels.append(name)
            continue
        for section in sections:
            columns.append(dict(report, **section))
            labels.append(f"{name}[{section.get('candidate', '?')}]")
    return columns, labels


def render_text(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: List[List[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").strip() or " "

    out = ["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_refract compare",
                                     description="Compare pytest-refract JSON reports side by side.")
    parser.add_argument("reports", nargs="+",
                        help="JSON reports; the first is the base; a matrix report gives one column per candidate")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for PR comments)")
    args = parser.parse_args(argv)
    try:
        reports = [load_report(p) for p in args.reports]
    except ReportFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    columns, names = expand_candidates(reports, [Path(p).name for p in args.reports])
    rows = table(columns, names)
    print(render_markdown(rows) if args.markdown else render_text(rows))
    return 0
