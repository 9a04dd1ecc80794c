"""Candidate matrix: several candidates, one reference, ranked, each gated."""

from __future__ import annotations

import pytest
from conftest import read_report, tiny_args


def _matrix(model, prompts, corpus, *extra):
    return tiny_args(model, prompts, corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0",
                     "--refract-candidate=ctk=q4_0,ctv=q4_0", *extra)


def test_matrix_ids_and_collection(pytester, tiny_model, tiny_prompts, tiny_corpus):
    out = pytester.runpytest_subprocess(*_matrix(tiny_model, tiny_prompts, tiny_corpus), "--collect-only", "-q").stdout.str()
    assert "test_kld[q8_0-q8_0-chunk-00]" in out and "test_kld[q4_0-q4_0-chunk-00]" in out
    assert "test_trajectory[q4_0-q4_0-fact-001]" in out
    one = pytester.runpytest_subprocess(*_matrix(tiny_model, tiny_prompts, tiny_corpus), "--collect-only", "-q",
                                        "-k", "q4_0-q4_0 and kld").stdout.str()
    assert "test_kld[q4_0-q4_0-chunk-02]" in one and "q8_0-q8_0" not in one


def test_matrix_shares_one_reference_and_ranks(pytester, tiny_model, tiny_prompts, tiny_corpus):
    single = pytester.path / "single.json"
    pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0",
                                             "--refract-no-cache", f"--refract-json={single}"))
    matrix = pytester.path / "matrix.json"
    result = pytester.runpytest_subprocess(*_matrix(tiny_model, tiny_prompts, tiny_corpus, "--refract-no-cache",
                                                    f"--refract-json={matrix}"))
    a, m = read_report(single), read_report(matrix)
    labels = [c["candidate"] for c in m["candidates"]]
    assert labels == ["ctk=q8_0,ctv=q8_0", "ctk=q4_0,ctv=q4_0"]
    q4 = m["candidates"][1]
    # Same numbers as the single-candidate run: the shared reference changes nothing.
    assert q4["composite"] == a["composite"]
    assert q4["axes"]["kld"]["mean_kld"] == a["axes"]["kld"]["mean_kld"]
    # The reference ran once per unit: its tokens equal a single run's, not twice that.
    for axis in ("trajectory", "kld"):
        ref_tokens = sum(c["axes"][axis]["compute"].get("reference", {}).get("batch_tokens", 0) for c in m["candidates"])
        assert ref_tokens == a["axes"][axis]["compute"]["reference"]["batch_tokens"]
    ranked = [r["candidate"] for r in m["ranking"]]
    assert set(ranked) == set(labels)
    # Ranked by what the gate reads, the verdict: PASSing candidates from the smallest KV cache
    # up, then the rest (UNDECIDED before FAIL) by verdict score.
    order = {"PASS": 0, "UNDECIDED": 1, "FAIL": 2}
    verdicts = [order[r["verdict"]] for r in m["ranking"]]
    assert verdicts == sorted(verdicts)
    passing = [r["kv_bytes_per_token"] for r in m["ranking"] if r["verdict"] == "PASS"]
    assert passing == sorted(passing)
    rest = [r["verdict_score"] for r in m["ranking"] if r["verdict"] == "UNDECIDED"]
    assert rest == sorted(rest, reverse=True)
    result.stdout.fnmatch_lines(["*which config to ship*",
                                 "*candidate*verdict*KV bytes/token*pareto*raw composite (REFRACT-comparable, not the verdict)",
                                 "*1  ctk=*"])
    # KV bytes per token, worked out by hand for the tiny model (2 layers, 2 KV heads of 32):
    # a 64-wide row is 128 B in f16, 2 x 34 B in q8_0, 2 x 18 B in q4_0; K and V per layer.
    assert m["reference_kv_bytes_per_token"] == 2 * (128 + 128)
    assert m["candidates"][0]["kv_cache"] == {"bytes_per_token": 2 * (68 + 68), "vs_reference": 272 / 512}
    assert m["candidates"][1]["kv_cache"] == {"bytes_per_token": 2 * (36 + 36), "vs_reference": 144 / 512}
    assert {r["candidate"]: r["kv_vs_reference"] for r in m["ranking"]} == {labels[0]: 272 / 512, labels[1]: 144 / 512}


def test_gate_applies_to_each_candidate(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*tiny_args(
        tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=f16,ctv=f16",
        "--refract-candidate=ctk=q4_0,ctv=q4_0", "--refract-fail-under=99.99", "--refract-gate=raw",
        f"--refract-json={report}"))
    data = read_report(report)
    assert data["candidates"][0]["gate"]["passed"] is True  # the self-reference
    assert data["candidates"][1]["gate"]["passed"] is False
    assert data["gate"]["passed"] is False and result.ret == 1
    assert data["gate"]["reasons"][0].startswith("ctk=q4_0,ctv=q4_0: composite")


def test_fixture_is_parametrized_over_candidates(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytester.makepyfile(test_mine="""
        def test_greedy(refract):
            r = refract.greedy("hello world the end", n_predict=4)
            refract.gate("mine", r.score)
    """)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(*_matrix(tiny_model, tiny_prompts, tiny_corpus, "--refract-axes=none",
                                                    f"--refract-json={report}"), "test_mine.py", "-v")
    result.stdout.fnmatch_lines(["*test_greedy[[]q8_0-q8_0[]] PASSED*", "*test_greedy[[]q4_0-q4_0[]] PASSED*"])
    data = read_report(report)
    assert {c["candidate"] for c in data["candidates"]} == {"ctk=q8_0,ctv=q8_0", "ctk=q4_0,ctv=q4_0"}
    by_candidate = {m["candidate"]: m["metrics"]["score"] for m in data["custom"]["measurements"] if m["kind"] == "gate"}
    assert set(by_candidate) == {"ctk=q8_0,ctv=q8_0", "ctk=q4_0,ctv=q4_0"}
    # Each candidate's composite is its own gated score: the matrix keeps them apart.
    for section in data["candidates"]:
        assert section["composite"] == pytest.approx(by_candidate[section["candidate"]])


def test_duplicate_candidate_is_a_usage_error(pytester, tiny_model, tiny_prompts, tiny_corpus):
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus,
                                                      "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                      "--refract-candidate=ctv=q8_0,ctk=q8_0"))
    assert result.ret == 4
    result.stderr.fnmatch_lines(["ERROR: --refract-candidate ctk=q8_0,ctv=q8_0 is given twice (as ctk=q8_0,ctv=q8_0 and "
                                 "ctv=q8_0,ctk=q8_0)"])


def test_matrix_under_xdist_loadgroup_matches_serial(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytest.importorskip("xdist")
    serial, parallel = pytester.path / "s.json", pytester.path / "p.json"
    pytester.runpytest_subprocess(*_matrix(tiny_model, tiny_prompts, tiny_corpus, "--refract-no-cache",
                                           f"--refract-json={serial}"))
    pytester.runpytest_subprocess(*_matrix(tiny_model, tiny_prompts, tiny_corpus, "--refract-no-cache",
                                           f"--refract-json={parallel}"), "-n", "2", "--dist", "loadgroup")
    s, p = read_report(serial), read_report(parallel)
    assert [c["composite"] for c in p["candidates"]] == [c["composite"] for c in s["candidates"]]
