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
from ..files import resolved_target, special_file_kind, temp_prefix
from ..inputs import data

# Other plugins' output options (option dest -> flag): a report of ours on one of their paths
# would be overwritten by theirs (or the other way round) while the terminal names ours.
FOREIGN_OUTPUTS = {"xmlpath": "--junitxml", "htmlpath": "--html", "report_log": "--report-log",
                   "resultlog": "--result-log", "debug": "--debug", "json_report_file": "--json-report-file"}
# Folders whose entries are devices, process descriptors or kernel state, never a report file.
_SYSTEM_DIRS = ("/dev/", "/sys/")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _link_chain(path: str) -> List[str]:
    """``path`` and every path its symlinks lead through, in order (at most 40 hops): a link
    to /dev/stdout leads on to /proc/self/fd/1, and from there to whatever stdout is."""
    chain = [path]
    for _ in range(40):
        try:
            target = os.readlink(chain[-1])
        except OSError:
            break
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), target)))
    return chain


def foreign_outputs(option) -> Dict[str, str]:
    """flag -> path of every other plugin's output file given on this command line (pytest's
    --junitxml and --debug, pytest-html's --html, pytest-reportlog's --report-log, ...)."""
    found = {}
    for dest, flag in FOREIGN_OUTPUTS.items():
        value = getattr(option, dest, None)
        if isinstance(value, str) and value:
            found[flag] = value
    return found


def check_foreign_outputs(outputs: Dict[str, Optional[str]], option) -> None:
    """One line when a report path of ours is also another plugin's output (``option``: the
    parsed command line, config.option): one of the two files would silently be lost."""
    foreign = foreign_outputs(option)
    for name, path in outputs.items():
        if not path:
            continue
        path = os.path.abspath(os.path.expanduser(path))
        for flag, other_path in foreign.items():
            if _same_file(path, os.path.abspath(os.path.expanduser(other_path))):
                raise UsageProblem(f"{name}={path} is also {flag}; that plugin would overwrite the report "
                                   "(or ours its file): give them different paths")


def check_outputs(outputs: Dict[str, Optional[str]], inputs: List[Tuple[str, Optional[str]]],
                  cache_dir: Optional[str] = None) -> None:
    """``outputs``: option name -> path (``--refract-json``, ``--refract-html``); ``inputs``:
    (what it is, path) of every file the run reads; ``cache_dir``: the reference cache folder
    (its marker and entries are never a report). One line for the first problem found."""
    given = [(name, os.path.abspath(os.path.expanduser(path))) for name, path in outputs.items() if path]
    for i, (name, path) in enumerate(given):
        real = os.path.realpath(path)
        if cache_dir and (real + os.sep).startswith(os.path.realpath(cache_dir) + os.sep):
            raise UsageProblem(f"{name}={path} is inside the reference cache folder {cache_dir}; the cache's files "
                               "are never replaced by a report: give a path outside it")
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
        for shown in _link_chain(path):
            if shown.startswith(_SYSTEM_DIRS) or (shown.startswith("/proc/") and "/fd/" in shown):
                # e.g. /dev/stdout with stdout redirected to a file: stat sees a regular file,
                # but the rename would replace the /dev entry (or the shell's output file).
                raise UsageProblem(f"{name}={path} is under /{shown.split('/')[1]} ({shown}): a device or a process's "
                                   "descriptor, never a report file; give a file path")
        _check_writable(name, path)


def _check_writable(name: str, path: str) -> None:
    """Create and remove a temp file beside the report: exactly what the atomic write will do
    (the same temp name, where the write will land: through any symlink)."""
    target = resolved_target(path)
    folder = str(target.parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=folder)
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
