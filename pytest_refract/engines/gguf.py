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
_U64 = struct.Struct("<Q")
# Arrays longer than this are skipped rather than kept (token lists, merges): we only need sizes.
_KEEP_ARRAY_MAX = 64
# Arrays of arrays deeper than this are not a model's metadata (no GGUF writer nests them), and
# each level costs a Python stack frame.
_MAX_NESTING = 8
# ggml tensors have at most 4 dimensions (GGML_MAX_DIMS).
_MAX_DIMS = 4


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

    def skip_strings(self, count: int) -> None:
        """Read past ``count`` strings without decoding them, with string()'s checks: a
        262k-token vocabulary is 262k strings, and decoding each one only to drop the list
        cost seconds of every audit's start (measured: benchmarks/bench_overhead.py)."""
        read, unpack, size = self.fh.read, _U64.unpack, self.size
        for _ in range(count):
            head = read(8)
            if len(head) != 8:
                raise _Truncated()
            (n,) = unpack(head)
            if n > size or len(read(n)) != n:
                raise _Truncated()

    def value(self, vtype: int, depth: int = 0):
        if depth > _MAX_NESTING:
            raise ValueError(f"metadata arrays nested deeper than {_MAX_NESTING} levels")
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
            if item_type == _STRING and count > _KEEP_ARRAY_MAX:
                self.skip_strings(count)
                return _SkippedArray(count)
            items = [self.value(item_type, depth + 1) for _ in range(count)]
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
        value = self.arch_key("context_length")  # a whole number when present: see _check_metadata
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


# The GGUF magic: a file shorter than it is no GGUF, and is refused without being read.
_MAGIC_BYTES = 4


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
    if size < _MAGIC_BYTES:
        # Before any read: a file whose read blocks (/proc/kmsg says size 0) would hang here.
        raise UsageProblem(f"not a GGUF file ({size} bytes, shorter than the GGUF magic): {p}; llama.cpp needs a .gguf model")
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
                if n_dims > _MAX_DIMS:
                    raise ValueError(f"tensor {name!r} claims {n_dims} dimensions (ggml has at most {_MAX_DIMS})")
                dims = [reader.scalar("<Q") for _ in range(n_dims)]
                ttype = reader.scalar("<I")
                offset = reader.scalar("<Q")
                tensors.append((name, dims, ttype, offset))
        except _Truncated:
            raise UsageProblem(f"truncated GGUF file (header ends early): {p}") from None
        except (ValueError, struct.error) as exc:
            raise UsageProblem(f"corrupt GGUF header in {p}: {exc}") from None
        _check_metadata(metadata, p)
        alignment = metadata.get("general.alignment", 32)
        pos = fh.tell()
        data_offset = (pos + alignment - 1) // alignment * alignment
    return GGUFInfo(p, size, version, metadata, n_tensors, tensors, data_offset)


# Metadata this package reads as numbers: key suffix (after "<arch>.") -> whether a per-layer
# list of whole numbers is allowed, and the smallest value allowed (a recurrent model has 0 heads).
_NUMERIC_KEYS = {"context_length": (False, 1), "embedding_length": (False, 1), "block_count": (False, 1),
                 "attention.head_count": (True, 0), "attention.head_count_kv": (True, 0),
                 "attention.key_length": (False, 1), "attention.value_length": (False, 1)}
_MAX_WHOLE = (1 << 32) - 1  # llama.cpp reads these keys as uint32


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata(metadata: Dict[str, Any], path: Path) -> None:
    """One line for a metadata value this package would read as a number but is not one in
    range (a string or NaN context_length, head_count as a list of strings, an alignment of
    0.5): never a traceback later."""
    def shown(value) -> str:
        text = f"{value!r}" if not isinstance(value, _SkippedArray) else f"an array of {value.length} items"
        return text if len(text) <= 40 else text[:37] + "..."

    arch = metadata.get("general.architecture", "unknown")
    if not isinstance(arch, str):
        raise UsageProblem(f"corrupt GGUF metadata in {path}: general.architecture is {shown(arch)}, not a name")
    alignment = metadata.get("general.alignment", 32)
    if not (_whole(alignment) and 0 < alignment <= (1 << 30) and alignment & (alignment - 1) == 0):
        raise UsageProblem(f"corrupt GGUF metadata in {path}: general.alignment is {shown(alignment)}, "
                           "not a power of two")
    for suffix, (per_layer, lowest) in _NUMERIC_KEYS.items():
        key = f"{arch}.{suffix}"
        value = metadata.get(key)
        if value is None:
            continue
        if per_layer and isinstance(value, list):
            if all(_whole(v) and 0 <= v <= _MAX_WHOLE for v in value) and any(v >= max(lowest, 1) for v in value):
                continue
        elif _whole(value) and lowest <= value <= _MAX_WHOLE:
            continue
        raise UsageProblem(f"corrupt GGUF metadata in {path}: {key} is {shown(value)}, not a whole number "
                           f"from {lowest} to {_MAX_WHOLE}{' (or a list of them per layer)' if per_layer else ''}")


def expected_data_end(info: GGUFInfo, row_size) -> int:
    """Byte offset where the last tensor's data ends; ``row_size(ggml_type, n)`` is ggml's own
    row-size function so that every quantization format is sized correctly."""
    end = info.data_offset
    for name, dims, ttype, offset in info.tensors:
        n_per_row = dims[0] if dims else 1
        n_rows = 1
        for d in dims[1:]:
            n_rows *= d
        if n_per_row * n_rows >= 1 << 62:
            raise UsageProblem(f"corrupt GGUF tensor table in {info.path}: tensor {name!r} has dimensions {dims}")
        try:
            # row_size validates ttype against the build's ggml type table before any C call:
            # ggml's own functions do no bounds check (type 4, a removed slot, divides by zero).
            size = row_size(ttype, n_per_row)
        except ValueError as exc:
            raise UsageProblem(f"corrupt GGUF tensor table in {info.path}: tensor {name!r}: {exc}") from None
        end = max(end, info.data_offset + offset + size * n_rows)
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


def file_sha256(path, block: int = 8 * MIB) -> str:
    """sha256 of the whole file, read in blocks into one reused buffer (memory stays ``block``
    bytes whatever the file's size). The model's identity for the reference cache: an edit
    anywhere, even in bytes no sample would read, changes it. See cache.model_identity for how
    a warm run avoids re-reading."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def head_sha256(path, n_bytes: int = MIB) -> str:
    """sha256 of the first MiB: the report's ``model.sha256_first_mib``."""
    return sampled_sha256(path, (0,), n_bytes)
