"""GGUF header reader, on tiny synthesised models (no real model download)."""

from __future__ import annotations

import hashlib
import os

import pytest

from pytest_refract.errors import UsageProblem
from pytest_refract.gguf_meta import expected_data_end, head_sha256, read_gguf

from tiny_model import write_tiny_llama

engine = pytest.importorskip("pytest_refract.engines.llamacpp")


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_llama(tmp_path / "m.gguf")


def test_read_gguf_metadata(tiny):
    info = read_gguf(tiny)
    assert info.path == tiny
    assert info.version in (2, 3)
    assert info.architecture == "llama"
    assert info.name == "tiny-llama"
    assert info.n_ctx_train == 2048
    assert info.head_dims == (32, 32)
    assert info.chat_template is None
    assert info.size_bytes == os.path.getsize(tiny)
    # token_embd, output_norm, output + 9 per layer for 2 layers
    assert info.n_tensors == 3 + 2 * 9
    assert len(info.tensors) == info.n_tensors
    assert info.data_offset % 32 == 0


def test_read_gguf_hyperparameters_follow_the_writer(tmp_path):
    path = write_tiny_llama(tmp_path / "wide.gguf", n_ctx_train=4096, n_embd=128, n_head=2, n_head_kv=1)
    info = read_gguf(path)
    assert info.n_ctx_train == 4096
    assert info.head_dims == (64, 64)


def test_read_gguf_chat_template(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    info = read_gguf(write_tiny_llama(tmp_path / "chat.gguf", chat_template=template))
    assert info.chat_template == template


def test_blank_chat_template_counts_as_none(tmp_path):
    info = read_gguf(write_tiny_llama(tmp_path / "blank.gguf", chat_template="   "))
    assert info.chat_template is None


def test_expected_data_end_equals_file_size(tiny):
    info = read_gguf(tiny)
    assert expected_data_end(info, engine.row_size) == os.path.getsize(tiny)


def test_expected_data_end_detects_truncated_data(tiny, tmp_path):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])
    info = read_gguf(cut)  # the header is intact, so it still parses
    end = expected_data_end(info, engine.row_size)
    assert end == len(data)
    assert end > os.path.getsize(cut)


def test_header_cut_short_is_truncated(tiny, tmp_path):
    cut = tmp_path / "head.gguf"
    cut.write_bytes(tiny.read_bytes()[:100])
    with pytest.raises(UsageProblem) as info:
        read_gguf(cut)
    assert "truncated" in str(info.value)
    assert str(cut) in str(info.value)


def test_magic_only_is_truncated(tmp_path):
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(UsageProblem, match="truncated"):
        read_gguf(p)


def test_text_file_is_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is not a model\n")
    with pytest.raises(UsageProblem) as info:
        read_gguf(p)
    assert "not a GGUF" in str(info.value)
    assert "b'this'" in str(info.value)


def test_empty_file_is_not_gguf(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(UsageProblem, match="not a GGUF"):
        read_gguf(p)


def test_unsupported_version(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(UsageProblem, match="unsupported GGUF version 9"):
        read_gguf(p)


def test_missing_path(tmp_path):
    with pytest.raises(UsageProblem) as info:
        read_gguf(tmp_path / "nope.gguf")
    assert "not found" in str(info.value)
    assert "nope.gguf" in str(info.value)


def test_directory_path(tmp_path):
    with pytest.raises(UsageProblem, match="directory"):
        read_gguf(tmp_path)


def test_head_sha256_small_file_is_whole_file_hash(tiny):
    assert os.path.getsize(tiny) < 1 << 20
    assert head_sha256(tiny) == hashlib.sha256(tiny.read_bytes()).hexdigest()


def test_head_sha256_hashes_only_the_first_mib(tmp_path):
    data = os.urandom((1 << 20) + 12345)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(data)
    b.write_bytes(data[: 1 << 20] + b"different tail")
    expected = hashlib.sha256(data[: 1 << 20]).hexdigest()
    assert head_sha256(a) == expected
    assert head_sha256(b) == expected
    assert head_sha256(a) != hashlib.sha256(data).hexdigest()
