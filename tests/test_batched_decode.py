"""Batched decoding (--refract-decode-batch): several prompts decoded together as separate
sequences. It must change speed only: same tokens, same scores, an exact floor, the cache
keyed by layout, and only the selected items decoded."""

from __future__ import annotations

import json

import pytest
from conftest import read_report, tiny_args


def _audit(pytester, model, prompts, corpus, name, *extra, candidate="ctk=q4_0,ctv=q4_0"):
    report = pytester.path / f"{name}.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(model, prompts, corpus, f"--refract-candidate={candidate}", f"--refract-json={report}",
                   "--refract-axes=trajectory,plad", *extra))
    return result, read_report(report)


def _items(report, axis, *keys):
    return {r["id"]: tuple(json.dumps(r.get(k)) for k in keys) for r in report["axes"][axis]["items"]}


def test_batched_and_serial_decode_give_the_same_results(pytester, tiny_model, tiny_prompts, tiny_corpus):
    _, serial = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "serial", "--refract-no-cache",
                       "--refract-decode-batch=1")
    _, batched = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "batched", "--refract-no-cache",
                        "--refract-decode-batch=16")
    assert serial["settings"]["decode_layout"]["sequences_per_batch"] == 1
    assert batched["settings"]["decode_layout"]["sequences_per_batch"] == 16
    assert batched["settings"]["decode_layout"]["axes"] == ["trajectory", "plad"]
    keys = ("ref_tokens", "cand_tokens", "prefix_agreement", "score")
    assert _items(batched, "trajectory", *keys) == _items(serial, "trajectory", *keys)
    assert _items(batched, "plad", "ref_drift", "cand_drift", "score") == _items(serial, "plad", "ref_drift", "cand_drift", "score")
    for b, s in zip(batched["axes"]["trajectory"]["items"], serial["axes"]["trajectory"]["items"]):
        # This tiny model's f32 matmuls round differently for several rows (test_engine), and a
        # reference row that moves by an ulp can move a 16-bit step: equal to 1%, not bit for bit.
        assert b["teacher_forced_kld"] == pytest.approx(s["teacher_forced_kld"], rel=1e-2, abs=1e-9)
    assert batched["composite"] == pytest.approx(serial["composite"], abs=1e-9)
    # The decode steps really were shared: fewer llama_decode calls than tokens decoded.
    compute = batched["axes"]["trajectory"]["compute"]["cand0"]
    assert compute["decode_tokens"] == 0 and compute["seq_decode_tokens"] > 2 * compute["seq_decode_steps"]
    assert serial["axes"]["trajectory"]["compute"]["cand0"]["seq_decode_tokens"] == 0
    # KV memory held at once: serial, one 256-cell context per role (f16 512 B/token, q4_0 144,
    # the bf16 sensitivity control 512); batched, one 256-cell stream per sequence for every
    # role, so a whole multiple of that.
    per_context = 256 * (512 + 144 + 512)
    assert serial["kv_cache_bytes_peak"] == per_context
    assert batched["kv_cache_bytes_peak"] % per_context == 0 and batched["kv_cache_bytes_peak"] >= 3 * per_context


def test_batched_floor_is_exactly_100(pytester, tiny_model, tiny_prompts, tiny_corpus):
    _, report = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "floor", "--refract-no-cache", "--refract-floor")
    assert report["settings"]["decode_layout"]["sequences_per_batch"] > 1
    assert report["axes"]["trajectory"]["floor_score"] == 100.0
    assert report["axes"]["plad"]["floor_score"] == 100.0
    assert all(r["floor"]["teacher_forced_kld"] == 0.0 for r in report["axes"]["trajectory"]["items"])


def test_a_batch_holds_only_selected_items(pytester, tiny_model, tiny_prompts, tiny_corpus):
    _, one = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "one", "--refract-no-cache", "-k",
                    "trajectory and code-001")
    _, serial = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "one-serial", "--refract-no-cache",
                       "--refract-decode-batch=1", "-k", "trajectory and code-001")
    assert [r["id"] for r in one["axes"]["trajectory"]["items"]] == ["code-001"]
    ref = one["axes"]["trajectory"]["compute"]["reference"]
    # Only code-001's prompt was evaluated and decoded, as in a serial run of that one item: a
    # batch of one is decoded one sequence at a time, and counted so.
    assert ref == serial["axes"]["trajectory"]["compute"]["reference"]
    assert ref["decode_tokens"] == one["axes"]["trajectory"]["items"][0]["ref_len"] - 1
    assert ref["seq_decode_tokens"] == 0


def test_cache_is_keyed_by_layout(pytester, tiny_model, tiny_prompts, tiny_corpus):
    cache = pytester.path / "cache"
    _, cold = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "cold", f"--refract-cache-dir={cache}")
    _, warm = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "warm", f"--refract-cache-dir={cache}",
                     candidate="ctk=q8_0,ctv=q8_0")
    # All from the cache, but for the cache's spot check, which may compute one cached trajectory
    # batch again (its seed is fresh every run).
    checked = {c["kind"] for c in warm["reference_cache"]["spot_check"]["reference_checked"]}
    if "trajectory" not in checked:
        assert warm["axes"]["trajectory"]["compute"].get("reference") is None
    assert warm["reference_cache"]["misses"] == 0
    _, other = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "serial", f"--refract-cache-dir={cache}",
                      "--refract-decode-batch=1", candidate="ctk=q8_0,ctv=q8_0")
    # Entries decoded in a batch are not served to one-at-a-time decoding, which recomputes.
    assert other["axes"]["trajectory"]["compute"]["reference"]["decode_tokens"] > 0
    assert _items(other, "trajectory", "ref_tokens") == _items(cold, "trajectory", "ref_tokens")


def test_xdist_keeps_a_batch_on_one_worker_or_decodes_serially(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytest.importorskip("xdist")
    _, serial = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "s", "--refract-no-cache")
    _, grouped = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "g", "--refract-no-cache", "-n", "2",
                        "--dist", "loadgroup")
    _, spread = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "l", "--refract-no-cache", "-n", "2",
                       "--dist", "load")
    assert grouped["settings"]["decode_layout"]["sequences_per_batch"] == 16
    assert grouped["composite"] == serial["composite"]
    assert _items(grouped, "trajectory", "cand_tokens") == _items(serial, "trajectory", "cand_tokens")
    layout = spread["settings"]["decode_layout"]
    assert layout["sequences_per_batch"] == 1 and "loadgroup" in layout["note"]


def test_decode_batch_must_be_positive(pytester, tiny_model, tiny_prompts, tiny_corpus):
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-decode-batch=0"))
    assert result.ret == 4
    result.stderr.fnmatch_lines(["ERROR: --refract-decode-batch=0 must be at least 1"])


def test_batch_time_is_shared_out_to_every_item_and_candidate(pytester, tiny_model, tiny_prompts, tiny_corpus):
    # One item measures its whole batch; each item's wall_s must still be its own share, so a
    # matrix's second candidate does not read as free (it used to show 0.0 s).
    _, report = _audit(pytester, tiny_model, tiny_prompts, tiny_corpus, "matrix", "--refract-no-cache",
                       "--refract-candidate=ctk=q8_0,ctv=q8_0")
    sections = report["candidates"]
    assert len(sections) == 2
    for section in sections:
        for axis in ("trajectory", "plad"):
            items = [r for r in section["axes"][axis]["items"] if not r.get("skipped")]
            assert items and all(r["wall_s"] > 0 for r in items), (section["candidate"], axis)
            # Shares of one batch are equal across its items, to float rounding.
            shares = [r["wall_s"] for r in items]
            assert max(shares) < 3 * min(shares), (section["candidate"], axis, shares)
