#!/usr/bin/env python3
"""Write a sweep's two charts from a saved JSON report as standalone SVG files: the Pareto chart
(KV bytes per token against the worst axis multiple, interval whiskers, points coloured by
verdict, the frontier drawn and the recommendation ringed) and the K x V heat map of verdicts.
They are the HTML report's own charts with its stylesheet inlined, so a page of documentation
can show them as images.

    python tools/sweep_charts.py REPORT.json OUTDIR [--prefix smollm2]

Writes OUTDIR/PREFIX-sweep-pareto.svg and OUTDIR/PREFIX-sweep-grid.svg, and refuses to replace
a file that is already there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from depth_charts import read_report, standalone, write_new  # the depth charts' own file handling

from pytest_refract.report.html.views.sweep import heat_map, pareto_chart


def charts_of(report: dict) -> Dict[str, str]:
    """The sweep's charts as standalone SVG text, by name (absent when there is nothing to
    draw, as without a sweep)."""
    sweep = report.get("sweep")
    if not isinstance(sweep, dict):
        return {}
    drawn = {"pareto": pareto_chart(sweep), "grid": heat_map(sweep, report.get("reference"))}
    return {name: standalone(str(svg)) for name, svg in drawn.items() if svg is not None}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--prefix", default="sweep")
    args = parser.parse_args(argv)
    report = read_report(args.report)
    if report is None:
        return 2
    charts = charts_of(report)
    if not charts:
        print(f"error: {args.report} has no sweep to draw (run with --refract-sweep)", file=sys.stderr)
        return 2
    return write_new({args.outdir / f"{args.prefix}-sweep-{name}.svg": svg for name, svg in charts.items()},
                     args.outdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
