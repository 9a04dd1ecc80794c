"""The decode axis (axes/decode.py) on the fake engine: one token per llama_decode, compared
with the KLD axis's batched reference rows; the verdict against a control measured the same
way; and the flag for a build whose one-token decode path disagrees with its batched path."""

from __future__ import annotations

import fake_engine
import pytest
from conftest import unrepeated_text
from test_runner_fake import audit_every_item

from pytest_refract.audit.runner import Runner
from pytest_refract.axes import BUILTIN, resolve
from pytest_refract.axes.decode import decode_and_batched, intervals_disagree, window_of
from pytest_refract.engines.kvconfig import parse_kv_config
from pytest_refract.settings import Settings


def _settings(model, corpus, candidate="ctk=q8_0,ctv=q8_0", **over) -> Settings:
    values = dict(model=str(model), reference=parse_kv_config("ctk=f16,ctv=f16"),
                  candidates=(parse_kv_config(candidate),), axes=("kld", "decode"),
                  fail_under=0.0, fail_under_text="0", item_fail_under=None, json_path=None,
                  prompts_path=None, corpus_path=str(corpus), n_predict=8, ctx=64, chunks=None, seed=0,
                  threads=1, gpu_layers=0, floor=False, decode_batch=1, decode_window=8, decode_chunks=4,
                  sensitivity=parse_kv_config("ctk=bf16,ctv=bf16"), gate_basis="verdict", sequential=False)
    values.update(over)
    return Settings(**values)


@pytest.fixture
def clean_fake():
    yield
    fake_engine.DECODE_NOISE.clear()
    fake_engine.NO_OP_TYPES.clear()


@pytest.fixture
def corpus(tmp_path):
    # 8 chunks of 64 tokens of varied words (the fake tokenizer hashes words).
    path = tmp_path / "corpus.txt"
    path.write_text(unrepeated_text(8 * 64 + 10), encoding="utf-8")
    return path


def test_window_is_capped_at_the_scored_half():
    assert window_of(64, 8) == 8
    assert window_of(64, 1000) == 31  # positions 32 .. 62 predict a token inside the chunk
    assert window_of(8, 32) == 3


def test_decode_rows_come_from_one_token_steps(tiny_model, corpus, clean_fake):
    """The window is fed one token per engine step, after the prefix in one batch; a healthy
    engine (the fake computes the same rows either way) gives decode == batched exactly."""
    settings = _settings(tiny_model, corpus)
    runner = Runner(settings, resolve(), engine_mod=fake_engine)
    steps = []
    ctx = runner.context("cand0")
    original = ctx._decode
    ctx._decode = lambda rows, seqs: (steps.append(len(rows)), original(rows, seqs))[1]
    tokens = list(range(3, 67))
    from pytest_refract.reference.codec import LogprobRows, compact, concat_quantized, sparse_logprobs

    ref = runner.context("reference")
    parts = []
    ref.reset()
    ref.evaluate_each(0, tokens[:-1], 0, 32, lambda first, view: parts.append(sparse_logprobs(view)))
    rows = LogprobRows(compact(concat_quantized(parts)))
    decoded, batched = decode_and_batched(ctx, tokens, 8, rows[0:8], tokens[33:41])
    assert steps[0] == 40 and steps[1:] == [1] * 8  # prefix + window in one batch, then 8 single steps
    assert list(decoded["kld"]) == list(batched["kld"])
    assert len(decoded["kld"]) == 8
    runner.close()


def test_decode_axis_section_and_verdict(tiny_model, corpus, clean_fake):
    report, results = audit_every_item(_settings(tiny_model, corpus))
    section = report["axes"]["decode"]
    assert section["n_chunks"] == 4 and section["n_positions"] == 4 * 8
    assert section["window"] == 8 and section["first_position"] == 32
    assert section["mean_kld"] > 0 and section["batched"]["mean_kld"] == pytest.approx(section["mean_kld"])
    assert section["decode_batched_disagree"] is False
    assert section["verdict"]["axis"] == "decode" and section["verdict"]["basis"] in ("multiple", "absolute")
    assert "decode" in report["verdict"]["axes"]
    # The control was measured the same way, on the same chunks.
    assert set(results["control"]["decode"]) == set(results["cand0"]["decode"])
    # Its chunks are the KLD axis's first ones: the reference rows are shared (cache-less run:
    # from memory), and per item the candidate decoded exactly the window one token at a time.
    assert set(results["cand0"]["decode"]) <= set(results["cand0"]["kld"])
    item = next(iter(results["cand0"]["decode"].values()))
    assert item["compute"]["cand0"]["decode_tokens"] == 8
    assert not any(line.startswith("Decode and batched KLD disagree") for line in report["diagnosis"])


def test_a_broken_decode_kernel_is_flagged(tiny_model, corpus, clean_fake):
    healthy, _ = audit_every_item(_settings(tiny_model, corpus))
    fake_engine.DECODE_NOISE["q8_0"] = 1.0
    report, _ = audit_every_item(_settings(tiny_model, corpus))
    section = report["axes"]["decode"]
    assert section["decode_batched_disagree"] is True
    assert section["mean_kld"] > 10 * section["batched"]["mean_kld"]
    assert any(line.startswith("Decode and batched KLD disagree") for line in report["diagnosis"])
    assert section["verdict"]["verdict"] == "FAIL"
    # The batched KLD axis cannot see it: its numbers are those of the healthy build.
    assert report["axes"]["kld"]["mean_kld"] == healthy["axes"]["kld"]["mean_kld"]
    assert healthy["axes"]["decode"]["decode_batched_disagree"] is False


def test_intervals_disagree():
    assert intervals_disagree([0.1, 0.2], [0.3, 0.4]) is True
    assert intervals_disagree([0.3, 0.4], [0.1, 0.2]) is True
    assert intervals_disagree([0.1, 0.3], [0.2, 0.4]) is False
    assert intervals_disagree(None, [0.2, 0.4]) is None


def test_decode_is_opt_in_and_part_of_full():
    from pytest_refract.settings import DEFAULT_AXES

    assert "decode" not in DEFAULT_AXES and "decode" in BUILTIN


# --------------------------------------------------------------------------- what ran, no-op


def test_a_candidate_that_computes_the_reference_is_a_no_op(tiny_model, corpus, clean_fake):
    """A build that ignores the candidate's cache types (the fake computes f16 for q8_0):
    bit-identical logits on every scored position, flagged, never a PASS, the gate fails."""
    fake_engine.NO_OP_TYPES.add("q8_0")
    report, results = audit_every_item(_settings(tiny_model, corpus, axes=("kld",)))
    assert all(r["logits_identical_to_reference"] is True for r in results["cand0"]["kld"].values())
    assert report["axes"]["kld"]["logits_identical_to_reference"] is True
    assert report["no_op"].startswith("no-op: this cache config changed nothing")
    assert report["verdict"]["verdict"] != "PASS" and report["verdict"]["no_op"] == report["no_op"]
    assert report["gate"]["passed"] is False and any("no-op" in r for r in report["gate"]["reasons"])
    assert report["diagnosis"][0].startswith("NO-OP: no-op: this cache config changed nothing")
    # Its axes measured what ran: the KLD axis itself finds nothing beyond the margin (the storage
    # floor only; too few chunks here for a PASS of its own).
    assert report["axes"]["kld"]["verdict"]["verdict"] != "FAIL"
    # The control (bf16) is not the reference's computation.
    assert all(r["logits_identical_to_reference"] is False for r in results["control"]["kld"].values())
    from pytest_refract.report.html import render_html

    assert "<strong>No-op.</strong> no-op: this cache config changed nothing" in render_html(report)
    assert report["ranking"][0]["no_op"] == report["no_op"]


def test_a_working_candidate_and_a_self_reference_are_no_no_op(tiny_model, corpus, clean_fake):
    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("kld",)))
    assert report["axes"]["kld"]["logits_identical_to_reference"] is False and report["no_op"] is None
    same, _ = audit_every_item(_settings(tiny_model, corpus, candidate="ctk=f16,ctv=f16", axes=("kld",)))
    # Identical logits, but the types do not differ: that is a self-reference, not a no-op.
    assert same["axes"]["kld"]["logits_identical_to_reference"] is True and same["no_op"] is None


def test_ran_is_recorded_per_config(tiny_model, corpus, clean_fake):
    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("kld",)))
    ran = report["ran"]
    assert set(ran) == {"type_k", "type_v", "flash_attn", "rotation", "library", "warnings"}
    assert (ran["type_k"], ran["type_v"]) == ("q8_0", "q8_0")
    assert set(ran["library"]) == {"path", "sha256", "system_info"}
    assert ran["library"]["path"] == "~/venv/lib/libllama.so" and ran["library"]["sha256"] == "ab" * 32
    assert (report["reference_ran"]["type_k"], report["reference_ran"]["type_v"]) == ("f16", "f16")
    assert (report["sensitivity"]["ran"]["type_k"], report["sensitivity"]["ran"]["type_v"]) == ("bf16", "bf16")


def test_terminal_and_html_show_ran_decode_and_no_op(tiny_model, corpus, clean_fake):
    from pytest_refract.report import terminal
    from pytest_refract.report.html import render_html

    fake_engine.DECODE_NOISE["q8_0"] = 1.0
    report, _ = audit_every_item(_settings(tiny_model, corpus))

    class Out:
        def __init__(self):
            self.text = []

        def write_sep(self, sep, title):
            self.text.append(title + "\n")

        def write(self, text, **kw):
            self.text.append(text)

        def write_line(self, text="", **kw):
            self.text.append(text + "\n")

    out = Out()
    terminal.render(out, report, None, resolve())
    text = "".join(out.text)
    assert "  ran      K q8_0 / V q8_0" in text and "  ran      K f16 / V f16" in text
    assert "DECODE ≠ BATCHED" in text and "Decode and batched KLD disagree" in text
    html = render_html(report)
    assert "Decode and batched KLD disagree" in html and "ran (candidate)" in html and "K q8_0 / V q8_0" in html


def test_decode_reads_the_kld_axis_reference_entries(tiny_model, corpus, clean_fake, tmp_path):
    """On a cold cache the KLD axis writes each chunk's reference; the decode axis reads those
    entries back rather than running the reference again; a warm run reads both."""
    cache = tmp_path / "cache"
    cold, results = audit_every_item(_settings(tiny_model, corpus, cache_dir=str(cache)))
    decode_items = list(results["cand0"]["decode"].values())
    # Every chunk's reference comes from the KLD axis's entry; at most one is computed again, by
    # the cache's spot check (one cached read per kind, re-measured and compared bit for bit).
    recomputed = [r for r in decode_items
                  if "reference" in r["compute"] and r["compute"]["reference"]["batch_tokens"] > 0]
    assert len(recomputed) <= 1 and len(decode_items) >= 2
    assert all(r["reference_cache"]["hits"] == 1 for r in decode_items if r not in recomputed)
    assert all(r["reference_cache"]["misses"] == 0 for r in decode_items)
    warm, _ = audit_every_item(_settings(tiny_model, corpus, cache_dir=str(cache)))
    assert warm["axes"]["decode"]["mean_kld"] == cold["axes"]["decode"]["mean_kld"]
    assert warm["reference_cache"]["misses"] == 0
