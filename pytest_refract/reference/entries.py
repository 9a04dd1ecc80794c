"""The reference cache's entries: one file per result, keyed by everything that determines it.

The reference (f16 KV) does not change between runs or between candidates, yet it is half of
every audit. Entries are keyed by everything that determines them: the model file's identity,
the reference config, the settings that change llama.cpp's numerics, the exact token ids of the
item, the llama.cpp build and this cache's format version. An entry is checksummed over every
byte after the checksum itself (its header, the arrays' layout, the meta JSON a control result
lives in, and the payload); a corrupt, truncated or mismatched one, or one whose arrays have
the wrong shape or dtype for its kind, is reported once, deleted and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..files import write_atomic
from .codec import check_sparse, decode_payload, encode_payload, is_sparse
from .folder import FORMAT_VERSION, _cache_warning, say

_MAGIC = b"RFRC"
# An entry: magic, the sha256 of everything after it, the header's length, header, payload.
_DIGEST_LEN = 32


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


# Deflate cannot expand a byte into more than about 1032 (its largest ratio): a header that
# promises more from its payload than that is no entry zlib wrote.
_DEFLATE_MAX_RATIO = 1032


def _layout_bytes(layout: list) -> int:
    """The bytes a layout's arrays take, checked before anything is decompressed: each item an
    object with a name, a numeric dtype and a shape of whole numbers."""
    total = 0
    for item in layout:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("malformed layout")
        dtype = np.dtype(item.get("dtype"))
        shape = item.get("shape")
        if dtype.hasobject or dtype.itemsize == 0 or not isinstance(shape, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n < (1 << 40) for n in shape):
            raise ValueError("malformed layout")
        total += int(np.prod(shape, dtype=object) if shape else 1) * dtype.itemsize
    return total


def _inflate(payload, expected: int) -> bytes:
    """The payload decompressed, never to more than the ``expected`` bytes its layout says
    (a small entry that inflates to gigabytes is rejected before it takes the memory)."""
    if expected > _DEFLATE_MAX_RATIO * len(payload) + 1024:
        raise ValueError(f"header promises {expected} bytes from a {len(payload)}-byte payload, more than "
                         "deflate can hold")
    inflater = zlib.decompressobj()
    data = inflater.decompress(payload, expected + 1)
    if len(data) > expected or inflater.unconsumed_tail:
        raise ValueError(f"payload decompresses to more than the {expected} bytes its header promises")
    if not inflater.eof:
        raise ValueError("payload ends before its compressed stream does")
    return data


def _read_entry(path: Path) -> bytes:
    """An entry's bytes, never through a link (O_NOFOLLOW) and only from a regular file: a
    link planted in the cache could otherwise make a run read any file (or a device) as an
    entry. OSError for a link (ELOOP) or anything that is not a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


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
    n_rows: Optional[int] = None
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
        if kind == "trajectory" and n_rows is not None and len(tokens) > n_rows:  # a trajectory has rows
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
        assert self.directory is not None  # only asked of an enabled cache
        return self.directory / self.namespace / kind / f"{key[:40]}.rfc"

    def _linked_folder(self, path: Path) -> Optional[Path]:
        """The namespace or kind folder on the way to ``path`` that is a symbolic link, if
        any: the cache never reads or writes through a link inside its own folder."""
        for folder in (path.parent.parent, path.parent):
            if folder.is_symlink():
                return folder
        return None

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry exists (not whether it is sound: load checks that)."""
        return self.enabled and self._path(kind, key).exists()

    def load(self, kind: str, key: str) -> Optional[dict]:
        if not self.enabled:
            return None
        path = self._path(kind, key)
        linked = self._linked_folder(path)
        if linked is not None:
            self.misses += 1
            self._give_up(f"reference cache folder {linked} is a symbolic link; the cache never reads or writes "
                          "through one")
            return None
        if path.is_symlink():
            # Planted: replaced (removed here, then written as a file), never followed.
            self.misses += 1
            self._evict(path, "it is a symbolic link, never followed")
            return None
        if not path.exists():
            self.misses += 1
            return None
        try:
            raw = _read_entry(path)
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
            arrays = _unpack_arrays(_inflate(payload, _layout_bytes(header["arrays"])), header["arrays"])
            del raw, payload
            arrays = decode_payload(arrays)
            meta = json.loads(header.get("meta") or "{}")
            check_entry(kind, arrays, meta, self.n_vocab)
        except Exception as exc:  # any defect: never use the entry
            self.misses += 1
            self._evict(path, str(exc))
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
                parts.append(compressor.compress(arr.reshape(-1).data.cast("B")))  # .data: the array's own memory
        parts.append(compressor.flush())
        header = json.dumps({"format": FORMAT_VERSION, "key": key, "size": sum(len(p) for p in parts),
                             "arrays": layout, "meta": json.dumps(meta or {})}).encode()
        head = struct.pack("<I", len(header)) + header
        digest = hashlib.sha256(head)
        for part in parts:
            digest.update(part)
        path = self._path(kind, key)
        linked = self._linked_folder(path)
        if linked is not None:
            self._give_up(f"reference cache folder {linked} is a symbolic link; the cache never reads or writes "
                          "through one")
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, [_MAGIC + digest.digest() + head, *parts])
            self.bytes_written += len(_MAGIC) + digest.digest_size + len(head) + sum(len(p) for p in parts)
        except OSError as exc:  # a full disk, a folder where the entry goes: never the item's failure
            self._give_up(f"reference cache entry {path} cannot be written ({exc.strerror or exc})")

    def _evict(self, path: Path, why: str) -> None:
        """Delete a rejected entry first, then say so: the warning (an exception under
        ``-W error``) can never leave the entry in place to be rejected on every run."""
        try:
            path.unlink()
        except OSError:
            pass
        say(f"reference cache entry {path.name} rejected ({why}); recomputing")

    def _give_up(self, why: str) -> None:
        """One warning, then no cache for the rest of the run."""
        self.directory = None
        _cache_warning(why)
