"""Issue 22: nothing faked, nothing lost, round 3. A tampered cache, a substituted cache type
or a degenerate model never passes; device files are never replaced; no input crashes, hangs
or exhausts memory. Each test here failed on the code before its fix."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import fake_engine
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_runner_fake import _run, _settings

from pytest_refract.reference.entries import ReferenceCache, check_entry
from pytest_refract.reference.folder import RefCacheWarning, prepare_cache_dir


@pytest.fixture
def inputs(tiny_model, tiny_prompts, tiny_corpus):
    return tiny_model, tiny_prompts, tiny_corpus


def _loaded_without_warning(cache, kind, key):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry = cache.load(kind, key)
    return entry, [str(w.message) for w in caught]


# --------------------------------------------------------------------------- 1. cache integrity


def test_a_one_byte_edit_of_a_control_result_is_rejected(tmp_path):
    """Finding 1: a control entry's result lives in its meta JSON; the checksum must cover it."""
    cache = ReferenceCache(tmp_path, {"model": "x"})
    key = cache.key("control-trajectory", "c", "u")
    cache.store("control-trajectory", key, {}, meta={"result": {"prefix_agreement": 48, "ref_len": 64}})
    path = cache._path("control-trajectory", key)
    raw = path.read_bytes()
    assert raw.count(b"48") == 1
    path.write_bytes(raw.replace(b"48", b"40"))
    entry, said = _loaded_without_warning(cache, "control-trajectory", key)
    assert entry is None and len(said) == 1 and "checksum mismatch" in said[0]
    assert not path.exists()


@hsettings(max_examples=60, deadline=None)
@given(st.data())
def test_changing_any_byte_of_an_entry_rejects_it(tmp_path_factory, data):
    """Every byte an entry holds (header, layout, meta, payload) is covered by its checksum."""
    folder = tmp_path_factory.mktemp("c")
    cache = ReferenceCache(folder, {"model": "x"}, n_vocab=4)
    key = cache.key("trajectory", [1])
    cache.store("trajectory", key, {"q": np.arange(8, dtype=np.uint16).reshape(2, 4),
                                    "scale": np.ones(2, np.float32), "min_log_prob": np.zeros(2, np.float32),
                                    "tokens": np.array([1, 3])}, meta={"note": 7})
    path = cache._path("trajectory", key)
    raw = bytearray(path.read_bytes())
    where = data.draw(st.integers(0, len(raw) - 1))
    raw[where] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    entry, said = _loaded_without_warning(cache, "trajectory", key)
    assert entry is None and len(said) == 1 and "rejected" in said[0]


def _logprob_entry(rows=2, vocab=4, **over):
    arrays = {"q": np.zeros((rows, vocab), np.uint16), "scale": np.ones(rows, np.float32),
              "min_log_prob": np.zeros(rows, np.float32)}
    arrays.update(over)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize("kind, arrays, meta, why", [
    ("kld", _logprob_entry(vocab=5), {}, "vocabulary has 4"),
    ("kld", _logprob_entry(q=np.zeros((2, 4), np.float32)), {}, "not uint16|not a 2-D unsigned"),
    ("kld", _logprob_entry(q=np.zeros(8, np.uint16)), {}, "2-D"),
    ("kld", _logprob_entry(scale=np.ones(3, np.float32)), {}, "scale has 3 rows"),
    ("kld", _logprob_entry(min_log_prob=None), {}, "no min_log_prob"),
    ("trajectory", _logprob_entry(tokens=np.array([0.5, 1.0])), {}, "tokens is float64"),
    ("trajectory", _logprob_entry(tokens=np.array([1, 9])), {}, "outside the vocabulary"),
    ("greedy", {"tokens": np.array([[1, 2]])}, {}, "1-D"),
    ("control-kld", {}, {"result": [1, 2]}, "no result object"),
])
def test_a_well_checksummed_entry_of_the_wrong_shape_is_evicted_once(tmp_path, kind, arrays, meta, why):
    """Finding 1: valid checksum, wrong shape or dtype: one warning, evicted, recomputed."""
    cache = ReferenceCache(tmp_path, {"model": "x"}, n_vocab=4)
    key = cache.key(kind, [1])
    cache.store(kind, key, arrays, meta=meta)
    entry, said = _loaded_without_warning(cache, kind, key)
    assert entry is None and len(said) == 1 and "rejected" in said[0], said
    assert re.search(why, said[0]), said[0]
    assert not cache._path(kind, key).exists()
    with pytest.raises(ValueError):
        check_entry(kind, arrays, meta, 4)


def test_a_tampered_control_cache_never_changes_a_result(inputs, tmp_path):
    """Finding 1 end to end on the fake engine: control-trajectory results edited in the cache
    are rejected and recomputed, so the second run's numbers are the first run's."""
    cache_dir = tmp_path / "cache"
    assert prepare_cache_dir(cache_dir) == cache_dir
    s = _settings(*inputs, axes=("trajectory",), cache_dir=str(cache_dir))
    _, first = _run(s)
    entries = sorted(cache_dir.glob("*/control-trajectory/*.rfc"))
    assert entries
    for entry in entries:
        raw = entry.read_bytes()
        tampered = re.sub(rb'(prefix_agreement\\": )\d+', rb"\g<1>0", raw)
        assert tampered != raw
        entry.write_bytes(tampered)
    with pytest.warns(RefCacheWarning, match="checksum mismatch"):
        _, second = _run(s)
    assert _scores_of(second) == _scores_of(first)


def _scores_of(results):
    return {role: {axis: {uid: r.get("score") for uid, r in items.items()} for axis, items in axes.items()}
            for role, axes in results.items()}


# --------------------------------------------------------------------------- 5. model identity


def test_an_edit_outside_any_sample_changes_the_model_identity(tmp_path, monkeypatch):
    """Finding 5: same size, one byte changed 1.5 MiB into a 4 MiB file (outside the first,
    middle and last MiB the old identity sampled)."""
    from pytest_refract.reference import model_index as cache_mod

    model = tmp_path / "m.gguf"
    model.write_bytes(bytes(range(256)) * (4 * 4096))
    folder = tmp_path / "cache"
    folder.mkdir()
    reads = []
    real = cache_mod.file_sha256
    monkeypatch.setattr(cache_mod, "file_sha256", lambda p: reads.append(p) or real(p))
    before = cache_mod.model_identity(model, folder)
    assert cache_mod.model_identity(model, folder) == before and len(reads) == 1  # warm: nothing re-read
    with open(model, "r+b") as fh:
        fh.seek(3 << 19)
        fh.write(b"\xff")
    after = cache_mod.model_identity(model, folder)
    assert after["size"] == before["size"] and after["sha256"] != before["sha256"] and len(reads) == 2


def test_an_edit_that_restores_the_mtime_is_still_seen(tmp_path):
    import os
    import time

    from pytest_refract.reference.model_index import model_identity

    model = tmp_path / "m.gguf"
    model.write_bytes(b"a" * 4096)
    folder = tmp_path / "cache"
    folder.mkdir()
    before = model_identity(model, folder)
    st = os.stat(model)
    time.sleep(0.01)
    with open(model, "r+b") as fh:
        fh.write(b"b")
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -d` would put it back
    assert model_identity(model, folder)["sha256"] != before["sha256"]


def test_a_foreign_or_huge_index_is_ignored_not_trusted(tmp_path):
    import hashlib
    import os

    from pytest_refract.reference.model_index import MODEL_INDEX, _file_key, model_identity

    model = tmp_path / "m.gguf"
    model.write_bytes(b"model bytes")
    folder = tmp_path / "cache"
    folder.mkdir()
    # An index not written by us, claiming a hash for this very file.
    (folder / MODEL_INDEX).write_text(json.dumps({"files": {_file_key(os.stat(model)): {"sha256": "0" * 64}}}))
    assert model_identity(model, folder)["sha256"] == hashlib.sha256(b"model bytes").hexdigest()


# --------------------------------------------------------------------------- 9, 10. crafted GGUF files

import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from pytest_refract.engines.gguf import read_gguf  # noqa: E402
from pytest_refract.errors import UsageProblem  # noqa: E402


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(kind, value) -> bytes:
    """GGUF value bytes (without the type tag) for kind: u32, u64, i32, f32, str, or
    ("arr", item kind, [items])."""
    if isinstance(kind, tuple):
        _, item_kind, items = kind
        return struct.pack("<IQ", _TYPE[item_kind if not isinstance(item_kind, tuple) else "arr"], len(items)) + b"".join(
            _value(item_kind, v) for v in items)
    if kind == "str":
        return _s(value)
    return struct.pack({"u32": "<I", "u64": "<Q", "i32": "<i", "f32": "<f"}[kind], value)


_TYPE = {"u32": 4, "i32": 5, "f32": 6, "str": 8, "arr": 9, "u64": 10}


def _craft(path: Path, meta: list, tensors=(("t", [32], 0, 0),)) -> Path:
    """A GGUF v3 header: ``meta`` as (key, kind, value), ``tensors`` as (name, dims, type, offset)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for key, kind, value in meta:
        out += [_s(key), struct.pack("<I", _TYPE["arr"] if isinstance(kind, tuple) else _TYPE[kind]), _value(kind, value)]
    for name, dims, ttype, offset in tensors:
        out += [_s(name), struct.pack("<I", len(dims)), b"".join(struct.pack("<Q", d) for d in dims),
                struct.pack("<IQ", ttype, offset)]
    body = b"".join(out)
    path.write_bytes(body + b"\0" * (-len(body) % 32) + b"\0" * 4096)
    return path


ARCH = ("general.architecture", "str", "llama")


def _nested(depth: int):
    kind = "u32"
    for _ in range(depth):
        kind = ("arr", kind, None)
    return kind


def _nested_value(depth: int) -> bytes:
    inner = struct.pack("<IQ", 4, 0)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


@pytest.mark.parametrize("entry, said", [
    (("llama.context_length", "str", "2048"), "llama.context_length is '2048', not a whole number"),
    (("llama.context_length", "f32", float("nan")), "llama.context_length is nan"),
    (("llama.embedding_length", "str", "64"), "llama.embedding_length is '64'"),
    (("llama.attention.head_count", ("arr", "str", ["a", "b"]), None), "llama.attention.head_count is ['a', 'b']"),
    (("llama.attention.head_count", "i32", -2), "llama.attention.head_count is -2"),
    (("llama.attention.head_count", ("arr", "u32", [0, 0]), None), "llama.attention.head_count is [0, 0]"),
    (("general.alignment", "f32", 0.5), "general.alignment is 0.5, not a power of two"),
    (("general.alignment", ("arr", "u32", [32, 32]), None), "general.alignment is [32, 32]"),
    (("general.alignment", "u32", 0), "general.alignment is 0"),
    (("general.architecture", "u32", 7), "general.architecture is 7"),
])
def test_metadata_of_an_unexpected_type_is_one_line(tmp_path, entry, said):
    """Finding 10: every key this package reads as a number is checked once, at read."""
    meta = [ARCH, entry] if entry[0] != "general.architecture" else [entry]
    path = _craft(tmp_path / "m.gguf", meta)
    with pytest.raises(UsageProblem, match="corrupt GGUF metadata") as caught:
        info = read_gguf(path)
        _ = (info.n_ctx_train, info.head_dims)  # what a lenient reader would trip on later
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_five_thousand_nested_arrays_are_one_line(tmp_path):
    path = tmp_path / "m.gguf"
    body = (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
            + _s("deep") + struct.pack("<I", 9) + _nested_value(5000))
    path.write_bytes(body + b"\0" * 64)
    with pytest.raises(UsageProblem, match="corrupt GGUF header .*nested deeper than 8"):
        read_gguf(path)


def test_more_than_four_dimensions_is_one_line(tmp_path):
    path = _craft(tmp_path / "m.gguf", [ARCH], tensors=(("t", [1] * 5, 0, 0),))
    with pytest.raises(UsageProblem, match="claims 5 dimensions"):
        read_gguf(path)


CRAFTED_TYPE = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_safety_round3 import _craft, ARCH
from pytest_refract.engines import llamacpp
from pytest_refract.engines.gguf import expected_data_end, read_gguf
from pytest_refract.errors import UsageProblem
path = _craft(Path({path!r}), [ARCH], tensors=(("blk.0.attn_q.weight", [32, 4], {ttype}, 0),))
try:
    expected_data_end(read_gguf(path), llamacpp.row_size)
except UsageProblem as exc:
    print("USAGE:", exc)
"""


@pytest.mark.parametrize("ttype, said", [(4, "ggml type 4 is not a type this llama.cpp build knows"),
                                         (2**31 - 1, "ggml type 2147483647 is not a type"),
                                         (8, "a row of 32 values cannot be stored as ggml type 8")])
def test_a_crafted_tensor_type_is_one_line_not_a_signal(tmp_path, ttype, said):
    """Finding 9: type 4 (a removed slot, block size 0) gave SIGFPE inside ggml_row_size,
    2**31-1 SIGSEGV. Run in a child process: a regression must not kill the test session."""
    pytest.importorskip("llama_cpp")
    if ttype == 8:  # q8_0 has blocks of 32: a row of 32 fits; make it 33 wide instead
        said = "a row of 33 values cannot be stored as ggml type 8"
    code = CRAFTED_TYPE.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m.gguf"), ttype=ttype)
    if ttype == 8:
        code = code.replace("[32, 4]", "[33, 4]")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert "USAGE: corrupt GGUF tensor table" in run.stdout and said in run.stdout, run.stdout


def _usage_error(result) -> str:
    """Exit 4, exactly one ERROR line, no traceback; returns that line."""
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == 4, text
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, text
    return errors[0]


def _args(model, prompts, corpus, *extra):
    return [f"--refract-model={model}", f"--refract-prompts={prompts}", f"--refract-corpus={corpus}",
            "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-ctx=64", "--refract-chunks=2",
            "--refract-n-predict=8", "--refract-threads=1", *extra]


@pytest.mark.parametrize("broken", ["missing-tensor", "zero-heads"])
def test_a_full_load_llama_cpp_refuses_is_one_line(pytester, tiny_prompts, tiny_corpus, broken):
    """Finding 10: the vocabulary-only load passes, the full load is refused: one line."""
    pytest.importorskip("llama_cpp")
    from tiny_model import write_tiny_llama

    kwargs = {"missing-tensor": {"missing_tensor": "blk.1.ffn_up.weight"}, "zero-heads": {"head_count": 0}}[broken]
    model = write_tiny_llama(pytester.path / "m.gguf", n_ctx_train=1024, **kwargs)
    line = _usage_error(pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus), timeout=120))
    assert "llama.cpp could not load m.gguf" in line, line


def test_a_one_token_vocabulary_is_refused_before_tokenizing(pytester, tiny_prompts, tiny_corpus):
    """Finding 12: llama.cpp's tokenizer aborted on a 1-token vocabulary."""
    pytest.importorskip("llama_cpp")
    from tiny_model import write_tiny_llama

    model = write_tiny_llama(pytester.path / "one.gguf", n_ctx_train=1024, n_vocab_kept=1)
    line = _usage_error(pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus), timeout=120))
    assert "vocabulary of 1 token" in line or "could not load" in line, line


# --------------------------------------------------------------------------- 6, 7, 8. report outputs

import os  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from pytest_refract.audit.guard import check_foreign_outputs, check_outputs  # noqa: E402
from pytest_refract.files import write_atomic, write_reports  # noqa: E402


@pytest.mark.parametrize("how", ["direct", "symlink", "symlink-to-fd"])
def test_a_report_path_leading_into_dev_is_refused(tmp_path, how):
    """Finding 6: /dev/stdout with stdout redirected to a file stats as a regular file; the
    rename then replaced the /dev/stdout link. Any path that leads through /dev or a process's
    descriptors is refused, whatever it points to now."""
    path = {"direct": "/dev/stdout", "symlink": tmp_path / "r.json", "symlink-to-fd": tmp_path / "fd.json"}[how]
    if how == "symlink":
        path.symlink_to("/dev/stdout")
    elif how == "symlink-to-fd":
        path.symlink_to(f"/proc/self/fd/{os.open(tmp_path, os.O_RDONLY)}")
    with pytest.raises(UsageProblem, match="never a report file"):
        check_outputs({"--refract-json": str(path)}, [])


def test_write_atomic_replaces_what_a_link_points_to_never_the_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_atomic(link, "new", follow_links=True)  # a report path the user gave
    assert link.is_symlink() and real.read_text() == "new"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    to_fifo = tmp_path / "to-fifo.json"
    to_fifo.symlink_to(fifo)
    with pytest.raises(OSError, match="FIFO"):
        write_atomic(to_fifo, "x", follow_links=True)  # returns at once: a FIFO is never opened
    assert to_fifo.is_symlink() and fifo.exists() and not fifo.is_file()


def test_a_report_path_inside_the_cache_folder_is_refused(tmp_path):
    """Finding 6: the cache's marker named as a report path would be replaced by the report."""
    cache = tmp_path / "cache"
    assert prepare_cache_dir(cache) == cache
    for name in (".pytest-refract-cache", "r.json"):
        with pytest.raises(UsageProblem, match="inside the reference cache folder"):
            check_outputs({"--refract-json": str(cache / name)}, [], str(cache))


def test_a_legal_long_name_passes_the_check_and_the_write(tmp_path):
    """Finding 7: a 250-byte name made a temp name past 255 bytes; the check used a short one."""
    path = tmp_path / ("r" * 245 + ".json")
    check_outputs({"--refract-json": str(path)}, [])
    write_atomic(path, "{}")
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_failed_write_goes_beside_the_cache_and_says_so(tmp_path):
    gone = tmp_path / "gone" / "r.json"
    fallback = tmp_path / "fallback"
    written, problems = write_reports([("--refract-json", str(gone), lambda: "{}")], fallback)
    assert written["--refract-json"] == fallback / "r.json" and (fallback / "r.json").read_text() == "{}"
    assert len(problems) == 1 and f"--refract-json={gone} could not be written" in problems[0]
    assert f"written to {fallback / 'r.json'} instead" in problems[0]
    _, problems = write_reports([("--refract-json", str(gone), lambda: "{}")], None)
    assert problems and "instead" not in problems[0]


@pytest.mark.parametrize("dest, flag", [("xmlpath", "--junitxml"), ("htmlpath", "--html"),
                                        ("report_log", "--report-log"), ("debug", "--debug")])
def test_another_plugins_output_on_our_path_is_refused(tmp_path, dest, flag):
    """Finding 8: --junitxml on the --refract-json path, or pytest-html's --html on ours."""
    ours = str(tmp_path / "r.out")
    with pytest.raises(UsageProblem, match=f"is also {flag}"):
        check_foreign_outputs({"--refract-json": ours}, SimpleNamespace(**{dest: ours}))
    check_foreign_outputs({"--refract-json": ours}, SimpleNamespace(**{dest: str(tmp_path / "other")}))


def test_junitxml_on_the_json_path_is_a_usage_error(pytester, tiny_model):
    path = pytester.path / "r.xml"
    line = _usage_error(pytester.runpytest_subprocess(f"--refract-model={tiny_model}",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                      f"--refract-json={path}", f"--junitxml={path}"))
    assert "is also --junitxml" in line and not path.exists()


REMOVE_REPORT_FOLDER = """
import shutil
def pytest_runtest_call(item):
    shutil.rmtree({folder!r}, ignore_errors=True)
"""


def test_a_report_folder_removed_mid_run_keeps_the_summary_and_the_gate(pytester, tiny_prompts, tiny_corpus):
    """Finding 7: the report folder removed mid-run ended in INTERNALERROR after all items ran."""
    pytest.importorskip("llama_cpp")
    folder = pytester.path / "out"
    folder.mkdir()
    pytester.makeconftest(REMOVE_REPORT_FOLDER.format(folder=str(folder)))
    result = pytester.runpytest_subprocess(*_args(Path(tiny_prompts).parent / "x", tiny_prompts, tiny_corpus)[1:],
                                           f"--refract-model={_tiny_for(pytester)}", "--refract-axes=kld",
                                           f"--refract-json={folder / 'r.json'}", "-p", "cacheprovider", timeout=300)
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text and "Traceback" not in text, text
    assert "refract KV-cache audit" in text and "gate" in text
    fallback = pytester.path / ".pytest_cache" / "d" / "refract-reports" / "r.json"
    assert f"--refract-json={folder / 'r.json'} could not be written" in text
    assert f"written to {fallback} instead" in text
    assert json.loads(fallback.read_text())["schema"].startswith("pytest-refract.report")
    assert result.ret == 1


def _tiny_for(pytester) -> Path:
    from tiny_model import write_tiny_llama

    return write_tiny_llama(pytester.path / "tiny.gguf", n_ctx_train=1024)


# --------------------------------------------------------------------------- 3. degenerate measurements


def test_a_template_that_drops_the_content_is_refused(pytester, tiny_prompts, tiny_corpus):
    pytest.importorskip("llama_cpp")
    from tiny_model import write_tiny_llama

    model = write_tiny_llama(pytester.path / "t.gguf", n_ctx_train=1024,
                             chat_template="{{ bos_token }}hello world{% if add_generation_prompt %} the end{% endif %}")
    line = _usage_error(pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus), timeout=120))
    assert "drops the user's content" in line and "t.gguf" in line


def test_a_uniform_model_cannot_pass(pytester, tiny_prompts, tiny_corpus):
    """Finding 3: every logit equal reported "composite 100.00 EXCELLENT, All clear"."""
    pytest.importorskip("llama_cpp")
    from tiny_model import write_tiny_llama

    model = write_tiny_llama(pytester.path / "u.gguf", n_ctx_train=1024, uniform_output=True)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus, f"--refract-json={report}"),
                                           timeout=300)
    assert result.ret == 1, result.stdout.str()
    data = json.loads(report.read_text())
    assert data["gate"]["passed"] is False
    assert any("cannot show cache damage" in r for r in data["gate"]["reasons"]), data["gate"]


def test_vacuous_reasons_need_both_a_flat_reference_and_no_kld():
    from pytest_refract.report.vacuous import vacuous_reasons

    assert vacuous_reasons({"kld": {"ppl_ref": 332.0, "mean_kld": 0.0}}, 332)
    assert not vacuous_reasons({"kld": {"ppl_ref": 349.7, "mean_kld": 0.0}}, 332)  # random weights, not flat
    assert not vacuous_reasons({"kld": {"ppl_ref": 332.0, "mean_kld": 0.01}}, 332)  # damage shows
    assert vacuous_reasons({"trajectory": {"score": 100.0, "mean_max_len": 1.0}}, 332)
    assert not vacuous_reasons({"trajectory": {"score": 100.0, "mean_max_len": 8.0}}, 332)


@pytest.mark.parametrize("pattern", ["{value}|", "|{value}", "{value}|.", "(?:{value})?", "{value}|\\d{4}"])
def test_an_answer_pattern_matching_a_reply_without_the_value_is_refused(pytester, tiny_model, pattern):
    line = _usage_error(pytester.runpytest_subprocess(f"--refract-model={tiny_model}",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                      "--refract-axes=rniah", f"--refract-rniah-answer={pattern}"))
    assert "matches a reply that lacks the value" in line


# --------------------------------------------------------------------------- 4. the baseline gate

from pytest_refract.report.baseline import baseline_reasons, load_baseline, no_composite_reason  # noqa: E402

_AXES = {"kld": {"score": 90.0}, "trajectory": {"score": 80.0}}


def test_a_baseline_that_never_measured_this_candidate_fails():
    matrix = {"candidates": [{"candidate": "ctk=q4_0,ctv=q4_0", "axes": _AXES, "composite": 85.0}]}
    reasons = baseline_reasons(matrix, "ctk=q8_0,ctv=q8_0", _AXES, 85.0, 0.0)
    assert reasons == ["--refract-baseline never measured ctk=q8_0,ctv=q8_0 (it holds ctk=q4_0,ctv=q4_0); "
                       "a baseline gate needs a baseline of the same candidate"]
    single = {"candidate": "ctk=q4_0,ctv=q4_0", "axes": _AXES, "composite": 85.0}
    assert "measured ctk=q4_0,ctv=q4_0, not ctk=q8_0,ctv=q8_0" in baseline_reasons(single, "ctk=q8_0,ctv=q8_0",
                                                                                  _AXES, 85.0, 0.0)[0]
    assert baseline_reasons(single, "ctk=q4_0,ctv=q4_0", _AXES, 85.0, 0.0) == []


def test_a_baseline_with_nothing_comparable_fails_and_other_settings_are_named():
    base = {"candidate": "c", "axes": {"rniah": {"score": 90.0}}, "composite": None}
    assert "no score comparable" in baseline_reasons(base, "c", _AXES, None, 2.0)[0]
    base = {"candidate": "c", "axes": {"kld": {"score": 99.0}}, "composite": None, "settings": {"ctx": 512}}
    reasons = baseline_reasons(base, "c", _AXES, None, 2.0, {"ctx": 64})
    assert len(reasons) == 1 and "kld dropped 9.00" in reasons[0] and "ctx 512 there, 64 here" in reasons[0]


@pytest.mark.parametrize("changes, said", [({"complete": False}, "interrupted run"),
                                           ({"composite": None, "axes": {"kld": {"score": None}}}, "no score at all")])
def test_an_interrupted_or_empty_baseline_is_refused(tmp_path, changes, said):
    data = {"schema": "pytest-refract.report.v1", "composite": 90.0, "candidate": "c", "reference": "r",
            "model": {"path": "m", "size_bytes": 1, "sha256_first_mib": "x"}, "axes": {"kld": {"score": 90.0}}}
    data.update(changes)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageProblem, match=said):
        load_baseline(str(path), {"path": "m", "size_bytes": 1, "sha256_first_mib": "x"}, "r")


def test_no_composite_with_nothing_scorable_names_why():
    """Finding 12: the reason read "no composite:  could not be scored" with no axis name."""
    line = no_composite_reason({"rniah": {"score": None, "status": "n/a", "error": "no cell could be scored"}})
    assert line == "no composite: no axis had anything to score (rniah: no cell could be scored)"


def test_rniah_alone_gives_no_chunks_note(inputs):
    runner, _ = _run(_settings(*inputs, axes=("rniah",)))
    assert runner.inputs.chunks_note is None


# --------------------------------------------------------------------------- 11. inputs that block or never end

import threading  # noqa: E402

from pytest_refract.files import MAX_TEXT_BYTES  # noqa: E402
from pytest_refract.inputs.data import load_corpus, load_prompts  # noqa: E402


def _returns_within(seconds, call):
    """call()'s exception or result, failing (not hanging) when it does not return in time."""
    out = {}

    def work():
        try:
            out["value"] = call()
        except BaseException as exc:
            out["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "blocked"
    return out


@pytest.mark.parametrize("loader", ["prompts", "corpus", "haystack"])
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_input_that_is_no_regular_file_is_named_without_opening_it(tmp_path, loader, kind):
    path = tmp_path / "in"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    call = {"prompts": lambda: load_prompts(path), "corpus": lambda: load_corpus(path),
            "haystack": lambda: load_corpus(path, "haystack", "--refract-haystack")}[loader]
    out = _returns_within(10, call)
    assert isinstance(out.get("error"), UsageProblem), out
    assert ("a FIFO" if kind == "fifo" else "a character device") in str(out["error"])


def test_an_input_larger_than_the_bound_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:
        fh.truncate(MAX_TEXT_BYTES + 1)  # sparse: no disk used
    with pytest.raises(UsageProblem, match="larger than 64 MiB"):
        load_corpus(big)


@pytest.mark.parametrize("template, said", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}",
     "range() items"),
    ("{% for a in range(90000) %}{{ 'xxxxxxxxxxxxxxxxxxxx' }}{% endfor %}{{ messages[0].content }}", "characters"),
    ("{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}{{ messages[0].content }}",
     "took over"),
])
def test_template_rendering_is_bounded(tiny_model, monkeypatch, template, said):
    pytest.importorskip("llama_cpp")
    from pytest_refract.engines import chat_template, llamacpp
    from pytest_refract.engines.base import TemplateProblem

    monkeypatch.setattr(chat_template, "TEMPLATE_SECONDS", 1.0)
    engine = llamacpp.Engine(tiny_model, vocab_only=True)
    try:
        render = engine.user_turn_renderer(template)
        out = _returns_within(20, lambda: render("hi"))
    finally:
        engine.close()
    assert isinstance(out.get("error"), TemplateProblem) and said in str(out["error"]), out


# --------------------------------------------------------------------------- 12. smaller ones

from pytest_refract.report import schema  # noqa: E402


@pytest.mark.parametrize("text, said", [
    ('{"schema": "pytest-refract.report.v1", "composite": 1' + "0" * 400 + "}", "has 401 digits"),
    ('{"schema": "pytest-refract.report.v1", "composite": 1e999}', "out of range"),
    ('{"schema": "pytest-refract.report.v1", "x": ' + "[" * 5000 + "]" * 5000 + "}", "nested deeper"),
    ('{"schema": "pytest-refract.report.v1", "x": ' + "[" * 40 + "]" * 40 + "}", "nested deeper"),
])
def test_reports_with_huge_numbers_or_deep_nesting_are_one_line(tmp_path, text, said):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(schema.ReportFileError, match=said):
        schema.load_report(path)
    run = subprocess.run([sys.executable, "-m", "pytest_refract", "compare", str(path), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr and said in run.stderr


def test_a_lone_surrogate_in_a_prompt_is_one_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "hi \\ud800 there"}\n')
    with pytest.raises(UsageProblem, match=r"p.jsonl:1: prompt holds a lone surrogate"):
        load_prompts(path)


def test_a_blank_ini_model_is_a_usage_error_like_the_flag(pytester):
    pytester.makeini("[pytest]\nrefract_model =\n")
    line = _usage_error(pytester.runpytest_subprocess("--refract-candidate=ctk=q8_0,ctv=q8_0"))
    assert "ini option refract_model is empty" in line


def test_fa_on_spelled_out_is_the_same_candidate(pytester, tiny_model):
    line = _usage_error(pytester.runpytest_subprocess(f"--refract-model={tiny_model}",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0,fa=on"))
    assert "is given twice" in line


# --------------------------------------------------------------------------- 2. the cache types llama.cpp used

from pytest_refract.audit.runner import Runner  # noqa: E402
from pytest_refract.axes import resolve  # noqa: E402
from pytest_refract.engines.kvlog import CacheAllocation, CacheLog, check_cache_types, parse_log  # noqa: E402

FORK_WARNING = ("llama_kv_cache: auto-asymmetric: GQA ratio 6:1 (n_head=6, n_head_kv=1) — upgrading K from turbo4 "
                "to q8_0 to prevent quality degradation. Disable with TURBO_AUTO_ASYMMETRIC=0")


def test_check_cache_types_names_what_was_used_and_why():
    facts = parse_log([(3, FORK_WARNING + "\n"),
                       (2, "llama_kv_cache: size =    1.00 MiB (   256 cells,   2 layers,  1/1 seqs), "
                           "K (q8_0):    0.50 MiB, V (turbo4):    0.50 MiB\n")])
    line = check_cache_types(("turbo4", "turbo4"), facts, "--refract-candidate ctk=turbo4,ctv=turbo4")
    assert line.startswith("--refract-candidate ctk=turbo4,ctv=turbo4: llama.cpp created a q8_0/turbo4 (K/V) cache, "
                           "not the turbo4/turbo4 asked for (it changed K); llama.cpp logged: llama_kv_cache: "
                           "auto-asymmetric")
    assert "TURBO_AUTO_ASYMMETRIC=0" in line and "ctk=q8_0,ctv=turbo4" in line and "\n" not in line
    assert check_cache_types(("q8_0", "turbo4"), facts, "x") is None
    silent = CacheLog(caches=[CacheAllocation(256, "f16", 1.0, "q4_0", 1.0)])
    assert "logged no reason" in check_cache_types(("q4_0", "q4_0"), silent, "x")
    assert check_cache_types(("q4_0", "q4_0"), CacheLog(), "x") is None  # a build that logs no sizes
    # ggml's log spells its k-quants q4_K, its type table q4_k: the same type, not a change.
    k_quants = CacheLog(caches=[CacheAllocation(256, "q4_K", 1.0, "q6_K", 1.0)])
    assert check_cache_types(("q4_k", "q6_k"), k_quants, "x") is None
    assert "(it changed V)" in check_cache_types(("q4_k", "q5_k"), k_quants, "x")


@pytest.mark.parametrize("role, asked, flag", [("reference", "f16", "--refract-reference"),
                                               ("control", "bf16", "--refract-sensitivity"),
                                               ("candidate", "q4_0", "--refract-candidate"),
                                               ("second candidate", "q8_0", "--refract-candidate")])
def test_a_substituted_cache_type_is_refused_for_every_role(inputs, monkeypatch, role, asked, flag):
    """Finding 2, on the fake engine: whichever context llama.cpp changes the types of, the
    run stops before any item with one line naming what was used and why."""
    monkeypatch.setattr(fake_engine, "SUBSTITUTE", {asked: ("q8_0" if asked != "q8_0" else "f16",
                                                            f"fake: upgrading K from {asked}")})
    s = _settings(*inputs, candidates=tuple(parse_kv_config(c) for c in ("ctk=q4_0,ctv=q4_0", "ctk=q8_0,ctv=q8_0")))
    with pytest.raises(UsageProblem) as caught:
        Runner(s, resolve(), engine_mod=fake_engine)
    line = str(caught.value)
    assert line.startswith(flag) and f"not the {asked}/" in line and f"fake: upgrading K from {asked}" in line


def test_unsubstituted_types_still_run(inputs):
    runner = Runner(_settings(*inputs), resolve(), engine_mod=fake_engine)
    runner.close()


from pytest_refract.engines.kvconfig import parse_kv_config  # noqa: E402


def test_the_fork_upgrading_turbo4_on_a_gqa6_model_is_refused(pytester, tiny_prompts, tiny_corpus):
    """Finding 2 on a real TurboQuant fork build (REFRACT_FORK_LIB): a tiny model with 6 query
    heads per KV head, symmetric turbo4 asked for."""
    lib = os.environ.get("REFRACT_FORK_LIB")
    if not lib:
        pytest.skip("REFRACT_FORK_LIB names no TurboQuant fork build")
    from tiny_model import write_tiny_llama

    model = write_tiny_llama(pytester.path / "gqa6.gguf", n_ctx_train=1024, n_embd=192, n_head=6, n_head_kv=1)
    result = pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus)[:3],
                                           "--refract-candidate=ctk=turbo4,ctv=turbo4", f"--refract-llama-lib={lib}",
                                           "--refract-threads=1", "--refract-ctx=64", "--refract-chunks=1",
                                           "--refract-n-predict=4", timeout=600)
    line = _usage_error(result)
    assert "llama.cpp created a q8_0/turbo4 (K/V) cache, not the turbo4/turbo4 asked for" in line, line
    assert "auto-asymmetric" in line


# --------------------------------------------------------------------------- 12. the cache marker


def test_a_temp_marker_left_by_a_crash_or_a_concurrent_run_does_not_refuse_the_folder(tmp_path):
    """Finding 12: a second first run saw the first one's temporary marker as a user's file
    (1 in 7 tries), and a crash mid-write left one that refused the folder forever."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "..pytest-refract-cache.abc123xy.tmp").write_text("")  # write_atomic's temp name
    (folder / ".write-check.4242.tmp").write_text("")
    assert prepare_cache_dir(folder) == folder and (folder / ".pytest-refract-cache").is_file()


def test_concurrent_first_runs_on_a_fresh_folder_all_succeed(tmp_path):
    script = ("import sys\nfrom pathlib import Path\nfrom pytest_refract.reference.folder import prepare_cache_dir\n"
              "ok = 0\nfor i in range(20):\n"
              "    d = Path(sys.argv[1]) / str(i)\n"
              "    try:\n        ok += prepare_cache_dir(d) == d\n"
              "    except Exception as exc:\n        print(exc)\nprint(ok)\n")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [r.communicate(timeout=120) for r in runs]
    assert all(r.returncode == 0 for r in runs), outs
    assert [o[0].strip() for o in outs] == ["20"] * 4, [o[0] for o in outs]
