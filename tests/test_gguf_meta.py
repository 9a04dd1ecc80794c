"""GGUF header reader, on tiny synthesised models (no real model download), cross-checked
against the gguf package's own reader (GGUFReader) on every architecture tiny_model writes
and on SmolLM2."""

from __future__ import annotations

import hashlib
import os

import gguf  # a test dependency (tiny_model writes with it too)
import pytest
from tiny_model import FAMILIES, write_tiny_family, write_tiny_llama

from pytest_refract.engines.gguf import (
    _KEEP_ARRAY_MAX,
    _SkippedArray,
    expected_data_end,
    head_sha256,
    read_gguf,
)
from pytest_refract.errors import UsageProblem


@pytest.fixture
def ggml_row_size():
    """ggml's own row-size function; only the data-end tests need llama.cpp for it, so only
    they skip without it (the parser tests above and below run anywhere)."""
    return pytest.importorskip("pytest_refract.engines.llamacpp").row_size


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


def test_expected_data_end_equals_file_size(tiny, ggml_row_size):
    info = read_gguf(tiny)
    assert expected_data_end(info, ggml_row_size) == os.path.getsize(tiny)


def test_expected_data_end_detects_truncated_data(tiny, tmp_path, ggml_row_size):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])
    info = read_gguf(cut)  # the header is intact, so it still parses
    end = expected_data_end(info, ggml_row_size)
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


# --------------------------------------------------------------------------- vs gguf.GGUFReader


def _reader_value(field):
    """A metadata value as GGUFReader decodes it (scalars, strings, lists of either)."""
    value = field.contents()
    return value.tolist() if hasattr(value, "tolist") else value


def _assert_same_as_gguf_reader(path):
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    fields = {k: _reader_value(f) for k, f in theirs.fields.items() if not k.startswith("GGUF.")}

    assert ours.version == _reader_value(theirs.fields["GGUF.version"])
    # Every key, and every value we keep; long arrays (token lists) are kept by length only.
    assert set(ours.metadata) == set(fields)
    for key, value in fields.items():
        mine = ours.metadata[key]
        if isinstance(mine, _SkippedArray):
            assert isinstance(value, list) and mine.length == len(value) > _KEEP_ARRAY_MAX, key
        else:
            assert mine == value, key

    # The properties the plugin reads, derived here straight from GGUFReader's fields.
    arch = fields.get("general.architecture", "unknown")
    assert ours.architecture == arch
    assert ours.name == (fields.get("general.name") or path.stem)
    assert ours.n_ctx_train == fields.get(f"{arch}.context_length")
    heads = fields.get(f"{arch}.attention.head_count")
    heads = next((h for h in heads if h), None) if isinstance(heads, list) else heads
    embd = fields.get(f"{arch}.embedding_length")
    split = embd // heads if heads and embd else None
    assert ours.head_dims == (fields.get(f"{arch}.attention.key_length", split),
                              fields.get(f"{arch}.attention.value_length", split))
    template = fields.get("tokenizer.chat_template")
    assert ours.chat_template == (template if template and template.strip() else None)

    # The tensor table: names, dims (GGUF order), ggml types, offsets from the data start.
    assert ours.n_tensors == len(theirs.tensors)
    assert ours.tensors == [(t.name, t.shape.tolist(), int(t.tensor_type), t.data_offset - theirs.data_offset)
                            for t in theirs.tensors]
    assert ours.data_offset == theirs.data_offset
    return ours


@pytest.mark.parametrize("family", ("llama",) + FAMILIES)
def test_header_matches_gguf_reader_on_tiny_models(tmp_path, family):
    if family == "llama":
        path = write_tiny_llama(tmp_path / "llama.gguf", chat_template="{{ messages }}")
    else:
        path = write_tiny_family(tmp_path / f"{family}.gguf", family)
    info = _assert_same_as_gguf_reader(path)
    assert info.architecture == family
    assert info.tensors  # a model with no tensors would compare nothing


@pytest.mark.smollm2
def test_header_matches_gguf_reader_on_smollm2(smollm2):
    info = _assert_same_as_gguf_reader(smollm2)
    assert info.architecture == "llama"
    assert info.chat_template is not None
    assert any(isinstance(v, _SkippedArray) for v in info.metadata.values())  # the token list


def test_long_string_arrays_are_skipped_with_their_checks(tiny, tmp_path):
    """The token list (a string array longer than _KEEP_ARRAY_MAX) is read past undecoded:
    kept by length only, and a file cut inside it, or a string longer than the file, is
    still a truncated header."""
    info = read_gguf(tiny)
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, _SkippedArray) and tokens.length == len(gguf.GGUFReader(tiny).fields[
        "tokenizer.ggml.tokens"].data) > _KEEP_ARRAY_MAX
    data = tiny.read_bytes()
    key = b"tokenizer.ggml.tokens"
    start = data.index(key) + len(key) + 4 + 4 + 8  # value type, item type, count
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: start + 40])
    with pytest.raises(UsageProblem, match="truncated"):
        read_gguf(cut)
    # The first string's length made larger than the whole file.
    bad = bytearray(data)
    bad[start : start + 8] = (len(data) + 1).to_bytes(8, "little")
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(bytes(bad))
    with pytest.raises(UsageProblem, match="truncated"):
        read_gguf(huge)
