"""On-disk cache of everything the reference side produces.

The reference (f16 KV) does not change between runs or between candidates, yet it is half of
every audit. Entries are keyed by everything that determines them: the model file's identity,
the reference config, the settings that change llama.cpp's numerics, the exact token ids of the
item, the llama.cpp build and this cache's format version. An entry is checksummed; a corrupt,
truncated or mismatched one is reported, deleted and recomputed, never used.

Log-probabilities are stored as llama-perplexity stores its KLD base: per position a scale and
an offset, and one uint16 per vocabulary entry, with everything below max - 16 clamped.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import warnings
import zlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .files import write_atomic

FORMAT_VERSION = 1
_MAGIC = b"RFRC"


class RefCacheWarning(UserWarning):
    pass


def quantize_logprobs(logits: np.ndarray, block: int = 32) -> Dict[str, np.ndarray]:
    """16-bit log-probabilities, as llama-perplexity's --kl-divergence-base file: per row a
    scale and the log-prob of the lowest kept logit (max - 16), then one uint16 per entry.
    Done in row blocks, in float32, so the temporaries stay a few MB."""
    x = np.asarray(logits, dtype=np.float32)
    n, vocab = x.shape
    q = np.empty((n, vocab), dtype=np.uint16)
    scale = np.empty(n, dtype=np.float32)
    min_log_prob = np.empty(n, dtype=np.float32)
    for lo in range(0, n, block):
        xb = x[lo : lo + block]
        mx = xb.max(axis=1)
        mn = np.maximum(xb.min(axis=1), mx - np.float32(16.0))
        lse = np.log(np.exp(xb - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
        sc = (mx - mn) / np.float32(65535.0)
        inv = np.divide(np.float32(1.0), sc, out=np.zeros_like(sc), where=sc > 0)
        t = (xb - mn[:, None]) * inv[:, None]
        np.rint(t, out=t)
        np.clip(t, 0, 65535, out=t)
        t[xb <= mn[:, None]] = 0
        q[lo : lo + block] = t.astype(np.uint16)
        scale[lo : lo + block] = sc
        min_log_prob[lo : lo + block] = mn - mx - lse
    return {"q": q, "scale": scale, "min_log_prob": min_log_prob}


def dequantize_logprobs(stored: Dict[str, np.ndarray]) -> np.ndarray:
    return (stored["q"].astype(np.float32) * stored["scale"][:, None] + stored["min_log_prob"][:, None]).astype(np.float32)


def model_identity(path: Path) -> dict:
    """Size plus hashes of the header and of samples from the middle and the end: enough to
    tell model files apart without reading gigabytes."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for offset in (0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))):
            fh.seek(offset)
            h.update(fh.read(1 << 20))
    return {"size": size, "sample_sha256": h.hexdigest()}


class ReferenceCache:
    def __init__(self, directory: Optional[Path], identity: dict):
        self.directory = Path(directory) if directory else None
        self.identity = dict(identity, format=FORMAT_VERSION)
        self.namespace = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:20]
        self.hits = 0
        self.misses = 0
        self.rejected = 0

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

    def load(self, kind: str, key: str) -> Optional[dict]:
        if not self.enabled:
            return None
        path = self._path(kind, key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            raw = path.read_bytes()
            if raw[:4] != _MAGIC:
                raise ValueError("bad magic")
            (header_len,) = struct.unpack("<I", raw[4:8])
            header = json.loads(raw[8 : 8 + header_len])
            payload = raw[8 + header_len :]
            if header.get("format") != FORMAT_VERSION or header.get("key") != key:
                raise ValueError("entry belongs to another key or format")
            if len(payload) != header.get("size") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
                raise ValueError("checksum mismatch (truncated or corrupt)")
            with np.load(io.BytesIO(zlib.decompress(payload)), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            meta = json.loads(header.get("meta") or "{}")
        except Exception as exc:  # any defect: never use the entry
            self.rejected += 1
            self.misses += 1
            warnings.warn(RefCacheWarning(f"reference cache entry {path.name} rejected ({exc}); recomputing"))
            try:
                path.unlink()
            except OSError:
                pass
            return None
        self.hits += 1
        return {"meta": meta, "arrays": arrays}

    def store(self, kind: str, key: str, arrays: Dict[str, np.ndarray], meta: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        payload = zlib.compress(buf.getvalue(), 1)
        header = json.dumps({"format": FORMAT_VERSION, "key": key, "size": len(payload),
                             "sha256": hashlib.sha256(payload).hexdigest(), "meta": json.dumps(meta or {})}).encode()
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, _MAGIC + struct.pack("<I", len(header)) + header + payload)
