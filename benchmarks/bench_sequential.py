"""Sequential stopping against a fixed design, as a user runs them (pytest in a fresh process
each): wall time, peak RSS, tokens computed per config, items measured per axis, and whether
the verdicts agree with an exhaustive run of the same configs.

    python benchmarks/bench_sequential.py command1      # README command 1, before and after, cold and warm
    python benchmarks/bench_sequential.py matrix        # 4 candidates, sequential and --refract-exhaustive
    python benchmarks/bench_sequential.py matrix --sequential-report saved/matrix-sequential.json
                                                        # only the exhaustive run, against a saved sequential one

"before" is the fixed design of earlier releases: --refract-exhaustive over the 36-prompt set
(prompts/default.jsonl) and 32 chunks. "after" is the default: sequential over the whole pool.
Cold runs start from an empty reference cache (a fresh folder), warm runs reuse it. Run on a
quiet machine (llama.cpp's threads spin against any other job); prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_audit import run_audit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEFORE = ["--refract-exhaustive", f"--refract-prompts={ROOT / 'prompts' / 'default.jsonl'}", "--refract-chunks=32"]
MATRIX = ["ctk=bf16,ctv=bf16", "ctk=q8_0,ctv=q8_0", "ctk=q8_0,ctv=q4_0", "ctk=q4_0,ctv=q4_0"]


def sections(report: dict) -> list:
    return report.get("candidates") or [report]


def role_labels(report: dict) -> dict:
    labels = {f"cand{i}": s["candidate"] for i, s in enumerate(sections(report))}
    labels["reference"] = "reference " + str(report.get("reference"))
    sens = report.get("sensitivity") or {}
    if sens.get("config"):
        labels[sens.get("role") or "control"] = "control " + sens["config"]
    return labels


def tokens_per_config(report: dict) -> dict:
    """Tokens llama.cpp processed per config, summed over every item (the control's included)."""
    labels = role_labels(report)
    totals: dict = {}
    sens = report.get("sensitivity") or {}
    for section in [*sections(report), sens]:
        for axis in (section.get("axes") or {}).values():
            items = axis.get("items") or []
            per_item = [i.get("compute") or {} for i in items]
            for compute in per_item or [axis.get("compute") or {}]:
                for role, counts in compute.items():
                    n = sum(counts.get(k, 0) for k in ("batch_tokens", "decode_tokens", "seq_decode_tokens"))
                    totals[labels.get(role, role)] = totals.get(labels.get(role, role), 0) + n
    return totals


def summary(report: dict) -> dict:
    out = {}
    for s in sections(report):
        axes = {}
        for name, a in (s.get("axes") or {}).items():
            v = a.get("verdict") or {}
            seq = a.get("sequential") or {}
            axes[name] = {"verdict": v.get("verdict"), "multiple": v.get("multiple"), "ci": v.get("multiple_ci95"),
                          "measured": len(a.get("items") or []), "of": (seq.get("looks") or [None])[-1]}
        out[s["candidate"]] = {"verdict": (s.get("verdict") or {}).get("verdict"), "axes": axes}
    return out


def _end(value) -> str:
    return "inf" if value is None else f"{value:.2f}"


def show(name: str, run: dict) -> dict:
    report = run["report"]
    print(f"\n== {name}: wall {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB, exit {run['exit']}")
    toks = tokens_per_config(report)
    print("   tokens: " + ", ".join(f"{k} {v:,}" for k, v in toks.items()) + f"; total {sum(toks.values()):,}")
    summ = summary(report)
    for cand, s in summ.items():
        parts = []
        for axis, a in s["axes"].items():
            m = f"{a['multiple']:.2f}x" if isinstance(a["multiple"], (int, float)) else "n/a"
            # An upper end is open (None) below the items a PASS needs.
            ci = f" [{_end(a['ci'][0])}, {_end(a['ci'][1])}]" if a["ci"] else ""
            parts.append(f"{axis} {a['measured']}/{a['of']} {m}{ci} {a['verdict']}")
        print(f"   {cand:<20} {s['verdict']:<10} " + "; ".join(parts))
    return summ


def agreement(fast: dict, full: dict) -> None:
    """A contradiction is PASS against FAIL (run or axis); UNDECIDED on one side is not one."""
    print("\n== verdicts against the exhaustive run")
    for cand, s in fast.items():
        other = full.get(cand)
        if other is None:
            continue
        pairs = [("run", s["verdict"], other["verdict"])] + [
            (axis, a["verdict"], (other["axes"].get(axis) or {}).get("verdict")) for axis, a in s["axes"].items()]
        bad = [p for p in pairs if {p[1], p[2]} == {"PASS", "FAIL"}]
        same = all(p[1] == p[2] for p in pairs)
        print(f"   {cand:<20} {'same' if same else 'differs'}"
              f"{'; CONTRADICTS: ' + str(bad) if bad else ''}: " + ", ".join(f"{p[0]} {p[1]}/{p[2]}" for p in pairs))


def command1(args, base: list) -> None:
    for name, extra in (("before (fixed design, 36 prompts, 32 chunks)", BEFORE), ("after (sequential, the pool)", [])):
        if args.only and args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            flags = [*base, f"--refract-cache-dir={work / 'cache'}", *extra]
            cold = run_audit(args.model, args.candidate, flags, work)
            show(f"{name}, cold", cold)
            warm = run_audit(args.model, args.candidate, flags, work)
            show(f"{name}, warm", warm)


def matrix(args, base: list) -> None:
    cands = args.candidates
    extra = [f"--refract-candidate={c}" for c in cands[1:]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = ([] if args.sequential_report else [("sequential", [])]) + (
            [] if args.skip_exhaustive else [("exhaustive", ["--refract-exhaustive"] + args.exhaustive_flags)])
        if args.sequential_report:
            # The numbers are deterministic (the same bits on every run of one build), so a
            # sequential report saved earlier stands for a sequential run of the same code.
            results["sequential"] = show(f"matrix, sequential, from {args.sequential_report}",
                                         {"report": json.loads(Path(args.sequential_report).read_text()),
                                          "wall_s": float("nan"), "peak_rss_mb": float("nan"), "exit": "n/a"})
        for name, flags in runs:
            # Each cold: its own cache folder.
            cache = work / f"cache-{name}"
            run = run_audit(args.model, cands[0], [*base, f"--refract-cache-dir={cache}", *extra, *flags], work)
            if args.save:  # first: a report is worth more than its printout
                Path(args.save).mkdir(parents=True, exist_ok=True)
                (Path(args.save) / f"matrix-{name}.json").write_text(json.dumps(run["report"]))
            results[name] = show(f"matrix, {name}, cold", run)
    if "exhaustive" in results and "sequential" in results:
        agreement(results["sequential"], results["exhaustive"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["command1", "matrix"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--candidate", default="ctk=q8_0,ctv=q4_0")
    ap.add_argument("--only", default=None, help="command1: run only the scenario whose name holds this")
    ap.add_argument("--exhaustive-flags", default="", help="matrix: more flags for the exhaustive run (one string)")
    ap.add_argument("--candidates", nargs="*", default=MATRIX, help="matrix: the candidates (default: 4 configs)")
    ap.add_argument("--flags", default="", help="more pytest flags for every run (one string)")
    ap.add_argument("--skip-exhaustive", action="store_true", help="matrix: the sequential run only")
    ap.add_argument("--sequential-report", default=None,
                    help="matrix: read the sequential run from this saved report (--save's matrix-sequential.json)"
                         " instead of running it")
    ap.add_argument("--save", default=None, help="matrix: keep each run's JSON report in this folder")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    base = shlex.split(args.flags)
    args.exhaustive_flags = shlex.split(args.exhaustive_flags)
    if args.what == "command1":
        command1(args, base)
    else:
        matrix(args, base)


if __name__ == "__main__":
    main()
