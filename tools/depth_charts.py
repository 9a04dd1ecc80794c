#!/usr/bin/env python3
"""Write the depth axis's charts of a saved JSON report as standalone SVG files: for every
candidate, the multiple of the control's KLD by depth bucket (interval whiskers, the margin
drawn) and the candidate's and the control's mean KLD by depth. They are the HTML report's own
charts (which draws them for the report's leading candidate only), with its stylesheet inlined,
so a page of documentation can show them as images.

    python tools/depth_charts.py REPORT.json OUTDIR [--prefix smollm2]

Writes OUTDIR/PREFIX-K-V-multiple.svg and OUTDIR/PREFIX-K-V-kld.svg per candidate (K and V the
cache types), and refuses to replace a file that is already there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

from pytest_refract.report.html.render import STYLESHEET
from pytest_refract.report.html.views.depth import kld_chart, multiple_chart

SVG_NS = 'xmlns="http://www.w3.org/2000/svg"'


def standalone(svg: str) -> str:
    """An inline SVG element as a file of its own: the SVG namespace and the report's CSS (its
    custom properties live on :root, which is the <svg> element in a file of its own)."""
    opening_end = svg.index(">") + 1
    return svg[:4] + " " + SVG_NS + svg[4:opening_end] + f"<style>{STYLESHEET}</style>" + svg[opening_end:] + "\n"


def file_stem(candidate: str) -> str:
    """``ctk=q8_0,ctv=q4_0`` -> ``q8_0-q4_0``; other settings follow, in order."""
    parts = [p.split("=", 1)[-1] for p in candidate.split(",")]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def charts_of(report: dict) -> Dict[str, Dict[str, str]]:
    """Per candidate label, its two depth charts as standalone SVG text (absent when the axis
    has no bucket to draw)."""
    sections: List[dict] = report.get("candidates") or [report]
    out: Dict[str, Dict[str, str]] = {}
    for section in sections:
        depth = ((section.get("axes") or {}).get("depth")) or {}
        drawn = {name: chart(depth) for name, chart in (("multiple", multiple_chart), ("kld", kld_chart))}
        kept = {name: standalone(str(svg)) for name, svg in drawn.items() if svg is not None}
        if kept:
            out[str(section.get("candidate"))] = kept
    return out


def read_report(path: Path) -> Optional[dict]:
    """The saved JSON report, or None after a one-line error."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {path} as a JSON report: {exc}", file=sys.stderr)
        return None
    return report if isinstance(report, dict) else {}


def write_new(targets: Dict[Path, str], outdir: Path) -> int:
    """Write each chart to its path, none if any is there already (nothing a user has is
    replaced); the exit status, after a one-line error where it fails."""
    there = [str(path) for path in targets if path.exists()]
    if there:
        print(f"error: {there[0]} exists; remove it or choose another --prefix", file=sys.stderr)
        return 2
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for path, svg in targets.items():
            path.write_text(svg, encoding="utf-8")
            print(path)
    except OSError as exc:  # the folder is a file, or not writable
        print(f"error: cannot write the charts into {outdir}: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--prefix", default="depth")
    args = parser.parse_args(argv)
    report = read_report(args.report)
    if report is None:
        return 2
    charts = charts_of(report)
    if not charts:
        print(f"error: {args.report} has no depth axis with buckets to draw", file=sys.stderr)
        return 2
    return write_new({args.outdir / f"{args.prefix}-{file_stem(label)}-{name}.svg": svg
                      for label, kept in charts.items() for name, svg in kept.items()}, args.outdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
