"""A run stopped early (a CI job cancelled, Ctrl-C) still leaves a report that says it is
incomplete, even when no item had finished: strict JSON, "complete": false, no scores, a red
gate, and how many items ran."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import read_report, subprocess_env


def _start(cwd, tiny_model, tiny_prompts, tiny_corpus, report, html):
    env = dict(subprocess_env(), REFRACT_TEST_DECODE_PAUSE="0.5", PYTHONUNBUFFERED="1")
    args = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
        f"--refract-model={tiny_model}", f"--refract-prompts={tiny_prompts}", f"--refract-corpus={tiny_corpus}",
        "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-ctx=64", "--refract-chunks=2",
        "--refract-n-predict=8", "--refract-threads=1", f"--refract-json={report}", f"--refract-html={html}",
    ]
    # A shell without job control starts background jobs with SIGINT ignored, and a Python that
    # starts with SIGINT ignored never turns it into KeyboardInterrupt: the child gets the
    # default disposition back, as in a terminal, so the test does not depend on how it is run.
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupt_before_the_first_item_finishes_leaves_a_report(slow_decode_dir, tiny_model, tiny_prompts,
                                                                   tiny_corpus, signum):
    report, html = slow_decode_dir / "r.json", slow_decode_dir / "r.html"
    proc = _start(slow_decode_dir, tiny_model, tiny_prompts, tiny_corpus, report, html)
    lines = []
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "collected" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(120), "".join(lines)
    # Each decode pauses 0.5 s and the first item (a batch of 3 prompts under two caches) needs
    # about twenty: a second in, it is still computing.
    time.sleep(1.0)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out

    data = read_report(report)  # strict JSON
    assert data["complete"] is False
    assert data["items_run"] == 0 and data["items_selected"] == 5
    assert data["composite"] is None and data["band"] is None
    assert all(axis.get("score") is None for axis in data["axes"].values())
    assert data["gate"]["passed"] is False
    assert any("interrupted" in reason for reason in data["gate"]["reasons"])
    assert any(line.startswith("INCOMPLETE") for line in data["diagnosis"])
    page = html.read_text(encoding="utf-8")
    assert "<html" in page.lower()


def test_interrupt_during_collection_still_leaves_a_report(pytester, tiny_model, tiny_prompts, tiny_corpus):
    # SIGTERM as collection ends, before the test loop starts.
    pytester.makeconftest("""
        import os, signal

        def pytest_collection_finish(session):
            os.kill(os.getpid(), signal.SIGTERM)
    """)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={tiny_model}", f"--refract-prompts={tiny_prompts}", f"--refract-corpus={tiny_corpus}",
        "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-ctx=64", "--refract-chunks=2", "--refract-n-predict=8",
        f"--refract-json={report}")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    data = read_report(report)
    assert data["complete"] is False and data["items_run"] == 0
    assert data["composite"] is None and data["gate"]["passed"] is False
