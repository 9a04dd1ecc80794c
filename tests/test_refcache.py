"""The reference cache: 16-bit storage, integrity checks, and warm runs that agree with cold ones."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import read_report
from test_plugin_tiny import _args

from pytest_refract.refcache import ReferenceCache, RefCacheWarning, dequantize_logprobs, quantize_logprobs
from pytest_refract.scoring import kld_positions


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
    cache = ReferenceCache(tmp_path, {"model": "x"})
    key = cache.key("kld", [1, 2, 3])
    assert cache.load("kld", key) is None and cache.misses == 1
    cache.store("kld", key, {"a": np.arange(10)}, {"note": "hi"})
    entry = cache.load("kld", key)
    assert entry["meta"] == {"note": "hi"} and entry["arrays"]["a"].tolist() == list(range(10))
    assert cache.hits == 1
    path = next((tmp_path / cache.namespace / "kld").iterdir())
    for damage in (lambda b: b[:-7], lambda b: b[:40] + bytes([b[40] ^ 0xFF]) + b[41:], lambda b: b"XXXX" + b[4:]):
        cache.store("kld", key, {"a": np.arange(10)})
        path.write_bytes(damage(path.read_bytes()))
        with pytest.warns(RefCacheWarning, match="rejected"):
            assert cache.load("kld", key) is None
        assert not path.exists()  # a bad entry is removed, then recomputed by the caller
    other = cache.key("kld", [1, 2, 4])
    cache.store("kld", key, {"a": np.arange(3)})
    path.rename(path.with_name(f"{other[:40]}.rfc"))  # an entry under the wrong key
    with pytest.warns(RefCacheWarning, match="another key"):
        assert cache.load("kld", other) is None


def test_keys_depend_on_identity_and_content(tmp_path):
    a = ReferenceCache(tmp_path, {"model": "x", "reference": "ctk=f16,ctv=f16"})
    b = ReferenceCache(tmp_path, {"model": "x", "reference": "ctk=bf16,ctv=bf16"})
    assert a.namespace != b.namespace
    assert a.key("kld", [1, 2]) != a.key("kld", [1, 3]) != a.key("trajectory", [1, 2])


def _run(pytester, model, prompts, corpus, candidate, cache_dir, name, *extra):
    report = pytester.path / f"{name}.json"
    result = pytester.runpytest_subprocess(
        *_args(model, prompts, corpus, f"--refract-candidate={candidate}", f"--refract-cache-dir={cache_dir}",
               f"--refract-json={report}", "--refract-full", "--refract-rniah-lengths=128",
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
    for section in warm["axes"].values():
        ref = section["compute"].get("reference", {"batch_tokens": 0, "decode_tokens": 0})
        assert ref == {"batch_tokens": 0, "decode_tokens": 0}  # the reference did not run at all
    # Another candidate, same reference: served from the cache as well.
    _, other = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q8_0,ctv=q8_0", cache, "other")
    assert other["reference_cache"]["misses"] == 0


def test_corrupt_entry_is_recomputed_with_a_warning(pytester, tiny_model, tiny_prompts, tiny_corpus):
    cache = pytester.path / "cache"
    _, cold = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "ctk=q4_0,ctv=q4_0", cache, "cold")
    entries = sorted(cache.rglob("*.rfc"))
    victim = entries[0]
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
