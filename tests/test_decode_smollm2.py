"""The decode axis on the real SmolLM2-135M-Instruct through llama.cpp, as a user runs it:
a few seconds of one-token decodes (2 chunks x 8 positions); and, where llama.cpp was built
with GPU offload, the same on the GPU with what ran checked (marked gpu: skipped elsewhere)."""

from __future__ import annotations

import pytest

from conftest import read_report


def _run(pytester, model, candidate, *extra):
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={model}", f"--refract-candidate={candidate}", "--refract-axes=decode",
        "--refract-ctx=128", "--refract-chunks=2", "--refract-decode-chunks=2", "--refract-decode-window=8",
        "--refract-exhaustive", f"--refract-json={report}", "-p", "no:cacheprovider", *extra)
    return result, read_report(report)


@pytest.mark.smollm2
def test_decode_axis_on_smollm2(pytester, smollm2):
    result, data = _run(pytester, smollm2, "ctk=q8_0,ctv=q8_0")
    section = data["axes"]["decode"]
    assert section["n_chunks"] == 2 and section["n_positions"] == 16 and section["window"] == 8
    assert section["first_position"] == 64
    # q8_0 moves SmolLM2's next-token distributions a little, never by nothing or by a lot.
    assert 0 < section["mean_kld"] < 0.1 and 0 <= section["batched"]["mean_kld"] < 0.1
    # A healthy CPU build: the one-token path agrees with the batched one.
    assert section["decode_batched_disagree"] is False
    assert section["verdict"]["axis"] == "decode"
    assert data["sensitivity"]["axes"]["decode"]["n_chunks"] == 2
    ran = data["ran"]
    assert (ran["type_k"], ran["type_v"]) == ("q8_0", "q8_0") and ran["flash_attn"] in ("on", "off")
    assert ran["library"]["sha256"] and ran["library"]["path"]
    assert (data["reference_ran"]["type_k"], data["reference_ran"]["type_v"]) == ("f16", "f16")
    result.stdout.fnmatch_lines(["*ran      K q8_0 / V q8_0*", "decode *decode mean KLD*batched*"])


@pytest.mark.gpu
@pytest.mark.smollm2
def test_decode_axis_on_the_gpu(pytester, smollm2):
    """On a GPU build the one-token decode kernels are the GPU's: a q8_0 K / q4_0 V cache must
    run as asked, with its attention on the GPU and no K/V conversion to f16."""
    result, data = _run(pytester, smollm2, "ctk=q8_0,ctv=q4_0", "--refract-gpu-layers=99")
    assert data["settings"]["gpu_layers"] == 99 and "gpu_layers_note" not in data["settings"]
    ran = data["ran"]
    assert (ran["type_k"], ran["type_v"]) == ("q8_0", "q4_0")
    names = {n for w in ran["warnings"] for n in w["names"]}
    assert not names & {"attention_on_cpu", "kv_converted_to_f16", "cache_type_changed"}, ran["warnings"]
    section = data["axes"]["decode"]
    assert section["decode_batched_disagree"] is False, section["decode_vs_batched"]
    assert 0 < section["mean_kld"] < 0.5
