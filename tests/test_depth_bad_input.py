"""The depth axis's flags and inputs that cannot work: one usage-error line each (exit 4), naming
the limit and the fix, before any model loads. On the tiny model (training context 1024)."""

from __future__ import annotations

from conftest import one_usage_error_line


def _run(pytester, model, corpus, *extra):
    return pytester.runpytest_subprocess(
        f"--refract-model={model}", f"--refract-corpus={corpus}", "--refract-ctx=64", "--refract-axes=depth",
        "--refract-threads=1", "--refract-candidate=ctk=q8_0,ctv=q8_0", "-p", "no:cacheprovider", *extra)


def _long_corpus(pytester, words=3000):
    path = pytester.path / "long.txt"
    path.write_text(("the end of the world is a hello to the end. " * (words // 10)).strip() + "\n", encoding="utf-8")
    return path


def test_depth_above_the_models_context(pytester, tiny_model):
    line = one_usage_error_line(_run(pytester, tiny_model, _long_corpus(pytester), "--refract-depth=2048"))
    assert "--refract-depth=2048 exceeds the model's training context of 1024 tokens" in line
    assert "--refract-depth=1024 or less" in line


def test_depth_below_twice_the_first_bucket(pytester, tiny_model):
    line = one_usage_error_line(_run(pytester, tiny_model, _long_corpus(pytester), "--refract-depth=300"))
    assert "--refract-depth=300 is below 512, twice the first depth bucket (256 tokens)" in line


def test_stride_zero_negative_or_too_large(pytester, tiny_model):
    corpus = _long_corpus(pytester)
    for value in ("0", "-3"):
        line = one_usage_error_line(_run(pytester, tiny_model, corpus, f"--refract-depth-stride={value}"))
        assert f"--refract-depth-stride={value} must be at least 1" in line
    line = one_usage_error_line(_run(pytester, tiny_model, corpus, "--refract-depth-stride=100"))
    assert "use at most 64" in line


def test_corpus_too_short_for_one_chunk(pytester, tiny_model, tiny_corpus):
    line = one_usage_error_line(_run(pytester, tiny_model, tiny_corpus, "--refract-depth=1024"))
    assert "fewer than one depth chunk of 1024" in line and "tokens" in line and "--refract-corpus" in line


def test_the_default_depth_is_capped_at_the_models_context_and_runs(pytester, tiny_model):
    """The default 4096 on a model of 1024: capped, not refused (a value given would be)."""
    result = _run(pytester, tiny_model, _long_corpus(pytester), "--refract-chunks=1", "--refract-depth-stride=64",
                  "--refract-exhaustive")
    assert result.ret in (0, 1), result.stdout.str()
    result.stdout.fnmatch_lines(["*evidence up to 1024 tokens of context*"])


def test_a_depth_this_machine_cannot_hold_is_refused_with_the_estimate(pytester, tiny_model):
    # Available memory as this machine would report it were it nearly full.
    pytester.makeconftest("import pytest_refract.inputs.depth as d\nd.available_bytes = lambda: 1024 ** 2\n")
    line = one_usage_error_line(_run(pytester, tiny_model, _long_corpus(pytester), "--refract-depth=1024"))
    assert "--refract-depth=1024 needs about" in line and "GiB" in line and "1.0 GiB" not in line
    assert "available" in line and "smaller --refract-depth" in line
