"""Checks that keep the user's files safe, run before any model loads.

A report path is an output: it must never name one of the run's inputs (the model, prompts,
corpus, haystack or baseline), never name the other report, never be a device, pipe or socket
(replacing one by a file would break the system), and it must be writable where it is asked
for: a bad path found after an hour of measuring loses the hour.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Tuple

from ..errors import UsageProblem
from ..files import special_file_kind
from ..inputs import data


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_outputs(outputs: Dict[str, Optional[str]], inputs: List[Tuple[str, Optional[str]]]) -> None:
    """``outputs``: option name -> path (``--refract-json``, ``--refract-html``); ``inputs``:
    (what it is, path) of every file the run reads. One line for the first problem found."""
    given = [(name, os.path.abspath(os.path.expanduser(path))) for name, path in outputs.items() if path]
    for i, (name, path) in enumerate(given):
        for other, other_path in given[:i]:
            if _same_file(path, other_path):
                raise UsageProblem(f"{name}={path} is also {other}; the two reports need different paths")
        for what, source in inputs:
            if source and _same_file(path, os.path.expanduser(str(source))):
                raise UsageProblem(f"{name}={path} is the {what}; a report never overwrites an input, "
                                   "give another path")
        kind = special_file_kind(path)
        if kind:
            raise UsageProblem(f"{name}={path} is {kind}, not a regular file; give a file path")
        _check_writable(name, path)


def _check_writable(name: str, path: str) -> None:
    """Create and remove a temp file beside the report: exactly what the atomic write will do."""
    folder = os.path.dirname(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".refract-write-check.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageProblem(f"{name}={path}: cannot write in {folder} ({exc.strerror or exc}); "
                           "give a writable path") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    if os.path.exists(path) and not os.access(path, os.W_OK) and os.geteuid() != 0:
        # The rename would still succeed, but a read-only file is the user saying "keep this".
        raise UsageProblem(f"{name}={path} exists and is read-only; give another path")


def input_files(settings, model_path) -> List[tuple]:
    """(what, path) of every file the run reads: none of them may be a report path."""
    inputs = [("model (--refract-model)", model_path),
              ("prompt set (--refract-prompts)", settings.prompts_path),
              ("corpus (--refract-corpus)", settings.corpus_path),
              ("haystack (--refract-haystack)", settings.haystack_path),
              ("baseline report (--refract-baseline)", settings.baseline_path)]
    try:
        bundled = data.data_dir()
        inputs += [("bundled prompt set", bundled / data.DEFAULT_PROMPTS), ("bundled corpus", bundled / data.DEFAULT_CORPUS)]
    except UsageProblem:
        pass  # reported where the bundled files are needed
    return inputs
