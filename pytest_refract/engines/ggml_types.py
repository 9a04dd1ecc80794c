"""The ggml type table of the loaded llama.cpp build: which KV cache types it has, and the
bytes of a row in each (read from the library itself, bounded by the count its ggml.h
declares)."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Dict, List, Optional

import llama_cpp

from ..errors import UsageProblem
from . import libload
from .kvconfig import CacheType


def _ggml_lib():
    """The ggml library that llama-cpp-python actually loaded (not a table of ours), so that a
    fork's cache types (e.g. TurboQuant's turbo4) are found where the build has them."""
    for path in libload.loaded_library_files():
        if path.name.startswith(("libggml-base.", "ggml-base.")):
            return ctypes.CDLL(str(path))
    lib_dir = libload.loaded_library_dir() or Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so", "libggml.dylib", "ggml.dll"):
        candidate = lib_dir / name
        if candidate.exists():
            return ctypes.CDLL(str(candidate))
    # Fall back to the llama library itself: older builds link ggml statically into it.
    return llama_cpp.llama_cpp._lib


class _TypeTraits(ctypes.Structure):
    # Leading fields of ggml.h's struct ggml_type_traits (stable since ggml 0.1).
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_CACHE_TYPES: Optional[Dict[str, CacheType]] = None
_ROW_SIZE = None
# type id -> block size of every type the loaded ggml build has a layout for (tensors too).
_BLOCK_SIZES: Dict[int, int] = {}
# Integer and deprecated slots in ggml's enum are not storage formats for a KV cache.
_NOT_CACHE_TYPES = {"i8", "i16", "i32", "i64", "f64", "none", "deprecated", "q8_1", "q8_k"}
_TYPE_NAME_RE = re.compile(r"^[a-z0-9_]{2,16}$")


def _header_candidates() -> List[Path]:
    """Where the loaded build's ggml.h may be: installed beside llama-cpp-python, or, for a
    library folder of one's own (--refract-llama-lib), in its install prefix or the source
    tree its build folder's CMakeCache.txt names."""
    site = Path(llama_cpp.__file__).resolve().parent.parent
    headers = [site / "include" / "ggml.h", Path(llama_cpp.__file__).parent / "include" / "ggml.h"]
    folder = libload.loaded_library_dir()
    if folder is not None:
        headers += [folder.parent / "include" / "ggml.h", folder.parent.parent / "ggml" / "include" / "ggml.h"]
        for cache in (folder.parent / "CMakeCache.txt", folder / "CMakeCache.txt"):
            if cache.is_file():
                m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache.read_text(errors="replace"), re.M)
                if m:
                    headers.append(Path(m.group(1).strip()) / "ggml" / "include" / "ggml.h")
    return headers


def _ggml_type_count() -> int:
    """GGML_TYPE_COUNT of the loaded build, from its ggml.h. ggml's type functions do no
    bounds check, so the table is read only up to a count the build itself declares: without
    one, the scan fails closed with a one-line error rather than guess where the table ends."""
    headers = _header_candidates()
    for header in headers:
        if header.is_file():
            m = re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", header.read_text(errors="replace"))
            if m:
                return int(m.group(1))
    raise UsageProblem(
        "cannot tell which KV cache types this llama.cpp build has: no ggml.h declaring GGML_TYPE_COUNT at "
        + ", ".join(str(h) for h in dict.fromkeys(headers))
        + "; reinstall llama-cpp-python, or give --refract-llama-lib a build folder inside its build tree"
    )


def cache_types() -> Dict[str, CacheType]:
    """Name -> CacheType for every storage type the loaded ggml build names."""
    global _CACHE_TYPES, _ROW_SIZE
    if _CACHE_TYPES is None:
        lib = _ggml_lib()
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        types: Dict[str, CacheType] = {}
        for type_id in range(_ggml_type_count()):
            traits = lib.ggml_get_type_traits(type_id).contents
            if traits.blck_size <= 0 or traits.type_size <= 0 or not traits.type_name:
                continue  # removed slots of the enum
            _BLOCK_SIZES[type_id] = int(traits.blck_size)
            if traits.type_name != b"f32" and (not traits.from_float_ref or not traits.to_float):
                continue  # a type nothing can write into (e.g. needs an importance matrix)
            name = traits.type_name.decode("ascii", errors="replace").strip().lower()
            if not _TYPE_NAME_RE.match(name) or name in _NOT_CACHE_TYPES or name.startswith(("q4_0_", "iq4_nl_")):
                continue
            types.setdefault(name, CacheType(name, type_id, int(traits.blck_size)))
        _CACHE_TYPES = types
        _ROW_SIZE = lambda t, n: int(lib.ggml_row_size(t, n))  # noqa: E731
    return _CACHE_TYPES


def row_size(type_id: int, n: int) -> int:
    """Bytes of one row of ``n`` values stored as ggml type ``type_id``. ValueError for a type
    this build's table does not have, or a row its blocks cannot tile: ggml_row_size itself
    checks neither (a removed type has block size 0: SIGFPE; 2**31-1 reads past the table)."""
    cache_types()
    block = _BLOCK_SIZES.get(type_id)
    if block is None:
        raise ValueError(f"ggml type {type_id} is not a type this llama.cpp build knows")
    if n < 0 or n >= 1 << 62 or n % block:
        raise ValueError(f"a row of {n} values cannot be stored as ggml type {type_id} (blocks of {block})")
    assert _ROW_SIZE is not None  # set by cache_types() with the table
    return _ROW_SIZE(type_id, n)
