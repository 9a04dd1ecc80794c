"""The reference cache's folder: the marker that says a folder is this cache's own, what may
be used, counted and cleared in it (only what this cache wrote; a user's files never).

The cache's parts: this folder (folder.py), the 16-bit log-prob rows entries hold (codec.py),
the model-hash index a warm run reads instead of the model (model_index.py), and the checksummed
entries themselves and their keys (entries.py). store.py keeps results in them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

from ..errors import UsageProblem
from ..files import write_atomic

# 4: the sha256 covers header, meta and payload (before 4 it covered the payload only: a control
# entry's result, in its meta, could be edited unnoticed), and log-prob rows may be stored
# sparse (columns as gaps on disk); 2: dense uint16 rows after a JSON layout; 1: an npz.
FORMAT_VERSION = 4
# The file that says "this folder is pytest-refract's reference cache": without it a non-empty
# folder is the user's, and is neither used nor cleared.
MARKER = ".pytest-refract-cache"
# The folders entries are written to: the reference's kinds, and the sensitivity control's
# results per axis ("control-<axis>", for any axis, a plugin's too: see store.py).
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
