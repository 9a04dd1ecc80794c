"""Log-probability rows as the reference cache keeps them, on disk and in memory.

Log-probabilities are quantized as llama-perplexity quantizes its KLD base: per position a scale
and an offset, and one uint16 per vocabulary entry, with everything at or below max - 16 set to
0. They are stored sparse: per row only the entries that are not 0 (column and uint16 value),
which is exactly what llama-perplexity's file says and nothing less, so the dense rows rebuilt
from them are bit-identical (a 262k-entry vocabulary keeps a few percent of its entries).
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Optional

import numpy as np


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
