"""Cache types tried in a child process before this one creates a context with them.

Where a backend cannot store a cache type, llama.cpp does not refuse the context: it aborts the
whole process (GGML_ABORT, e.g. "pre-allocated tensor (cache_k_l0 (view)) in a buffer (CPU)
that cannot run the operation (SET_ROWS)" for iq3_s on the CPU backend), with nothing to catch.
A sweep of every type the build offers meets such types, and on a model whose 256-wide heads
fit their blocks (Gemma 3), llama.cpp's own block check does not stop them first. So a context
with a type outside llama.cpp's own --cache-type list (kvconfig.CLI_CACHE_TYPES) is first
created in a child process; a child that dies names the config that killed it, and the config
is refused with llama.cpp's last words, as a refusal is.

The child is this module run as ``python -m``: it loads the model once, then for each config
creates and frees a small context, writing a line after each, so the parent knows how far it
got. After a death the rest are tried in a new child.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

# Seconds for the child to start and load the model, and per config beyond that.
START_SECONDS = 120
PER_CONFIG_SECONDS = 30

_ABORT_LINE = re.compile(r"\.(?:c|cc|cpp|cu|m):\d+: (.+)$")


def abort_reason(stderr: str) -> str:
    """llama.cpp's last words from a dead child's stderr: the GGML_ABORT / GGML_ASSERT line
    without its source location, else the last line; for the refusal's one-line reason."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _ABORT_LINE.search(line)
        if m:
            return m.group(1)[:300]
    return lines[-1][:300] if lines else "no message"


def configs_that_abort(model_path: Path, gpu_layers: int, context: dict, configs: Sequence[Tuple[str, str, str]],
                       python: Optional[str] = None) -> Dict[int, str]:
    """index -> why, for each config (label, K type name, V type name) whose context creation
    killed a child process. ``context``: n_ctx, n_batch, n_ubatch, n_threads. Configs a child
    survived are absent (llama.cpp may still refuse them, cleanly, in this process). A child
    that cannot load the model at all tries nothing: {} (this process then probes as before)."""
    pending = list(range(len(configs)))
    dead: Dict[int, str] = {}
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # no debugger attached to print a backtrace
    while pending:
        request = json.dumps({"model": str(model_path), "gpu_layers": gpu_layers, "context": context,
                              "configs": [list(configs[i]) for i in pending]})
        timeout = START_SECONDS + PER_CONFIG_SECONDS * len(pending)
        try:
            proc = subprocess.run([python or sys.executable, "-m", __name__], input=request, capture_output=True,
                                  text=True, timeout=timeout, env=env)
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, code = f"no context within {timeout} s", None
        lines = out.split("\n")
        if "ready" not in lines:
            return dead  # the child never loaded the model: nothing was tried
        done = sum(1 for ln in lines if ln.startswith("done "))
        if code == 0 or done >= len(pending):
            break
        culprit = pending[done]
        signal = f", signal {-code}" if code is not None and code < 0 else ""
        dead[culprit] = (f"llama.cpp aborted creating a context for {configs[culprit][0]} (in a child process{signal}): "
                         f"{abort_reason(err)}")
        pending = pending[done + 1:]
    return dead


def _child() -> int:
    from ..errors import MeasurementError
    from . import llamacpp as E
    from .base import ContextRefused, ContextSettings
    from .kvconfig import parse_kv_config

    request = json.loads(sys.stdin.read())
    try:
        engine = E.Engine(Path(request["model"]), n_gpu_layers=int(request["gpu_layers"]))
    except MeasurementError as exc:
        print(exc, file=sys.stderr)
        return 1
    table = E.cache_types()
    settings = ContextSettings(**request["context"])
    print("ready", flush=True)
    for label, k, v in request["configs"]:
        try:
            engine.probe(parse_kv_config(label), (table[k], table[v]), settings)
        except ContextRefused:
            pass  # a clean refusal: the parent meets it again, with its reason
        print(f"done {label}", flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
