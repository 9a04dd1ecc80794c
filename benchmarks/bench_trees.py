"""Compare two source trees of pytest-refract on the same audit: wall time, peak RSS, and
whether every number in the JSON report is the same (a refactoring must change none).

    python benchmarks/bench_trees.py BEFORE_TREE AFTER_TREE [--quick | --full-small] [--rounds 1]

Each tree runs the default audit (SmolLM2, ctk=q8_0,ctv=q4_0) in a fresh pytest process with
PYTHONPATH pointing at it, one after the other, alternating over rounds; run it on a quiet
machine. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_audit import run_audit  # noqa: E402

# Values that differ between any two runs: not numbers of the measurement.
VOLATILE = {"timestamp", "wall_s", "repro_command"}


def differences(a, b, path: str = "") -> list:
    """Paths where two reports differ, timings and the timestamp aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key in VOLATILE:
                continue
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'the first' if key in a else 'the second'}")
            else:
                out += differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [] if len(a) == len(b) else [f"{path}: {len(a)} vs {len(b)} entries"]
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: {str(a)[:60]} != {str(b)[:60]}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--candidate", default="ctk=q8_0,ctv=q4_0")
    ap.add_argument("--quick", action="store_true", help="8 prompts x 32 tokens, 4 chunks (a smoke run)")
    ap.add_argument("--full-small", action="store_true",
                    help="all four axes, small: 6 prompts x 32 tokens, 3 chunks, R-NIAH at 512 and 1024 tokens")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    extra = ["--refract-n-predict=32", "--refract-chunks=4", "-k", "chunk or fact or reason"] if args.quick else []
    if args.full_small:
        extra = ["--refract-full", "--refract-n-predict=32", "--refract-chunks=3", "--refract-rniah-lengths=512,1024",
                 "-k", "chunk or rniah or fact-00"]
    runs = {"before": [], "after": []}
    saved = os.environ.get("PYTHONPATH")
    try:
        for _ in range(args.rounds):
            for name in ("before", "after"):
                os.environ["PYTHONPATH"] = str(Path(getattr(args, name)).resolve())
                with tempfile.TemporaryDirectory() as tmp:
                    runs[name].append(run_audit(args.model, args.candidate, extra, Path(tmp)))
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    for name, results in runs.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in results)
        rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in results)
        print(f"{name:<6} {getattr(args, name)}: wall {walls} s; peak RSS {rss} MB; exit {[r['exit'] for r in results]}")
    best = {name: min(r["wall_s"] for r in results) for name, results in runs.items()}
    peak = {name: max(r["peak_rss_mb"] for r in results) for name, results in runs.items()}
    print(f"after / before: wall {best['after'] / best['before']:.3f} (best of {args.rounds}), "
          f"peak RSS {peak['after'] / peak['before']:.3f}")
    diff = differences(runs["before"][0]["report"], runs["after"][0]["report"])
    print(f"report numbers: {'identical' if not diff else f'{len(diff)} differences'}")
    for line in diff[:40]:
        print("  " + line)
    print(json.dumps({"before_composite": runs["before"][0]["report"]["composite"],
                      "after_composite": runs["after"][0]["report"]["composite"]}))


if __name__ == "__main__":
    main()
