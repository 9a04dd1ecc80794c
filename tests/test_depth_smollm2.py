"""The depth axis on the real SmolLM2-135M-Instruct through llama.cpp, as a user runs it, at a
small depth (one chunk of 1024 tokens, stride 32: seconds): llama.cpp returns logits at the
scored positions only, every bucket has its figures, and the report says what it covers."""

from __future__ import annotations

import pytest
from conftest import read_report


@pytest.mark.smollm2
def test_depth_axis_on_smollm2(pytester, smollm2):
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={smollm2}", "--refract-candidate=ctk=q8_0,ctv=q4_0", "--refract-axes=depth",
        "--refract-depth=1024", "--refract-depth-stride=32", "--refract-chunks=1", "--refract-exhaustive",
        f"--refract-json={report}", "-p", "no:cacheprovider")
    data = read_report(report)
    section = data["axes"]["depth"]
    assert section["n_chunks"] == 1 and section["depth"] == 1024 and section["stride"] == 32
    buckets = section["buckets"]
    assert [(b["from"], b["to"]) for b in buckets] == [(256, 512), (512, 1024)]
    assert [b["positions"] for b in buckets] == [8, 16]
    for b in buckets:
        # q8_0 K / q4_0 V moves SmolLM2's distributions measurably, and more than bf16 does.
        assert 0 < b["mean_kld"] < 0.5 and b["control_mean_kld"] is not None
        assert b["kld_p999"] >= b["mean_kld"] and 0 < b["same_top_pct"] <= 100
    # One chunk decides nothing: no interval, no verdict beyond UNDECIDED.
    assert section["verdict"]["verdict"] == "UNDECIDED"
    assert data["context_evidence"]["tokens"] == 1024 and data["context_evidence"]["depth_axis"] is True
    result.stdout.fnmatch_lines(["*evidence up to 1024 tokens of context*", "*depth    256*512*"])
