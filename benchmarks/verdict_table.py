"""The verdict tables of docs/measured.md from saved JSON reports: per candidate the multiple of the
control's damage with its interval and verdict per axis, the run verdict, the verdict score, the
raw composite and llama.cpp's KV bytes per token; optionally recomputed on a subset of the
report's items (the same config at fewer items).

    python benchmarks/verdict_table.py REPORT.json [--label TEXT] [--subset 12x8]

``--subset 12x8`` keeps the -001 and -002 prompt of each category and chunks 00-07 (both sides
alike) and recomputes the verdict at the fixed-sample 95 % with the code that wrote the report.
Prints Markdown rows; computes nothing with llama.cpp.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

from pytest_refract.axes import resolve
from pytest_refract.report import verdicts as RV


def sections(report):
    return report.get("candidates") or [report]


def _keep(subset: str):
    prompts, chunks = (int(x) for x in subset.split("x"))
    per_category = max(1, prompts // 6)

    def keep(axis: str, item_id: str) -> bool:
        if axis == "kld":
            return int(item_id.split("-")[1]) < chunks
        m = re.search(r"-(\d{3})$", item_id)
        return bool(m) and int(m.group(1)) <= per_category
    return keep


def _restrict(section: dict, keep, registry) -> dict:
    out = copy.deepcopy(section)
    for name, axis in out.get("axes", {}).items():
        key = registry[name].ITEMS_KEY if name in registry else "items"
        items = axis.get(key) or axis.get("items") or []
        axis[key] = [i for i in items if keep(name, str(i["id"]))]
        axis.pop("sequential", None)
    return out


def _cell(v: dict) -> str:
    if not v:
        return "–"
    if (v.get("reason") or "").startswith("not measured further"):
        why = v["reason"].split(": ", 1)[-1]
        if v.get("multiple") is None:
            return f"not measured ({why})"
        ci = v.get("multiple_ci95")
        inside = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        return f"{v['multiple']:.2f}×{inside}, stopped ({why})"
    if v.get("basis") == "multiple" and v.get("multiple") is not None:
        ci = v.get("multiple_ci95")
        inside = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        return f"{v['multiple']:.2f}×{inside} {v['verdict']}"
    if v.get("damage") is not None:
        return f"D {v['damage']:.3g} {v['verdict']}"
    return v.get("verdict") or "–"


def rows(report: dict, label: str, subset=None) -> list:
    registry = resolve()
    control = report.get("sensitivity")
    out = []
    for sec in sections(report):
        if subset:
            keep = _keep(subset)
            sec = _restrict(sec, keep, registry)
            ctrl = _restrict(control, keep, registry)
            verdict = RV.candidate_verdict(sec["axes"], ctrl, registry, sec.get("self_reference", False))
            counts = {n: len(a.get("items") or []) for n, a in sec["axes"].items()}
            composite = None
        else:
            verdict = sec.get("verdict") or {}
            counts = {n: len(a.get("items") or []) for n, a in sec["axes"].items()}
            composite = sec.get("composite")
        axes = verdict.get("axes", {}) if verdict else {}
        kv = RV.kv_bytes(sec)
        score = verdict.get("score") if verdict else None
        measured = ", ".join(f"{counts[n]} {registry[n].ITEMS_NOUN if n in registry else 'items'}" for n in counts)
        shown_score = f"{score:.1f}" if score is not None else "–"
        shown_composite = f"{composite:.2f} " + (sec.get("band") or "") if composite is not None else "–"
        out.append(f"| {label} | `{sec['candidate']}` | {measured} | {_cell(axes.get('trajectory'))} | "
                   f"{_cell(axes.get('kld'))} | **{verdict.get('verdict') if verdict else '–'}** | "
                   f"{shown_score} | {shown_composite} | {int(kv) if kv else '–'} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--label", default="")
    ap.add_argument("--subset", default=None)
    args = ap.parse_args()
    report = json.loads(Path(args.report).read_text())
    for row in rows(report, args.label, args.subset):
        print(row)
    ctrl = report.get("sensitivity") or {}
    for name, a in (ctrl.get("axes") or {}).items():
        print(f"control {ctrl.get('config')} {name}: {len(a.get('items') or [])} items")
    print(f"wall_s {report.get('wall_s')}, items_run {report.get('items_run')}, "
          f"skipped (decided) {report.get('items_skipped_decided')}")


if __name__ == "__main__":
    main()
