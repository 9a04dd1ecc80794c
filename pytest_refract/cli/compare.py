"""``python -m pytest_refract compare A.json B.json [...]``: reports side by side.

The first report is the base; every other column shows its value and the change from the
base, so a PR comment (``--markdown``) answers "what moved since the last build".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..axes import BUILTIN, generic
from ..report.schema import ReportFileError, load_report

# (row label, getter, format, higher_is_better)
Metric = Tuple[str, "_Field", str, Optional[bool]]  # label, getter, format, higher is better


class ReportFieldError(Exception):
    """A field compare reads has a type no report of this package writes; the message names it."""


class _Field:
    """A getter of one report field by its path (``verdict.score``): the value, or None where
    the field or an object on its way is absent. An object on the way that is not an object
    is a ReportFieldError naming the field, never a crash."""

    def __init__(self, *path: str):
        self.path = path
        self.name = ".".join(path)

    def __call__(self, report: dict):
        value: Any = report
        for i, part in enumerate(self.path):
            if value is None:
                return None
            if not isinstance(value, dict):
                raise ReportFieldError(f"field {'.'.join(self.path[:i])} must be an object or null, "
                                       f"not {type(value).__name__}")
            value = value.get(part)
        return value


def _axis(name: str, key: str) -> _Field:
    return _Field("axes", name, *key.split("."))


HEADLINE: List[Metric] = [
    # What the gate reads by default (null in reports from before the verdict, or without a control).
    ("verdict score", _Field("verdict", "score"), "{:.2f}", True),
    ("raw composite (REFRACT-comparable, not the verdict)", _Field("composite"), "{:.2f}", True),
    ("KV memory vs reference", _Field("kv_cache", "vs_reference"), "{:.3f}", False),
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


def _number(get: _Field, report: dict):
    """A metric's value: a number or None; anything else names its field."""
    value = get(report)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ReportFieldError(f"field {get.name} must be a number or null, not {type(value).__name__} "
                               f"({value!r:.40})")
    return value


def _text(get: _Field, report: dict, missing: str) -> str:
    value = get(report)
    if value is None:
        return missing
    if not isinstance(value, str):
        raise ReportFieldError(f"field {get.name} must be a string or null, not {type(value).__name__} "
                               f"({value!r:.40})")
    return value or missing


# Characters that would break a table's line (a newline in a model's file name adds a row):
# shown as escapes, never written raw.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127, 0x85]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def shown(text: str) -> str:
    """A cell's text on one line: control characters and line separators as escapes."""
    return str(text).translate(_CONTROL)


def table(reports: List[dict], names: List[str]) -> List[List[str]]:
    """Rows of cells: header, band row, metric rows (value and change from the first). A field
    of the wrong type is a ReportFieldError naming the field (and, in main, the file)."""
    header = ["metric"] + names
    rows = [header, ["model"] + [_text(_Field("model", "path"), r, "?") for r in reports],
            ["candidate"] + [_text(_Field("candidate"), r, "?") for r in reports],
            ["band"] + [_text(_Field("band"), r, "n/a") for r in reports]]
    verdicts = [_text(_Field("verdict", "verdict"), r, "n/a") for r in reports]
    if any(r.get("verdict") for r in reports):
        # The verdict leads; the band is the raw composite's, a REFRACT-comparable reference figure.
        rows[3][0] = "raw band (REFRACT-comparable, not the verdict)"
        rows.insert(3, ["verdict"] + verdicts)
    for label, get, fmt, better in metrics(reports):
        values = [_number(get, r) for r in reports]
        if all(v is None for v in values):
            continue
        cells = [label, _fmt(values[0], fmt)]
        for v in values[1:]:
            d = _delta(values[0], v, fmt, better)
            cells.append(_fmt(v, fmt) + (f" ({d})" if d else ""))
        rows.append(cells)
    return [[shown(c) for c in row] for row in rows]


def check_fields(report: dict) -> None:
    """ReportFieldError for the first field compare reads that has the wrong type."""
    table([report], ["x"])


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
        # A backslash first, so that the one before an escaped | cannot be escaped itself.
        return shown(text).replace("\\", "\\\\").replace("|", "\\|").strip() or " "

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
        print(f"error: {shown(str(exc))}", file=sys.stderr)
        return 2
    for path, report in zip(args.reports, reports):
        try:
            for column in expand_candidates([report], ["x"])[0]:
                check_fields(column)
        except ReportFieldError as exc:
            print(f"error: {shown(path)}: {exc}", file=sys.stderr)
            return 2
    columns, names = expand_candidates(reports, [Path(p).name for p in args.reports])
    rows = table(columns, names)
    return _emit(render_markdown(rows) if args.markdown else render_text(rows))


def _emit(text: str) -> int:
    """Print ``text``; a reader that stops early (``| head``) ends the output quietly."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point it at
        # /dev/null first.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    return 0
