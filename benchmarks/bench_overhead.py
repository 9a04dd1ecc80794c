"""Where an audit's wall time goes besides llama.cpp's own compute; prints figures, asserts nothing.

    python benchmarks/bench_overhead.py [--preset smollm2|gemma3-kld] [--warm] [--tree DIR]
                                        [--no-profile] [-- extra pytest args]

One audit runs as a user runs it (pytest in a fresh process, PYTHONPATH at ``--tree``, default
this checkout), with every C function of llama-cpp-python wrapped in a timer, and under
cProfile. Printed:

- the process's wall time, the part spent inside llama.cpp's C calls (llama_decode on its own:
  the compute; then model load, context creation, tokenizing, logits pointers, the rest), and
  the share of wall time that is llama_decode;
- the rest, by category (log-softmax, KLD statistics, reference-cache encoding and decoding,
  argmax, finite checks, JSON, pytest, imports, ...): cProfile's self time of each function,
  a numpy or builtin call charged to the project function that called it.

``--warm`` runs the audit twice on one fresh reference-cache folder: cold, then warm.
``--no-profile`` keeps only the C-call timers (no cProfile): the share of wall time without a
profiler's own overhead, which inflates call-heavy Python (cProfile costs ~1 us per call).
Presets: ``smollm2`` is the default audit (trajectory and KLD, with its control) on 16 prompts,
32 greedy tokens and 4 chunks; ``gemma3-kld`` is KLD only, 2 chunks, on Gemma 3's 262k vocabulary.
Hold /work/cpu.lock (or run on a quiet machine): the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PRESETS = {
    "smollm2": ["--refract-model=smollm2", "--refract-candidate=ctk=q8_0,ctv=q4_0", "--refract-n-predict=32",
                "--refract-chunks=4", "-k", "chunk or fact or reason or code-001 or code-002 or code-003 or code-004"],
    "gemma3-kld": ["--refract-model=gemma3", "--refract-candidate=ctk=q8_0,ctv=q4_0", "--refract-axes=kld",
                   "--refract-chunks=2"],
    "none": [],  # give the audit's arguments after --
}

# Runs in the audit's own process: wraps llama-cpp-python's C functions in timers, profiles
# pytest.main, and writes the raw figures as JSON to argv[1].
_LAUNCH = r'''
import ctypes, json, sys, time
import llama_cpp
import llama_cpp.llama_cpp as _low

started = time.perf_counter()
c_seconds, c_calls = {}, {}

def _wrap(name, fn):
    def llama_cpp_c_call(*args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            c_seconds[name] = c_seconds.get(name, 0.0) + time.perf_counter() - t
            c_calls[name] = c_calls.get(name, 0) + 1
    return llama_cpp_c_call

for _name, _fn in list(vars(_low).items()):
    if isinstance(_fn, ctypes._CFuncPtr):
        _wrapped = _wrap(_name, _fn)
        setattr(_low, _name, _wrapped)
        if getattr(llama_cpp, _name, None) is _fn:
            setattr(llama_cpp, _name, _wrapped)

import pytest
profile = sys.argv[2] == "profile"
if profile:
    import cProfile
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    rc = prof.runcall(pytest.main, sys.argv[3:])
else:
    t0 = time.perf_counter()
    rc = pytest.main(sys.argv[3:])
in_pytest = time.perf_counter() - t0
rows = []
if profile:
    import pstats
    stats = pstats.Stats(prof).stats
    index = {key: i for i, key in enumerate(stats)}
    for key, (cc, nc, tt, ct, callers) in stats.items():
        rows.append([list(key), tt, ct, [[index[c], v[2]] for c, v in callers.items() if c in index]])
json.dump({"rc": int(rc), "in_pytest_s": in_pytest, "c_seconds": c_seconds, "c_calls": c_calls,
           "functions": rows}, open(sys.argv[1], "w"))
sys.exit(int(rc))
'''

# C functions of llama.cpp by what they do (anything else: "other C calls").
C_GROUPS = {
    "llama_decode": "llama_decode (the compute)",
    "llama_model_load_from_file": "model load",
    "llama_init_from_model": "context creation",
    "llama_free": "context creation",
    "llama_tokenize": "tokenize / detokenize",
    "llama_token_to_piece": "tokenize / detokenize",
    "llama_get_logits": "logits pointers",
    "llama_get_logits_ith": "logits pointers",
}

# Project functions by category: (path suffix, function names or None for any) -> category;
# first match wins. Paths are matched on the file's last components.
CATEGORIES = [
    ("scoring/metrics.py", {"log_softmax"}, "log-softmax over the vocabulary"),
    ("scoring/metrics.py", {"kld_positions", "_block_stats"}, "KLD per-position statistics"),
    ("scoring/metrics.py", None, "scoring summaries (percentiles, means, margins)"),
    ("reference/codec.py", {"quantize_logprobs", "sparsify", "sparse_logprobs", "concat_quantized", "compact",
                            "append_logits", "encode_payload", "stored", "_quantize_rows"},
     "reference encode (16-bit quantize, sparsify, compress, write)"),
    ("reference/entries.py", {"store"}, "reference encode (16-bit quantize, sparsify, compress, write)"),
    ("reference/model_index.py", {"model_identity", "_read_index"}, "model file hash"),
    ("engines/gguf.py", {"file_sha256"}, "model file hash"),
    ("reference/codec.py", None, "reference decode (read, check, decompress, dequantize)"),
    ("reference/entries.py", None, "reference decode (read, check, decompress, dequantize)"),
    ("reference/folder.py", None, "reference decode (read, check, decompress, dequantize)"),
    ("reference/model_index.py", None, "reference decode (read, check, decompress, dequantize)"),
    ("reference/store.py", None, "reference store glue"),
    ("engines/base.py", {"_take"}, "greedy argmax"),
    ("engines/base.py", {"require_finite"}, "finite checks on logits"),
    ("engines/base.py", None, "engine Python (batch fill, views, bookkeeping)"),
    ("engines/llamacpp.py", {"llama_cpp_c_call"}, "llama.cpp C calls"),
    ("engines/llamacpp.py", None, "engine Python (batch fill, views, bookkeeping)"),
    ("engines/llama_log.py", None, "engine Python (batch fill, views, bookkeeping)"),
    ("engines/chat_template.py", None, "engine Python (batch fill, views, bookkeeping)"),
    ("engines/ggml_types.py", None, "engine Python (batch fill, views, bookkeeping)"),
    ("axes/trajectory.py", None, "trajectory axis per-row work"),
    ("axes/kld.py", None, "KLD axis glue (raw lists, concatenation)"),
    ("json/encoder.py", None, "JSON"),
    ("json/decoder.py", None, "JSON"),
    ("json/__init__.py", None, "JSON"),
    ("engines/gguf.py", None, "GGUF metadata read (Python)"),
    ("pytest_refract/report", None, "report building and writing"),
    ("pytest_refract/files.py", None, "atomic file writes (fsync)"),
    ("pytest_refract/scoring", None, "verdict / calibration statistics"),
]
_BUILTIN_CATEGORIES = [
    # "decompress" first: "compress" is part of its name.
    ("zlib", "reference decode (read, check, decompress, dequantize)", ("decompress",)),
    ("zlib", "reference encode (16-bit quantize, sparsify, compress, write)", ("compress", "flush")),
    ("_json", "JSON", ()),
    ("json", "JSON", ()),
]


def _category(key, generic_memo, stats, depth=0):
    """Category -> weight for one function: its own category, or (a numpy, builtin or
    standard-library helper) its callers' categories, weighted by the time each caller's calls
    took."""
    path, _line, name = key
    if path.endswith("<string>") and name == "llama_cpp_c_call":
        return {"llama.cpp C calls": 1.0}
    norm = path.replace("\\", "/")
    for suffix, names, cat in CATEGORIES:
        if suffix in norm and (names is None or name in names):
            return {cat: 1.0}
    if path == "~":
        for word, cat, subnames in _BUILTIN_CATEGORIES:
            if word in name and (not subnames or any(s in name for s in subnames)):
                return {cat: 1.0}
    if "/pytest_refract/" in norm:
        return {"other project Python": 1.0}
    if "_pytest/" in norm or "/pluggy/" in norm:
        return {"pytest and plugins": 1.0}
    if "importlib" in norm or "<frozen" in norm or name in ("<module>",):
        return {"imports": 1.0}
    generic = path == "~" or "/numpy/" in norm or "/python3" in norm
    if not generic or depth > 6:
        return {"other Python": 1.0}
    if key in generic_memo:
        return generic_memo[key]
    generic_memo[key] = {"other Python": 1.0}  # cycles
    callers = stats[key]["callers"]
    total = sum(t for _, t in callers) or 0.0
    out = defaultdict(float)
    if total <= 0:
        out["other Python"] = 1.0
    for caller, t in callers:
        if total <= 0:
            break
        for cat, w in _category(caller, generic_memo, stats, depth + 1).items():
            out[cat] += w * t / total
    generic_memo[key] = dict(out)
    return generic_memo[key]


def categorize(functions: list) -> dict:
    keys = [tuple(f[0]) for f in functions]
    stats = {keys[i]: {"tt": f[1], "callers": [(keys[c], t) for c, t in f[3]]} for i, f in enumerate(functions)}
    memo: dict = {}
    seconds = defaultdict(float)
    for key, s in stats.items():
        for cat, w in _category(key, memo, stats).items():
            seconds[cat] += w * s["tt"]
    return dict(seconds)


def top_functions(functions: list, n: int = 12) -> list:
    """The functions with the most self time outside llama.cpp's C calls."""
    rows = [(f[1], f"{Path(f[0][0]).name}:{f[0][1]} {f[0][2]}") for f in functions if f[0][2] != "llama_cpp_c_call"]
    return sorted(rows, reverse=True)[:n]


def run_once(tree: Path, args: list, workdir: Path, profile: bool) -> dict:
    out = workdir / "overhead.json"
    if out.exists():
        out.unlink()
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-c", _LAUNCH, str(out), "profile" if profile else "plain", "-q", "-p", "no:cacheprovider",
           f"--refract-json={workdir / 'report.json'}", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if not out.exists():
        sys.exit(f"the audit wrote no figures (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    data["wall_s"] = wall
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    data["pytest_summary"] = lines[-1] if lines else ""
    return data


def show(title: str, data: dict) -> None:
    wall = data["wall_s"]
    c = data["c_seconds"]
    groups = defaultdict(float)
    for name, s in c.items():
        groups[C_GROUPS.get(name, "other C calls")] += s
    decode = groups.get("llama_decode (the compute)", 0.0)
    c_total = sum(c.values())
    print(f"\n== {title}: wall {wall:.1f} s (process), exit {data['rc']} ({data['pytest_summary']}); inside pytest.main {data['in_pytest_s']:.1f} s")
    print(f"   llama.cpp C calls {c_total:7.2f} s = {100 * c_total / wall:5.1f} % of wall; llama_decode alone "
          f"{decode:7.2f} s = {100 * decode / wall:5.1f} % ({data['c_calls'].get('llama_decode', 0)} calls)")
    for name, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"     {name:<48} {s:8.2f} s  {100 * s / wall:5.1f} %")
    rest = wall - c_total
    print(f"   everything else {rest:7.2f} s = {100 * rest / wall:5.1f} % of wall "
          f"(start-up before pytest.main: {wall - data['in_pytest_s']:.2f} s)")
    if data["functions"]:
        cats = categorize(data["functions"])
        cats.pop("llama.cpp C calls", None)
        for name, s in sorted(cats.items(), key=lambda kv: -kv[1]):
            if s >= 0.005:
                print(f"     {name:<48} {s:8.2f} s  {100 * s / wall:5.1f} %")
        print("   top functions by self time (outside llama.cpp's C calls; numpy calls count in their caller):")
        for tt, label in top_functions(data["functions"]):
            print(f"     {tt:8.2f} s  {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent),
                    help="source tree of pytest-refract to run (PYTHONPATH); default: this checkout")
    ap.add_argument("--warm", action="store_true", help="run cold, then warm on the same reference cache")
    ap.add_argument("--no-profile", action="store_true", help="C-call timers only, no cProfile")
    ap.add_argument("--save", help="folder to keep each run's raw figures in (JSON), to categorize again later")
    ap.add_argument("extra", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    print(f"tree {tree}; preset {args.preset}; {os.cpu_count()} cores; "
          f"{'C-call timers only' if args.no_profile else 'cProfile + C-call timers'}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for phase in ("cold", "warm") if args.warm else ("cold",):
            work = Path(tmp) / phase
            work.mkdir()
            data = run_once(tree, PRESETS[args.preset] + [f"--refract-cache-dir={cache}"] + args.extra, work,
                            not args.no_profile)
            show(f"{args.preset} {phase}", data)
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                (Path(args.save) / f"{args.preset}-{phase}.json").write_text(json.dumps(data))


if __name__ == "__main__":
    main()
