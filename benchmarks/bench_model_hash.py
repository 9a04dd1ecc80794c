"""What the model's identity costs (issue 22, finding 5): the reference cache keys on the
sha256 of the whole model file, computed once per file and remembered by (device, inode, size,
mtime, ctime) in the cache folder. This prints the cold cost (the first run on a file: one
sequential read plus sha256) and the warm cost (a later run: a stat and a small JSON read),
measured on a file of --gib GiB, and extrapolates the cold cost to a 25 GB model.

    flock /work/cpu.lock python benchmarks/bench_model_hash.py --gib 2

Two throughputs are measured: sha256 over bytes already in memory (the CPU bound), and
file_sha256 over the file after its pages were dropped from the page cache with
posix_fadvise(DONTNEED) (the disk read plus the hash, what a first run on a freshly
downloaded model pays when the file is not cached)."""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from pytest_refract.engines.gguf import file_sha256
from pytest_refract.reference.model_index import model_identity

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0, help="size of the file hashed (GiB)")
    ap.add_argument("--dir", default=None, help="folder for the temporary file (default: the system's)")
    args = ap.parse_args()
    size = int(args.gib * (1 << 30))
    block = os.urandom(8 << 20)
    t = time.perf_counter()
    h = hashlib.sha256()
    for _ in range(size // len(block)):
        h.update(block)
    cpu = size / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.gguf"
        with open(path, "wb") as fh:
            for _ in range(size // len(block)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        t = time.perf_counter()
        file_sha256(path)
        cold = size / (time.perf_counter() - t)
        t = time.perf_counter()
        file_sha256(path)
        cached = size / (time.perf_counter() - t)
        folder = Path(tmp) / "cache"
        folder.mkdir()
        model_identity(path, folder)  # fills the index
        t = time.perf_counter()
        for _ in range(100):
            model_identity(path, folder)
        warm = (time.perf_counter() - t) / 100
    print(f"file of {size / GB:.2f} GB")
    print(f"sha256 in memory:                    {cpu / GB:6.2f} GB/s -> 25 GB in {25 * GB / cpu:6.1f} s")
    print(f"file_sha256, pages dropped (cold):   {cold / GB:6.2f} GB/s -> 25 GB in {25 * GB / cold:6.1f} s")
    print(f"file_sha256, file in the page cache: {cached / GB:6.2f} GB/s -> 25 GB in {25 * GB / cached:6.1f} s")
    print(f"model_identity, warm (indexed):      {warm * 1e3:6.3f} ms per run, whatever the size")


if __name__ == "__main__":
    main()
