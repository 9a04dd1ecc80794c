"""Benchmark the default audit on this machine; prints figures, asserts nothing.

    python benchmarks/bench_audit.py [--model smollm2] [--candidate ctk=q8_0,ctv=q4_0] [--quick]

Figures:
- llama.cpp throughput through the same library and settings the audit uses: pp512 (one
  512-token batch, fresh cache) and tg128 (128 one-token decode steps), per KV config;
- the default audit's wall time (a real `pytest --refract-model=...` subprocess), per axis;
- the audit's tokens (from the JSON report's per-role compute counts) divided by those rates:
  the pure-compute time for the same tokens, and wall / compute (target <= 1.3);
- peak RSS of the audit process next to the model file size;
- with --sensitivity-cost: what the sensitivity control costs, cold (one more config's decode
  and prefill) and warm (read from the reference cache: nothing), from four audits sharing
  one reference-cache folder per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def throughput(model_path: Path, kv_text: str, threads: int, n_ctx: int = 1024, repeats: int = 3,
               long_lengths: tuple = ()) -> dict:
    from pytest_refract.engines import llamacpp as E
    from pytest_refract.inputs.data import load_corpus
    from pytest_refract.engines.gguf import read_gguf
    from pytest_refract.engines.kvconfig import parse_kv_config, validate_for_model

    info = read_gguf(model_path)
    kv = parse_kv_config(kv_text)
    types = validate_for_model(kv, E.cache_types(), *info.head_dims, "bench")
    eng = E.Engine(model_path)
    try:
        ctx = eng.context(kv, types, E.ContextSettings(n_ctx=n_ctx, n_threads=threads), "bench")
        tokens = eng.tokenize(load_corpus().text[:20000], add_special=True)[:512]
        ctx.reset()
        ctx.evaluate(0, tokens[:64], 0, logits_from=63)  # warm-up: graph allocation, page faults
        pp = []
        for _ in range(repeats):
            ctx.reset()
            t = time.perf_counter()
            ctx.evaluate(0, tokens, 0, logits_from=511)
            pp.append(512 / (time.perf_counter() - t))
        long_rates = {}
        if long_lengths:
            # Long prompts run slower per token (attention grows with depth): measure the
            # prefill rate at each R-NIAH haystack length, as llama-bench -p L would.
            text = load_corpus().text
            many = eng.tokenize(text * 2, add_special=True)
            long_ctx = eng.context(kv, types, E.ContextSettings(n_ctx=max(long_lengths) + 256, n_threads=threads), "long")
            for length in long_lengths:
                long_ctx.reset()
                t = time.perf_counter()
                long_ctx.evaluate(0, many[:length], 0, logits_from=length - 1)
                long_rates[length] = length / (time.perf_counter() - t)
        tg = []
        for _ in range(repeats):
            ctx.reset()
            ctx.evaluate(0, tokens[:1], 0, logits_from=0)
            t = time.perf_counter()
            for i in range(128):
                ctx._step([(tokens[(i + 1) % 512], i + 1, True)], [0])
            tg.append(128 / (time.perf_counter() - t))
        # Decode with 16 sequences stepping together (one KV stream each), as the trajectory
        # and PLAD axes do with the default --refract-decode-batch: 16 prompts of 64 tokens,
        # then 128 steps of 16 rows. Audit tokens decoded this way are priced at this rate.
        width = 16
        many = eng.context(kv, types, E.ContextSettings(n_ctx=256, n_threads=threads), "bench-seq", n_seq=width)
        tgw = []
        for _ in range(repeats):
            for slot in range(width):
                many.clear(slot)
                many.evaluate_each(slot, tokens[slot * 8 : slot * 8 + 64], 0, 63, lambda first, view: None)
            t = time.perf_counter()
            for i in range(128):
                many._step([(tokens[(i + slot) % 512], 64 + i, True) for slot in range(width)], list(range(width)))
            tgw.append(width * 128 / (time.perf_counter() - t))
        return {"pp512": statistics.median(pp), "tg128": statistics.median(tg), "tg128x16": statistics.median(tgw),
                "pp_at": long_rates}
    finally:
        eng.close()


_LAUNCH = (
    "import json, resource, sys, pytest\n"
    "rc = pytest.main(sys.argv[2:])\n"
    "use = resource.getrusage\n"
    "peak = max(use(resource.RUSAGE_SELF).ru_maxrss, use(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'peak_rss_kb': peak}))\n"
    "sys.exit(int(rc))\n"
)


def run_audit(model: str, candidate: str, extra: list, workdir: Path) -> dict:
    """One audit as a user runs it (pytest in a fresh process); its own peak RSS (the largest
    of the pytest process and any xdist worker) is written by the launcher."""
    report = workdir / "report.json"
    rss_file = workdir / "rss.json"
    for stale in (report, rss_file):
        if stale.exists():
            stale.unlink()
    cmd = [sys.executable, "-c", _LAUNCH, str(rss_file), "-q", "-p", "no:cacheprovider", f"--refract-model={model}",
           f"--refract-candidate={candidate}", f"--refract-json={report}", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if not report.exists():
        sys.exit(f"audit produced no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(report.read_text())
    peak_kb = json.loads(rss_file.read_text())["peak_rss_kb"]
    # ru_maxrss is in KiB; figures are printed in MB (10^6 bytes), like the model file size.
    return {"wall_s": wall, "exit": proc.returncode, "peak_rss_mb": peak_kb * 1024 / 1e6, "report": data}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--candidate", default="ctk=q8_0,ctv=q4_0")
    ap.add_argument("--reference", default="ctk=f16,ctv=f16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 32 tokens, 4 chunks (a smoke run)")
    ap.add_argument("--full", action="store_true", help="all four axes (--refract-full) with their defaults")
    ap.add_argument("--sensitivity-cost", action="store_true",
                    help="only measure the sensitivity control's cost: cold and warm, with and without it")
    args = ap.parse_args()
    if args.sensitivity_cost:
        sensitivity_cost(args)
        return

    from pytest_refract.inputs.data import resolve_model

    model_path = resolve_model(args.model)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; model {model_path.name} "
          f"({model_path.stat().st_size / 1e6:.1f} MB); threads {args.threads}")
    long_lengths = (1024, 2048, 4096) if args.full else ()
    rates = {
        "reference": throughput(model_path, args.reference, args.threads, long_lengths=long_lengths),
        "candidate": throughput(model_path, args.candidate, args.threads, long_lengths=long_lengths),
    }
    for role, r in rates.items():
        longs = "   " + "  ".join(f"pp{n} {v:6.1f}" for n, v in r["pp_at"].items()) if r["pp_at"] else ""
        print(f"llama.cpp {role:<9} pp512 {r['pp512']:7.1f} tok/s   tg128 {r['tg128']:6.1f} tok/s   "
              f"16 sequences x tg128 {r['tg128x16']:6.1f} tok/s{longs}")

    extra = ["--refract-n-predict=32", "--refract-chunks=4", "-k", "chunk or fact or reason"] if args.quick else []
    if args.full:
        extra.append("--refract-full")
    with tempfile.TemporaryDirectory() as tmp:
        run = run_audit(args.model, args.candidate, extra, Path(tmp))
    rep = run["report"]
    print(f"audit: exit {run['exit']}, composite {rep['composite']}, band {rep['band']}, wall {run['wall_s']:.1f} s")
    total_compute = 0.0
    for name, section in rep["axes"].items():
        compute_s = 0.0
        tokens = []
        for role, counts in section.get("compute", {}).items():
            tokens.append(f"{role}: {counts['batch_tokens']} batched + {counts['decode_tokens']} decoded alone + "
                          f"{counts.get('seq_decode_tokens', 0)} decoded in batches")
        control_items = (((rep.get("sensitivity") or {}).get("axes") or {}).get(name) or {}).get("items") or []
        for item in (section.get("items") or section.get("cells") or []) + control_items:
            for role, counts in item.get("compute", {}).items():
                r = rates["reference"] if role in ("reference", "floor") else rates["candidate"]
                pp = r["pp_at"].get(item.get("length"), r["pp512"]) if name == "rniah" else r["pp512"]
                compute_s += (counts["batch_tokens"] / pp + counts["decode_tokens"] / r["tg128"]
                              + counts.get("seq_decode_tokens", 0) / r["tg128x16"])
        total_compute += compute_s
        score = "  n/a " if section["score"] is None else f"{section['score']:6.2f}"
        print(f"  {name:<10} score {score}  wall {section['wall_s']:7.1f} s  pure compute "
              f"{compute_s:7.1f} s  ratio {section['wall_s'] / compute_s:5.2f}   ({'; '.join(tokens)})")
    print(f"total: wall {run['wall_s']:.1f} s (process, incl. start-up and model load), pure compute "
          f"{total_compute:.1f} s, ratio {run['wall_s'] / total_compute:.2f} (target <= 1.3)")
    kv_mb = (rep.get("kv_cache_bytes_peak") or 0) / 1e6
    budget = model_path.stat().st_size / 1e6 + kv_mb + 400
    print(f"peak RSS {run['peak_rss_mb']:.0f} MB; budget {budget:.0f} MB = model file "
          f"{model_path.stat().st_size / 1e6:.0f} MB + KV caches {kv_mb:.0f} MB + 400 MB")


def sensitivity_cost(args) -> None:
    """Wall time of the same audit without and with the sensitivity control, each cold (an
    empty reference cache) and then warm (the cache the cold run filled)."""
    extra = ["--refract-n-predict=32", "--refract-chunks=4", "-k", "chunk or fact or reason"] if args.quick else []
    if args.full:
        extra.append("--refract-full")
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in (("without control", ["--refract-no-sensitivity"]), ("with control", [])):
            cache = Path(tmp) / name.replace(" ", "-")
            for phase in ("cold", "warm"):
                work = Path(tmp) / f"{name.replace(' ', '-')}-{phase}"
                work.mkdir()
                run = run_audit(args.model, args.candidate, extra + flags + [f"--refract-cache-dir={cache}"], work)
                rep = run["report"]
                tokens = 0
                for section in ((rep.get("sensitivity") or {}).get("axes") or {}).values():
                    for item in section.get("items") or section.get("cells") or []:
                        for counts in item.get("compute", {}).values():
                            tokens += sum(counts[k] for k in ("batch_tokens", "decode_tokens", "seq_decode_tokens"))
                walls[(name, phase)] = run["wall_s"]
                print(f"{name:<16} {phase}: wall {run['wall_s']:7.1f} s, exit {run['exit']}, composite "
                      f"{rep['composite']}, verdict {(rep.get('verdict') or {}).get('verdict')}, control tokens {tokens}, "
                      f"control read from cache: {(rep.get('sensitivity') or {}).get('cached')}")
    for phase in ("cold", "warm"):
        a, b = walls[("without control", phase)], walls[("with control", phase)]
        print(f"control cost {phase}: {b - a:+.1f} s ({100 * (b - a) / a:+.0f} % of {a:.1f} s)")


if __name__ == "__main__":
    main()
