"""The R-NIAH answer pattern, searched with a time bound.

The pattern is the user's regex, and Python's ``re`` backtracks: ``(\\w|\\s|.)*z{value}`` takes
longer than the universe's age on a 40-character reply, and no flag bounds it. So every search
runs in a small helper process (plain Python, ``re`` and ``json`` only, started once and kept)
that is killed when a search outlives MATCH_TIMEOUT_S; the caller gets PatternTimeout, and a
later search starts a fresh helper. A sane pattern answers in microseconds, so the bound only
ever ends a pattern that would never finish.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Optional

# The longest one search may take. Replies are at most a few thousand characters (the answer
# budget), which any pattern that does not backtrack exponentially searches in far less.
MATCH_TIMEOUT_S = 2.0
# A pattern longer than this is no answer pattern (and compiling it is work of its own).
MAX_PATTERN_CHARS = 2000

_HELPER = r"""
import json, re, sys
compiled = {}
for line in sys.stdin:
    req = json.loads(line)
    key = (req["p"], req["f"])
    if key not in compiled:
        if len(compiled) > 64:
            compiled.clear()
        compiled[key] = re.compile(req["p"], req["f"])
    sys.stdout.write("1\n" if compiled[key].search(req["t"]) else "0\n")
    sys.stdout.flush()
"""


class PatternTimeout(Exception):
    """A search that did not finish within MATCH_TIMEOUT_S."""


def answer_regex(template: str, value: str) -> str:
    """The regex text of an answer template with ``{value}`` (escaped) filled in."""
    return template.replace("{value}", re.escape(value))


class _Helper:
    """One helper process, started on first use; searches are serialized by a lock."""

    def __init__(self):
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            # -I -S: no site, no user paths, no environment: starts in milliseconds, imports nothing of ours.
            try:
                self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HELPER], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
            except OSError as exc:  # no search is ever run unbounded: the pattern cannot be used
                raise PatternTimeout(f"the search helper could not start ({exc.strerror or exc})") from None
        return self._proc

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def search(self, pattern: str, flags: int, text: str, timeout_s: float) -> bool:
        request = (json.dumps({"p": pattern, "f": flags, "t": text}) + "\n").encode("utf-8", "surrogatepass")
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None  # started with both pipes
            try:
                proc.stdin.write(request)
            except (BrokenPipeError, OSError):
                self.close()
                raise PatternTimeout("the pattern helper ended") from None
            deadline = time.monotonic() + timeout_s
            answer = b""
            while not answer.endswith(b"\n"):
                left = deadline - time.monotonic()
                ready = select.select([proc.stdout], [], [], max(left, 0))[0] if left > 0 else []
                if not ready:
                    self.close()
                    raise PatternTimeout(f"no result within {timeout_s:g} s")
                chunk = os.read(proc.stdout.fileno(), 16)
                if not chunk:
                    self.close()
                    raise PatternTimeout("the pattern helper ended")
                answer += chunk
            return answer.strip() == b"1"


_helper = _Helper()


def search(pattern: str, text: str, flags: int = re.IGNORECASE, timeout_s: Optional[float] = None) -> bool:
    """Whether ``pattern`` (regex text) matches anywhere in ``text``, or PatternTimeout when
    the search outlives ``timeout_s`` (default MATCH_TIMEOUT_S). re.error for a bad pattern,
    raised here, before anything is sent to the helper."""
    re.compile(pattern, flags)
    if os.name != "posix":  # no select() on pipes: searched here, unbounded
        return re.search(pattern, text, flags) is not None
    return _helper.search(pattern, flags, text, MATCH_TIMEOUT_S if timeout_s is None else timeout_s)
