"""On-disk cache of everything the reference side produces.

The reference (f16 KV) does not change between runs or between candidates, yet it is half of
every audit. Entries are keyed by everything that determines them: the model file's identity,
the reference config, the settings that change llama.cpp's numerics, the exact token ids of the
item, the llama.cpp build and this cache's format version. An entry is checksummed over every
byte after the checksum itself (its header, the arrays' layout, the meta JSON a control result
lives in, and the payload); a corrupt, truncated or mismatched one, or one whose arrays have
the wrong shape or dtype for its kind, is reported once, deleted and recomputed, never used.

Log-probabilities are quantized as llama-perplexity quantizes its KLD base: per position a scale
and an offset, and one uint16 per vocabulary entry, with everything at or below max - 16 set to
0. They are stored sparse: per row only the entries that are not 0 (column and uint16 value),
which is exactly what llama-perplexity's file says and nothing less, so the dense rows rebuilt
from them are bit-identical (a 262k-entry vocabulary keeps a few percent of its entries).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..engines.gguf import file_sha256
from ..errors import UsageProblem
from ..files import write_atomic

# 4: the sha256 covers header, meta and payload (before 4 it covered the payload only: a control
# entry's result, in its meta, could be edited unnoticed), and log-prob rows may be stored
# sparse (columns as gaps on disk); 2: dense uint16 rows after a JSON layout; 1: an npz.
FORMAT_VERSION = 4
_MAGIC = b"RFRC"
# An entry: magic, the sha256 of everything after it, the header's length, header, payload.
_DIGEST_LEN = 32
# The file that says "this folder is pytest-refract's reference cache": without it a non-empty
# folder is the user's, and is neither used nor cleared.
MARKER = ".pytest-refract-cache"
# The folders entries are written to: the reference's kinds, and the sensitivity control's
# results per axis ("control-<axis>", for any axis, a plugin's too: see refstore.py).
KINDS = ("trajectory", "kld", "greedy")
_CONTROL_KIND_RE = re.compile(r"control-[a-z][a-z0-9_]{0,31}")
_NAMESPACE_RE = re.compile(r"[0-9a-f]{20}")
_ENTRY_RE = re.compile(r"[0-9a-f]{40}\.rfc|\.[0-9a-f]{40}\.rfc\..+\.tmp")  # an entry, or write_atomic's temp file


def is_kind(name: str) -> bool:
    """Whether ``name`` is a folder of entries this cache writes."""
    return name in KINDS or _CONTROL_KIND_RE.fullmatch(name) is not None


class RefCacheWarning(UserWarning):
    pass


def _is_our_entry(path: Path) -> bool:
    return _ENTRY_RE.fullmatch(path.name) is not None and path.is_file() and not path.is_symlink()


def _is_our_namespace(path: Path) -> bool:
    """A folder laid out exactly as this cache writes one: kind folders holding entries."""
    if not (_NAMESPACE_RE.fullmatch(path.name) and path.is_dir() and not path.is_symlink()):
        return False
    for kind in path.iterdir():
        if not is_kind(kind.name) or not kind.is_dir() or kind.is_symlink():
            return False
        if not all(_is_our_entry(entry) for entry in kind.iterdir()):
            return False
    return True


# Files this cache writes at its top level besides entries: write_atomic's temp files of the
# marker and the model index (another run may be writing one right now, or a crash left one),
# the model index itself, and the writability probe.
_SCRATCH_RE = re.compile(r"\.\.pytest-refract-cache\..+\.tmp|\.model-sha256\.json|\.\.model-sha256\.json\..+\.tmp"
                         r"|\.write-check\.\d+\.tmp")


def _is_our_scratch(path: Path) -> bool:
    """By name only: another run's temp file may be renamed away between listing and a stat."""
    return _SCRATCH_RE.fullmatch(path.name) is not None and not path.is_symlink()


def _has_marker(directory: Path) -> bool:
    marker = directory / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("written_by") == "pytest-refract"
    except (OSError, ValueError, AttributeError):
        return False


def _cache_warning(text: str) -> None:
    warnings.warn(RefCacheWarning(text + "; measuring without the reference cache"), stacklevel=3)


def prepare_cache_dir(directory: Path, clear: bool = False) -> Optional[Path]:
    """The folder to cache in, marked as this cache's own, or None (measure without a cache)
    when it cannot be used: it is a file, or cannot be created or written (one warning).

    A non-empty folder without the marker is refused (UsageProblem), unless everything in it
    is laid out as this cache writes (a cache from before the marker existed): it may be the
    user's, and clearing or filling it could lose their files. ``clear`` removes only entries
    this cache wrote."""
    directory = Path(directory)
    try:
        if directory.exists() and not directory.is_dir():
            _cache_warning(f"reference cache folder {directory} is not a folder")
            return None
        if directory.is_dir() and not _has_marker(directory):
            foreign = [e.name for e in sorted(directory.iterdir())
                       if not (_is_our_namespace(e) or _is_our_scratch(e))]
            # Asked again: another run may have renamed its marker into place since the first look.
            if foreign and not _has_marker(directory):
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise UsageProblem(
                    f"reference cache folder {directory} holds files pytest-refract did not write ({shown}) and no "
                    f"{MARKER} marker; refusing to use or clear it: give --refract-cache-dir an empty or new folder"
                )
        directory.mkdir(parents=True, exist_ok=True)
        if not _has_marker(directory):
            write_atomic(directory / MARKER, json.dumps({"written_by": "pytest-refract", "format": FORMAT_VERSION}) + "\n")
        probe = directory / f".write-check.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _cache_warning(f"reference cache folder {directory} cannot be used ({exc.strerror or exc})")
        return None
    if clear:
        clear_entries(directory)
    return directory


def folder_bytes(directory: Optional[Path]) -> Optional[int]:
    """Bytes of all entries this cache holds in ``directory`` (every namespace), or None."""
    if directory is None:
        return None
    total = 0
    try:
        for namespace in Path(directory).iterdir():
            if not (_NAMESPACE_RE.fullmatch(namespace.name) and namespace.is_dir() and not namespace.is_symlink()):
                continue
            for kind in namespace.iterdir():
                if is_kind(kind.name) and kind.is_dir() and not kind.is_symlink():
                    with os.scandir(kind) as entries:
                        total += sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False))
    except OSError:
        return None
    return total


def describe_size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def clear_entries(directory: Path) -> int:
    """Delete the entries this cache wrote (and their folders, once empty); nothing else.
    Returns how many entries were deleted."""
    removed = 0
    for namespace in sorted(Path(directory).iterdir()):
        if not (_NAMESPACE_RE.fullmatch(namespace.name) and namespace.is_dir() and not namespace.is_symlink()):
            continue
        for kind in namespace.iterdir():
            if not is_kind(kind.name) or not kind.is_dir() or kind.is_symlink():
                continue
            for entry in kind.iterdir():
                if _is_our_entry(entry):
                    try:
                        entry.unlink()
                        removed += 1
                    except OSError:
                        pass
            try:
                kind.rmdir()  # only if nothing else is left in it
            except OSError:
                pass
        try:
            namespace.rmdir()
        except OSError:
            pass
    return removed


def _quantize_rows(xb: np.ndarray, q: np.ndarray, scale: np.ndarray, min_log_prob: np.ndarray,
                   buf: np.ndarray, mask: np.ndarray) -> None:
    """One block of rows quantized into q, scale and min_log_prob; ``buf`` (float32) and
    ``mask`` (bool) are scratch of the block's shape, reused from block to block."""
    mx = xb.max(axis=1)
    mn = np.maximum(xb.min(axis=1), mx - np.float32(16.0))
    np.subtract(xb, mx[:, None], out=buf)
    np.exp(buf, out=buf)
    lse = np.log(buf.sum(axis=1, dtype=np.float64)).astype(np.float32)
    sc = (mx - mn) / np.float32(65535.0)
    inv = np.divide(np.float32(1.0), sc, out=np.zeros_like(sc), where=sc > 0)
    np.subtract(xb, mn[:, None], out=buf)
    buf *= inv[:, None]
    np.rint(buf, out=buf)
    np.clip(buf, 0, 65535, out=buf)
    np.copyto(buf, 0, where=np.less_equal(xb, mn[:, None], out=mask))
    q[...] = buf
    scale[...] = sc
    min_log_prob[...] = mn - mx - lse


def quantize_logprobs(logits: np.ndarray, block: int = 32) -> Dict[str, np.ndarray]:
    """16-bit log-probabilities, as llama-perplexity's --kl-divergence-base file: per row a
    scale and the log-prob of the lowest kept logit (max - 16), then one uint16 per entry.
    Done in row blocks, in float32, so the temporaries stay a few MB (one block's scratch,
    reused by every block)."""
    x = np.asarray(logits, dtype=np.float32)
    n, vocab = x.shape
    q = np.empty((n, vocab), dtype=np.uint16)
    scale = np.empty(n, dtype=np.float32)
    min_log_prob = np.empty(n, dtype=np.float32)
    width = min(block, n)
    buf = np.empty((width, vocab), dtype=np.float32)
    mask = np.empty((width, vocab), dtype=bool)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        k = hi - lo
        _quantize_rows(x[lo:hi], q[lo:hi], scale[lo:hi], min_log_prob[lo:hi], buf[:k], mask[:k])
    return {"q": q, "scale": scale, "min_log_prob": min_log_prob}


def sparse_logprobs(logits: np.ndarray, block: int = 32) -> Dict[str, np.ndarray]:
    """quantize_logprobs, kept sparse (see sparsify): quantized a block of rows at a time, so
    the dense uint16 form of a whole chunk never exists (one block's, reused, does)."""
    x = np.asarray(logits, dtype=np.float32)
    n, vocab = x.shape
    if n == 0:
        return sparsify(quantize_logprobs(x, block))
    width = min(block, n)
    q = np.empty((width, vocab), dtype=np.uint16)
    buf = np.empty((width, vocab), dtype=np.float32)
    mask = np.empty((width, vocab), dtype=bool)
    parts = []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        k = hi - lo
        scale, low = np.empty(k, dtype=np.float32), np.empty(k, dtype=np.float32)
        _quantize_rows(x[lo:hi], q[:k], scale, low, buf[:k], mask[:k])
        parts.append(sparsify({"q": q[:k], "scale": scale, "min_log_prob": low}))
    return concat_quantized(parts)


def sparsify(stored: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Dense 16-bit rows as their non-zero entries: ``row_ptr`` (n + 1 offsets), ``col``
    (uint32, ascending within a row), ``val`` (uint16), plus scale, min_log_prob and the
    vocabulary size. Zero entries dequantize to min_log_prob exactly, so nothing is lost."""
    q = np.ascontiguousarray(stored["q"])
    n, vocab = q.shape
    # One flat index array (not a row and a column array) and a 1-D gather: the same entries
    # in the same row-major order as np.nonzero(q) gives, for less memory traffic.
    flat = np.flatnonzero(q)
    counts = np.count_nonzero(q, axis=1) if n else np.zeros(0, dtype=np.int64)
    row_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    cols = flat - np.repeat(np.arange(n, dtype=np.int64) * vocab, counts)
    return {"scale": stored["scale"], "min_log_prob": stored["min_log_prob"], "row_ptr": row_ptr,
            "col": cols.astype(np.uint32), "val": q.reshape(-1)[flat], "n_vocab": np.asarray([vocab], dtype=np.int64)}


def is_sparse(stored: Dict[str, np.ndarray]) -> bool:
    return "col" in stored


def dense_q(stored: Dict[str, np.ndarray]) -> np.ndarray:
    """The uint16 rows llama-perplexity would have written, from either form."""
    if not is_sparse(stored):
        return stored["q"]
    n, vocab = len(stored["row_ptr"]) - 1, int(stored["n_vocab"][0])
    q = np.zeros((n, vocab), dtype=np.uint16)
    # row_ptr starts at 0 (slices are rebased): entry j of row r goes to r * vocab + col[j].
    flat = np.repeat(np.arange(n, dtype=np.int64) * vocab, np.diff(stored["row_ptr"]))
    flat += stored["col"]
    q.reshape(-1)[flat] = stored["val"]
    return q


def encode_payload(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """What goes to disk: a sparse entry's columns as gaps within each row (the row's first
    column as is), which zlib packs to about a byte where absolute uint32 columns need ~3."""
    if "col" not in arrays or not len(arrays["col"]):
        return arrays
    col, ptr = arrays["col"], arrays["row_ptr"]
    gaps = np.empty_like(col)
    gaps[0] = col[0]
    np.subtract(col[1:], col[:-1], out=gaps[1:])
    starts = ptr[:-1][np.diff(ptr) > 0]
    gaps[starts] = col[starts]
    out = {k: v for k, v in arrays.items() if k != "col"}
    out["col_gaps"] = gaps
    return out


def decode_payload(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """encode_payload undone, then the entry checked (check_sparse) before any row is rebuilt."""
    if "col_gaps" in arrays:
        gaps, ptr = arrays["col_gaps"], arrays.get("row_ptr")
        if ptr is None or len(ptr) < 1 or ptr[0] != 0 or ptr[-1] != len(gaps) or (np.diff(ptr) < 0).any():
            raise ValueError("sparse entry's row offsets are inconsistent")
        run = np.cumsum(gaps, dtype=np.int64)
        counts = np.diff(ptr)
        before = np.where(ptr[:-1] > 0, run[np.maximum(ptr[:-1] - 1, 0)] if len(run) else 0, 0)
        col = run - np.repeat(before, counts)
        if len(col) and (col.min() < 0 or col.max() > np.iinfo(np.uint32).max):
            raise ValueError("sparse entry's columns are out of range")
        arrays = {k: v for k, v in arrays.items() if k != "col_gaps"}
        arrays["col"] = col.astype(np.uint32)
    check_sparse(arrays)
    return arrays


def check_sparse(stored: Dict[str, np.ndarray]) -> None:
    """A loaded sparse entry must be well formed before any row is rebuilt from it."""
    if not is_sparse(stored):
        return
    ptr, col, val, vocab = stored["row_ptr"], stored["col"], stored["val"], stored.get("n_vocab")
    if vocab is None or vocab.shape != (1,) or int(vocab[0]) <= 0:
        raise ValueError("sparse entry without its vocabulary size")
    if len(ptr) != len(stored["scale"]) + 1 or len(stored["min_log_prob"]) != len(stored["scale"]):
        raise ValueError("sparse entry's row counts disagree")
    if len(ptr) and (ptr[0] != 0 or ptr[-1] != len(col) or len(col) != len(val) or (np.diff(ptr) < 0).any()):
        raise ValueError("sparse entry's row offsets are inconsistent")
    if len(col) and int(col.max()) >= int(vocab[0]):
        raise ValueError("sparse entry's columns exceed the vocabulary")


def dequantize_logprobs(stored: Dict[str, np.ndarray], out: Optional[np.ndarray] = None) -> np.ndarray:
    """The float32 log-probs of either form: q x scale + min_log_prob, per entry, in float32.
    ``out`` (float32, C-contiguous, the rows' shape) is a buffer to fill instead of a new array.

    A sparse entry is not expanded to dense uint16 first: its zero entries all become the
    row's ``0 x scale + min_log_prob`` (computed as such, so every bit matches), filled in one
    pass, and only the kept entries are computed one by one."""
    shape = _shape(stored)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"a buffer of {shape} float32 is needed, not {out.dtype}{list(out.shape)}")
    scale, low = stored["scale"], stored["min_log_prob"]
    if not is_sparse(stored):
        out[...] = stored["q"]
        out *= scale[:, None]
        out += low[:, None]
        return out
    n, vocab = shape
    zero = np.zeros(n, dtype=np.float32)
    zero *= scale
    zero += low
    out[...] = zero[:, None]
    counts = np.diff(stored["row_ptr"])
    kept = stored["val"].astype(np.float32)
    kept *= np.repeat(scale, counts)
    kept += np.repeat(low, counts)
    # row_ptr starts at 0 (slices are rebased): entry j of row r goes to r * vocab + col[j].
    flat = np.repeat(np.arange(n, dtype=np.int64) * vocab, counts)
    flat += stored["col"]
    out.reshape(-1)[flat] = kept
    return out


def _shape(stored: Dict[str, np.ndarray]) -> tuple:
    if is_sparse(stored):
        return (len(stored["row_ptr"]) - 1, int(stored["n_vocab"][0]))
    return stored["q"].shape


def _slice_rows(stored: Dict[str, np.ndarray], rows: slice) -> Dict[str, np.ndarray]:
    """Rows of either form, as views (a sparse slice keeps absolute offsets, rebased here)."""
    if not is_sparse(stored):
        return {k: v[rows] for k, v in stored.items()}
    lo, hi, step = rows.indices(len(stored["row_ptr"]) - 1)
    if step != 1:
        raise TypeError("sparse log-prob rows are read by contiguous row slices")
    hi = max(hi, lo)
    ptr = stored["row_ptr"][lo : hi + 1]
    a, b = int(ptr[0]), int(ptr[-1])
    return {"scale": stored["scale"][lo:hi], "min_log_prob": stored["min_log_prob"][lo:hi], "row_ptr": ptr - a,
            "col": stored["col"][a:b], "val": stored["val"][a:b], "n_vocab": stored["n_vocab"]}


def concat_quantized(parts: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """One stored entry from row segments quantized one after another (both of one form)."""
    if len(parts) == 1:
        return parts[0]
    if not is_sparse(parts[0]):
        return {k: np.concatenate([p[k] for p in parts]) for k in ("q", "scale", "min_log_prob")}
    ptrs, base = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        ptrs.append(p["row_ptr"][1:] + base)
        base += int(p["row_ptr"][-1])
    return {"scale": np.concatenate([p["scale"] for p in parts]),
            "min_log_prob": np.concatenate([p["min_log_prob"] for p in parts]),
            "row_ptr": np.concatenate(ptrs), "col": np.concatenate([p["col"] for p in parts]),
            "val": np.concatenate([p["val"] for p in parts]), "n_vocab": parts[0]["n_vocab"]}


def compact(stored: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The smaller of the two forms of the same rows (both rebuild the same floats): sparse
    wins on a trained model's large vocabulary; a small or flat one may keep most entries,
    and then 2 bytes per entry beat 6."""
    if is_sparse(stored):
        n, vocab = _shape(stored)
        if len(stored["col"]) * 6 > n * vocab * 2:
            return {"q": dense_q(stored), "scale": stored["scale"], "min_log_prob": stored["min_log_prob"]}
    return stored


def stored_nbytes(stored: Dict[str, np.ndarray]) -> int:
    """Bytes the stored form holds in memory."""
    return int(sum(np.asarray(v).nbytes for v in stored.values()))


def _unpack_arrays(data: bytes, layout: list) -> Dict[str, np.ndarray]:
    """Arrays laid out one after another in ``data`` (read-only views, no copies)."""
    arrays: Dict[str, np.ndarray] = {}
    offset = 0
    for item in layout:
        dtype = np.dtype(item["dtype"])
        count = int(np.prod(item["shape"], dtype=np.int64))
        if offset + count * dtype.itemsize > len(data):
            raise ValueError("payload shorter than its layout")
        arrays[item["name"]] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(item["shape"])
        offset += count * dtype.itemsize
    if offset != len(data):
        raise ValueError("payload longer than its layout")
    return arrays


class LogprobRows:
    """16-bit log-probabilities held as stored, dequantized only a few rows at a time.

    Holding the reference this way costs 2 bytes per vocabulary entry instead of 4. Slicing
    rows gives another LogprobRows over the same storage (no copy); ``np.asarray`` of it gives
    the float32 log-probs, exactly those of ``dequantize_logprobs``. Scoring reads in small row
    blocks, so the float matrix of a whole chunk never exists."""

    def __init__(self, stored: Dict[str, np.ndarray]):
        self.stored = stored
        self.shape = _shape(stored)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> "LogprobRows":
        if not isinstance(rows, slice):
            raise TypeError("LogprobRows is read by row slices")
        return LogprobRows(_slice_rows(self.stored, rows))

    def dequantize_into(self, rows: slice, out: np.ndarray) -> np.ndarray:
        """The float32 log-probs of ``rows``, written into ``out`` (see dequantize_logprobs)."""
        return dequantize_logprobs(_slice_rows(self.stored, rows), out=out)

    def __array__(self, dtype=None, copy=None):
        out = dequantize_logprobs(self.stored)
        return out if dtype is None else out.astype(dtype, copy=False)


# The model hashes this cache has computed, by file identity: a warm run reads a few hundred
# bytes instead of the whole model. Bounded: at most _INDEX_ENTRIES files, and an index larger
# than _INDEX_MAX_BYTES (not one we wrote) is ignored.
MODEL_INDEX = ".model-sha256.json"
_INDEX_ENTRIES = 64
_INDEX_MAX_BYTES = 1 << 20


def _file_key(st: os.stat_result) -> str:
    """What changes whenever the file's bytes may have: device, inode, size, mtime and ctime
    (in ns). ctime cannot be set back by a user (touch -d sets mtime only), so an edit in
    place that restores the old mtime still changes the key."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _read_index(index: Path) -> dict:
    try:
        if not index.is_file() or index.is_symlink() or index.stat().st_size > _INDEX_MAX_BYTES:
            return {}
        data = json.loads(index.read_text(encoding="utf-8"))
        entries = data.get("files") if isinstance(data, dict) and data.get("written_by") == "pytest-refract" else None
        return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", v["sha256"])} if isinstance(entries, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def model_identity(path: Path, directory: Optional[Path] = None) -> dict:
    """The model file's size and the sha256 of all its bytes.

    The hash is computed once per file (one sequential read of the whole file) and remembered
    in ``directory``'s MODEL_INDEX, by device, inode, size, mtime and ctime: a later run whose
    file has the same five reads nothing more. Without a folder (no cache) there is nothing to
    key, so nothing is hashed: ``sha256`` is None."""
    path = Path(path)
    st = os.stat(path)
    if directory is None:
        return {"size": st.st_size, "sha256": None}
    index = Path(directory) / MODEL_INDEX
    entries = _read_index(index)
    key = _file_key(st)
    known = entries.get(key)
    if known is not None:
        return {"size": st.st_size, "sha256": known["sha256"]}
    digest = file_sha256(path)
    if _file_key(os.stat(path)) != key:  # changed while being read: the hash describes neither version
        raise UsageProblem(f"model file {path} changed while it was being hashed; run again once it is complete")
    entries.pop(key, None)
    entries[key] = {"sha256": digest, "file": path.name}
    kept = dict(list(entries.items())[-_INDEX_ENTRIES:])
    try:
        write_atomic(index, json.dumps({"written_by": "pytest-refract", "files": kept}, indent=0) + "\n")
    except OSError:
        pass  # only a later run's speed depends on it
    return {"size": st.st_size, "sha256": digest}


def _verified_parts(raw: bytes):
    """(header dict, payload view) of an entry whose sha256 matches every byte after it, or
    ValueError. Nothing of the entry is parsed before the checksum has passed."""
    start = 4 + _DIGEST_LEN
    if raw[:4] != _MAGIC:
        raise ValueError("bad magic")
    if len(raw) < start + 4:
        raise ValueError("truncated header")
    if hashlib.sha256(memoryview(raw)[start:]).digest() != raw[4:start]:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    (header_len,) = struct.unpack("<I", raw[start : start + 4])
    if start + 4 + header_len > len(raw):
        raise ValueError("truncated header")
    header = json.loads(raw[start + 4 : start + 4 + header_len])
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise ValueError("malformed header")
    return header, memoryview(raw)[start + 4 + header_len :]


# What each kind's entry must hold: array name -> (dtype kind letters, number of dimensions).
# Rows of log-probabilities: one uint16 per vocabulary entry, a float32 scale and offset per row.
# The dense form's arrays; a sparse entry (col, val, row_ptr, n_vocab) is checked by check_sparse
# and then as the same rows.
_LOGPROB_ARRAYS = {"q": ("u", 2), "scale": ("f", 1), "min_log_prob": ("f", 1)}
_SPARSE_ARRAYS = {"col": ("u", 1), "val": ("u", 1), "row_ptr": ("iu", 1), "n_vocab": ("iu", 1),
                  "scale": ("f", 1), "min_log_prob": ("f", 1)}
_REQUIRED_ARRAYS = {
    "kld": _LOGPROB_ARRAYS,
    "trajectory": dict(_LOGPROB_ARRAYS, tokens=("iu", 1)),
    "greedy": {"tokens": ("iu", 1)},
}


def check_entry(kind: str, arrays: Dict[str, np.ndarray], meta, n_vocab: Optional[int] = None) -> None:
    """ValueError naming the defect when an entry's contents cannot be what its kind stores:
    a missing array, a wrong dtype or number of dimensions, rows of another vocabulary size,
    per-row arrays of another length, token ids outside the vocabulary, non-finite
    log-probabilities, or (a control entry) no result object. Such an entry passed its
    checksum, so it was written so (an older build, a bug); it is still never used."""
    if not isinstance(meta, dict):
        raise ValueError("meta is not an object")
    required = dict(_REQUIRED_ARRAYS.get(kind, {}))
    sparse = "q" in required and is_sparse(arrays)
    if sparse:
        required = dict({k: v for k, v in required.items() if k not in _LOGPROB_ARRAYS}, **_SPARSE_ARRAYS)
    for name, (kinds, ndim) in required.items():
        arr = arrays.get(name)
        if arr is None:
            raise ValueError(f"no {name} array")
        if arr.dtype.kind not in kinds or arr.ndim != ndim:
            raise ValueError(f"{name} is {arr.dtype}{list(arr.shape)}, not a {ndim}-D "
                             f"{'integer' if 'i' in kinds else 'unsigned' if kinds == 'u' else 'float'} array")
    n_rows = None
    if "q" in _REQUIRED_ARRAYS.get(kind, {}):
        if sparse:
            check_sparse(arrays)
            n_rows, width = len(arrays["scale"]), int(arrays["n_vocab"][0])
            if arrays["val"].dtype != np.uint16:
                raise ValueError(f"val is {arrays['val'].dtype}, not uint16")
        else:
            q = arrays["q"]
            if q.dtype != np.uint16:
                raise ValueError(f"q is {q.dtype}, not uint16")
            n_rows, width = q.shape
        if n_vocab is not None and width != n_vocab:
            raise ValueError(f"rows of {width} entries, the model's vocabulary has {n_vocab}")
        for name in ("scale", "min_log_prob"):
            if arrays[name].shape != (n_rows,):
                raise ValueError(f"{name} has {arrays[name].shape[0]} rows, the entry has {n_rows}")
            if not np.isfinite(arrays[name]).all():
                raise ValueError("non-finite log-probabilities")
    tokens = arrays.get("tokens")
    if tokens is not None and kind in ("trajectory", "greedy"):
        if tokens.size and (int(tokens.min()) < 0 or (n_vocab is not None and int(tokens.max()) >= n_vocab)):
            raise ValueError("token ids outside the vocabulary")
        if kind == "trajectory" and len(tokens) > n_rows:
            raise ValueError(f"{len(tokens)} tokens but {n_rows} log-prob rows")
    if kind.startswith("control-") and not isinstance(meta.get("result"), dict):
        raise ValueError("no result object in a control entry")


class ReferenceCache:
    def __init__(self, directory: Optional[Path], identity: dict, n_vocab: Optional[int] = None):
        self.directory = Path(directory) if directory else None
        # The model's vocabulary size, when known: an entry's rows must have exactly as many.
        self.n_vocab = n_vocab
        self.identity = dict(identity, format=FORMAT_VERSION)
        self.namespace = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:20]
        self.hits = 0
        self.misses = 0
        # Bytes of entries this run wrote and read (the cost of the reference on disk).
        self.bytes_written = 0
        self.bytes_read = 0

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def key(self, kind: str, *parts) -> str:
        h = hashlib.sha256(self.namespace.encode() + kind.encode())
        for part in parts:
            if isinstance(part, (list, tuple)):
                h.update(np.asarray(part, dtype=np.int64).tobytes())
            else:
                h.update(repr(part).encode())
            h.update(b"|")
        return h.hexdigest()

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / self.namespace / kind / f"{key[:40]}.rfc"

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry exists (not whether it is sound: load checks that)."""
        return self.enabled and self._path(kind, key).exists()

    def load(self, kind: str, key: str) -> Optional[dict]:
        if not self.enabled:
            return None
        path = self._path(kind, key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            raw = path.read_bytes()
            n_read = len(raw)
        except OSError as exc:  # e.g. an entry replaced by a folder: a cache problem, not the item's
            self.misses += 1
            self._give_up(f"reference cache entry {path} cannot be read ({exc.strerror or exc})")
            return None
        try:
            header, payload = _verified_parts(raw)
            if header.get("format") != FORMAT_VERSION or header.get("key") != key:
                raise ValueError("entry belongs to another key or format")
            if len(payload) != header.get("size"):
                raise ValueError("payload size differs from its header")
            arrays = _unpack_arrays(zlib.decompress(payload), header["arrays"])
            del raw, payload
            arrays = decode_payload(arrays)
            meta = json.loads(header.get("meta") or "{}")
            check_entry(kind, arrays, meta, self.n_vocab)
        except Exception as exc:  # any defect: never use the entry
            self.misses += 1
            warnings.warn(RefCacheWarning(f"reference cache entry {path.name} rejected ({exc}); recomputing"))
            try:
                path.unlink()
            except OSError:
                pass
            return None
        self.hits += 1
        self.bytes_read += n_read
        return {"meta": meta, "arrays": arrays}

    def store(self, kind: str, key: str, arrays: Dict[str, np.ndarray], meta: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        arrays = encode_payload(arrays)
        # Arrays are compressed straight from their own memory, one after another, and the
        # header and compressed parts are written without joining them: a KLD entry is tens
        # of MB, and every extra copy would add to the audit's peak memory.
        compressor = zlib.compressobj(1)
        parts: List[bytes] = []
        layout = []
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            layout.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
            if arr.size:
                parts.append(compressor.compress(memoryview(arr.reshape(-1)).cast("B")))
        parts.append(compressor.flush())
        header = json.dumps({"format": FORMAT_VERSION, "key": key, "size": sum(len(p) for p in parts),
                             "arrays": layout, "meta": json.dumps(meta or {})}).encode()
        head = struct.pack("<I", len(header)) + header
        digest = hashlib.sha256(head)
        for part in parts:
            digest.update(part)
        path = self._path(kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, [_MAGIC + digest.digest() + head, *parts])
            self.bytes_written += len(_MAGIC) + digest.digest_size + len(head) + sum(len(p) for p in parts)
        except OSError as exc:  # a full disk, a folder where the entry goes: never the item's failure
            self._give_up(f"reference cache entry {path} cannot be written ({exc.strerror or exc})")

    def _give_up(self, why: str) -> None:
        """One warning, then no cache for the rest of the run."""
        self.directory = None
        _cache_warning(why)


class CompressedRows:
    """16-bit log-prob rows kept in memory as a decode produces them, sparse (only the entries
    llama-perplexity keeps, see sparsify) and zlib-compressed row by row. Slicing gives a
    LogprobRows of those rows; ``stored()`` the whole entry, in the sparse form stored on disk."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self._rows: List[tuple] = []  # (count, zlib(col), zlib(val)) per row
        self._scale: List[float] = []
        self._min: List[float] = []

    def append_logits(self, logits: np.ndarray) -> None:
        """Quantize one row of logits (as quantize_logprobs) and keep it sparse and compressed."""
        sp = sparsify(quantize_logprobs(logits[None, :]))
        self._rows.append((len(sp["col"]), zlib.compress(sp["col"].tobytes(), 1), zlib.compress(sp["val"].tobytes(), 1)))
        self._scale.append(sp["scale"][0])
        self._min.append(sp["min_log_prob"][0])

    @property
    def shape(self) -> tuple:
        return (len(self._rows), self.n_vocab)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes the compressed rows hold (what a batch of continuations costs in memory)."""
        return sum(len(c) + len(v) for _, c, v in self._rows) + 8 * len(self._rows)

    def _stored(self, rows: slice) -> Dict[str, np.ndarray]:
        picked = self._rows[rows]
        row_ptr = np.zeros(len(picked) + 1, dtype=np.int64)
        np.cumsum([n for n, _, _ in picked], out=row_ptr[1:])
        col = np.frombuffer(b"".join(zlib.decompress(c) for _, c, _ in picked), dtype=np.uint32)
        val = np.frombuffer(b"".join(zlib.decompress(v) for _, _, v in picked), dtype=np.uint16)
        return {"scale": np.asarray(self._scale[rows], dtype=np.float32),
                "min_log_prob": np.asarray(self._min[rows], dtype=np.float32), "row_ptr": row_ptr,
                "col": col, "val": val, "n_vocab": np.asarray([self.n_vocab], dtype=np.int64)}

    def __getitem__(self, rows: slice) -> LogprobRows:
        if not isinstance(rows, slice):
            raise TypeError("CompressedRows is read by row slices")
        return LogprobRows(self._stored(rows))

    def stored(self) -> Dict[str, np.ndarray]:
        return self._stored(slice(None))
