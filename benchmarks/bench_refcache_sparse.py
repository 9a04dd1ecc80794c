"""The reference cache's log-prob rows, dense (format 2) against sparse (format 3): size on disk
and in memory, time to encode, store, load and dequantize, and that both give the same floats.
Prints figures, asserts nothing (the identity is a test's job: tests/test_refcache.py).

    flock /work/cpu.lock python benchmarks/bench_refcache_sparse.py --model gemma3 [--chunks 1]

Real logits: the reference (f16 cache) over the bundled corpus, one 512-token KLD chunk at a
time (its scored half, 255 rows, as the KLD axis keeps), and 64 greedy steps of one prompt (a
trajectory's rows, as CompressedRows holds them). "Dense" is what the code stored before:
one uint16 per vocabulary entry per row, zlib level 1 on disk, zlib per row in memory for
trajectories.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np


def _timed(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def _entry_size(cache, kind, key):
    return cache._path(kind, key).stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from pytest_refract.engines import llamacpp
    from pytest_refract.engines.base import ContextSettings
    from pytest_refract.engines.kvconfig import parse_kv_config
    from pytest_refract.inputs.data import load_corpus, resolve_model
    from pytest_refract.reference.codec import (
        CompressedRows,
        LogprobRows,
        dequantize_logprobs,
        quantize_logprobs,
        sparse_logprobs,
        stored_nbytes,
    )
    from pytest_refract.reference.entries import ReferenceCache

    path = resolve_model(args.model)
    engine = llamacpp.Engine(path)
    types = llamacpp.cache_types()
    kv = parse_kv_config("ctk=f16,ctv=f16")
    ctx = engine.context(kv, (types["f16"], types["f16"]),
                         ContextSettings(n_ctx=512, n_batch=512, n_ubatch=512, n_threads=args.threads), "reference")
    tokens = engine.tokenize(load_corpus().text)
    print(f"model {path.name}: vocabulary {engine.n_vocab:,}; {args.threads} threads; "
          f"timings on a shared 2-core VM (not a quiet machine)")
    with tempfile.TemporaryDirectory() as tmp:
        cache = ReferenceCache(Path(tmp), {"bench": 1})
        for c in range(args.chunks):
            chunk = tokens[c * 512 : (c + 1) * 512]
            ctx.reset()
            logits = ctx.evaluate(0, chunk, 0, 256)[:-1]  # the scored rows, as the KLD axis keeps them
            n, vocab = logits.shape
            dense, t_dense = _timed(lambda: quantize_logprobs(logits))
            sparse, t_sparse = _timed(lambda: sparse_logprobs(logits))
            kept = len(sparse["col"]) / (n * vocab)
            per_row = np.diff(sparse["row_ptr"])
            kd, ks = cache.key("kld", [c, 0]), cache.key("kld", [c, 1])
            _, t_store_d = _timed(lambda: cache.store("kld", kd, dense), 1)
            _, t_store_s = _timed(lambda: cache.store("kld", ks, sparse), 1)
            (ld, t_load_d) = _timed(lambda: cache.load("kld", kd))
            (ls, t_load_s) = _timed(lambda: cache.load("kld", ks))
            fd, t_deq_d = _timed(lambda: np.asarray(LogprobRows(ld["arrays"])))
            fs, t_deq_s = _timed(lambda: np.asarray(LogprobRows(ls["arrays"])))
            same = np.array_equal(fd, fs) and np.array_equal(fd, dequantize_logprobs(dense))
            print(f"\nKLD chunk {c}: {n} rows x {vocab:,}; entries kept (within 16 nats of the max): "
                  f"{100 * kept:.2f} % (per row min {per_row.min():,}, median {int(np.median(per_row)):,}, "
                  f"max {per_row.max():,}); float rows identical: {same}")
            print(f"  {'':10} {'memory':>10} {'disk':>10} {'encode':>9} {'store':>9} {'load':>9} {'to float':>9}")
            for name, st, disk, te, tst, tl, tq in (
                    ("dense", stored_nbytes(dense), _entry_size(cache, "kld", kd), t_dense, t_store_d, t_load_d, t_deq_d),
                    ("sparse", stored_nbytes(sparse), _entry_size(cache, "kld", ks), t_sparse, t_store_s, t_load_s, t_deq_s)):
                print(f"  {name:10} {st / 1e6:8.2f}MB {disk / 1e6:8.2f}MB {te:8.3f}s {tst:8.3f}s {tl:8.3f}s {tq:8.3f}s")
            print(f"  32 default chunks: dense {32 * _entry_size(cache, 'kld', kd) / 1e9:.2f} GB on disk, "
                  f"sparse {32 * _entry_size(cache, 'kld', ks) / 1e9:.2f} GB")

        # A trajectory prompt: 64 greedy steps, rows kept as the decode produces them.
        prompt = engine.tokenize("The capital of France is")
        old_rows, new_rows = [], CompressedRows(engine.n_vocab)
        t_old = t_new = 0.0

        def keep(i, step, row):
            nonlocal t_old, t_new
            t = time.perf_counter()
            q = quantize_logprobs(row[None, :])
            old_rows.append(zlib.compress(q["q"].tobytes(), 1))
            t_old += time.perf_counter() - t
            t = time.perf_counter()
            new_rows.append_logits(row)
            t_new += time.perf_counter() - t

        ctx.reset()
        ctx.greedy([prompt], 64, keep)
        old_mem = sum(len(b) for b in old_rows) + 8 * len(old_rows)
        kt, kt2 = cache.key("trajectory", [0]), cache.key("trajectory", [1])
        # The old on-disk entry: dense rows (decompressed), zlib over all.
        dense_rows = {"q": np.stack([np.frombuffer(zlib.decompress(b), dtype=np.uint16) for b in old_rows]),
                      "scale": np.zeros(len(old_rows), dtype=np.float32),
                      "min_log_prob": np.zeros(len(old_rows), dtype=np.float32)}
        cache.store("trajectory", kt, dense_rows)
        cache.store("trajectory", kt2, new_rows.stored())
        print(f"\ntrajectory prompt: {len(new_rows)} rows x {engine.n_vocab:,}")
        print(f"  dense : {old_mem / 1e6:6.2f} MB in memory (zlib per row), {_entry_size(cache, 'trajectory', kt) / 1e6:6.2f} MB on disk, "
              f"keep {1000 * t_old / len(old_rows):.2f} ms/row")
        print(f"  sparse: {new_rows.nbytes / 1e6:6.2f} MB in memory (zlib per row), {_entry_size(cache, 'trajectory', kt2) / 1e6:6.2f} MB on disk, "
              f"keep {1000 * t_new / len(old_rows):.2f} ms/row")
    engine.close()


if __name__ == "__main__":
    main()
