"""Prompts and --refract-n-predict that cannot fit the model's context: one usage-error line
each (exit 4), naming the flag or prompt at fault and what would fit. On the tiny model, whose
training context is 1024 tokens."""

from __future__ import annotations

import json

from conftest import one_usage_error_line


def _run(pytester, model, prompts, corpus, *extra):
    return pytester.runpytest_subprocess(
        f"--refract-model={model}", f"--refract-prompts={prompts}", f"--refract-corpus={corpus}",
        "--refract-ctx=64", "--refract-chunks=1", "--refract-threads=1",
        "--refract-candidate=ctk=q8_0,ctv=q8_0", *extra,
    )


def _prompts(pytester, name, text):
    path = pytester.path / name
    rows = [{"id": "fact-001", "category": "factual", "prompt": "hello world"},
            {"id": "long-001", "category": "factual", "prompt": text}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_n_predict_larger_than_the_context(pytester, tiny_model, tiny_prompts, tiny_corpus):
    for value in (1024, 50000):
        line = one_usage_error_line(_run(pytester, tiny_model, tiny_prompts, tiny_corpus, f"--refract-n-predict={value}"))
        assert f"--refract-n-predict={value} is not smaller than the model's context of 1024 tokens" in line


def test_n_predict_is_not_checked_when_no_axis_generates(pytester, tiny_model, tiny_prompts, tiny_corpus):
    # Only trajectory and PLAD generate; a KLD-only audit runs whatever --refract-n-predict says.
    result = _run(pytester, tiny_model, tiny_prompts, tiny_corpus, "--refract-n-predict=50000", "--refract-axes=kld")
    result.assert_outcomes(passed=1)


def test_prompt_longer_than_the_context(pytester, tiny_model, tiny_corpus):
    prompts = _prompts(pytester, "long.jsonl", " ".join(["hello world the end"] * 600))
    line = one_usage_error_line(_run(pytester, tiny_model, prompts, tiny_corpus, "--refract-n-predict=8"))
    assert "prompt 'long-001' in " in line and "long.jsonl" in line
    assert "longer than the model's context of 1024 tokens" in line


def test_prompt_that_fits_only_without_the_answer_names_the_n_predict_that_fits(pytester, tiny_model, tiny_corpus):
    prompts = _prompts(pytester, "mid.jsonl", " ".join(["hello world the end"] * 100))
    line = one_usage_error_line(_run(pytester, tiny_model, prompts, tiny_corpus, "--refract-n-predict=1000"))
    assert "prompt 'long-001'" in line and "with --refract-n-predict=1000 it exceeds the model's context of 1024" in line
    fits = int(line.split("use --refract-n-predict=")[1].split(" ")[0])
    assert 0 < fits < 1000
    # The number it names does fit (collection succeeds), and one more does not.
    ok = _run(pytester, tiny_model, prompts, tiny_corpus, f"--refract-n-predict={fits}", "--collect-only", "-q")
    assert ok.ret == 0, ok.stdout.str()
    over = _run(pytester, tiny_model, prompts, tiny_corpus, f"--refract-n-predict={fits + 1}", "--collect-only", "-q")
    assert "use --refract-n-predict=" in one_usage_error_line(over)
