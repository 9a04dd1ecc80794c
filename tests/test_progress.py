"""Progress of long items: the counting and the text (pure), then the plugin as users see it,
under a pseudo-terminal and through a pipe, on the tiny model slowed down by a conftest so an
item lasts long enough to be reported."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
from pytest_refract.audit.progress import LiveLine, PlainLines, Progress, describe, status_text
from pytest_refract.axes.base import Unit

STATUS_RE = re.compile(r"refract: (trajectory|kld|rniah|plad) .*: [\d,]+/[\d,]+ tokens, [\d,]+ tok/s")
# Where an axis's decision stands at a look (stopping.py): a line that stays.
DECISION_RE = re.compile(r"refract: (trajectory|kld|rniah|plad)( \[[^]]*\])?: \d+ (prompts|chunks|cells|perturbations), "
                         r".*(PASS|FAIL|UNDECIDED)( decided.*|, next look at \d+)?")


def _dots_intact(lines) -> bool:
    """pytest's own progress: its dot lines (split only by decision lines) hold the 5 items
    and the last ends at [100%]."""
    dotted = [line for line in lines if re.fullmatch(r"refract [.]*( +\[ ?\d+%\])?", line)]
    return bool(dotted) and sum(line.count(".") for line in dotted) == 5 and dotted[-1].endswith("[100%]")


# ----------------------------------------------------------------------------- pure parts


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class RecordingSink:
    def __init__(self, delay, interval):
        self.delay, self.interval, self.last = delay, interval, None
        self.shown, self.cleared = [], 0

    def due(self, now, elapsed):
        return elapsed >= self.delay and (self.last is None or now - self.last >= self.interval)

    def show(self, text, now):
        self.last = now
        self.shown.append(text)

    def clear(self):
        self.cleared += 1


def test_status_text_names_the_work_and_estimates_what_is_left():
    text = status_text("kld chunk-03", done=1000, planned=3000, elapsed=4.0)
    assert text == "refract: kld chunk-03: 1,000/3,000 tokens, 250 tok/s, ~8 s left"
    # The plan is an estimate: when more was done, the total follows and nothing is "left".
    assert status_text("rniah cell 1024-0.50", 500, 400, 2.0) == "refract: rniah cell 1024-0.50: 500/500 tokens, 250 tok/s"
    assert "~2 min 05 s left" in status_text("x", 10, 1260, 1.0)
    assert "~1 h 00 min left" in status_text("x", 1, 3601, 1.0)


def test_describe_names_batch_cell_or_unit():
    assert describe("trajectory", Unit("fact-001", batch=2)) == "trajectory batch 2"
    assert describe("trajectory", Unit("fact-001", batch=None)) == "trajectory fact-001"
    assert describe("rniah", Unit("1024-0.50"), noun="cell") == "rniah cell 1024-0.50"
    assert describe("kld", Unit("chunk-07"), "ctk=q8_0,ctv=q4_0") == "kld chunk-07 [ctk=q8_0,ctv=q4_0]"


def test_progress_waits_for_the_delay_then_throttles():
    clock, sink = FakeClock(), RecordingSink(delay=1.0, interval=0.5)
    progress = Progress(sink, clock)
    progress.begin("kld chunk-00", 1000)
    shown_after = []
    for _ in range(8):  # a decode every 0.25 s for 2 s
        clock.now += 0.25
        progress.decoded(25)
        shown_after.append(len(sink.shown))
    # Nothing in the first second, then one line per half second.
    assert shown_after == [0, 0, 0, 1, 1, 2, 2, 3]
    assert sink.shown[0] == "refract: kld chunk-00: 100/1,000 tokens, 100 tok/s, ~9 s left"
    assert sink.shown[-1] == "refract: kld chunk-00: 200/1,000 tokens, 100 tok/s, ~8 s left"
    progress.end()
    assert sink.cleared == 1
    # The next item starts its own count and its own delay.
    progress.begin("kld chunk-01", 1000)
    clock.now += 0.25
    progress.decoded(25)
    assert progress.done == 25 and len(sink.shown) == 3


def test_the_line_states_the_reference_caches_size():
    clock, sink = FakeClock(), RecordingSink(delay=0.0, interval=0.0)
    progress = Progress(sink, clock)
    written = [0]
    progress.suffix = lambda: f"ref cache {written[0]} B written, 0 B read"
    progress.begin("kld chunk-00", 100)
    clock.now += 1
    progress.decoded(10)
    written[0] = 4096
    clock.now += 1
    progress.decoded(10)
    assert sink.shown[0].endswith("; ref cache 0 B written, 0 B read")
    assert sink.shown[1].endswith("; ref cache 4096 B written, 0 B read")  # read when drawn


def test_a_short_item_shows_nothing_and_clears_nothing():
    clock, sink = FakeClock(), RecordingSink(delay=1.0, interval=0.5)
    progress = Progress(sink, clock)
    progress.begin("trajectory batch 0", 100)
    clock.now += 0.5
    progress.decoded(100)
    progress.end()
    assert sink.shown == [] and sink.cleared == 0


def test_without_a_sink_it_only_counts():
    progress = Progress()
    progress.begin("kld chunk-00", 10)
    progress.decoded(7)
    assert progress.done == 7
    progress.end()
    progress.decoded(3)  # tokens outside an item (the refract fixture) are harmless
    assert progress.done == 10


class _Writer:
    """Just enough of pytest's TerminalWriter for the sinks."""

    def __init__(self, current=""):
        self._file = self
        self.out = []
        self.fullwidth = 40
        self.width_of_current_line = len(current)

    def write(self, text, flush=False):
        self.out.append(text)
        if "\n" in text:
            self.width_of_current_line = len(text.rsplit("\n", 1)[1])
        else:
            self.width_of_current_line += len(text)

    def flush(self):
        pass


class _Config:
    def get_verbosity(self):
        return 0


class _Reporter:
    def __init__(self, current=""):
        self._tw = _Writer(current)
        self.currentfspath = "refract"
        self.config = _Config()

    def write_fspath_result(self, nodeid, res):  # as pytest: a fresh line with the file prefix
        if self.currentfspath is None:
            self._tw.write("\nrefract ")
            self.currentfspath = "refract"
        self._tw.write(res)


def test_live_line_returns_the_cursor_to_pytests_line():
    reporter = _Reporter("refract ...")
    sink = LiveLine(reporter, None)
    sink.show("refract: kld chunk-00: 10/20 tokens, 5 tok/s, ~2 s left and a long tail past the width", 1.0)
    sink.show("refract: kld chunk-00: 15/20 tokens", 2.0)
    sink.clear()
    raw = "".join(reporter._tw.out)
    # Opened below pytest's line, redrawn in place, cut short of the last column (no wrap),
    # erased, then back up to column 11 of pytest's line.
    assert raw.startswith("\n\rrefract: kld chunk-00: 10/20 tokens, 5 \x1b[K\rrefract: kld")
    assert raw.endswith("\r\x1b[K\x1b[1A\x1b[11C")
    assert reporter.currentfspath == "refract"  # pytest's own bookkeeping untouched


def test_plain_lines_stand_alone_and_reopen_pytests_line():
    reporter = _Reporter("refract ..")
    sink = PlainLines(reporter, None)
    sink.nodeid = "refract::test_kld[chunk-02]"
    sink.show("refract: kld chunk-02: 5/10 tokens, 1 tok/s, ~5 s left", 1.0)
    sink.show("refract: kld chunk-02: 8/10 tokens, 1 tok/s, ~2 s left", 4.0)
    assert reporter.currentfspath is None  # pytest's next write opens a new line
    sink.clear()  # the item ends: pytest's line is reopened for its letter
    assert "".join(reporter._tw.out) == ("\nrefract: kld chunk-02: 5/10 tokens, 1 tok/s, ~5 s left"
                                         "\nrefract: kld chunk-02: 8/10 tokens, 1 tok/s, ~2 s left\nrefract ")
    reporter._tw.out.clear()
    sink.clear()  # an item that showed nothing changes nothing
    assert reporter._tw.out == []


# ----------------------------------------------------------------------------- as users see it

def _audit_args(tiny_model, tiny_prompts, tiny_corpus, *extra):
    return [
        f"--refract-model={tiny_model}", f"--refract-prompts={tiny_prompts}", f"--refract-corpus={tiny_corpus}",
        "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-ctx=64", "--refract-chunks=2",
        "--refract-n-predict=8", "--refract-threads=1", "-p", "no:cacheprovider",
        # These tests are about progress lines, not the gate: the raw composite gate at 0 passes
        # (a few tiny items decide no PASS, and the tiny model's bit-identical bf16 KLD makes
        # q8_0's verdict FAIL; either would fail the session they read).
        "--refract-gate=raw", "--refract-fail-under=0", *extra,
    ]


def _env():
    return dict(subprocess_env(), COLUMNS="120", TERM="xterm")


def _run_piped(cwd, args):
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_plain_lines_in_a_pipe(slow_decode_dir, tiny_model, tiny_prompts, tiny_corpus):
    code, out = _run_piped(slow_decode_dir, _audit_args(tiny_model, tiny_prompts, tiny_corpus))
    assert code == 0, out
    lines = out.splitlines()
    status = [line for line in lines if STATUS_RE.match(line)]
    assert status, out
    assert "\x1b[" not in out and "\r" not in out  # no cursor control in a log
    # Every status line stands alone, and pytest's result lines and summary are intact.
    assert all(re.fullmatch(r"refract: .*tokens, [\d,]+ tok/s(, ~.* left)?(; ref cache .* written, .* read)?", line)
               for line in status)
    # Each axis's last look says where its decision stands, on a line of its own.
    decisions = [line for line in lines if DECISION_RE.fullmatch(line)]
    assert {line.split(":")[1].strip() for line in decisions} == {"trajectory", "kld"}, out
    assert _dots_intact(lines), out
    assert re.search(r"=+ 5 passed in .* =+", out), out
    assert "refract KV-cache audit" in out


def test_quiet_quiet_and_the_flag_silence_it(slow_decode_dir, tiny_model, tiny_prompts, tiny_corpus):
    for extra in (["-qq"], ["--refract-no-progress"]):
        code, out = _run_piped(slow_decode_dir, _audit_args(tiny_model, tiny_prompts, tiny_corpus, *extra))
        assert code == 0, out
        assert not STATUS_RE.search(out), (extra, out)
        assert re.search(r"^(refract )?[.]{5} +\[100%\]$", out, re.M), out  # pytest's own progress as ever
    # The ini key does the same.
    (slow_decode_dir / "pytest.ini").write_text("[pytest]\nrefract_no_progress = true\n")
    code, out = _run_piped(slow_decode_dir, _audit_args(tiny_model, tiny_prompts, tiny_corpus))
    assert code == 0 and not STATUS_RE.search(out), out


def _render_screen(raw: str, width: int = 120) -> list:
    """The screen a terminal shows after ``raw``: just the controls the plugin and pytest use
    (CR, LF, erase to end of line, cursor up, cursor right; colours are dropped)."""
    lines, row, col = [[]], 0, 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            m = re.match(r"\x1b\[(\d*)([A-Za-z])", raw[i:])
            assert m, repr(raw[i:i + 10])
            n = int(m.group(1) or 1)
            if m.group(2) == "K":
                del lines[row][col:]
            elif m.group(2) == "A":
                row = max(0, row - n)
            elif m.group(2) == "C":
                col += n
            i += m.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
            while len(lines) <= row:
                lines.append([])
        else:
            line = lines[row]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return ["".join(line).rstrip() for line in lines]


def _run_in_pty(cwd, args):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=cwd, env=_env(), stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    # The terminal turns LF into CR LF; the screen model needs only the LF.
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


def test_live_line_under_a_terminal_leaves_pytests_output_intact(slow_decode_dir, tiny_model, tiny_prompts, tiny_corpus):
    code, raw = _run_in_pty(slow_decode_dir, _audit_args(tiny_model, tiny_prompts, tiny_corpus))
    assert code == 0, raw
    # The status line was drawn and redrawn in place ...
    drawn = re.findall(r"\r(refract: [^\r\n\x1b]*)\x1b\[K", raw)
    assert any(STATUS_RE.match(text) for text in drawn), raw
    assert "\x1b[1A" in raw
    # ... and erased: what remains on screen is pytest's own output, its dots on one line.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    screen = _render_screen(plain)
    assert not any(STATUS_RE.search(line) for line in screen), "\n".join(screen)
    assert any(DECISION_RE.fullmatch(line.rstrip()) for line in screen), "\n".join(screen)
    assert _dots_intact([line.rstrip() for line in screen]), "\n".join(screen)
    assert any(re.search(r"5 passed in", line) for line in screen), "\n".join(screen)


def test_xdist_shows_no_status_lines(slow_decode_dir, tiny_model, tiny_prompts, tiny_corpus):
    pytest.importorskip("xdist")
    code, out = _run_piped(slow_decode_dir, _audit_args(tiny_model, tiny_prompts, tiny_corpus, "-n", "2",
                                                 "--dist", "loadgroup"))
    assert code == 0, out
    assert not STATUS_RE.search(out), out
    assert "5 passed" in out
