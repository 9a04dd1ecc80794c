"""Benchmark audits at scale on this machine; prints a table, asserts nothing.

    python benchmarks/bench_scale.py [--model smollm2] [--skip-full]

Runs the default audit (36 prompts x 128 tokens, 32 chunks x 512) on SmolLM2 as real pytest
subprocesses and reports: cold wall time, warm wall time (reference served from the cache, with
another candidate), a 3-candidate matrix against 3 separate cold runs, xdist -n 2 against
serial, peak RSS of each run, the ratio of wall time to pure llama.cpp compute for the same
tokens (rates measured in this run through the same library), and the --refract-full audit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_audit import run_audit, throughput  # noqa: E402

CANDIDATES = ("ctk=q8_0,ctv=q4_0", "ctk=q8_0,ctv=q8_0", "ctk=q4_0,ctv=q4_0")


def compute_seconds(report: dict, rates: dict) -> float:
    """Pure llama.cpp time for the tokens this report processed, per context role."""
    label_rates = {}
    for section in report.get("candidates") or [report]:
        label_rates[section["candidate"]] = rates.get(section["candidate"], rates["ctk=f16,ctv=f16"])
    total = 0.0
    for section in report.get("candidates") or [report]:
        cand_rate = label_rates[section["candidate"]]
        for name, axis in section["axes"].items():
            for item in axis.get("items") or axis.get("cells") or []:
                for role, counts in (item.get("compute") or {}).items():
                    r = rates["ctk=f16,ctv=f16"] if role in ("reference", "floor") else cand_rate
                    pp = r["pp_at"].get(item.get("length"), r["pp512"]) if name == "rniah" else r["pp512"]
                    total += (counts["batch_tokens"] / pp + counts["decode_tokens"] / r["tg128"]
                              + counts.get("seq_decode_tokens", 0) / r["tg128x16"])
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    from pytest_refract.inputs.data import resolve_model

    model_path = resolve_model(args.model)
    size_mb = model_path.stat().st_size / 1e6
    threads = os.cpu_count() or 1
    print(f"machine: {os.cpu_count()} cores, model {model_path.name} ({size_mb:.0f} MB), {threads} threads", flush=True)
    rates = {kv: throughput(model_path, kv, threads, long_lengths=(1024, 2048, 4096))
             for kv in ("ctk=f16,ctv=f16",) + CANDIDATES}
    for kv, r in rates.items():
        longs = "  ".join(f"pp{n} {v:.0f}" for n, v in r["pp_at"].items())
        print(f"llama.cpp {kv:<20} pp512 {r['pp512']:6.1f} tok/s  tg128 {r['tg128']:6.1f} tok/s  {longs}", flush=True)

    rows = []

    def record(name, run):
        rep = run["report"]
        compute = compute_seconds(rep, rates)
        rows.append((name, run["wall_s"], compute, run["peak_rss_mb"], rep.get("composite")))
        print(f"{name:<44} wall {run['wall_s']:7.1f} s  compute {compute:7.1f} s  ratio "
              f"{run['wall_s'] / compute:5.2f}  peak RSS {run['peak_rss_mb']:5.0f} MB  composite {rep.get('composite')}",
              flush=True)
        return run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        work = tmp / "w"
        work.mkdir()
        cold = record("cold, default audit (fills the cache)",
                      run_audit(args.model, CANDIDATES[0], [f"--refract-cache-dir={cache}"], work))
        warm = record("warm: another candidate, reference cached",
                      run_audit(args.model, CANDIDATES[1], [f"--refract-cache-dir={cache}"], work))
        separate = [record(f"separate cold run {c}", run_audit(args.model, c, ["--refract-no-cache"], work))
                    for c in CANDIDATES]
        matrix_args = ["--refract-no-cache"] + [f"--refract-candidate={c}" for c in CANDIDATES[1:]]
        matrix = record("3-candidate matrix, one cold reference", run_audit(args.model, CANDIDATES[0], matrix_args, work))
        xdist = record("xdist -n 2 --dist loadgroup (no cache)",
                       run_audit(args.model, CANDIDATES[0], ["--refract-no-cache", "-n", "2", "--dist", "loadgroup"], work))
        # Decode phase: the axes whose greedy decodes run in batches, one sequence at a time
        # against the default 16 together.
        phase = ["--refract-no-cache", "--refract-axes=trajectory,plad"]
        one_at_a_time = record("trajectory+plad, 1 sequence per decode",
                               run_audit(args.model, CANDIDATES[0], phase + ["--refract-decode-batch=1"], work))
        batched = record("trajectory+plad, 16 sequences per decode",
                         run_audit(args.model, CANDIDATES[0], phase, work))
        if not args.skip_full:
            full = record("--refract-full, cold (no cache)",
                          run_audit(args.model, CANDIDATES[0], ["--refract-no-cache", "--refract-full"], work))
            for name, axis in full["report"]["axes"].items():
                print(f"    {name:<11} score {axis['score'] if axis['score'] is None else round(axis['score'], 2)}"
                      f"  wall {axis['wall_s']:.1f} s", flush=True)

    sep_total = sum(r["wall_s"] for r in separate)
    print()
    print(f"warm / cold                      {warm['wall_s'] / cold['wall_s']:.2f}   (target <= 0.55)")
    print(f"matrix / 3 separate cold runs    {matrix['wall_s'] / sep_total:.2f}   (target <= (N+1)/2N = 0.67)")
    print(f"xdist -n 2 / serial              {xdist['wall_s'] / separate[0]['wall_s']:.2f}   "
          f"composite {xdist['report']['composite']} vs serial {separate[0]['report']['composite']}")
    kv_mb = (separate[0]["report"].get("kv_cache_bytes_peak") or 0) / 1e6
    print(f"peak RSS of a default audit      {separate[0]['peak_rss_mb']:.0f} MB  (budget: model file {size_mb:.0f} MB "
          f"+ KV caches {kv_mb:.0f} MB + 400 MB = {size_mb + kv_mb + 400:.0f} MB)")
    identical = all(
        json.dumps(a.get(k)) == json.dumps(b.get(k))
        for axis in ("trajectory", "plad")
        for a, b in zip(one_at_a_time["report"]["axes"][axis]["items"], batched["report"]["axes"][axis]["items"])
        for k in ("cand_tokens", "ref_tokens", "teacher_forced_kld", "ref_drift", "cand_drift")
    )
    for axis in ("trajectory", "plad"):
        w1 = one_at_a_time["report"]["axes"][axis]["wall_s"]
        w16 = batched["report"]["axes"][axis]["wall_s"]
        print(f"{axis:<10} 1 seq {w1:6.1f} s, 16 seqs {w16:6.1f} s: {w1 / w16:.2f}x")
    print(f"decode phase (trajectory+plad)   {one_at_a_time['wall_s'] / batched['wall_s']:.2f}x faster batched "
          f"(target >= 2); item results identical: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
