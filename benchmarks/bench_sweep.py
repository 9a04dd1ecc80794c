"""A sweep against the same pairs audited one at a time, as a user runs them (pytest in a fresh
process each): wall time, tokens llama.cpp computed per candidate, candidates per minute, and
whether the answers agree. Target: the sweep under 0.4x the separate runs' wall time.

    python benchmarks/bench_sweep.py --types f16,q8_0,q4_0 --axes kld --max-items 16

The sweep runs once from an empty reference cache. The separate runs each audit one of the
sweep's candidates (every pair llama.cpp accepted) with the same settings, twice over: each from
its own empty cache ("cold": nothing shared), and one after another on one cache folder ("warm":
the reference and control computed by the first run are read by the rest, as pytest's own cache
folder does for a user). Run on a quiet machine (llama.cpp's threads spin against any other
job); prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list, workdir: Path) -> dict:
    report = workdir / "report.json"
    if report.exists():
        report.unlink()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--refract-json={report}", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if not report.exists():
        sys.exit(f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "exit": proc.returncode, "report": json.loads(report.read_text())}


def tokens(report: dict) -> dict:
    """Tokens per role name as the report's items count them (prompt tokens and decoded ones)."""
    out: dict = {}
    sections = report.get("candidates") or [report]
    for section in [*sections, report.get("sensitivity") or {}]:
        for axis in (section.get("axes") or {}).values():
            for item in axis.get("items") or []:
                for role, counts in (item.get("compute") or {}).items():
                    n = sum(counts.get(k, 0) for k in ("batch_tokens", "decode_tokens", "seq_decode_tokens"))
                    out[role] = out.get(role, 0) + n
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--axes", default="kld")
    ap.add_argument("--max-items", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-separate-cold", action="store_true", help="skip the cold separate runs (the slowest part)")
    args = ap.parse_args()
    common = [f"--refract-model={args.model}", f"--refract-axes={args.axes}", f"--refract-max-items={args.max_items}",
              f"--refract-threads={args.threads}"]
    print(f"machine: {os.cpu_count()} cores; model {args.model}; types {args.types}; axes {args.axes}; "
          f"at most {args.max_items} items per axis; threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "sweep").mkdir()
        sweep = run([*common, f"--refract-sweep={args.types}", f"--refract-cache-dir={work / 'sweep' / 'cache'}"],
                    work / "sweep")
        report = sweep["report"]
        pairs = [s["candidate"] for s in report.get("candidates") or [report]]
        n = len(pairs)
        answer = (report["sweep"]["recommendation"] or {}).get("config")
        toks = tokens(report)
        cand_tokens = sum(v for k, v in toks.items() if k.startswith("cand"))
        print(f"sweep: {n} candidates ({len(report['sweep']['skipped'])} skipped, {len(report['sweep']['refused'])} "
              f"refused), {sweep['wall_s']:.1f} s, {n / sweep['wall_s'] * 60:.2f} candidates/min, "
              f"{cand_tokens / max(n, 1):.0f} tokens per candidate, reference {toks.get('reference', 0)} and control "
              f"{toks.get('control', 0)} tokens once; recommends {answer}; exit {sweep['exit']}")
        for mode in (["warm"] if args.no_separate_cold else ["cold", "warm"]):
            wall, cand_tok, verdicts = 0.0, 0, {}
            shared = work / f"{mode}-cache"
            for i, pair in enumerate(pairs):
                folder = work / f"{mode}-{i}"
                folder.mkdir()
                cache = shared if mode == "warm" else folder / "cache"
                one = run([*common, f"--refract-candidate={pair}", f"--refract-cache-dir={cache}"], folder)
                wall += one["wall_s"]
                cand_tok += tokens(one["report"]).get("cand0", 0)
                verdicts[pair] = (one["report"].get("verdict") or {}).get("verdict")
            print(f"separate ({mode}): {n} runs, {wall:.1f} s, {n / wall * 60:.2f} candidates/min, "
                  f"{cand_tok / max(n, 1):.0f} tokens per candidate; sweep / separate wall time "
                  f"{sweep['wall_s'] / wall:.2f}x (target < 0.4x)")
            own = {s["candidate"]: (s.get("verdict") or {}).get("verdict") for s in report.get("candidates") or [report]}
            differ = {p: (own.get(p), v) for p, v in verdicts.items() if own.get(p) != v}
            print(f"  verdicts that differ from the sweep's (sweep, separate): {differ or 'none'}")


if __name__ == "__main__":
    main()
