"""Progress of long items: a decode batch, a KLD chunk or an R-NIAH cell can compute for
minutes before pytest prints its result letter, so while one runs the user sees what it is doing.

Three parts, kept apart so that llama.cpp I/O and scoring never touch the terminal:

- ``Progress`` is the callback interface. The audit calls ``begin(label, planned_tokens)`` and
  ``end()`` around each item; the engine calls ``decoded(n)`` after every llama_decode with the
  number of tokens it fed. It only counts and, now and then, hands a status text to its sink.
- ``LiveLine`` (a terminal) keeps one status line under pytest's current line, redrawn in
  place, and erases it when the item ends, putting the cursor back where pytest left it, so
  pytest's own dots and percentages are untouched.
- ``PlainLines`` (a pipe, a CI log) writes an ordinary line at most every PLAIN_INTERVAL_S,
  and only for items that run that long.

Nothing is shown under ``-qq``, with ``--refract-no-progress``, or under xdist: workers have
no terminal (their output is not relayed), and the controller only learns of an item when it
has finished, so there is nothing live to show there; xdist's own per-item lines stand.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Optional

# A terminal line appears only for work lasting longer than LIVE_DELAY_S (no flicker on
# fast items) and is redrawn at most every LIVE_INTERVAL_S.
LIVE_DELAY_S = 1.0
LIVE_INTERVAL_S = 0.25
# In a log, a line every PLAIN_INTERVAL_S at most: enough to show the run is alive and how
# long is left, without burying pytest's own output.
PLAIN_INTERVAL_S = 12.0


def describe(axis: str, unit, candidate: Optional[str] = None, noun: str = "") -> str:
    """What an item computes, as the status line names it: its decode batch where batched
    (the batch is the long wait), else its unit (``noun`` names it where the id alone does
    not say what it is: "rniah cell 1024-0.50")."""
    if unit.batch is not None:
        what = f"{axis} batch {unit.batch}"
    else:
        what = f"{axis} {noun + ' ' if noun else ''}{unit.id}"
    return f"{what} [{candidate}]" if candidate else what


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def status_text(label: str, done: int, planned: int, elapsed: float) -> str:
    """``refract: kld chunk-03: 1,536/3,069 tokens, 412 tok/s, ~4 s left``. ``planned`` is an
    estimate made before the work (cache hits and early end-of-generation make it high), so
    the figure left is only ever an estimate, and never below zero."""
    planned = max(planned, done)
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"refract: {label}: {done:,}/{planned:,} tokens, {rate:,.0f} tok/s"
    if rate > 0 and planned > done:
        text += f", ~{_duration((planned - done) / rate)} left"
    return text


class Progress:
    """Counts the tokens of the item being measured and tells the sink, when it asks to be
    told, how far along it is. Without a sink it only counts (the cost is one addition and
    one clock read per llama_decode)."""

    def __init__(self, sink=None, clock: Callable[[], float] = time.monotonic):
        self.sink = sink
        self.clock = clock
        self.label: Optional[str] = None
        self.planned = 0
        self.done = 0
        self.started = 0.0
        self._shown = False
        # What else the line says (the reference cache's size), read when the line is drawn.
        self.suffix: Optional[Callable[[], str]] = None

    def begin(self, label: str, planned_tokens: int) -> None:
        self.label = label
        self.planned = max(0, int(planned_tokens))
        self.done = 0
        self.started = self.clock()
        self._shown = False

    def decoded(self, n_tokens: int) -> None:
        self.done += n_tokens
        if self.sink is None or self.label is None:
            return
        now = self.clock()
        elapsed = now - self.started
        if self.sink.due(now, elapsed):
            text = status_text(self.label, self.done, self.planned, elapsed)
            extra = self.suffix() if self.suffix is not None else ""
            self.sink.show(text + (f"; {extra}" if extra else ""), now)
            self._shown = True

    def end(self) -> None:
        if self._shown and self.sink is not None:
            self.sink.clear()
        self.label = None
        self._shown = False


class _TerminalSink:
    """Writes beside pytest's terminal reporter. During an item pytest captures output, so
    each write suspends capturing the way pytest's live logging does."""

    def __init__(self, reporter, capman):
        self.reporter = reporter
        self.capman = capman
        self.last = None
        self.delay, self.interval = LIVE_DELAY_S, LIVE_INTERVAL_S
        self.nodeid: Optional[str] = None  # the running item (set by the plugin when it starts)

    def due(self, now: float, elapsed: float) -> bool:
        if elapsed < self.delay:
            return False
        return self.last is None or now - self.last >= self.interval

    def note(self, text: str) -> None:
        """A line that stays, on a terminal and in a log alike (a sequential decision): after
        pytest's letter for the item, on a line of its own; pytest reopens its own line."""
        tw = self.reporter._tw
        with self._suspended():
            tw.write(("\n" if tw.width_of_current_line else "") + text, flush=True)
            self.reporter.currentfspath = None
            if self.nodeid and self.reporter.config.get_verbosity() <= 0:
                # Without -v pytest appends letters (and the final percentage) to the current
                # line: open its own line again, not ours.
                self.reporter.write_fspath_result(self.nodeid, "")

    def _suspended(self):
        if self.capman is None:
            return contextlib.nullcontext()
        return self.capman.global_and_fixture_disabled()


class LiveLine(_TerminalSink):
    """One status line under pytest's current line, redrawn in place."""

    def __init__(self, reporter, capman):
        super().__init__(reporter, capman)
        self.column: Optional[int] = None  # pytest's cursor column when the line was opened

    def _raw(self, text: str) -> None:
        # Straight to the terminal, past pytest's writer: its idea of the current line (which
        # it uses to place the percentage) stays the line it wrote, where the cursor returns.
        stream = getattr(self.reporter._tw, "_file", None) or self.reporter._tw
        stream.write(text)
        stream.flush()

    def show(self, text: str, now: float) -> None:
        self.last = now
        width = max(20, self.reporter._tw.fullwidth - 1)
        with self._suspended():
            opening = ""
            if self.column is None:
                self.column = self.reporter._tw.width_of_current_line
                opening = "\n" if self.column else ""
            self._raw(f"{opening}\r{text[:width]}\x1b[K")

    def clear(self) -> None:
        if self.column is None:
            return
        back = f"\x1b[1A\x1b[{self.column}C" if self.column else ""
        with self._suspended():
            self._raw("\r\x1b[K" + back)
        self.column = None
        self.last = None


class PlainLines(_TerminalSink):
    """Ordinary lines for logs: no cursor movement, at most one every PLAIN_INTERVAL_S over
    the whole run, only for items that run at least that long."""

    def __init__(self, reporter, capman):
        super().__init__(reporter, capman)
        self.delay = self.interval = PLAIN_INTERVAL_S
        self._wrote = False

    def show(self, text: str, now: float) -> None:
        self.last = now
        tw = self.reporter._tw
        with self._suspended():
            # Left open (no newline): pytest's next write starts a fresh line itself, because
            # its record of the current file is reset, so no blank line appears either way.
            tw.write(("\n" if tw.width_of_current_line else "") + text, flush=True)
            self.reporter.currentfspath = None
        self._wrote = True

    def clear(self) -> None:
        # The lines stay in the log. Without -v pytest writes an item's letter wherever the
        # cursor is (it wrote the file prefix when the item started): open pytest's line again.
        if self._wrote and self.nodeid and self.reporter.config.get_verbosity() <= 0:
            with self._suspended():
                self.reporter.write_fspath_result(self.nodeid, "")
        self._wrote = False


def sink_for(config, enabled: bool):
    """The sink this pytest process should use, or None for silence."""
    if not enabled or hasattr(config, "workerinput"):
        return None
    if config.get_verbosity() <= -2:
        return None
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return None
    if getattr(config.option, "numprocesses", None) or getattr(config.option, "tx", None):
        return None  # xdist controller: items run elsewhere (see the module docstring)
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter.isatty() and os.environ.get("TERM") != "dumb":
        return LiveLine(reporter, capman)
    return PlainLines(reporter, capman)
