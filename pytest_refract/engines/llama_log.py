"""llama.cpp's log, as the engine reads it: kept quiet, its recent errors kept to quote in our
own one-line messages, and every record of a context's creation captured (kvlog.py parses
what it says; -v echoes it)."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import List, Optional, Tuple

import llama_cpp

_LOG_LOCK = threading.Lock()
_recent_errors: List[str] = []
# While a context is created, every log record goes here too (see _capture_log): llama.cpp
# reports there what it did (rotation, cache sizes) and why it refused.
_captured: Optional[List[Tuple[int, str]]] = None
_echo_log = False  # -v: print the captured creation log to stderr
# Every warning and error llama.cpp logged, at any time (the last _NOTABLE_KEPT), and how many
# there were: a context reads what its own llama_decode calls added (ggml warns at first use,
# e.g. the CUDA vector kernel's "converting K and V to f16 instead (slow)").
_NOTABLE_KEPT = 256
_notable: List[str] = []
_notable_count = 0


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):  # pragma: no cover - called from C
    # llama.cpp prints hundreds of lines per model load; keep only errors, to quote them in
    # our own one-line messages (e.g. "unknown model architecture").
    msg = text.decode("utf-8", errors="replace")
    global _notable_count
    with _LOG_LOCK:
        if _captured is not None:
            _captured.append((int(level), msg))
        if level in (3, 4) and msg.strip():  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            _notable.append(msg.strip())
            del _notable[:-_NOTABLE_KEPT]
            _notable_count += 1
    if level == 4:  # GGML_LOG_LEVEL_ERROR
        msg = msg.strip()
        if msg:
            with _LOG_LOCK:
                _recent_errors.append(msg)
                del _recent_errors[:-5]


def set_log_echo(on: bool) -> None:
    global _echo_log
    _echo_log = bool(on)


@contextlib.contextmanager
def _capture_log():
    """Collect llama.cpp's log records for the duration (a context's creation); the records
    are printed only with -v. Capturing ends, and the previous state returns, on exit."""
    global _captured
    records: List[Tuple[int, str]] = []
    with _LOG_LOCK:
        previous, _captured = _captured, records
    try:
        yield records
    finally:
        with _LOG_LOCK:
            _captured = previous
        if _echo_log and records:
            sys.stderr.write("".join(text for _, text in records))


def _last_error() -> str:
    """The most telling recent llama.cpp error: the loader's reason (e.g. "unknown model
    architecture: 'x'") rather than the generic "failed to load model" that follows it."""
    with _LOG_LOCK:
        for msg in reversed(_recent_errors):
            if "error loading model" in msg:
                return msg.split("error loading model", 1)[1].lstrip(": ").strip() or msg
        return _recent_errors[-1] if _recent_errors else ""


def notable_count() -> int:
    """How many warnings and errors llama.cpp has logged in this process."""
    return _notable_count


def notable_since(count: int) -> List[str]:
    """The warnings and errors logged after the ``count``-th (as many as are kept)."""
    with _LOG_LOCK:
        new = _notable_count - count
        return list(_notable[-new:]) if new > 0 else []
