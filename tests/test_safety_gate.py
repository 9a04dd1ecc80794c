"""A gate that cannot be talked into passing: the hostile probes of the gate, fixed as classes.
A control that is no rounding-only change, a partial audit gated as a whole one, a disguised
self-reference, one prompt counted twice, a forged cache entry, an early stop reported complete,
a failed gate invisible to JUnit, a baseline of another model, a second SIGTERM while the
reports are written, a default spelled out, and a negative damage. Each test here failed on
the code before its fix. Fake engine (tests/fake_engine.py) and tiny models: seconds in all."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import read_report


def _audit(pytester, model, corpus, *extra, prompts=None, report_name="r.json", cache=None):
    report = pytester.path / report_name
    args = [f"--refract-model={model}", f"--refract-corpus={corpus}", "--refract-ctx=64", "--refract-threads=1",
            "--refract-n-predict=8", f"--refract-cache-dir={cache}" if cache else "--refract-no-cache",
            f"--refract-json={report}", "-p", "no:cacheprovider",
            *([f"--refract-prompts={prompts}"] if prompts else []), *extra]
    if not any(a.startswith("--refract-candidate") for a in extra):
        args.append("--refract-candidate=ctk=bf16,ctv=bf16")  # the control's own damage: M = 1
    result = pytester.runpytest_inprocess(*args)
    return result, (read_report(report) if report.exists() else None)


def _usage_line(result) -> str:
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == 4, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, text
    return errors[0]


# --------------------------------------------------------------------------- 1. the control


@pytest.mark.parametrize("control, candidate, said", [
    ("ctk=q4_0,ctv=q4_0", "ctk=q4_0,ctv=q4_0", "ctk=q4_0, ctv=q4_0: not a float cache type"),
    ("ctk=q8_0,ctv=f16", "ctk=q4_0,ctv=q4_0", "ctk=q8_0: not a float cache type"),
    ("ctk=bf16,ctv=bf16", "ctk=bf16,ctv=bf16", "is also a candidate"),
    ("ctk=bf16,ctv=bf16,rot=off", "ctk=q4_0,ctv=q4_0", "rot differs from the reference's"),
])
def test_a_control_must_be_a_rounding_only_change_of_the_reference(pytester, tiny_model, control, candidate, said):
    line = _usage_line(pytester.runpytest_inprocess(f"--refract-model={tiny_model}", f"--refract-candidate={candidate}",
                                                    f"--refract-sensitivity={control}", "-p", "no:cacheprovider"))
    assert "--refract-sensitivity" in line and said in line, line


def test_the_ini_control_is_held_to_the_same_rule(pytester, tiny_model):
    pytester.makeini("[pytest]\nrefract_sensitivity = ctk=q4_0,ctv=q4_0\n")
    line = _usage_line(pytester.runpytest_inprocess(f"--refract-model={tiny_model}",
                                                    "--refract-candidate=ctk=q4_0,ctv=q4_0", "-p", "no:cacheprovider"))
    assert "not a float cache type" in line, line


# --------------------------------------------------------------------------- 2. partial audits


def test_a_keyword_subset_is_labelled_everywhere(pytester, fake_llamacpp, tiny_model, tiny_prompts, long_corpus):
    html = pytester.path / "r.html"
    result, report = _audit(pytester, tiny_model, long_corpus, f"--refract-html={html}", "-k", "kld",
                            prompts=tiny_prompts)
    out = result.stdout.str()
    selection = report["selection"]
    assert selection["subset"] is True and selection["not_selected"] == ["trajectory"]
    n = selection["axes"]["kld"]["pool"]
    assert selection["axes"]["kld"]["selected"] == n > 0
    assert selection["text"] == f"subset: kld {n} of {n}; not run: trajectory"
    assert report["verdict"]["subset"] is True
    assert report["diagnosis"][0].startswith("Subset verdict ")
    assert f"selected   subset: kld {n} of {n}; not run: trajectory" in out
    assert "(subset verdict)" in out and "verdict PASS on every selected axis" in out
    assert "subset: kld" in html.read_text()
    assert result.ret == 0  # a subset is a feature: gated as what it is, and labelled


def test_require_complete_fails_a_subset_and_passes_the_whole(pytester, fake_llamacpp, tiny_model, tiny_prompts,
                                                             long_corpus):
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-require-complete", "--refract-axes=kld",
                            prompts=tiny_prompts)
    assert result.ret == 1 and not report["gate"]["passed"]
    assert any(r.startswith("--refract-require-complete: the audit ran only part of the default audit")
               and "not run: trajectory" in r for r in report["gate"]["reasons"]), report["gate"]["reasons"]
    # A deselected item is a subset too, even on every axis of the default audit.
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-require-complete", "--refract-axes=kld",
                            "--deselect", "refract::test_kld[chunk-03]", prompts=tiny_prompts)
    assert report["selection"]["axes"]["kld"]["selected"] == report["selection"]["axes"]["kld"]["pool"] - 1
    assert not report["gate"]["passed"]
    # The whole default audit, its decided axes stopping early: complete, and the flag passes it
    # as far as the selection goes (only the verdict's own reasons may remain).
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-require-complete", "--refract-undecided=pass",
                            prompts=tiny_prompts)
    assert report["selection"]["subset"] is False, report["selection"]
    assert not any("require-complete" in r for r in report["gate"]["reasons"]), report["gate"]["reasons"]


def test_a_candidate_with_every_item_deselected_never_passes(pytester, fake_llamacpp, tiny_model, long_corpus):
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld", "--refract-candidate=ctk=f32,ctv=f32",
                            "--refract-candidate=ctk=q4_0,ctv=q4_0", "-k", "not q4_0")
    q4 = next(c for c in report["candidates"] if c["candidate"] == "ctk=q4_0,ctv=q4_0")
    assert q4["selection"]["axes"]["kld"]["selected"] == 0
    assert not q4["gate"]["passed"]
    assert any("no item of ctk=q4_0,ctv=q4_0 was measured" in r for r in report["gate"]["reasons"])
    assert result.ret == 1


# --------------------------------------------------------------------------- 3. a disguised self-reference


def test_a_self_reference_is_recognised_by_what_computes(pytester, fake_llamacpp, tiny_model, long_corpus):
    # nkvo only places the cache in host memory when layers run on a GPU; on this CPU build the
    # two configs are one computation.
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld",
                            "--refract-reference=ctk=q8_0,ctv=q8_0,nkvo=on", "--refract-candidate=ctk=q8_0,ctv=q8_0")
    assert report["self_reference"] is True
    text = "\n".join(report["diagnosis"])
    assert "Self-reference: the candidate computes as the reference (ctk=q8_0,ctv=q8_0,nkvo=on) does" in text
    assert "f16 reference" not in result.stdout.str() + text


def test_a_real_difference_is_no_self_reference(pytester, fake_llamacpp, tiny_model, long_corpus):
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld",
                            "--refract-reference=ctk=q8_0,ctv=q8_0", "--refract-candidate=ctk=q8_0,ctv=q4_0")
    assert report["self_reference"] is False


# --------------------------------------------------------------------------- 4. duplicate prompts


def _prompts(tmp_path, rows):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "category": "c", "prompt": t}) + "\n" for i, t in rows))
    return path


def test_one_text_under_two_ids_is_refused(pytester, tiny_model, tiny_corpus):
    prompts = _prompts(pytester.path, [(f"p{k}", "hello world the end" if k % 2 else "a world and the end")
                                       for k in range(16)])
    line = _usage_line(pytester.runpytest_inprocess(f"--refract-model={tiny_model}", f"--refract-prompts={prompts}",
                                                    "--refract-candidate=ctk=q8_0,ctv=q8_0", "-p", "no:cacheprovider"))
    assert "prompt 'p2' has the same text as 'p0'" in line and "counts once" in line, line


def test_every_prompt_the_same_text_is_not_blamed_on_the_template(pytester, fake_llamacpp, tiny_model, tiny_corpus):
    # Texts that differ only in whitespace the tokenizer drops: the same item, not a template fault.
    prompts = _prompts(pytester.path, [("a", "hello world"), ("b", "hello  world"), ("c", " hello world")])
    line = _usage_line(pytester.runpytest_inprocess(f"--refract-model={tiny_model}", f"--refract-prompts={prompts}",
                                                    f"--refract-corpus={tiny_corpus}", "--refract-threads=1", "--refract-ctx=64",
                                                    "--refract-candidate=ctk=q8_0,ctv=q8_0", "-p", "no:cacheprovider"))
    assert "render to the same tokens" in line and "one item counted 3 times" in line, line
    assert "template drops" not in line


def test_a_corpus_that_repeats_itself_counts_each_chunk_once(pytester, fake_llamacpp, tiny_model, tmp_path):
    # 11 words repeated: 64-token chunks i and i + 11 are the same tokens (64 = 9 mod 11), so of
    # 85 chunks only 11 are distinct. Counted 85 times, the bf16 control against itself reached
    # a PASS on "85 items"; counted once each, 11 items decide nothing.
    corpus = tmp_path / "loop.txt"
    corpus.write_text("the end of the world is a hello to the end. " * 500, encoding="utf-8")
    result, report = _audit(pytester, tiny_model, corpus, "--refract-axes=kld", "--refract-exhaustive")
    kld = report["candidates"][0]["axes"]["kld"] if "candidates" in report else report["axes"]["kld"]
    ids = [item["id"] for item in kld["items"]]
    assert len(ids) == 11 and len(set(ids)) == 11, ids
    note = report["settings"]["chunks_note"]
    assert "74 chunk(s) of the corpus repeat an earlier chunk token for token and count once" in note, note
    assert "chunk-11 = chunk-00" in note, note
    assert "74 chunk(s) of the corpus repeat" in result.stdout.str()
    assert report["verdict"] != "PASS"


def test_distinct_chunks_keeps_the_first_of_each_and_names_every_repeat():
    from pytest_refract.inputs.distinct import distinct_chunks

    tokens = [1, 2, 3, 4] * 3 + [9, 9, 9, 9] + [1, 2, 3, 4]
    kept, repeats = distinct_chunks(tokens, 4, 5, None, first_replaced=False)
    assert kept == [0, 3] and repeats == {1: 0, 2: 0, 4: 0}
    # With BOS over the first token, chunks that differ only there are the same input.
    kept, repeats = distinct_chunks([7, 1, 1, 8, 1, 1], 3, 2, None, first_replaced=True)
    assert kept == [0] and repeats == {1: 0}
    # A cap counts distinct chunks, and chunks past the last kept one are not read.
    kept, repeats = distinct_chunks([1, 1, 1, 1, 2, 2], 2, 3, 2, first_replaced=False)
    assert kept == [0, 2] and repeats == {1: 0}


def test_rniah_cells_whose_needles_land_together_count_once(pytester, fake_llamacpp, tiny_model, tmp_path):
    # The needle goes at the sentence boundary nearest its position: at 0.00 and 0.01 of a
    # haystack of sentences of several tokens each, every trial's needle lands at the start.
    haystack = tmp_path / "hay.txt"
    haystack.write_text(" ".join(f"Alpha beta gamma delta number {i} ends here." for i in range(60)), encoding="utf-8")
    result, report = _audit(pytester, tiny_model, haystack, "--refract-axes=rniah", "--refract-exhaustive",
                            f"--refract-haystack={haystack}", "--refract-rniah-lengths=128",
                            "--refract-rniah-positions=0,0.01,0.9", "--refract-rniah-trials=2")
    merged = report["settings"]["rniah"]["merged_cells"]
    assert merged == [{"cell": "128-0.01", "same_as": "128-0.00"}], merged
    axes = report["candidates"][0]["axes"] if "candidates" in report else report["axes"]
    cells = sorted(c["id"] for c in axes["rniah"]["cells"])
    assert cells == ["128-0.00", "128-0.90"], cells
    assert "1 R-NIAH cell(s) put their needles where another cell does and count once" in result.stdout.str()


def test_two_positions_that_name_one_cell_are_refused(pytester, tiny_model):
    line = _usage_line(pytester.runpytest_inprocess(f"--refract-model={tiny_model}", "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                                    "--refract-rniah-positions=0.1,0.102", "-p", "no:cacheprovider"))
    assert "0.1 and 0.102 are one cell (0.10)" in line and "at least 0.01 apart" in line, line


# --------------------------------------------------------------------------- 5. forged cache entries


def _forge(entry: Path, change) -> None:
    """Rewrite a cache entry's control result and recompute its checksum, as anyone who can
    write to the cache folder can."""
    import hashlib
    import struct

    raw = entry.read_bytes()
    start = 4 + 32
    (header_len,) = struct.unpack("<I", raw[start:start + 4])
    header = json.loads(raw[start + 4:start + 4 + header_len])
    meta = json.loads(header["meta"])
    change(meta["result"])
    header["meta"] = json.dumps(meta)
    head = json.dumps(header).encode()
    rest = struct.pack("<I", len(head)) + head + raw[start + 4 + header_len:]
    entry.write_bytes(raw[:4] + hashlib.sha256(rest).digest() + rest)


def test_a_forged_control_entry_is_caught_by_the_spot_check(pytester, fake_llamacpp, tiny_model, long_corpus):
    cache = pytester.path / "cache"
    args = ("--refract-axes=kld", "--refract-candidate=ctk=q8_0,ctv=q8_0")
    result, first = _audit(pytester, tiny_model, long_corpus, *args, cache=cache)
    assert first["verdict"]["verdict"] == "FAIL"
    entries = sorted(cache.glob("*/control-kld/*.rfc"))
    assert entries

    def inflate(result):  # a control 100x as damaged makes any candidate look 100x better
        result["mean_kld"] *= 100
        result["score"] = 50.0

    for entry in entries:
        _forge(entry, inflate)
    result, second = _audit(pytester, tiny_model, long_corpus, *args, cache=cache)
    spot = second["reference_cache"]["spot_check"]
    assert [c["match"] for c in spot["checked"]] == [False]
    assert "differs from its re-measurement" in second["reference_cache"]["tampered"]
    assert not second["gate"]["passed"] and result.ret == 1
    assert any("failed its spot check" in r for r in second["gate"]["reasons"]), second["gate"]["reasons"]
    assert "ref cache  DISTRUSTED" in result.stdout.str()
    # The forged entries are gone: the next run reads and checks an honest cache.
    result, third = _audit(pytester, tiny_model, long_corpus, *args, cache=cache)
    assert third["reference_cache"]["tampered"] is None and third["verdict"]["verdict"] == "FAIL"


def test_an_intact_cache_passes_its_spot_check_bit_for_bit(pytester, fake_llamacpp, monkeypatch, tiny_model,
                                                           tiny_prompts, long_corpus):
    from pytest_refract.reference import store

    monkeypatch.setattr(store, "SPOT_WINDOW", 1)  # the first cached read of every axis and kind
    cache = pytester.path / "cache"
    args = ("--refract-axes=trajectory,kld", "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-undecided=pass")
    _audit(pytester, tiny_model, long_corpus, *args, prompts=tiny_prompts, cache=cache)
    result, second = _audit(pytester, tiny_model, long_corpus, *args, prompts=tiny_prompts, cache=cache)
    spot = second["reference_cache"]["spot_check"]
    assert sorted(c["axis"] for c in spot["checked"]) == ["kld", "trajectory"]
    assert sorted(c["kind"] for c in spot["reference_checked"]) == ["kld", "trajectory"]
    assert all(c["match"] for c in spot["checked"] + spot["reference_checked"])
    assert second["reference_cache"]["tampered"] is None and second["reference_cache"]["hits"] > 0


def test_a_forged_reference_entry_is_caught_by_the_spot_check(pytester, fake_llamacpp, tiny_model, long_corpus):
    import zlib

    from pytest_refract.reference.codec import decode_payload
    from pytest_refract.reference.entries import ReferenceCache, _unpack_arrays, _verified_parts

    cache = pytester.path / "cache"
    # Without a control, so the reference's own spot check is what must catch it (with one, the
    # control's re-measurement against the forged reference differs from its cached result too).
    args = ("--refract-axes=kld", "--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-no-sensitivity")
    _audit(pytester, tiny_model, long_corpus, *args, cache=cache)
    entries = sorted(cache.glob("*/kld/*.rfc"))
    assert entries
    for entry in entries:  # every reference chunk's log-probs shifted, each with a valid checksum
        header, payload = _verified_parts(entry.read_bytes())
        arrays = decode_payload(_unpack_arrays(zlib.decompress(payload), header["arrays"]))
        arrays["min_log_prob"] = arrays["min_log_prob"] - 0.5
        forger = ReferenceCache(cache, {})
        forger.namespace = entry.parent.parent.name
        forger.store("kld", header["key"], arrays, meta=json.loads(header["meta"]))
    result, second = _audit(pytester, tiny_model, long_corpus, *args, cache=cache)
    checked = second["reference_cache"]["spot_check"]["reference_checked"]
    assert [c["match"] for c in checked] == [False]
    assert "cached reference kld result differs" in second["reference_cache"]["tampered"]
    assert not second["gate"]["passed"] and result.ret == 1


# --------------------------------------------------------------------------- 6. early stops


@pytest.mark.parametrize("stop", [["-x"], ["--maxfail=1"]])
def test_an_early_stop_is_incomplete_and_never_passes(pytester, fake_llamacpp, tiny_model, long_corpus, stop):
    # Every q4_0 item fails --refract-item-fail-under=100, so the first failure stops the run.
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld", "--refract-exhaustive",
                            "--refract-candidate=ctk=q4_0,ctv=q4_0", "--refract-item-fail-under=100", *stop)
    assert report["complete"] is False
    reasons = report["gate"]["reasons"]
    assert not report["gate"]["passed"] and reasons[0].startswith("the run stopped early"), reasons
    assert "after 1 of" in reasons[0] and report["verdict"] is None
    assert report["diagnosis"][0].startswith("INCOMPLETE: the run stopped early")


# --------------------------------------------------------------------------- 7. the gate in JUnit XML


@pytest.mark.parametrize("candidate, passed", [("ctk=q4_0,ctv=q4_0", False), ("ctk=bf16,ctv=bf16", True)])
def test_the_gate_is_a_junit_test_case(pytester, fake_llamacpp, tiny_model, long_corpus, candidate, passed):
    junit = pytester.path / "j.xml"
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld", f"--refract-candidate={candidate}",
                            f"--junitxml={junit}")
    assert report["gate"]["passed"] is passed and result.ret == (0 if passed else 1)
    suite = ET.parse(junit).getroot().find("testsuite")
    gate = [case for case in suite.iter("testcase") if case.get("name") == "gate"]
    assert len(gate) == 1 and gate[0].get("classname") == "refract"
    failure = gate[0].find("failure")
    if passed:
        assert failure is None
    else:
        assert failure is not None and "verdict FAIL" in failure.get("message")
        assert int(suite.get("failures")) >= 1
    # pytest's own counts are the items' alone.
    assert "gate" not in "".join(result.stdout.lines[-1:])


# --------------------------------------------------------------------------- 8. a baseline of another model


def test_a_baseline_of_another_model_is_refused_without_a_cache(pytester, fake_llamacpp, tiny_model, long_corpus):
    # Two files of one size and one first MiB, differing in their last byte.
    first, second = pytester.path / "a.gguf", pytester.path / "b.gguf"
    raw = tiny_model.read_bytes() + bytes(2 * 2**20)
    first.write_bytes(raw)
    second.write_bytes(raw[:-1] + b"\x01")
    result, report = _audit(pytester, first, long_corpus, "--refract-axes=kld", report_name="base.json")
    assert report["model"]["sha256"] and len(report["model"]["sha256"]) == 64
    line = _usage_line(pytester.runpytest_inprocess(
        f"--refract-model={second}", f"--refract-corpus={long_corpus}", "--refract-axes=kld", "--refract-ctx=64",
        "--refract-candidate=ctk=f32,ctv=f32", "--refract-no-cache", f"--refract-baseline={pytester.path / 'base.json'}",
        "-p", "no:cacheprovider"))
    assert "was measured on another model" in line and "whole-file sha256" in line, line


def test_a_baseline_naming_no_model_hash_is_refused(pytester, fake_llamacpp, tiny_model, long_corpus):
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld", report_name="base.json")
    report["model"]["sha256"] = None
    (pytester.path / "base.json").write_text(json.dumps(report))
    line = _usage_line(pytester.runpytest_inprocess(
        f"--refract-model={tiny_model}", f"--refract-corpus={long_corpus}", "--refract-axes=kld", "--refract-ctx=64",
        "--refract-candidate=ctk=f32,ctv=f32", "--refract-no-cache", f"--refract-baseline={pytester.path / 'base.json'}",
        "-p", "no:cacheprovider"))
    assert "does not name its model's whole-file sha256" in line, line


# --------------------------------------------------------------------------- 11. signals while finishing

SIGNAL_CONFTEST = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import fake_engine
from pytest_refract.audit import runner
from pytest_refract.report import html as html_mod
runner._load_llamacpp = lambda settings: fake_engine
real = html_mod.render_html

def render_html(report):
    os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM while the reports are written
    os.kill(os.getpid(), signal.SIGINT)
    return real(report)

html_mod.render_html = render_html
"""


def test_a_signal_while_the_reports_are_written_does_not_leave_a_stale_one(pytester, tiny_model, long_corpus):
    pytester.makeconftest(SIGNAL_CONFTEST.format(tests=str(Path(__file__).parent)))
    html, report = pytester.path / "r.html", pytester.path / "r.json"
    html.write_text("<html>an older run's PASS</html>")
    result = pytester.runpytest_subprocess(
        f"--refract-model={tiny_model}", f"--refract-corpus={long_corpus}", "--refract-axes=kld", "--refract-ctx=64",
        "--refract-candidate=ctk=f32,ctv=f32", "--refract-no-cache", "--refract-threads=1", f"--refract-json={report}",
        f"--refract-html={html}", "-p", "no:cacheprovider", timeout=120)
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text, text
    assert "older run" not in html.read_text() and read_report(report)["complete"] is True
    assert "refract: SIGTERM and SIGINT arrived while the reports were written; they were finished first" in text


# --------------------------------------------------------------------------- 19. canonical labels


def test_a_default_spelled_out_is_the_same_label():
    from pytest_refract.engines.kvconfig import parse_kv_config

    assert parse_kv_config("ctk=q8_0,ctv=q8_0,fa=on").label() == parse_kv_config("ctk=q8_0,ctv=q8_0").label()
    assert parse_kv_config("ctk=q8_0,ctv=q8_0,fa=off").label() == "ctk=q8_0,ctv=q8_0,fa=off"


def test_a_baseline_of_the_same_computation_spelled_otherwise_is_measured(pytester, fake_llamacpp, tiny_model,
                                                                        long_corpus):
    _result, base = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld", report_name="base.json")
    # As an earlier version wrote a candidate given with fa=on.
    base["candidate"] = "ctk=f32,ctv=f32,fa=on"
    (pytester.path / "base.json").write_text(json.dumps(base))
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-axes=kld",
                            "--refract-candidate=ctk=f32,ctv=f32,fa=on",
                            f"--refract-baseline={pytester.path / 'base.json'}")
    assert report["candidate"] == "ctk=f32,ctv=f32"
    assert not any("never measured" in r or "measured ctk" in r for r in report["gate"]["reasons"]), \
        report["gate"]["reasons"]


# --------------------------------------------------------------------------- 23. no negative damage


def _kld_items(means, n_positions=63):
    return [{"id": f"c{k}", "mean_kld": m, "n_positions": n_positions, "score": 100.0} for k, m in enumerate(means)]


@pytest.mark.parametrize("same_computation", [True, False])
def test_a_negative_damage_is_zero_and_inside_its_interval(same_computation):
    from pytest_refract.axes import BUILTIN
    from pytest_refract.scoring.verdict import axis_verdict

    rng = np.random.default_rng(0)
    control = _kld_items(0.004 + 0.001 * rng.random(16))
    candidate = _kld_items(-1e-4 + 1e-5 * rng.random(16))  # below 0: the 16-bit storage of the reference
    v = axis_verdict(BUILTIN["kld"], candidate, control, control_score=99.6, same_computation=same_computation)
    assert v.multiple is not None and v.multiple >= 0 and v.damage >= 0
    lo, hi = v.multiple_ci95
    # Below the items a PASS needs the interval is open above (hi None): the point is still in it.
    assert lo <= v.multiple and (hi is None or v.multiple <= hi)
    assert "KLD 0x the control" in v.headline() and " -" not in v.headline()


def test_a_negative_mean_kld_is_reported_as_zero():
    from pytest_refract.scoring.metrics import kld_summary

    n = 8
    s = kld_summary(np.full(n, -2e-7), np.zeros(n), np.ones(n), np.ones(n), np.ones(n, bool))
    assert s["mean_kld"] == 0.0


def test_the_spot_check_raises_no_false_alarm_on_llama_cpp(tiny_model, tiny_prompts, tiny_corpus, tmp_path,
                                                           monkeypatch):
    """The real engine gives the same bits on a re-measurement, so an intact cache passes (a
    false alarm would distrust every warm run). Every kind's first cached read is checked."""
    pytest.importorskip("llama_cpp")
    from test_runner_fake import _settings

    from pytest_refract.audit.runner import Runner
    from pytest_refract.axes import resolve
    from pytest_refract.reference import store

    monkeypatch.setattr(store, "SPOT_WINDOW", 1)
    settings = _settings(tiny_model, tiny_prompts, tiny_corpus, candidate="ctk=q8_0,ctv=q8_0", axes=("trajectory", "kld"),
                         cache_dir=str(tmp_path / "cache"), gate_basis="verdict")
    for _run in range(2):
        axes = resolve()
        runner = Runner(settings, axes)
        planned = [unit for unit, _group in runner.items()]
        runner.set_plan(planned)
        for unit in planned:
            runner.measure(unit)
        checks = runner.control.spot_checks + runner.reference.spot_checks
        runner.close()
    assert sorted(c.get("axis") or c.get("kind") for c in checks) == ["kld", "kld", "trajectory", "trajectory"]
    assert all(c["match"] for c in checks) and runner.reference.tampered is None
