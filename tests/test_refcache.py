"""The reference cache: 16-bit storage, integrity checks, and warm runs that agree with cold ones."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pytest

from conftest import read_report, tiny_args

from pytest_refract.reference.codec import (
    CompressedRows,
    LogprobRows,
    check_sparse,
    concat_quantized,
    dense_q,
    dequantize_logprobs,
    quantize_logprobs,
    sparse_logprobs,
    sparsify,
)
from pytest_refract.reference.entries import ReferenceCache
from pytest_refract.reference.folder import RefCacheWarning
from pytest_refract.reference.model_index import model_identity
from pytest_refract.scoring.metrics import kld_positions


def test_quantized_logprobs_follow_llama_perplexity_layout():
    logits = np.array([[2.0, 1.0, -30.0, 0.5]], dtype=np.float32)
    q = quantize_logprobs(logits)
    lse = math.log(sum(math.exp(x - 2.0) for x in (2.0, 1.0, -30.0, 0.5)))
    min_logit = max(-30.0, 2.0 - 16.0)
    assert q["min_log_prob"][0] == pytest.approx(min_logit - 2.0 - lse, rel=1e-6)
    assert q["scale"][0] == pytest.approx((2.0 - min_logit) / 65535, rel=1e-6)
    assert q["q"][0, 2] == 0  # below max - 16: clamped to the minimum
    assert q["q"][0, 0] == 65535
    lp = dequantize_logprobs(q)[0]
    assert lp[0] == pytest.approx(-lse, abs=1e-3)
    assert lp[1] == pytest.approx(1.0 - 2.0 - lse, abs=1e-3)


def test_kld_against_16bit_reference_is_within_half_a_percent():
    rng = np.random.RandomState(0)
    ref = rng.normal(0, 3, size=(64, 500)).astype(np.float32)
    cand = ref + rng.normal(0, 0.3, size=ref.shape).astype(np.float32)
    toks = rng.randint(0, 500, size=64)
    exact = kld_positions(ref, cand, toks)["kld"].mean()
    stored = kld_positions(dequantize_logprobs(quantize_logprobs(ref)), cand, toks, ref_is_logprobs=True)["kld"].mean()
    assert exact > 0.01
    assert stored == pytest.approx(exact, rel=0.005)


def test_store_load_roundtrip_and_corruption_detection(tmp_path):
    # A kind without a content schema (see cache.check_entry): any arrays round-trip.
    cache = ReferenceCache(tmp_path, {"model": "x"})
    key = cache.key("scratch", [1, 2, 3])
    assert cache.load("scratch", key) is None and cache.misses == 1
    cache.store("scratch", key, {"a": np.arange(10)}, {"note": "hi"})
    entry = cache.load("scratch", key)
    assert entry["meta"] == {"note": "hi"} and entry["arrays"]["a"].tolist() == list(range(10))
    assert cache.hits == 1
    mixed = {"q": np.arange(12, dtype=np.uint16).reshape(3, 4), "scale": np.array([0.5, 1.5, 2.5], dtype=np.float32),
             "tokens": np.array([7, -1], dtype=np.int64), "empty": np.zeros((0, 4), dtype=np.float32)}
    cache.store("scratch", key, mixed)
    back = cache.load("scratch", key)["arrays"]
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v) for k, v in mixed.items())
    path = next((tmp_path / cache.namespace / "scratch").iterdir())
    damages = [
        (lambda b: b[:-7], "checksum mismatch"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "checksum mismatch"),  # last payload byte
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:12], "truncated header"),
    ]
    for damage, why in damages:
        cache.store("scratch", key, {"a": np.arange(10)})
        path.write_bytes(damage(path.read_bytes()))
        with pytest.warns(RefCacheWarning, match=f"rejected \\({why}"):
            assert cache.load("scratch", key) is None
        assert not path.exists()  # a bad entry is removed, then recomputed by the caller
    other = cache.key("scratch", [1, 2, 4])
    cache.store("scratch", key, {"a": np.arange(3)})
    path.rename(path.with_name(f"{other[:40]}.rfc"))  # an entry under the wrong key
    with pytest.warns(RefCacheWarning, match="another key"):
        assert cache.load("scratch", other) is None


def test_keys_depend_on_identity_and_content(tmp_path):
    a = ReferenceCache(tmp_path, {"model": "x", "reference": "ctk=f16,ctv=f16"})
    b = ReferenceCache(tmp_path, {"model": "x", "reference": "ctk=bf16,ctv=bf16"})
    assert a.namespace != b.namespace
    assert a.key("kld", [1, 2]) != a.key("kld", [1, 3]) != a.key("trajectory", [1, 2])


def _run(pytester, model, prompts, corpus, candidate, cache_dir, name, *extra):
    report = pytester.path / f"{name}.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(model, prompts, corpus, f"--refract-candidate={candidate}", f"--refract-cache-dir={cache_dir}",
                   f"--refract-json={report}", "--refract-axes=trajectory,kld,rniah,plad", "--refract-rniah-lengths=128",
                   "--refract-rniah-positions=0.5", "--refract-rniah-trials=1", *extra))
    return result, read_report(report)


def _numbers(report):
    return {name: {k: v for k, v in a.items() if k not in ("wall_s", "compute", "items", "cells")}
            for name, a in report["axes"].items()}


def test_warm_run_matches_cold_and_skips_the_reference(pytester, tiny_model, tiny_prompts, tiny_corpus):
    cache = pytester.path / "cache"
    _, cold = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "cold")
    assert cold["reference_cache"]["hits"] == 0 and cold["reference_cache"]["misses"] > 0
    _, warm = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "warm")
    assert warm["reference_cache"]["misses"] == 0 and warm["reference_cache"]["hits"] > 0
    assert _numbers(warm) == _numbers(cold) and warm["composite"] == cold["composite"]
    # The cache's cost is stated: the cold run wrote every entry the folder holds, the warm
    # run wrote nothing and read them.
    on_disk = sum(p.stat().st_size for p in cache.rglob("*.rfc"))
    assert cold["reference_cache"]["bytes_written"] == on_disk == cold["reference_cache"]["folder_bytes"] > 0
    assert cold["reference_cache"]["bytes_read"] == 0
    assert warm["reference_cache"]["bytes_written"] == 0 and 0 < warm["reference_cache"]["bytes_read"] <= on_disk
    assert warm["reference_cache"]["folder_bytes"] == on_disk
    # The reference did not run at all, but for the cache's spot check (one cached read per kind
    # computed again; test_safety_gate.py).
    checked = {c["kind"] for c in warm["reference_cache"]["spot_check"]["reference_checked"]}
    for name, section in warm["axes"].items():
        ref = (section.get("compute") or {}).get("reference", {"batch_tokens": 0, "decode_tokens": 0})
        if name not in checked:
            assert ref == {"batch_tokens": 0, "decode_tokens": 0}
    # Another candidate, same reference: served from the cache as well.
    _, other = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q8_0,ctv=q8_0", cache, "other")
    assert other["reference_cache"]["misses"] == 0


def test_corrupt_entry_is_recomputed_with_a_warning(pytester, tiny_model, tiny_prompts, tiny_corpus):
    cache = pytester.path / "cache"
    _, cold = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "cold")
    victim = max(cache.rglob("*.rfc"), key=lambda p: p.stat().st_size)  # a KLD entry
    victim.write_bytes(victim.read_bytes()[:-100])
    result, warm = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "warm")
    result.stdout.fnmatch_lines(["*RefCacheWarning: reference cache entry * rejected (checksum mismatch*"])
    assert warm["reference_cache"]["misses"] == 1
    assert _numbers(warm) == _numbers(cold)


def test_no_cache_and_clear_cache(pytester, tiny_model, tiny_prompts, tiny_corpus):
    cache = pytester.path / "cache"
    _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "a", "--refract-no-cache")
    assert not cache.exists()
    _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "b")
    assert any(cache.rglob("*.rfc"))
    _, cleared = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "c",
                      "--refract-clear-cache")
    assert cleared["reference_cache"]["hits"] == 0


def test_logprob_rows_dequantize_slices_exactly_like_the_whole():
    rng = np.random.RandomState(3)
    stored = quantize_logprobs(rng.normal(0, 4, size=(70, 300)).astype(np.float32))
    rows = LogprobRows(concat_quantized([{k: v[:30] for k, v in stored.items()}, {k: v[30:] for k, v in stored.items()}]))
    whole = dequantize_logprobs(stored)
    assert rows.shape == (70, 300) and len(rows) == 70
    assert np.array_equal(np.asarray(rows[5:41]), whole[5:41]) and rows[5:41].shape == (36, 300)
    assert np.array_equal(np.asarray(rows[40:70][2:4]), whole[42:44])
    cand = rng.normal(0, 4, size=(70, 300)).astype(np.float32)
    toks = rng.randint(0, 300, size=70)
    a = kld_positions(rows, cand, toks, ref_is_logprobs=True)
    b = kld_positions(whole, cand, toks, ref_is_logprobs=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError):
        rows[3]


def test_compressed_rows_hold_exactly_the_16bit_rows():
    rng = np.random.RandomState(5)
    logits = rng.normal(0, 4, size=(9, 300)).astype(np.float32)
    rows = CompressedRows(300)
    for row in logits:
        rows.append_logits(row)
    whole = quantize_logprobs(logits)
    assert rows.shape == (9, 300) and len(rows) == 9
    kept = rows.stored()
    assert np.array_equal(dense_q(kept), whole["q"])
    assert np.array_equal(kept["scale"], whole["scale"]) and np.array_equal(kept["min_log_prob"], whole["min_log_prob"])
    assert np.array_equal(np.asarray(rows[2:5]), dequantize_logprobs(whole)[2:5])


@pytest.mark.parametrize("size", [10, (1 << 20) - 1, (3 << 20) + 12345])
def test_model_identity_value_is_pinned(tmp_path, size):
    """The cache namespace hashes this identity: any change to its value invalidates every
    user's cache, so it is pinned: the size and the sha256 of every byte of the file (issue
    22: the first, middle and last MiB it used to sample missed edits elsewhere), or no hash
    without a cache folder to remember it in."""
    data = os.urandom(size)
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    folder = tmp_path / "cache"
    folder.mkdir()
    assert model_identity(path, folder) == {"size": size, "sha256": hashlib.sha256(data).hexdigest()}
    assert model_identity(path) == {"size": size, "sha256": None}

# --------------------------------------------------------------------------- sparse rows


def _rows_like_a_large_vocabulary(rng, n, vocab):
    """Logits with a long low tail (most entries far below max - 16, as a trained model's), some
    rows flat enough that every entry is kept, and exact ties for the maximum."""
    x = rng.normal(-25, 6, size=(n, vocab)).astype(np.float32)
    x[:, rng.randint(0, vocab, size=20)] += 25
    x[0] = rng.normal(0, 1, size=vocab)  # all within 16 nats: only the minimum is 0
    x[1, :3] = x[1].max() + 1  # a tie for the top entry
    return x


@pytest.mark.parametrize("vocab", [300, 70001])
def test_sparse_rows_rebuild_llama_perplexitys_rows_bit_for_bit(vocab):
    rng = np.random.RandomState(11)
    x = _rows_like_a_large_vocabulary(rng, 40, vocab)
    dense = quantize_logprobs(x)
    sparse = sparse_logprobs(x, block=7)  # blocks that do not divide the rows
    check_sparse(sparse)
    assert np.array_equal(dense_q(sparse), dense["q"])
    assert np.array_equal(dequantize_logprobs(sparse), dequantize_logprobs(dense))
    assert sparse["col"].dtype == np.uint32 and sparse["val"].dtype == np.uint16
    assert (sparse["val"] > 0).all()
    if vocab > 1000:
        assert len(sparse["col"]) < 0.2 * x.size  # the point of it: far fewer entries kept
    # Every statistic, on every slice (KLD, Δp, same-top, NLL for PPL), is the dense one.
    cand = x + rng.normal(0, 0.3, size=x.shape).astype(np.float32)
    toks = rng.randint(0, vocab, size=len(x))
    a = kld_positions(LogprobRows(sparse), cand, toks, ref_is_logprobs=True)
    b = kld_positions(LogprobRows(dense), cand, toks, ref_is_logprobs=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    rows = LogprobRows(sparse)
    assert rows.shape == (40, vocab)
    assert np.array_equal(np.asarray(rows[5:33][3:9]), dequantize_logprobs(dense)[8:14])
    assert np.asarray(rows[9:9]).shape == (0, vocab)


def test_sparse_concat_equals_sparse_of_the_whole():
    rng = np.random.RandomState(2)
    x = _rows_like_a_large_vocabulary(rng, 23, 500)
    parts = [sparsify(quantize_logprobs(x[:10])), sparsify(quantize_logprobs(x[10:11])), sparsify(quantize_logprobs(x[11:]))]
    joined, whole = concat_quantized(parts), sparsify(quantize_logprobs(x))
    assert all(np.array_equal(joined[k], whole[k]) for k in whole)


@pytest.mark.parametrize("damage", ["ptr_start", "ptr_end", "ptr_down", "col_range", "no_vocab", "rows"])
def test_malformed_sparse_entries_are_rejected(damage):
    s = dict(sparse_logprobs(_rows_like_a_large_vocabulary(np.random.RandomState(1), 6, 400)))
    if damage == "ptr_start":
        s["row_ptr"] = s["row_ptr"] + 1
    elif damage == "ptr_end":
        s["row_ptr"] = np.concatenate([s["row_ptr"][:-1], [len(s["col"]) + 5]])
    elif damage == "ptr_down":
        s["row_ptr"] = s["row_ptr"].copy()
        s["row_ptr"][2], s["row_ptr"][3] = s["row_ptr"][3], s["row_ptr"][2] - 1
    elif damage == "col_range":
        s["col"] = s["col"].copy()
        s["col"][0] = 400
    elif damage == "no_vocab":
        del s["n_vocab"]
    else:
        s["scale"] = s["scale"][:-1]
    with pytest.raises(ValueError):
        check_sparse(s)


def test_sparse_entry_survives_the_disk_and_a_damaged_one_is_not_used(tmp_path):
    rng = np.random.RandomState(4)
    stored = sparse_logprobs(_rows_like_a_large_vocabulary(rng, 12, 3000))
    cache = ReferenceCache(tmp_path, {"model": "m"})
    key = cache.key("kld", [1, 2, 3])
    cache.store("kld", key, stored)
    back = cache.load("kld", key)["arrays"]
    assert all(np.array_equal(back[k], stored[k]) for k in stored)
    assert np.array_equal(np.asarray(LogprobRows(back)), dequantize_logprobs(stored))


def test_compact_keeps_whichever_form_is_smaller_and_the_same_floats():
    from pytest_refract.reference.codec import compact, is_sparse

    rng = np.random.RandomState(8)
    tail = sparse_logprobs(_rows_like_a_large_vocabulary(rng, 8, 5000))  # few entries kept
    flat = sparse_logprobs(rng.normal(0, 1, size=(8, 5000)).astype(np.float32))  # nearly all kept
    assert is_sparse(compact(tail)) and not is_sparse(compact(flat))
    for s in (tail, flat):
        assert np.array_equal(dequantize_logprobs(compact(s)), dequantize_logprobs(s))


def test_column_gaps_on_disk_round_trip_with_empty_rows():
    from pytest_refract.reference.codec import decode_payload, encode_payload

    rng = np.random.RandomState(9)
    x = _rows_like_a_large_vocabulary(rng, 10, 4000)
    stored = sparse_logprobs(x)
    # Rows with no entry at all (a row flat at its minimum keeps nothing).
    flat = sparsify({"q": np.zeros((2, 4000), dtype=np.uint16), "scale": np.zeros(2, np.float32),
                     "min_log_prob": np.zeros(2, np.float32)})
    for s in (stored, concat_quantized([flat, stored, flat]), flat):
        disk = encode_payload(s)
        assert "col" not in disk or not len(s["col"])
        back = decode_payload(dict(disk))
        assert all(np.array_equal(back[k], s[k]) and back[k].dtype == s[k].dtype for k in s)
