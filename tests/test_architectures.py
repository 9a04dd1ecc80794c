"""Your model, not ours: the audit on tiny random-weight models of other families than llama
(sliding-window attention with gemma's template, a qwen3 thinking template without BOS, a
mixture of experts, a recurrent/attention hybrid), all four axes, and the inputs it cannot measure (a recurrent model, an
architecture this llama.cpp does not know, a chat template that does not render) as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import one_usage_error_line, read_report
from tiny_model import write_tiny_family, write_tiny_llama


def _args(model, prompts, corpus, report, *extra):
    # Exhaustive: every axis measures every item, whatever a FAIL on another axis decided.
    # The corpus twice over: long enough for one depth chunk of 512 tokens (once holds ~480).
    doubled = Path(report).parent / "corpus_twice.txt"
    doubled.write_text(Path(corpus).read_text(encoding="utf-8") * 2, encoding="utf-8")
    corpus = doubled
    return [
        f"--refract-model={model}", f"--refract-prompts={prompts}", f"--refract-corpus={corpus}",
        "--refract-full", "--refract-ctx=64", "--refract-chunks=2", "--refract-depth=512", "--refract-depth-stride=64",
        "--refract-n-predict=8", "--refract-threads=1",
        "--refract-rniah-lengths=160", "--refract-rniah-positions=0.2", "--refract-rniah-trials=1",
        "--refract-no-progress", "--refract-exhaustive", f"--refract-json={report}", *extra,
    ]


# Candidates per family: the reference itself (must score 100: the measurement is sound on
# this architecture) and a quantized cache; on the sliding-window model also with a full-size
# window cache (swa_full), which changes what the cache keeps.
FAMILY_CANDIDATES = {
    "gemma3": ["ctk=f16,ctv=f16", "ctk=q8_0,ctv=q8_0", "ctk=q8_0,ctv=q8_0,swa_full=on"],
    "qwen3": ["ctk=f16,ctv=f16", "ctk=q8_0,ctv=q4_0"],
    "qwen3moe": ["ctk=f16,ctv=f16", "ctk=q8_0,ctv=q8_0"],
    "jamba": ["ctk=f16,ctv=f16", "ctk=q8_0,ctv=q8_0"],  # hybrid: recurrent and attention layers
}


@pytest.mark.parametrize("family", sorted(FAMILY_CANDIDATES))
def test_every_axis_runs_on_the_family(pytester, tiny_prompts, tiny_corpus, family):
    model = write_tiny_family(pytester.path / f"{family}.gguf", family, n_ctx_train=2048)
    report = pytester.path / "r.json"
    cands = [f"--refract-candidate={c}" for c in FAMILY_CANDIDATES[family]]
    result = pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus, report, *cands))
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text, text
    data = read_report(report)
    assert data["complete"] is True, text
    assert data["model"]["architecture"] == family
    sections = {sec["candidate"]: sec for sec in data["candidates"]}
    assert len(sections) == len(FAMILY_CANDIDATES[family])
    for label, sec in sections.items():
        axes = sec["axes"]
        assert set(axes) == {"trajectory", "kld", "rniah", "plad", "decode", "depth"}, label
        # One token per llama_decode gives what the batched path gives on this CPU build (the
        # cut back to the prefix included: a hybrid's recurrent state is rebuilt, not cut).
        assert axes["decode"]["decode_batched_disagree"] is not True, (label, axes["decode"]["decode_vs_batched"])
        for name in ("trajectory", "kld", "plad", "decode", "depth"):
            assert axes[name]["score"] is not None and 0.0 <= axes[name]["score"] <= 100.0, (label, name)
        # A random-weight model does not retrieve the needle: n/a, never a made-up 100.
        cell = axes["rniah"]["cells"][0]
        assert cell["length"] == 160 and cell["trials"] == 1
        assert (axes["rniah"]["score"] is None) == (cell["ref_hits"] == 0)
        if sec["self_reference"]:
            assert axes["trajectory"]["score"] == 100.0 and axes["plad"]["score"] == 100.0
            assert abs(axes["kld"]["mean_kld"]) < 1e-5 and round(sec["composite"], 2) == 100.0
        else:
            assert axes["kld"]["mean_kld"] > 0.0, label  # a quantized cache moved something
    assert result.ret in (0, 1), text  # gated on scores, never a crash or usage error


def test_gemma_template_and_thinking_template_are_used(pytester, tiny_prompts, tiny_corpus):
    """The chat template of each family shapes the prompt: gemma's turns, qwen3's reasoning
    block (which also gives R-NIAH a thinking model's answer budget)."""
    for family, thinking in (("gemma3", False), ("qwen3", True)):
        model = write_tiny_family(pytester.path / f"{family}.gguf", family)
        report = pytester.path / f"{family}.json"
        pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus, report,
                                             "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-axes=rniah"))
        data = read_report(report)
        rniah = data["settings"]["rniah"]
        assert rniah["thinking_template"] is thinking, family
        assert rniah["effective_answer_tokens"] == (1024 if thinking else 32)


def test_a_recurrent_model_is_one_line_not_a_score(pytester, tiny_prompts, tiny_corpus):
    model = write_tiny_family(pytester.path / "mamba.gguf", "mamba")
    result = pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus, pytester.path / "r.json",
                                                  "--refract-candidate=ctk=q8_0,ctv=q8_0"))
    line = one_usage_error_line(result)
    assert "recurrent model (mamba)" in line and "no KV cache" in line
    assert not (pytester.path / "r.json").exists()


def test_an_unknown_architecture_is_one_line(pytester, tiny_prompts, tiny_corpus):
    model = write_tiny_llama(pytester.path / "future.gguf", architecture="llama9000")
    result = pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus, pytester.path / "r.json",
                                                  "--refract-candidate=ctk=q8_0,ctv=q8_0"))
    line = one_usage_error_line(result)
    assert "llama9000" in line and "unknown model architecture" in line


@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor", "TemplateSyntaxError"),
    ("{{ raise_exception('this template only takes system turns') }}", "only takes system turns"),
    ("{{ messages[0]['content'] | no_such_filter }}", "no_such_filter"),
], ids=["syntax", "raises", "unknown-filter"])
def test_a_chat_template_that_fails_to_render_is_one_line(pytester, tiny_prompts, tiny_corpus, template, problem):
    model = write_tiny_llama(pytester.path / "broken.gguf", chat_template=template)
    result = pytester.runpytest_subprocess(*_args(model, tiny_prompts, tiny_corpus, pytester.path / "r.json",
                                                  "--refract-candidate=ctk=q8_0,ctv=q8_0"))
    line = one_usage_error_line(result)
    assert "chat template of broken.gguf" in line and problem in line
