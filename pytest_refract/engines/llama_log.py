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


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):  # pragma: no cover - called from C
    # llama.cpp prints hundreds of lines per model load; keep only errors, to quote them in
    # our own one-line messages (e.g. "unknown model architecture").
    msg = text.decode("utf-8", errors="replace")
    with _LOG_LOCK:
        if _captured is not None:
            _captured.append((int(level), msg))
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
