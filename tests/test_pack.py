"""Reference packs, the pure parts: writing, verifying, reading back bit for bit, and every way a
pack can be damaged or wrong for a run (each a one-line usage error, nothing read from it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pytest_refract.errors import MeasurementError, UsageProblem
from pytest_refract.reference.codec import sparse_logprobs
from pytest_refract.reference.pack import (
    MANIFEST,
    PACK_SCHEMA,
    PackReader,
    PackWriter,
    check_save_target,
    manifest_checksum,
    run_match,
)

VOCAB = 50


def _match(**over):
    base = dict(model_sha256="ab" * 32, model_size=1234, reference="ctk=f16,ctv=f16", control="ctk=bf16,ctv=bf16",
                numerics={"n_batch": 512, "n_ubatch": 512, "flash_attn": "auto", "decode_batch": 16},
                inputs={"prompts": "11" * 32, "corpus": "22" * 32, "haystack": None},
                axes={"trajectory": {"n_predict": 16, "decode_batch": 16}, "kld": {"ctx": 64}})
    base.update(over)
    return run_match(**base)


def _entries():
    rng = np.random.default_rng(0)
    rows = sparse_logprobs(rng.normal(size=(5, VOCAB)).astype(np.float32) * 4)
    return {
        ("trajectory", (1, 2, 3), 16): dict(rows, tokens=np.asarray([4, 5, 6], dtype=np.int64)),
        ("kld", (7, 8, 9, 10)): rows,
        ("greedy", (1, 2), 4): {"tokens": np.asarray([3, 3, 1, 0], dtype=np.int64)},
    }


def _write(tmp_path: Path, match=None) -> Path:
    target = tmp_path / "pack"
    writer = PackWriter(target, match or _match(), n_vocab=VOCAB)
    for (kind, *parts), arrays in _entries().items():
        writer.cache.store(kind, writer.cache.key(kind, *parts), arrays)
    key = writer.cache.key("control-kld", "ctk=bf16,ctv=bf16", "{}")
    writer.cache.store("control-kld", key, {}, meta={"result": {"score": 99.5, "mean_kld": 0.004}})
    writer.finish({"llama_cpp_python": "0.3.36", "library_digest": "cd" * 32}, {"threads": 2}, "pytest-refract test")
    return target


def test_round_trip_is_bit_identical(tmp_path):
    pack = _write(tmp_path)
    reader = PackReader(pack, _match(), n_vocab=VOCAB)
    try:
        for (kind, *parts), arrays in _entries().items():
            got = reader.cache.load(kind, reader.cache.key(kind, *parts))["arrays"]
            assert got.keys() == arrays.keys()
            for name in arrays:
                assert got[name].dtype == arrays[name].dtype and np.array_equal(got[name], arrays[name]), name
        control = reader.cache.load("control-kld", reader.cache.key("control-kld", "ctk=bf16,ctv=bf16", "{}"))
        assert control["meta"]["result"] == {"score": 99.5, "mean_kld": 0.004}
        assert reader.summary()["files"] == 4 and reader.summary()["bytes"] > 0
    finally:
        reader.close()
    # The staging folder is gone; only the pack remains.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_an_item_the_pack_does_not_hold_fails_the_item(tmp_path):
    reader = PackReader(_write(tmp_path), _match(), n_vocab=VOCAB)
    with pytest.raises(MeasurementError, match="holds no kld entry"):
        reader.cache.load("kld", reader.cache.key("kld", (1, 1, 1)))
    reader.close()


def _files(pack: Path):
    return sorted(p for p in pack.rglob("*") if p.is_file())


@pytest.mark.parametrize("which", ["entry", "manifest"])
def test_one_changed_byte_is_refused(tmp_path, which):
    pack = _write(tmp_path)
    victim = pack / MANIFEST if which == "manifest" else next(p for p in _files(pack) if p.suffix == ".rfc")
    raw = bytearray(victim.read_bytes())
    # A digit inside the manifest stays valid JSON: only the checksum can catch it.
    at = raw.index(b"1234") if which == "manifest" else len(raw) // 2
    raw[at] = ord("5") if which == "manifest" else raw[at] ^ 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(UsageProblem, match="checksum") as exc:
        PackReader(pack, _match(), n_vocab=VOCAB)
    assert "\n" not in str(exc.value)


def test_a_truncated_pack_is_refused(tmp_path):
    pack = _write(tmp_path)
    entry = next(p for p in _files(pack) if p.suffix == ".rfc")
    entry.write_bytes(entry.read_bytes()[:-10])
    with pytest.raises(UsageProblem, match="truncated or changed"):
        PackReader(pack, _match(), n_vocab=VOCAB)
    entry.unlink()
    with pytest.raises(UsageProblem, match="missing"):
        PackReader(pack, _match(), n_vocab=VOCAB)
    (pack / MANIFEST).write_text((pack / MANIFEST).read_text()[:100])
    with pytest.raises(UsageProblem, match="not valid JSON"):
        PackReader(pack, _match(), n_vocab=VOCAB)


def test_an_extra_file_is_refused(tmp_path):
    pack = _write(tmp_path)
    (pack / "entries" / "stray.txt").write_text("x")
    with pytest.raises(UsageProblem, match="does not list"):
        PackReader(pack, _match(), n_vocab=VOCAB)


def test_a_path_that_is_a_file_or_missing_is_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UsageProblem, match="is a file"):
        PackReader(f, _match())
    with pytest.raises(UsageProblem, match="no such folder"):
        PackReader(tmp_path / "nope", _match())
    with pytest.raises(UsageProblem, match="no manifest.json"):
        PackReader(tmp_path, _match())


def test_a_newer_schema_is_refused(tmp_path):
    pack = _write(tmp_path)
    manifest = json.loads((pack / MANIFEST).read_text())
    manifest["schema"] = PACK_SCHEMA + 1
    manifest["checksum"] = manifest_checksum(manifest)  # a sound pack of a newer writer
    (pack / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageProblem, match="newer than this pytest-refract reads"):
        PackReader(pack, _match())


@pytest.mark.parametrize("over, words", [
    ({"model_sha256": "cd" * 32}, "another model"),
    ({"inputs": {"prompts": "33" * 32, "corpus": "22" * 32, "haystack": None}}, "other prompts"),
    ({"numerics": {"n_batch": 512, "n_ubatch": 256, "flash_attn": "auto", "decode_batch": 16}}, "n_ubatch=512"),
    ({"reference": "ctk=bf16,ctv=bf16"}, "reference config"),
    ({"control": "ctk=q8_0,ctv=q8_0"}, "sensitivity control"),
    ({"axes": {"rniah": {"lengths": [1024]}}}, "no rniah axis"),
    ({"axes": {"trajectory": {"n_predict": 32, "decode_batch": 16}}}, "trajectory axis was measured with"),
])
def test_a_pack_for_another_run_is_refused(tmp_path, over, words):
    pack = _write(tmp_path)
    with pytest.raises(UsageProblem, match=words) as exc:
        PackReader(pack, _match(**over))
    assert "\n" not in str(exc.value)


def test_a_subset_of_the_pack_is_fine(tmp_path):
    # A run of one axis, without a corpus, may read a pack of two.
    pack = _write(tmp_path)
    PackReader(pack, _match(axes={"kld": {"ctx": 64}}, inputs={"prompts": None, "corpus": "22" * 32})).close()


def test_save_never_writes_into_a_foreign_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UsageProblem, match="not a reference pack"):
        PackWriter(mine, _match())
    assert (mine / "notes.txt").read_text() == "keep me"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageProblem, match="is a file"):
        check_save_target(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_save_target(empty) == empty


def test_a_pack_is_replaced_but_not_while_a_session_reads_it(tmp_path):
    pack = _write(tmp_path)
    first = json.loads((pack / MANIFEST).read_text())["checksum"]
    reader = PackReader(pack, _match(), n_vocab=VOCAB)
    writer = PackWriter(pack, _match(), n_vocab=VOCAB)
    writer.cache.store("greedy", writer.cache.key("greedy", (9,), 1), {"tokens": np.asarray([1], dtype=np.int64)})
    with pytest.raises(UsageProblem, match="a running session reads that pack"):
        writer.finish({}, {}, "test")
    # The pack being read is untouched and still reads.
    assert json.loads((pack / MANIFEST).read_text())["checksum"] == first
    assert reader.cache.load("greedy", reader.cache.key("greedy", (1, 2), 4))["arrays"]["tokens"].tolist() == [3, 3, 1, 0]
    reader.close()
    # The new pack is left whole beside it, for the user to move into place.
    writer.discard()
    assert (writer.staging / MANIFEST).is_file()
    import shutil

    shutil.rmtree(writer.staging)
    # Once nobody reads it, a new save replaces it whole.
    writer = PackWriter(pack, _match(), n_vocab=VOCAB)
    writer.cache.store("greedy", writer.cache.key("greedy", (9,), 1), {"tokens": np.asarray([1], dtype=np.int64)})
    writer.finish({}, {}, "test")
    reader = PackReader(pack, _match(), n_vocab=VOCAB)
    assert reader.summary()["files"] == 1
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_an_entry_changed_after_verification_fails_its_item(tmp_path):
    pack = _write(tmp_path)
    reader = PackReader(pack, _match(), n_vocab=VOCAB)
    key = reader.cache.key("greedy", (1, 2), 4)
    entry = next(p for p in _files(pack) if "greedy" in str(p))
    raw = bytearray(entry.read_bytes())
    raw[-1] ^= 1
    entry.write_bytes(bytes(raw))
    with pytest.raises(MeasurementError, match="changed since the pack was verified"):
        reader.cache.load("greedy", key)
    reader.close()


def test_rows_in_the_stored_form_compare_to_exactly_zero():
    """The drift role's rows reach kld_positions as the reference stores them: the same bits
    on both sides give a KLD of exactly 0, where the live logits leave the 16-bit storage floor."""
    from pytest_refract.audit.drift import stored_form
    from pytest_refract.reference.codec import LogprobRows
    from pytest_refract.scoring.metrics import kld_positions

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(6, VOCAB)) * 3).astype(np.float32)
    reference = LogprobRows(sparse_logprobs(logits))
    tokens = list(range(6))
    exact = kld_positions(reference, stored_form(logits), tokens, ref_is_logprobs=True)
    assert (exact["kld"] == 0.0).all() and exact["same_top"].all()
    live = kld_positions(reference, logits, tokens, ref_is_logprobs=True)
    assert (live["kld"] != 0.0).any()
    # A different build's rows are still measured, not hidden.
    moved = kld_positions(reference, stored_form(logits + rng.normal(size=logits.shape).astype(np.float32) * 0.1),
                          tokens, ref_is_logprobs=True)
    assert (moved["kld"] > 0).all()
