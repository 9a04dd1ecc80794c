"""Cache types a backend cannot store: llama.cpp aborts the process creating their context, so
types outside its own --cache-type list are tried in a child process first
(engines/isolated.py)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from tiny_model import write_tiny_llama

from pytest_refract.engines.isolated import abort_reason, configs_that_abort

GGML_ABORT = ("/tmp/llama.cpp/ggml/src/ggml-backend.cpp:941: pre-allocated tensor (cache_k_l0 (view)) in a buffer "
              "(CPU) that cannot run the operation (SET_ROWS)")


def test_abort_reason_is_llama_cpps_last_words_without_the_source_location():
    assert abort_reason(f"load ok\n{GGML_ABORT}\n[Inferior 1 (process 9) detached]\n") == (
        "pre-allocated tensor (cache_k_l0 (view)) in a buffer (CPU) that cannot run the operation (SET_ROWS)")
    assert abort_reason("something else went wrong\n") == "something else went wrong"
    assert abort_reason("") == "no message"


@pytest.fixture
def fake_child(tmp_path):
    """A stand-in for ``python -m pytest_refract.engines.isolated``: it aborts on a config whose
    label holds "iq3", writing a GGML_ABORT line first, and logs every start to a file."""
    log = tmp_path / "starts.log"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        request = json.loads(sys.stdin.read())
        with open({str(log)!r}, "a") as f:
            f.write(" ".join(c[0] for c in request["configs"]) + "\\n")
        if request["model"] == "unloadable":
            sys.exit(1)
        print("ready", flush=True)
        for label, k, v in request["configs"]:
            if "iq3" in label:
                print({GGML_ABORT!r}, file=sys.stderr, flush=True)
                os.abort()
            print("done " + label, flush=True)
        """))
    script.chmod(0o755)
    return script, log


def test_each_config_that_kills_a_child_is_named_and_the_rest_are_tried_in_a_new_one(fake_child):
    script, log = fake_child
    configs = [("ctk=q4_k,ctv=f16", "q4_k", "f16"), ("ctk=iq3_s,ctv=f16", "iq3_s", "f16"),
               ("ctk=f16,ctv=q4_k", "f16", "q4_k"), ("ctk=f16,ctv=iq3_xxs", "f16", "iq3_xxs"),
               ("ctk=q6_k,ctv=f16", "q6_k", "f16")]
    dead = configs_that_abort("model.gguf", 0, {"n_ctx": 256}, configs, python=str(script))
    assert sorted(dead) == [1, 3]
    assert dead[1] == ("llama.cpp aborted creating a context for ctk=iq3_s,ctv=f16 (in a child process, signal 6): "
                       "pre-allocated tensor (cache_k_l0 (view)) in a buffer (CPU) that cannot run the operation "
                       "(SET_ROWS)")
    # Three children: from the start, after the first death, after the second.
    assert log.read_text().splitlines() == [" ".join(c[0] for c in configs), " ".join(c[0] for c in configs[2:]),
                                            configs[4][0]]


def test_a_child_that_cannot_load_the_model_blames_no_config(fake_child):
    script, _log = fake_child
    assert configs_that_abort("unloadable", 0, {"n_ctx": 256}, [("ctk=iq3_s,ctv=f16", "iq3_s", "f16")],
                              python=str(script)) == {}


@pytest.fixture(scope="module")
def wide_head_model(tmp_path_factory):
    """One 256-wide KV head: the 256-value blocks of iq3_s fit, so llama.cpp's block check lets
    it through to a backend (CPU) that cannot store it."""
    return write_tiny_llama(tmp_path_factory.mktemp("wide") / "wide.gguf", n_ctx_train=1024, n_embd=256, n_head=1,
                            n_head_kv=1)


def test_a_candidate_the_backend_cannot_store_is_one_usage_line_not_an_abort(pytester, wide_head_model, tiny_corpus):
    result = pytester.runpytest_subprocess(
        f"--refract-model={wide_head_model}", f"--refract-corpus={tiny_corpus}", "--refract-ctx=64",
        "--refract-axes=kld", "--refract-no-cache", "--refract-candidate=ctk=iq3_s,ctv=f16", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stderr.str()
    errors = [ln for ln in result.stderr.lines if ln.startswith("ERROR:")]
    assert len(errors) == 1 and "llama.cpp aborted creating a context for ctk=iq3_s,ctv=f16" in errors[0], errors
    assert "SET_ROWS" in errors[0] and "Traceback" not in result.stderr.str()


def test_a_sweep_lists_the_types_that_would_abort_as_refused_and_measures_the_rest(pytester, wide_head_model,
                                                                                    tiny_corpus):
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={wide_head_model}", f"--refract-corpus={tiny_corpus}", "--refract-ctx=64",
        "--refract-axes=kld", "--refract-no-cache", "--refract-sweep=f16,q8_0,iq3_s", "--refract-max-items=1",
        f"--refract-json={report}", "-p", "no:cacheprovider")
    assert result.ret in (0, 1), result.stderr.str()  # a verdict, whatever it is: the run was not killed
    sweep = json.loads(report.read_text())["sweep"]
    refused = {r["candidate"]: r["why"] for r in sweep["refused"]}
    assert set(refused) == {p for p in sweep["pairs"] if "iq3_s" in p}
    assert all("aborted creating a context" in why and "in a child process" in why for why in refused.values())
    candidates = set(sweep["measured"]) | {s["candidate"] for s in sweep["skipped"]}
    assert candidates == {"ctk=q8_0,ctv=q8_0", "ctk=q8_0,ctv=f16", "ctk=f16,ctv=q8_0"} and sweep["measured"]
