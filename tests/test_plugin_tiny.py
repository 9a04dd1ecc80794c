"""The plugin as users run it (pytester, subprocess), on a tiny random-weight model: fast
enough to cover every flag path. Real-model behaviour is in test_smollm2.py."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from conftest import one_usage_error_line, read_report, tiny_args
from tiny_model import write_tiny_llama


def test_without_model_the_plugin_adds_nothing(pytester):
    result = pytester.runpytest_subprocess()
    assert result.ret == 5  # no tests: nothing was added
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pytest_refract.plugin; print('llama_cpp' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "False"


def test_collect_only_lists_items_by_axis_and_unit(pytester, tiny_model, tiny_prompts, tiny_corpus):
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0"), "--collect-only", "-q"
    )
    assert result.ret == 0
    out = result.stdout.str()
    for item in ("test_trajectory[fact-001]", "test_trajectory[code-001]", "test_kld[chunk-00]", "test_kld[chunk-02]"):
        assert item in out
    assert "test_kld[chunk-03]" not in out
    assert "refract KV-cache audit" not in out  # nothing was measured


def test_self_reference_scores_100_within_the_storage_floor(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=f16,ctv=f16", f"--refract-json={report}"),
    )
    result.assert_outcomes(passed=6)
    assert result.ret == 0
    data = read_report(report)
    assert data["schema"] == "pytest-refract.report.v3"
    # Greedy decoding is the same computation twice, so trajectory is exactly 100. Candidates are
    # compared with the reference's 16-bit log-probs (llama-perplexity's base format), so the
    # KLD is not exactly 0 but within that storage floor (~1e-7 nats), and the KLD score and
    # the composite within 100 x exp(-1e-5) of 100.
    assert data["self_reference"] is True
    assert data["axes"]["trajectory"]["score"] == 100.0
    assert abs(data["axes"]["kld"]["mean_kld"]) < 1e-5
    floor = 100.0 * math.exp(-1e-5)
    assert floor <= data["axes"]["kld"]["score"] <= 100.0
    assert floor <= data["composite"] <= 100.0 and data["band"] == "EXCELLENT"
    assert data["axes"]["kld"]["same_top_p_pct"] == 100.0
    assert data["axes"]["kld"]["n_chunks"] == 3
    assert data["axes"]["kld"]["n_positions"] == 3 * (64 - 1 - 32)
    assert data["floor"] is None
    result.stdout.fnmatch_lines(["composite  100.00*", "*gate: passed*"])  # a raw reference figure: no band beside the verdict


def test_keyword_selection_runs_only_that_axis(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0", f"--refract-json={report}"),
        "-k", "kld", "-v",
    )
    result.assert_outcomes(passed=3, deselected=3)
    assert set(read_report(report)["axes"]) == {"kld"}
    result.stdout.fnmatch_lines(["*test_kld[[]chunk-00[]] PASSED * *"])


def test_keyword_selects_trajectory_category(pytester, tiny_model, tiny_prompts, tiny_corpus):
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0"),
        "-k", "trajectory and code", "--collect-only", "-q",
    )
    out = result.stdout.str()
    assert "test_trajectory[code-001]" in out
    assert "test_trajectory[fact-001]" not in out and "test_kld" not in out


def test_floor_is_exactly_100_on_cpu(pytester, tiny_model, tiny_prompts, tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0", "--refract-floor",
                   f"--refract-json={report}"),
    )
    data = read_report(report)
    assert data["floor"] == 100.0
    assert data["axes"]["kld"]["floor_score"] == 100.0
    assert data["axes"]["trajectory"]["floor_score"] == 100.0
    assert any("Noise floor" in line for line in data["diagnosis"])
    assert result.ret in (0, 1)


def test_xdist_gives_the_serial_composite(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytest.importorskip("xdist")
    serial, parallel = pytester.path / "serial.json", pytester.path / "parallel.json"
    base = tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0")
    pytester.runpytest_subprocess(*base, f"--refract-json={serial}")
    result = pytester.runpytest_subprocess(*base, f"--refract-json={parallel}", "-n", "2")
    a, b = read_report(serial), read_report(parallel)
    assert a["composite"] is not None
    assert b["composite"] == a["composite"]
    assert b["axes"]["kld"]["mean_kld"] == a["axes"]["kld"]["mean_kld"]
    assert b["sensitivity"]["composite"] == a["sensitivity"]["composite"]  # the control too, across workers
    assert b["verdict"] == a["verdict"]
    assert result.ret == (0 if a["gate"]["passed"] else 1)


def test_gate_uses_fail_under_number(pytester, tiny_model, tiny_prompts, tiny_corpus):
    # Self-reference scores 100; a threshold of 100 passes, so the gate is ">= threshold".
    ok = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=f16,ctv=f16", "--refract-fail-under=100")
    )
    assert ok.ret == 0


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--refract-candidate=ctk=q8_0,ctv=turbo4", "no cache type 'turbo4'; it offers: "),
        ("--refract-candidate=ctk=q8_0,ctv=q4_0,fa=off", "quantized V cache needs flash attention"),
        # llama.cpp decides, and its own reason is quoted.
        ("--refract-candidate=ctk=q4_k,ctv=f16", "llama.cpp refused a context for ctk=q4_k,ctv=f16: "
                                                 "llama_init_from_model: K cache type q4_K with block size 256 does not "
                                                 "divide n_embd_head_k=32"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0,rot=sideways", "rot='sideways' is not a rotation policy; choose from "
                                                               "default, off, k, v, kv"),
        # The tiny model's heads are 32 wide: llama.cpp rotates only heads that are a multiple of 64.
        ("--refract-candidate=ctk=q8_0,ctv=q8_0,rot=kv", "rot=kv was not honoured: this build did not rotate K and "
                                                         "did not rotate V (no rotation)"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0 --refract-llama-lib=/nonexistent/llama-build",
         "--refract-llama-lib=/nonexistent/llama-build: folder /nonexistent/llama-build does not exist"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0 --refract-llama-lib=.", "holds no libllama.so"),
        ("--refract-candidate=ctk=q8_0,cvt=q4_0", "unknown key 'cvt'"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0 --refract-fail-under=GOOD", "neither a band"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0 --refract-n-predict=0", "--refract-n-predict=0 must be at least 1"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0 --refract-ctx=-5", "--refract-ctx=-5 must be at least 8"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0 --refract-axes=trajectory,vibes", "unknown axis 'vibes'"),
        ("--refract-candidate=ctk=q8_0,ctv=q8_0 --refract-json=/nonexistent/dir/r.json", "does not exist"),
    ],
)
def test_flag_problems_are_one_line_usage_errors(pytester, tiny_model, tiny_prompts, tiny_corpus, flag, expected):
    result = pytester.runpytest_subprocess(*tiny_args(tiny_model, tiny_prompts, tiny_corpus), *flag.split(" "))
    line = one_usage_error_line(result)
    assert expected in line
    if "turbo4" in flag:
        assert "q8_0" in line and "f16" in line  # names what this build offers


def test_bad_model_files_are_one_line_errors(pytester, tiny_model, tiny_prompts, tiny_corpus):
    not_gguf = pytester.path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model\n")
    truncated = pytester.path / "cut.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[:-4096])
    unknown_arch = write_tiny_llama(pytester.path / "arch.gguf", architecture="nosucharch")
    cases = {
        pytester.path / "missing.gguf": "model file not found",
        pytester.path: "is a directory",
        not_gguf: "not a GGUF file",
        truncated: "truncated GGUF file",
        unknown_arch: "llama.cpp could not load",
    }
    for model, expected in cases.items():
        result = pytester.runpytest_subprocess(
            *tiny_args(model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0")
        )
        assert expected in one_usage_error_line(result), model


def test_short_corpus_and_bad_prompts_are_one_line_errors(pytester, tiny_model, tiny_prompts, tiny_corpus):
    short = pytester.path / "short.txt"
    short.write_text("the end.")
    line = one_usage_error_line(pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, short, "--refract-candidate=ctk=q8_0,ctv=q8_0")))
    assert "fewer than one chunk of --refract-ctx=64" in line

    bad = pytester.path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "hello"}\n{"id": "b", "prompt": \n')
    line = one_usage_error_line(pytester.runpytest_subprocess(
        *tiny_args(tiny_model, bad, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0")))
    assert "bad.jsonl:2: malformed JSON" in line


def _depth_corpus(pytester):
    """A corpus long enough for one depth chunk of 512 tokens (the shared tiny corpus holds ~480)."""
    path = pytester.path / "depth_corpus.txt"
    path.write_text(("the end of the world is a hello to the end. " * 60).strip() + "\n", encoding="utf-8")
    return path


DEPTH_ARGS = ("--refract-depth=512", "--refract-depth-stride=64")


def test_full_audit_ids_and_selection(pytester, tiny_model, tiny_prompts):
    args = tiny_args(tiny_model, tiny_prompts, _depth_corpus(pytester), "--refract-candidate=ctk=q8_0,ctv=q8_0",
                     "--refract-full", *DEPTH_ARGS,
                     "--refract-rniah-lengths=128,256", "--refract-rniah-positions=0.5")
    out = pytester.runpytest_subprocess(*args, "--collect-only", "-q").stdout.str()
    for item in ("test_rniah[128-0.50]", "test_rniah[256-0.50]", "test_plad[fact-001-typo]",
                 "test_plad[code-001-case]", "test_plad[creative-001-punct]"):
        assert item in out
    case_only = pytester.runpytest_subprocess(*args, "--collect-only", "-q", "-k", "plad and case").stdout.str()
    assert "test_plad[fact-001-case]" in case_only
    assert "typo]" not in case_only and "test_trajectory" not in case_only and "test_rniah" not in case_only
    rniah_only = pytester.runpytest_subprocess(*args, "--collect-only", "-q", "-k", "rniah").stdout.str()
    assert "test_rniah[128-0.50]" in rniah_only and "test_plad" not in rniah_only


def test_full_self_reference_runs_every_axis(pytester, tiny_model, tiny_prompts):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, _depth_corpus(pytester), "--refract-candidate=ctk=f16,ctv=f16",
                   "--refract-full", *DEPTH_ARGS,
                   "--refract-rniah-lengths=128", "--refract-rniah-positions=0.5", "--refract-rniah-trials=2",
                   f"--refract-json={report}")
    )
    data = read_report(report)
    assert set(data["axes"]) == {"trajectory", "kld", "rniah", "plad", "decode", "depth"}
    plad = data["axes"]["plad"]
    # Prompts without a capitalised word or a synonym-table word skip those perturbations.
    assert plad["n_pairs"] + plad["n_skipped"] == 3 * 4
    assert plad["n_skipped"] >= 1
    assert all(r["excess"] == 0.0 for r in plad["items"] if not r["skipped"])
    assert plad["score"] == 100.0
    skipped_kinds = {r["perturbation"] for r in plad["items"] if r["skipped"]}
    assert skipped_kinds
    for kind in ("typo", "case", "punct", "paraphrase"):
        # A perturbation skipped on every prompt has no score; any other has one.
        all_skipped = all(r["skipped"] for r in plad["items"] if r["perturbation"] == kind)
        assert (plad["per_perturbation"][kind] is None) == all_skipped, kind
    rniah = data["axes"]["rniah"]
    cell = rniah["cells"][0]
    assert cell["length"] == 128 and cell["trials"] == 2 and cell["ref_hits"] == cell["cand_hits"]
    # A random-weight model does not retrieve: the cell and the axis are n/a, out of the composite.
    assert cell["ref_hits"] == 0 and rniah["status"] == "n/a", rniah
    assert rniah["score"] is None and rniah["confidence"] == "low"
    assert any("rniah: nothing to score" in line for line in data["diagnosis"])
    assert round(data["composite"], 2) == 100.0
    result.stdout.fnmatch_lines(["plad * 100.00 *"])


def test_rniah_length_beyond_context_is_a_usage_error(pytester, tiny_model, tiny_prompts, tiny_corpus):
    result = pytester.runpytest_subprocess(
        *tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0",
                   "--refract-axes=rniah", "--refract-rniah-lengths=4096")
    )
    line = one_usage_error_line(result)
    assert "--refract-rniah-lengths: 4096 tokens" in line and "the model's context of 1024 tokens" in line


def test_ini_keys_configure_the_audit_and_flags_win(pytester, tiny_model, tiny_prompts, tiny_corpus):
    pytester.makeini(f"""
        [pytest]
        refract_model = {tiny_model}
        refract_candidate = ctk=q8_0,ctv=q8_0
        refract_prompts = {tiny_prompts}
        refract_corpus = {tiny_corpus}
        refract_ctx = 64
        refract_chunks = 2
        refract_n_predict = 4
        refract_axes = kld
    """)
    out = pytester.runpytest_subprocess("--collect-only", "-q").stdout.str()
    assert "test_kld[chunk-01]" in out and "test_kld[chunk-02]" not in out and "test_trajectory" not in out
    out = pytester.runpytest_subprocess("--collect-only", "-q", "--refract-chunks=3").stdout.str()
    assert "test_kld[chunk-02]" in out


def test_item_fail_under_is_opt_in(pytester, tiny_model, tiny_prompts, tiny_corpus):
    base = tiny_args(tiny_model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q4_0,ctv=q4_0", "-k", "trajectory")
    report = pytester.path / "r.json"
    default = pytester.runpytest_subprocess(*base, f"--refract-json={report}")
    items = read_report(report)["axes"]["trajectory"]["items"]
    default.assert_outcomes(passed=3)  # per-item scores never fail items by default
    strict = pytester.runpytest_subprocess(*base, "--refract-item-fail-under=100")
    below = [i for i in items if i["score"] < 100]
    # q4_0 moves some of the tiny model's greedy continuations and not others (it is
    # deterministic on CPU): without an item below 100 this would check nothing.
    assert 0 < len(below) < 3, [i["score"] for i in items]
    strict.assert_outcomes(passed=3 - len(below), failed=len(below))
    strict.stdout.fnmatch_lines(["*is below --refract-item-fail-under=100*"])
    assert "Traceback" not in strict.stdout.str()


def test_thinking_template_gets_a_larger_answer_budget(pytester, tiny_prompts, tiny_corpus):
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}<think>"
    model = write_tiny_llama(pytester.path / "thinker.gguf", n_ctx_train=2048, chat_template=template)
    report = pytester.path / "r.json"
    pytester.runpytest_subprocess(*tiny_args(model, tiny_prompts, tiny_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                             "--refract-axes=rniah", "--refract-rniah-lengths=128",
                                             "--refract-rniah-positions=0.5", "--refract-rniah-trials=1",
                                             f"--refract-json={report}"))
    rniah = read_report(report)["settings"]["rniah"]
    assert rniah["thinking_template"] is True and rniah["effective_answer_tokens"] == 1024
