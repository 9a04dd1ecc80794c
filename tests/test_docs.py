"""The documentation says what the code does: every registered option is on docs/options.md (and
nothing there is an option the plugin lacks), the CI workflow example is valid YAML whose audit
command the plugin accepts, the README carries that same workflow, and neither the README nor
the docs point readers at the development machine."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import plugin_args

from pytest_refract import settings

ROOT = Path(__file__).resolve().parent.parent
OPTIONS_PAGE = ROOT / "docs" / "options.md"
WORKFLOW = ROOT / "examples" / "github-actions" / "refract.yml"
README = ROOT / "README.md"


def registered_flags() -> set:
    return ({f"--refract-{name}" for name, *_ in settings.OPTIONS}
            | {f"--refract-{name}" for name, _help in settings.FLAGS})


def test_every_registered_option_is_documented():
    text = OPTIONS_PAGE.read_text(encoding="utf-8")
    documented = set(re.findall(r"--refract-[a-z0-9-]*[a-z0-9]", text))
    assert registered_flags() - documented == set(), "registered but not on docs/options.md"
    assert documented - registered_flags() == set(), "on docs/options.md but not registered"


def test_the_options_check_sees_a_missing_option(tmp_path, monkeypatch):
    """The check above can fail: an option registered without a line on the page is caught."""
    monkeypatch.setattr(settings, "FLAGS", settings.FLAGS + (("made-up-flag", "help"),))
    with pytest.raises(AssertionError, match="registered but not"):
        test_every_registered_option_is_documented()


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _steps() -> list:
    jobs = _workflow()["jobs"]
    assert len(jobs) == 1
    return next(iter(jobs.values()))["steps"]


def _audit_args() -> list:
    runs = [s["run"] for s in _steps() if "--refract-model" in s.get("run", "")]
    assert len(runs) == 1, runs
    argv = shlex.split(runs[0].replace("\\\n", " "))
    assert argv[0] == "pytest", argv
    return argv[1:]


def _option(args: list, name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(values) == 1, (name, args)
    return values[0]


def test_workflow_installs_caches_audits_and_uploads():
    data = _workflow()
    # YAML 1.1 reads the bare key `on` as True.
    triggers = data.get("on", data.get(True))
    assert "pull_request" in triggers and "push" in triggers
    steps = _steps()
    install = next(s["run"] for s in steps if "pip install" in s.get("run", ""))
    assert 'CMAKE_ARGS="$(python3 tools/cmake_args.py)"' in install and "--no-cache-dir" in install
    args = _audit_args()
    cache_dir = _option(args, "--refract-cache-dir")
    restore = [s for s in steps if s.get("uses", "").startswith("actions/cache/restore@")]
    save = [s for s in steps if s.get("uses", "").startswith("actions/cache/save@")]
    assert len(restore) == 1 and len(save) == 1
    assert restore[0]["with"]["path"] == save[0]["with"]["path"] == cache_dir
    assert save[0]["if"].startswith("always()")
    assert steps.index(restore[0]) < steps.index(next(s for s in steps if "--refract-model" in s.get("run", "")))
    upload = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(upload) == 1 and upload[0]["if"] == "always()"
    uploaded = upload[0]["with"]["path"].split()
    assert _option(args, "--refract-json") in uploaded and _option(args, "--refract-html") in uploaded
    # The gate must be able to fail the job: no flag that turns FAIL or UNDECIDED into a pass.
    assert not [a for a in args if a.startswith(("--refract-undecided=pass", "--refract-fail-under"))]
    assert not [s for s in steps if s.get("continue-on-error")]


def test_workflow_audit_command_is_accepted_by_the_plugin(tmp_path, tiny_model, tiny_prompts, tiny_corpus):
    """The workflow's own pytest command line, on the tiny model instead of SmolLM2, in an
    empty folder (as a CI checkout is for the audit): configured and collected, exit 0."""
    args = [a for a in _audit_args() if not a.startswith("--refract-model=")]
    args += [f"--refract-model={tiny_model}", f"--refract-prompts={tiny_prompts}", f"--refract-corpus={tiny_corpus}",
             "--refract-ctx=64"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *plugin_args(), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids and all(i.startswith("refract::") for i in ids), ids


def test_a_bad_workflow_command_would_be_caught(tmp_path, tiny_model):
    """The acceptance check above can fail: a misspelt value is a usage error under --collect-only."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *plugin_args(),
                           f"--refract-model={tiny_model}", "--refract-candidate=ctk=q9_9,ctv=q4_0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]


def test_readme_carries_the_workflow_file_verbatim():
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert WORKFLOW.read_text(encoding="utf-8") in blocks


def _pages() -> list:
    docs = sorted(p for p in (ROOT / "docs").glob("*.md"))
    return [README, *docs, WORKFLOW]


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 350


@pytest.mark.parametrize("pattern, what", [
    (r"/work/|cpu\.lock", "a path of the development machine"),
    (r"\b20\d\d-\d\d-\d\d\b", "a date of day"),
    (r"\bagents?\b|\bthis VM\b", "how the project was developed"),
    (r"\bissues?\s*#?\d+|(?<![\w&])#\d+\b", "an issue number"),
])
def test_docs_say_nothing_of_the_development_machine(pattern, what):
    found = []
    for page in _pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            # External projects' issue numbers are fine when the line names whose issue it is.
            if what == "an issue number" and "the fork's issue" in line:
                continue
            if re.search(pattern, line, flags=re.I):
                found.append(f"{page.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, f"{what}:\n" + "\n".join(found)


def test_mkdocs_nav_lists_every_page():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = {next(iter(entry.values())) for entry in config["nav"]}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert in_nav == pages
    assert "_incoming/" in config["exclude_docs"]
