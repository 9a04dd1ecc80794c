"""The model file's identity for the reference cache's key: its size and the sha256 of all
its bytes, remembered in the cache folder by file identity so that a warm run need not read the
whole model again."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from ..engines.gguf import file_sha256
from ..errors import UsageProblem
from ..files import write_atomic

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
