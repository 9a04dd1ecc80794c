"""Which llama.cpp library llama-cpp-python loads, checked before it loads it.

``--refract-llama-lib DIR`` points llama-cpp-python at another build of llama.cpp (a fork such
as TurboQuant) through its own ``LLAMA_CPP_LIB_PATH`` variable, which it reads once, when
``llama_cpp`` is first imported. So this module must not import ``llama_cpp``: it runs before.

llama-cpp-python's bindings are ctypes declarations of one llama.h. A library built from a
different llama.h either fails to load (a symbol the bindings declare is missing) or, worse,
loads and passes structs with another layout. The symbols below tell the two llama.h versions
apart that this project supports and tests; a mismatch is refused with the version to install.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import UsageProblem

LIB_PATH_VAR = "LLAMA_CPP_LIB_PATH"
LIBRARY_NAMES = ("libllama.so", "libllama.dylib", "llama.dll")

# Symbols that llama.h gained between the oldest supported bindings (0.3.22, the ABI of the
# TurboQuant fork) and the newest tested (0.3.36): present in a 0.3.36-era library, absent in
# a 0.3.22-era one. Taken from the two releases' vendored include/llama.h.
NEWER_ABI_SYMBOLS = ("llama_version", "llama_batch_ext_init", "llama_model_ftype", "llama_sampler_copy")
OLDEST_BINDINGS = "0.3.22"
NEWEST_TESTED_BINDINGS = "0.3.36"


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def bindings_version() -> Optional[str]:
    """The installed llama-cpp-python's version, read without importing it."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def find_library(folder: Path) -> Optional[Path]:
    for name in LIBRARY_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def bindings_install_hint(version: str) -> str:
    return f"CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install --no-cache-dir llama-cpp-python=={version}"


def abi_problem(library_has_newer_symbols: bool, bindings: Optional[str]) -> Optional[str]:
    """Why bindings ``bindings`` cannot drive a library with (or without) the newer symbols;
    None when they match. Pure, so it is tested without two builds at hand."""
    if not bindings:
        return None
    newer_bindings = _version_tuple(bindings) >= _version_tuple(NEWEST_TESTED_BINDINGS)
    older_bindings = _version_tuple(bindings) <= _version_tuple(OLDEST_BINDINGS)
    if newer_bindings and not library_has_newer_symbols:
        return (f"its llama.h is older than llama-cpp-python {bindings}'s bindings (no llama_version); it matches "
                f"llama-cpp-python {OLDEST_BINDINGS} (the TurboQuant fork's ABI): install its bindings only with "
                f"`{bindings_install_hint(OLDEST_BINDINGS)}`")
    if older_bindings and library_has_newer_symbols:
        return (f"its llama.h is newer than llama-cpp-python {bindings}'s bindings (it has llama_version); install the "
                f"matching bindings, e.g. `{bindings_install_hint(NEWEST_TESTED_BINDINGS)}`")
    return None


def use_library(folder_text: str) -> Path:
    """Make the coming ``import llama_cpp`` load the library in ``folder_text``. Raises
    UsageProblem (one line) when the folder or its library cannot serve."""
    folder = Path(os.path.expanduser(folder_text)).resolve()
    flag = f"--refract-llama-lib={folder_text}"
    if not folder.is_dir():
        raise UsageProblem(f"{flag}: folder {folder} does not exist")
    library = find_library(folder)
    if library is None:
        raise UsageProblem(
            f"{flag}: {folder} holds no {' / '.join(LIBRARY_NAMES)}; give the folder of a shared-library build of "
            "llama.cpp (BUILD_SHARED_LIBS=ON, usually build/bin)"
        )
    loaded = sys.modules.get("llama_cpp")
    if loaded is not None:
        current = loaded_library_dir()
        if current is None or current.resolve() != folder:
            raise UsageProblem(
                f"{flag}: llama_cpp is already imported in this process from {current or 'its own package'}; "
                f"start a fresh Python process (or set {LIB_PATH_VAR}={folder} before anything imports llama_cpp)"
            )
        return folder
    try:
        handle = ctypes.CDLL(str(library))
    except OSError as exc:
        raise UsageProblem(f"{flag}: {library.name} does not load: {_first_line(str(exc))}") from None
    has_newer = all(hasattr(handle, name) for name in NEWER_ABI_SYMBOLS)
    problem = abi_problem(has_newer, bindings_version())
    if problem:
        raise UsageProblem(f"{flag}: {library} does not match llama-cpp-python {bindings_version()}: {problem}")
    os.environ[LIB_PATH_VAR] = str(folder)
    return folder


def import_problem(exc: BaseException, folder: Optional[Path]) -> str:
    """One line for a failed ``import llama_cpp``: an undefined symbol means the bindings and
    the library come from different llama.h versions."""
    text = _first_line(str(exc))
    version = bindings_version() or "?"
    where = f"the library in {folder}" if folder else "its library"
    m = re.search(r"undefined symbol: (\w+)", str(exc))
    if m:
        hint = (f"it matches llama-cpp-python {OLDEST_BINDINGS} (install bindings only: "
                f"`{bindings_install_hint(OLDEST_BINDINGS)}`)") if m.group(1) in NEWER_ABI_SYMBOLS else (
                "install the llama-cpp-python whose vendored llama.cpp matches the library, bindings only: "
                "CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install llama-cpp-python==<version>")
        return f"llama-cpp-python {version} cannot use {where}: it lacks {m.group(1)}; {hint}"
    return f"llama-cpp-python {version} failed to load {where}: {text}"


# llama.h's defaults (llama_context_default_params) that every supported release shares:
# a cache of f16 on both sides (GGML_TYPE_F16 = 1), and sizes in a plausible range.
GGML_TYPE_F16 = 1
_PLAUSIBLE = (("n_ctx", 0, 1 << 24), ("n_batch", 1, 1 << 24), ("n_ubatch", 1, 1 << 24), ("n_seq_max", 1, 1 << 16))


def context_params_problem(params, bindings: Optional[str] = None) -> Optional[str]:
    """Why ``params`` (the library's llama_context_default_params(), read through the
    bindings' ctypes layout) shows the bindings and the library disagree on the struct's
    layout; None when its known defaults read back as llama.h sets them.

    Why it matters: llama.h changed the fields before ``type_k`` in 0.3.24, so newer bindings
    over an older library (or the reverse) load and run, and write the cache types into
    another field: every config would silently be measured as something else."""
    version = bindings or bindings_version() or "?"
    got = {}
    for name in ("type_k", "type_v", *(field for field, _lo, _hi in _PLAUSIBLE)):
        value = getattr(params, name, None)
        got[name] = value
    wrong = [f"{side}={got[side]!r} (f16 is {GGML_TYPE_F16})" for side in ("type_k", "type_v")
             if got[side] != GGML_TYPE_F16]
    for name, lo, hi in _PLAUSIBLE:
        value = got[name]
        if not isinstance(value, int) or not lo <= value <= hi:
            wrong.append(f"{name}={value!r}")
    if isinstance(got["n_batch"], int) and isinstance(got["n_ubatch"], int) and got["n_ubatch"] > got["n_batch"] > 0:
        wrong.append(f"n_ubatch {got['n_ubatch']} > n_batch {got['n_batch']}")
    if not wrong:
        return None
    return (f"llama-cpp-python {version}'s llama_context_params layout does not match the loaded llama.cpp library: its "
            f"defaults read back as {', '.join(wrong)}, so the cache types asked for would land in another field; "
            f"install the bindings that match the library (bindings only: `{bindings_install_hint('<version>')}`)")


def loaded_library_dir() -> Optional[Path]:
    """The folder llama-cpp-python took its library from (after it was imported)."""
    mod = sys.modules.get("llama_cpp.llama_cpp")
    base = getattr(mod, "_base_path", None)
    return Path(base) if base is not None else None


def loaded_library_files() -> List[Path]:
    """libllama and the ggml libraries actually mapped into this process (Linux: from
    /proc/self/maps, so a library the dynamic linker found elsewhere is the one named), else
    the libraries in the folder llama-cpp-python loaded from."""
    pattern = re.compile(r"^(lib)?(llama|ggml[\w.-]*)\.(so[.\d]*|dylib|dll)$")
    found: Dict[str, Path] = {}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if path.startswith("/") and pattern.search(os.path.basename(path)):
                    found.setdefault(path, Path(path))
    except OSError:
        pass
    if not found:
        folder = loaded_library_dir()
        if folder is not None and folder.is_dir():
            for entry in folder.iterdir():
                if pattern.search(entry.name) and entry.is_file():
                    found.setdefault(str(entry), entry)
    return sorted(found.values(), key=lambda p: p.name)


def library_digest(files: List[Path], names: bool = True) -> Optional[str]:
    """sha256 over the loaded libraries' names and contents: two builds that differ in any
    byte get different reference-cache keys. ``names=False``: over the contents only (of one
    file, its plain sha256)."""
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        if names:
            digest.update(os.fsencode(path.name) + b"\0")
        try:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
