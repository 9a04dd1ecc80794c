"""Read a GGUF file's header and metadata without llama.cpp.

Why our own reader: input checks (is this GGUF at all, is it truncated, what is the head
dimension, how long is its context) must run before a model loads, must give one clear line
instead of a C++ abort, and must not import llama_cpp at plugin load.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import UsageProblem
from ..files import special_file_kind

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are skipped rather than kept (token lists, merges): we only need sizes.
_KEEP_ARRAY_MAX = 64


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, fh, size: int):
        self.fh = fh
        self.size = size

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise _Truncated()
        return data

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > self.size:
            raise _Truncated()
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if count > self.size:
                raise _Truncated()
            if item_type in _SCALARS and count > _KEEP_ARRAY_MAX:
                self.fh.seek(struct.calcsize(_SCALARS[item_type]) * count, os.SEEK_CUR)
                if self.fh.tell() > self.size:
                    raise _Truncated()
                return _SkippedArray(count)
            items = [self.value(item_type) for _ in range(count)]
            return items if count <= _KEEP_ARRAY_MAX else _SkippedArray(count)
        raise ValueError(f"unknown GGUF value type {vtype}")


@dataclass(frozen=True)
class _SkippedArray:
    length: int


@dataclass
class GGUFInfo:
    path: Path
    size_bytes: int
    version: int
    metadata: Dict[str, Any]
    n_tensors: int
    # (name, dims, ggml type, offset) of each tensor, for truncation checks.
    tensors: list = field(default_factory=list)
    data_offset: int = 0

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_key(self, suffix: str, default=None):
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def n_ctx_train(self) -> Optional[int]:
        value = self.arch_key("context_length")
        return int(value) if value is not None else None

    @property
    def head_dims(self) -> tuple:
        """(key head dimension, value head dimension), None where the metadata cannot say."""
        n_head = self.arch_key("attention.head_count")
        n_embd = self.arch_key("embedding_length")
        if isinstance(n_head, list):  # per-layer head counts: use the first non-zero layer
            n_head = next((h for h in n_head if h), None)
        default = n_embd // n_head if (n_head and n_embd) else None
        k = self.arch_key("attention.key_length", default)
        v = self.arch_key("attention.value_length", default)
        return (int(k) if k else None, int(v) if v else None)

    @property
    def chat_template(self) -> Optional[str]:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None


def read_gguf(path) -> GGUFInfo:
    """Parse the header, metadata and tensor table. Raises UsageProblem with one line for a
    missing file, a directory, a non-GGUF file, or a header cut short."""
    p = Path(path).expanduser()
    kind = special_file_kind(p)  # before any open(): a FIFO without a writer blocks forever
    if kind:
        raise UsageProblem(f"model path {p} is {kind}, not a regular file; llama.cpp needs a .gguf file on disk")
    if not p.exists():
        raise UsageProblem(f"model file not found: {p} (pass --refract-model=PATH.gguf, or smollm2)")
    if p.is_dir():
        raise UsageProblem(f"model path is a directory, not a .gguf file: {p}")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise UsageProblem(f"not a GGUF file (bad magic {magic!r}): {p}; llama.cpp needs a .gguf model")
        reader = _Reader(fh, size)
        try:
            version = reader.scalar("<I")
            if version not in (2, 3):
                raise UsageProblem(f"unsupported GGUF version {version} in {p}")
            n_tensors = reader.scalar("<Q")
            n_kv = reader.scalar("<Q")
            metadata: Dict[str, Any] = {}
            for _ in range(n_kv):
                key = reader.string()
                vtype = reader.scalar("<I")
                metadata[key] = reader.value(vtype)
            tensors = []
            for _ in range(n_tensors):
                name = reader.string()
                n_dims = reader.scalar("<I")
                dims = [reader.scalar("<Q") for _ in range(n_dims)]
                ttype = reader.scalar("<I")
                offset = reader.scalar("<Q")
                tensors.append((name, dims, ttype, offset))
        except _Truncated:
            raise UsageProblem(f"truncated GGUF file (header ends early): {p}") from None
        except (ValueError, struct.error) as exc:
            raise UsageProblem(f"corrupt GGUF header in {p}: {exc}") from None
        alignment = int(metadata.get("general.alignment", 32) or 32)
        pos = fh.tell()
        data_offset = (pos + alignment - 1) // alignment * alignment
    return GGUFInfo(p, size, version, metadata, n_tensors, tensors, data_offset)


def expected_data_end(info: GGUFInfo, row_size) -> int:
    """Byte offset where the last tensor's data ends; ``row_size(ggml_type, n)`` is ggml's own
    row-size function so that every quantization format is sized correctly."""
    end = info.data_offset
    for _name, dims, ttype, offset in info.tensors:
        n_per_row = dims[0] if dims else 1
        n_rows = 1
        for d in dims[1:]:
            n_rows *= d
        end = max(end, info.data_offset + offset + row_size(ttype, n_per_row) * n_rows)
    return end


MIB = 1 << 20


def sampled_sha256(path, offsets, n_bytes: int = MIB) -> str:
    """sha256 over up to ``n_bytes`` read at each offset in turn (samples may overlap, and are
    shorter where the file ends): a model file's fingerprint without reading gigabytes. The
    report's fingerprint and the reference cache's model identity both come from here."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for offset in offsets:
            fh.seek(offset)
            h.update(fh.read(n_bytes))
    return h.hexdigest()


def head_sha256(path, n_bytes: int = MIB) -> str:
    """sha256 of the first MiB: the report's ``model.sha256_first_mib``."""
    return sampled_sha256(path, (0,), n_bytes)
