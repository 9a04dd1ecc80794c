"""A sweep against the same pairs audited one at a time, as a user runs them (pytest in a fresh
process each): wall time, tokens llama.cpp computed per candidate, candidates per minute, and
whether the answers agree. Target: the sweep under 0.4x the separate runs' wall time.

    python benchmarks/bench_sweep.py --types f16,q8_0,q4_0 --axes kld --max-items 48
    python benchmarks/bench_sweep.py --types all --axes kld --ctx 128 --max-items 48 --sample 8 --no-separate-warm

The sweep runs once from an empty reference cache. The separate runs each audit one of the
sweep's candidates (every pair llama.cpp accepted, skipped or not: a user running them one by
one measures each) with the same settings, each from its own empty cache ("cold": nothing
shared), and one after another on one cache folder ("warm": the reference and control computed
by the first run are read by the rest, as pytest's own cache folder does for a user).

With ``--sample K`` only K of the N pairs, drawn with ``--seed``, run separately, and the N
runs' total is estimated as N times their mean wall time, with a 95 % interval (Student t,
finite-population corrected); of a warm sample, only the first run computes the reference and
control, so it counts once and the rest stand for the other N - 1. Run on a quiet machine (llama.cpp's threads spin against any other job);
prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
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


def total_estimate(walls: list, population: int) -> tuple:
    """(estimate, low, high) of the sum over ``population`` runs from a simple random sample of
    their wall times: N times the mean, with a Student-t interval and the finite-population
    correction (exact when the sample is the population)."""
    from pytest_refract.scoring.verdict import t_quantile

    k = len(walls)
    mean = sum(walls) / k
    if k == population:
        return population * mean, population * mean, population * mean
    if k < 2:
        return population * mean, None, None  # no spread to read from one run
    sd = math.sqrt(sum((w - mean) ** 2 for w in walls) / (k - 1))
    half = t_quantile(0.975, k - 1) * sd / math.sqrt(k) * math.sqrt(1 - k / population)
    return population * mean, population * (mean - half), population * (mean + half)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--axes", default="kld")
    ap.add_argument("--max-items", type=int, default=48, help="a PASS needs 46 items")
    ap.add_argument("--ctx", type=int, default=None, help="--refract-ctx (default: the plugin's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sample", type=int, default=None, help="run only this many pairs separately (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="a folder to keep the sweep's JSON report in")
    ap.add_argument("--reuse-sweep", type=Path, default=None,
                    help="a sweep report saved by --out: time only separate runs against it (needs --sweep-wall)")
    ap.add_argument("--sweep-wall", type=float, default=None, help="the reused sweep's wall time in seconds")
    ap.add_argument("--no-separate-cold", action="store_true", help="skip the cold separate runs (the slowest part)")
    ap.add_argument("--no-separate-warm", action="store_true", help="skip the warm separate runs")
    args = ap.parse_args()
    common = [f"--refract-model={args.model}", f"--refract-axes={args.axes}", f"--refract-max-items={args.max_items}",
              f"--refract-threads={args.threads}", *([f"--refract-ctx={args.ctx}"] if args.ctx else [])]
    print(f"machine: {os.cpu_count()} cores; model {args.model}; types {args.types}; axes {args.axes}; "
          f"at most {args.max_items} items per axis; ctx {args.ctx or 'default'}; threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "sweep").mkdir()
        if args.reuse_sweep is not None:
            if args.sweep_wall is None:
                sys.exit("--reuse-sweep needs --sweep-wall (the seconds that sweep took)")
            sweep = {"wall_s": args.sweep_wall, "exit": None, "report": json.loads(args.reuse_sweep.read_text())}
            print(f"sweep reused from {args.reuse_sweep} ({args.sweep_wall:.1f} s as given)")
        else:
            sweep = run([*common, f"--refract-sweep={args.types}", f"--refract-cache-dir={work / 'sweep' / 'cache'}"],
                        work / "sweep")
        report = sweep["report"]
        if args.out is not None and args.reuse_sweep is None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"sweep-{args.model}.json").write_text(json.dumps(report))
        pairs = [s["candidate"] for s in report.get("candidates") or [report]]
        n = len(pairs)
        measured = report["sweep"]["measured"]
        answer = (report["sweep"]["recommendation"] or {}).get("config")
        toks = tokens(report)
        cand_tokens = sum(v for k, v in toks.items() if k.startswith("cand"))
        skipped = [e for e in report["sweep"]["skipped"] if e["candidate"] in pairs]  # not the control
        print(f"sweep: {n} candidates ({len(measured)} measured, {len(skipped)} skipped, "
              f"{len(report['sweep']['refused'])} refused), {sweep['wall_s']:.1f} s, "
              f"{n / sweep['wall_s'] * 60:.2f} candidates/min, {cand_tokens / max(n, 1):.0f} tokens per candidate "
              f"({cand_tokens / max(len(measured), 1):.0f} per measured one), reference {toks.get('reference', 0)} and "
              f"control {toks.get('control', 0)} tokens once; recommends {answer}; exit {sweep['exit']}; "
              f"KV memory peak {report.get('kv_cache_bytes_peak')} B")
        chosen = list(pairs)
        if args.sample is not None and args.sample < n:
            chosen = random.Random(args.seed).sample(pairs, args.sample)
            print(f"separate runs: a sample of {len(chosen)} of the {n} pairs (seed {args.seed}): {', '.join(chosen)}")
        modes = [m for m, off in (("cold", args.no_separate_cold), ("warm", args.no_separate_warm)) if not off]
        own = {s["candidate"]: (s.get("verdict") or {}).get("verdict") for s in report.get("candidates") or [report]}
        for mode in modes:
            walls, cand_tok, verdicts = [], 0, {}
            shared = work / f"{mode}-cache"
            for i, pair in enumerate(chosen):
                folder = work / f"{mode}-{i}"
                folder.mkdir()
                cache = shared if mode == "warm" else folder / "cache"
                one = run([*common, f"--refract-candidate={pair}", f"--refract-cache-dir={cache}"], folder)
                walls.append(one["wall_s"])
                cand_tok += tokens(one["report"]).get("cand0", 0)
                verdicts[pair] = (one["report"].get("verdict") or {}).get("verdict")
                print(f"  {mode} {pair}: {one['wall_s']:.1f} s, {verdicts[pair]}", flush=True)
            if mode == "warm" and len(chosen) < n:
                # Only the first warm run computes the reference and control: it stands for
                # itself, the rest for the other N - 1.
                rest = total_estimate(walls[1:], n - 1)
                total, low, high = (None if x is None else walls[0] + x for x in rest)
            else:
                total, low, high = total_estimate(walls, n)
            span = "" if low is None or high is None else f" [{low:.0f}, {high:.0f}]"
            ratio_span = ("" if low is None or high is None or len(chosen) == n else
                          f" [{sweep['wall_s'] / high:.2f}, {sweep['wall_s'] / max(low, 1e-9):.2f}]")
            what = (f"{sum(walls):.1f} s" if len(chosen) == n else
                    f"{sum(walls):.1f} s for {len(chosen)}; all {n} estimated {total:.0f} s{span}")
            print(f"separate ({mode}): {what}, {n / total * 60:.2f} candidates/min, "
                  f"{cand_tok / max(len(chosen), 1):.0f} tokens per candidate; sweep / separate wall time "
                  f"{sweep['wall_s'] / total:.2f}x{ratio_span} (target < 0.4x)")
            # A pair the sweep skipped has no verdict of its own there (UNDECIDED): compare the rest.
            differ = {p: (own.get(p), v) for p, v in verdicts.items() if p in measured and own.get(p) != v}
            print(f"  verdicts of the measured pairs that differ from the sweep's (sweep, separate): {differ or 'none'}")


if __name__ == "__main__":
    main()
