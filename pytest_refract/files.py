"""What a path is, and atomic file writes: a temp file in the target's folder, fsync, then rename. A crash or an
error mid-write leaves whatever file was there before intact."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union


def write_atomic(path, data: Union[str, bytes, Sequence[bytes]]) -> Path:
    """``data`` may be a list of byte strings, written one after another: a large payload
    then need not be concatenated with its header in memory first."""
    target = Path(path).expanduser()
    parts = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        # mkstemp makes 0600 files; reports are artifacts others read, so honour the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def special_file_kind(path) -> Optional[str]:
    """What a path that is not a regular file or folder is ("a FIFO (named pipe)", ...), or None.

    Uses stat only: opening a FIFO that has no writer would block forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        shown = str(path)
        if shown.startswith(("/dev/fd/", "/proc/self/fd/")) or "/fd/" in shown:
            return "a pipe (e.g. from <(...) process substitution)"
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    return "not a regular file"
