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


def _path_values(value) -> List[str]:
    """The strings of an option or ini value that may name a file (a str, a Path, or a list
    of them; pytest's own path options keep a ``::node`` suffix off the file part)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if isinstance(v, bytes):
            v = os.fsdecode(v)
        if isinstance(v, str) and v.strip() and "\n" not in v and "\0" not in v:
            out.append(v.split("::", 1)[0])
    return out


def _option_flags(config) -> Dict[str, str]:
    """option dest -> its long flag, for every option any plugin registered (for the message)."""
    flags = dict(FOREIGN_OUTPUTS)
    parser = getattr(config, "_parser", None)
    for group in [getattr(parser, "_anonymous", None), *getattr(parser, "_groups", [])]:
        for opt in getattr(group, "options", []) or []:
            try:
                names = [n for n in opt.names() if n.startswith("--")]
            except Exception:  # another plugin's option object: the dest still names it
                continue
            if names and getattr(opt, "dest", None):
                flags.setdefault(opt.dest, names[0])
    return flags


def _looks_like_a_file(text: str) -> bool:
    """An option value worth comparing with a report path: an existing file, or a path-like
    value (a separator or an extension): a value such as "auto" or "no" is no file of this run."""
    full = os.path.expanduser(text)
    if os.path.isdir(full):
        return False
    return os.path.exists(full) or os.sep in text or "." in os.path.basename(text).strip(".")


def run_files(config) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(what, path) of every file this pytest run reads or writes besides our reports, and
    (what, folder) of folders it owns or rewrites whole: pytest's ini file, every loaded plugin
    and conftest, the files given on the command line, every option value (any plugin's) and
    ini value that names a file, the file stdout or stderr is appended to, pytest's cache
    folder, --basetemp, and pytest-html's assets folder. Our own options are left out: the
    reports and inputs are compared by check_outputs with their own names."""
    files: List[Tuple[str, str]] = []
    folders: List[Tuple[str, str]] = []
    inipath = getattr(config, "inipath", None)
    if inipath:
        files.append(("pytest's ini file", str(inipath)))
    try:
        plugins = list(config.pluginmanager.get_plugins())
    except Exception:
        plugins = []
    for plugin in plugins:
        source = getattr(plugin, "__file__", None)
        if isinstance(source, str):
            files.append(("a conftest.py or plugin module this run loaded", source))
    invoked = str(getattr(getattr(config, "invocation_params", None), "dir", "") or os.getcwd())
    for arg in _path_values(list(getattr(config, "args", []) or [])):
        full = os.path.join(invoked, os.path.expanduser(arg))
        if os.path.isfile(full):
            files.append(("a test file this run collects", full))
    flags = _option_flags(config)
    for dest, value in sorted(getattr(getattr(config, "option", None), "__dict__", {}).items()):
        if dest.startswith("refract_"):
            continue
        for text in _path_values(value):
            if _looks_like_a_file(text):
                files.append((flags.get(dest, "--" + dest.replace("_", "-")), os.path.join(invoked, os.path.expanduser(text))))
    ini_dir = str(inipath.parent) if inipath else invoked
    for name in sorted(getattr(getattr(config, "_parser", None), "_inidict", {}) or {}):
        if name.startswith("refract_"):
            continue
        try:
            value = config.getini(name)
        except Exception:  # a malformed value of another plugin's key: not ours to report
            continue
        for text in _path_values(value):
            if _looks_like_a_file(text) and " " not in text.strip():
                for base in {ini_dir, invoked}:
                    files.append((f"ini option {name}", os.path.join(base, os.path.expanduser(text))))
    html = getattr(getattr(config, "option", None), "htmlpath", None)
    if isinstance(html, str) and html:
        folders.append(("pytest-html's assets folder", os.path.join(os.path.dirname(os.path.join(invoked, html)), "assets")))
    basetemp = getattr(getattr(config, "option", None), "basetemp", None)
    if isinstance(basetemp, str) and basetemp:
        folders.append(("--basetemp (pytest empties it)", os.path.join(invoked, basetemp)))
    try:
        if config.pluginmanager.has_plugin("cacheprovider"):
            rootpath = str(getattr(config, "rootpath", invoked))
            folders.append(("pytest's cache folder", os.path.join(rootpath, os.path.expanduser(config.getini("cache_dir")))))
    except Exception:
        pass
    return files, folders


def _standard_streams(config) -> List[Tuple[str, os.stat_result]]:
    """(name, stat) of stdout and stderr where they are regular files (`pytest > log`): a
    report there would be replaced by the rest of the output, or cut it off. Read with pytest's
    global capture suspended, so fd 1 is the real stdout and not capture's temp file."""
    import contextlib
    import stat as stat_mod

    capman = config.pluginmanager.getplugin("capturemanager") if config is not None else None
    found = []
    try:
        ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    except Exception:
        ctx = contextlib.nullcontext()
    with ctx:
        for name, fd in (("stdout", 1), ("stderr", 2)):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if stat_mod.S_ISREG(st.st_mode):
                found.append((name, st))
    return found


def check_run_files(outputs: Dict[str, Optional[str]], config) -> None:
    """One line when a report path of ours is a file this run reads or writes (run_files), is
    inside a folder it owns (pytest's cache, --basetemp, pytest-html's assets), is stdout's or
    stderr's file, or is named like a test file this run collects: one of the two files would
    silently be lost, or the next run would collect a report as a test."""
    import fnmatch

    check_foreign_outputs(outputs, getattr(config, "option", None))
    files, folders = run_files(config)
    streams = _standard_streams(config)
    try:
        test_names = [str(g) for g in config.getini("python_files")] + ["conftest.py", "__init__.py"]
    except Exception:
        test_names = ["test_*.py", "*_test.py", "conftest.py", "__init__.py"]
    for name, path in outputs.items():
        if not path:
            continue
        full = os.path.abspath(os.path.expanduser(path))
        for what, other in files:
            if _same_file(full, other):
                raise UsageProblem(f"{name}={path} is also {what} ({other}); one would overwrite the other: "
                                   "give the report a path of its own")
        real = os.path.realpath(full)
        for what, folder in folders:
            if (real + os.sep).startswith(os.path.realpath(folder) + os.sep):
                raise UsageProblem(f"{name}={path} is inside {what} ({folder}), whose files are not ours: "
                                   "give a path outside it")
        target_stat: Optional[os.stat_result]
        try:
            target_stat = os.stat(full)
        except OSError:
            target_stat = None
        for stream, stream_stat in streams:
            if target_stat is not None and (target_stat.st_dev, target_stat.st_ino) == (stream_stat.st_dev, stream_stat.st_ino):
                raise UsageProblem(f"{name}={path} is the file this run's {stream} goes to; the report would "
                                   "replace the output (or the output cut the report): give another path")
        base = os.path.basename(full)
        for pattern in test_names:
            if fnmatch.fnmatch(base, pattern):
                raise UsageProblem(f"{name}={path} is named like a Python file pytest collects or imports "
                                   f"({pattern}); give the report a .json or .html name")


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
