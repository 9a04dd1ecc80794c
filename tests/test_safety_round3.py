"""Issue 22: nothing faked, nothing lost, round 3. A tampered cache, a substituted cache type
or a degenerate model never passes; device files are never replaced; no input crashes, hangs
or exhausts memory. Each test here failed on the code before its fix."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st

import fake_engine
from pytest_refract.reference.cache import RefCacheWarning, ReferenceCache, check_entry, prepare_cache_dir
from test_runner_fake import _run, _settings


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
