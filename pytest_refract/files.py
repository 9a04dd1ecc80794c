"""What a path is, and atomic file writes: a temp file in the target's folder, fsync, then rename. A crash or an
error mid-write leaves whatever file was there before intact."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

# The part of a target's name its temp file repeats: mkstemp adds 8 characters and ".tmp", and
# a legal 250-byte name must still leave a legal temp name (255 bytes on most file systems).
_TEMP_NAME_KEEP = 96


def temp_prefix(target: Path) -> str:
    """The prefix of write_atomic's temp file for ``target`` (the up-front writability check
    creates exactly such a file)."""
    return "." + target.name.encode("utf-8", "surrogateescape")[:_TEMP_NAME_KEEP].decode("utf-8", "ignore") + "."


def resolved_target(path) -> Path:
    """Where a write to ``path`` lands: through every symlink, so that the atomic rename
    replaces the file a link points to and never the link itself (a /dev/stdout link
    replaced by a regular file broke the system's stdout)."""
    target = Path(path).expanduser()
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def write_atomic(path, data: Union[str, bytes, Sequence[bytes]], follow_links: bool = False) -> Path:
    """``data`` may be a list of byte strings, written one after another: a large payload
    then need not be concatenated with its header in memory first.

    By default a symlink at ``path`` is never followed: the new file replaces the link itself
    (the rename acts on the name), so a link planted in a folder this package owns (the
    reference cache, the model cache) can never make a write land on the file it points to.
    ``follow_links=True`` is for a path the user gave (a report): the write lands where the
    link points, and the link stays. Either way only a regular file (or nothing, or, without
    following, a link) is ever replaced: a device, FIFO, socket or folder there is refused
    with OSError before anything is written. The temp file is created with O_EXCL (mkstemp),
    which never opens through a link."""
    if follow_links:
        target = resolved_target(path)
        kind = special_file_kind(target)
        if kind or target.is_dir():
            raise OSError(f"{target} is {kind or 'a folder'}; only a regular file is ever replaced")
    else:
        target = Path(path)
        kind = special_file_kind(target, follow_links=False)
        if kind:
            raise OSError(f"{target} is {kind}; only a regular file is ever replaced")
    # backslashreplace: a lone surrogate (a path's byte that is not UTF-8) is written as an
    # escape, never an exception after an hour of measuring.
    parts: List[Union[bytes, bytearray, memoryview]]
    if isinstance(data, str):
        parts = [data.encode("utf-8", "backslashreplace")]
    elif isinstance(data, (bytes, bytearray, memoryview)):
        parts = [data]
    else:
        parts = list(data)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=str(target.parent))
    try:
        # mkstemp makes 0600 files; reports are artifacts others read, so honour the umask.
        # fchmod: by descriptor, never through whatever the temp name may have become.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
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


def special_file_kind(path, follow_links: bool = True) -> Optional[str]:
    """What a path that is not a regular file or folder is ("a FIFO (named pipe)", ...), or None.
    ``follow_links=False``: the path itself (a symlink is then None: it is replaced, not
    followed), and a folder counts as special.

    Uses stat only: opening a FIFO that has no writer would block forever."""
    try:
        mode = os.stat(path).st_mode if follow_links else os.lstat(path).st_mode
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
    if stat.S_ISDIR(mode):
        return None if follow_links else "a folder"
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return None
    return "not a regular file"


def write_reports(outputs, fallback_dir: Optional[Path] = None) -> Tuple[Dict[str, Optional[Path]], List[str]]:
    """Write each report; a failure (a full disk, the folder removed mid-run, a name too long)
    never loses a measured audit. ``outputs``: (option, path, make_text) triples; the text is
    made once. Returns (option -> the path actually written or None, one line per failure
    saying where the report could not go and where it went instead, if anywhere): the
    fallback is ``fallback_dir`` (beside pytest's cache), under the report's own name."""
    written: Dict[str, Optional[Path]] = {}
    problems: List[str] = []
    for option, path, make_text in outputs:
        if not path:
            continue
        text = make_text()
        try:
            written[option] = write_atomic(path, text, follow_links=True)
            continue
        except OSError as exc:
            why = exc.strerror or str(exc)
        written[option] = None
        line = f"{option}={path} could not be written ({why})"
        if fallback_dir is not None:
            try:
                Path(fallback_dir).mkdir(parents=True, exist_ok=True)
                name = Path(path).name.encode("utf-8", "surrogateescape")[:_TEMP_NAME_KEEP].decode("utf-8", "ignore")
                written[option] = write_atomic(Path(fallback_dir) / (name or "report"), text)
                line += f"; written to {written[option]} instead"
            except OSError as exc:
                line += f"; nor beside pytest's cache ({exc.strerror or exc})"
        problems.append(line)
    return written, problems


# Largest input files read whole (documented in the README's safety section): a prompt set,
# a corpus or haystack, a report (baseline, compare). A read stops one byte past the bound, so
# a device such as /dev/zero, or a file still growing, can never exhaust memory.
MAX_PROMPTS_BYTES = 16 << 20
MAX_TEXT_BYTES = 64 << 20
MAX_REPORT_BYTES = 64 << 20


# How long one input file may take to read. A regular file whose read blocks (/proc/kmsg, a
# kernel tracing pipe, a hung network mount) would otherwise hang the run at start-up: the
# size bound alone never ends a read that returns nothing.
READ_DEADLINE_S = 60.0
_READ_BLOCK = 1 << 20
# The one call that reads bytes, named so that a test can stand in a read that blocks.
_read_chunk = os.read


def _read_bounded(path: Path, max_bytes: int, deadline_s: float) -> bytes:
    """Up to ``max_bytes + 1`` bytes of ``path``, or TimeoutError when the read takes longer
    than ``deadline_s``. The read runs in a daemon thread (a blocked read cannot be
    interrupted; the thread is left behind, the run is not); the file is opened non-blocking,
    so a file that supports it (/proc/kmsg) says EAGAIN at once instead of waiting."""
    import threading

    outcome: dict = {}

    def work():
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                chunks, total = [], 0
                while total <= max_bytes:
                    chunk = _read_chunk(fd, min(_READ_BLOCK, max_bytes + 1 - total))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                outcome["data"] = b"".join(chunks)
            finally:
                os.close(fd)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    reader = threading.Thread(target=work, name="refract-read-input", daemon=True)
    reader.start()
    reader.join(deadline_s)
    if reader.is_alive():
        raise TimeoutError(f"no end of file after {deadline_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def read_input(path, what: str, max_bytes: int, option: str = "") -> bytes:
    """The bytes of an input file, checked as the model path is: a FIFO, device or socket is
    named without being opened (opening a FIFO with no writer blocks forever), a file larger
    than ``max_bytes`` is refused, and so is one whose read blocks or does not end within
    READ_DEADLINE_S. UsageProblem, one line, for every defect."""
    from .errors import UsageProblem

    p = Path(path).expanduser()
    where = f" ({option})" if option else ""
    kind = special_file_kind(p)
    if kind:
        raise UsageProblem(f"{what} path {p} is {kind}, not a regular file{where}; give a file on disk")
    if not p.exists():
        raise UsageProblem(f"{what} file not found: {p}{where}")
    if p.is_dir():
        raise UsageProblem(f"{what} path is a directory, not a file: {p}{where}")
    try:
        raw = _read_bounded(p, max_bytes, READ_DEADLINE_S)
    except BlockingIOError:
        raise UsageProblem(f"{what} file {p} blocks when read (it is no file on disk, e.g. under /proc){where}; "
                           "give a file on disk") from None
    except TimeoutError as exc:
        raise UsageProblem(f"{what} file {p} could not be read ({exc}: a file that blocks, e.g. under /proc, "
                           f"or a hung mount){where}; give a file on disk") from None
    except OSError as exc:
        raise UsageProblem(f"{what} file {p} cannot be read ({exc.strerror or exc}){where}") from None
    if len(raw) > max_bytes:
        raise UsageProblem(f"{what} file {p} is larger than {max_bytes >> 20} MiB, the most pytest-refract reads"
                           f"{where}; give a smaller file")
    return raw
