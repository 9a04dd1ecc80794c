"""The depth axis (axes/depth.py) on the fake engine and the tiny model: its chunk layout and
depth buckets, logits only at the scored positions, the JSON schema of its buckets, and the
second half of a chunk at stride 1 equal to the KLD axis at the same chunk length."""

from __future__ import annotations

import json

import fake_engine
import numpy as np
import pytest
from conftest import unrepeated_text
from test_runner_fake import audit_every_item, measure_every_item

from pytest_refract.audit.runner import Runner
from pytest_refract.axes import resolve
from pytest_refract.engines.kvconfig import parse_kv_config
from pytest_refract.inputs.depth import bucket_edges, bucket_of, scored_positions
from pytest_refract.settings import Settings


def _settings(model, corpus, candidate="ctk=q8_0,ctv=q4_0", **over) -> Settings:
    values = dict(model=str(model), reference=parse_kv_config("ctk=f16,ctv=f16"),
                  candidates=(parse_kv_config(candidate),), axes=("kld", "depth"),
                  fail_under=0.0, fail_under_text="0", item_fail_under=None, json_path=None,
                  prompts_path=None, corpus_path=str(corpus), n_predict=8, ctx=512, chunks=None, seed=0,
                  threads=1, gpu_layers=0, floor=False, decode_batch=1, depth=512, depth_stride=1,
                  sensitivity=parse_kv_config("ctk=bf16,ctv=bf16"), gate_basis="verdict", sequential=False)
    values.update(over)
    return Settings(**values)


@pytest.fixture
def corpus(tmp_path):
    # 3 chunks of 1024 tokens of varied words (the fake tokenizer hashes words).
    path = tmp_path / "corpus.txt"
    path.write_text(unrepeated_text(3 * 1024 + 10), encoding="utf-8")
    return path


def test_bucket_edges_double_and_end_with_the_second_half():
    assert bucket_edges(512) == [256, 512]
    assert bucket_edges(4096) == [256, 512, 1024, 2048, 4096]
    assert bucket_edges(8192) == [256, 512, 1024, 2048, 4096, 8192]
    # Not a power of two: the last bucket is still the second half.
    assert bucket_edges(6000) == [256, 512, 1024, 2048, 3000, 6000]


@pytest.mark.parametrize("depth,stride", [(512, 1), (1024, 16), (4096, 16), (6000, 7)])
def test_scored_positions_follow_the_stride_in_every_bucket(depth, stride):
    positions = scored_positions(depth, stride)
    edges = bucket_edges(depth)
    assert positions == sorted(set(positions))
    assert positions[0] == 256 and positions[-1] <= depth - 2
    which = bucket_of(positions, edges)
    for b in range(len(edges) - 1):
        inside = [p for p, w in zip(positions, which) if w == b]
        assert inside[0] == edges[b], "each bucket's grid starts at its own edge"
        assert all(q - p == stride for p, q in zip(inside, inside[1:]))
    if stride == 1:
        # The second half is exactly llama-perplexity's scored positions n/2 .. n-2.
        assert [p for p in positions if p >= depth // 2] == list(range(depth // 2, depth - 1))


def test_depth_second_half_equals_the_kld_axis_at_stride_1(tiny_model, corpus):
    """At stride 1 the last bucket is the KLD axis's chunk at --refract-ctx=N: same chunks, same
    positions, the same mean KLD per chunk."""
    report, results = audit_every_item(_settings(tiny_model, corpus, ctx=512, depth=512, depth_stride=1))
    kld = {i["id"]: i for i in report["axes"]["kld"]["items"]}
    depth = {i["id"]: i for i in report["axes"]["depth"]["items"]}
    assert set(depth) <= set(kld) and len(depth) >= 2
    for cid, item in depth.items():
        assert item["bucket_edges"] == [256, 512]
        assert item["bucket_positions"] == [255] == [kld[cid]["n_positions"]]
        assert item["bucket_kld_sum"][0] / 255 == pytest.approx(kld[cid]["mean_kld"], rel=1e-9, abs=1e-12)
    assert report["axes"]["depth"]["buckets"][0]["mean_kld"] == pytest.approx(report["axes"]["kld"]["mean_kld"],
                                                                             rel=1e-9)


def test_logits_only_at_scored_positions(tiny_model, corpus, monkeypatch):
    settings = _settings(tiny_model, corpus, axes=("depth",), depth=1024, depth_stride=16)
    runner = Runner(settings, resolve(), engine_mod=fake_engine)
    wanted = []
    original = fake_engine.FakeContext._decode
    monkeypatch.setattr(fake_engine.FakeContext, "_decode", lambda self, rows, seqs: (
        wanted.extend(r[1] for r in rows if r[2]), original(self, rows, seqs))[1])
    results = measure_every_item(runner)
    runner.close()
    assert wanted, "the candidate decoded nothing"
    per_chunk = scored_positions(1024, 16)
    assert len(wanted) % len(per_chunk) == 0
    assert wanted[: len(per_chunk)] == per_chunk
    assert results


def test_json_buckets_schema(tiny_model, corpus):
    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("depth",), depth=1024, depth_stride=8))
    json.dumps(report, allow_nan=False)
    section = report["axes"]["depth"]
    assert section["stride"] == 8 and section["depth"] == 1024
    buckets = section["buckets"]
    assert [(b["from"], b["to"]) for b in buckets] == [(256, 512), (512, 1024)]
    keys = {"from", "to", "positions", "mean_kld", "control_mean_kld", "multiple", "multiple_ci95", "verdict",
            "same_top_pct", "kld_p999"}
    n_chunks = section["n_chunks"]
    assert n_chunks >= 2
    for b in buckets:
        assert keys <= set(b)
        assert b["positions"] == n_chunks * len(range(b["from"], min(b["to"], 1023), 8))
        assert b["control_mean_kld"] is not None and b["verdict"] in ("PASS", "FAIL", "UNDECIDED")
        assert b["mean_kld"] > 0 and b["kld_p999"] >= b["mean_kld"]
        if b["multiple"] is not None:
            assert b["multiple"] == pytest.approx(b["mean_kld"] / b["control_mean_kld"], rel=1e-9)
    v = section["verdict"]
    assert v["axis"] == "depth" and "at depth" in v["reason"]
    assert set(np.asarray([b["verdict"] for b in buckets])) <= {"PASS", "FAIL", "UNDECIDED"}


def test_terminal_and_html_show_the_buckets_and_the_context_covered(tiny_model, corpus):
    from pytest_refract.report.html.render import render_html
    from pytest_refract.report.terminal import render

    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("kld", "depth"), depth=1024, depth_stride=8))
    assert report["context_evidence"]["tokens"] == 1024 and report["context_evidence"]["depth_axis"]
    lines = []

    class TR:
        def write_sep(self, *a, **k):
            pass

        def write(self, text, **k):
            lines.append(text)

        def write_line(self, text="", **k):
            lines.append(text + "\n")

    render(TR(), report, None)
    text = "".join(lines)
    assert "evidence up to 1024 tokens of context" in text
    assert text.count("depth    256\u2013512") == 1 and "depth    512\u20131024" in text
    assert "by depth:" in text
    page = render_html(report)
    assert 'aria-label="Multiple of the control&#x27;s KLD by depth"' in page and 'class="hline"' in page
    # Each series' line is a path of the class its points (circles) have; the stylesheet fills
    # the points, so it must leave the paths unfilled, or a line is drawn as a filled polygon.
    import re

    from pytest_refract.report.html.render import STYLESHEET

    unfilled = " ".join(sel for sel, body in re.findall(r"([^{}]+)\{([^{}]*)\}", STYLESHEET) if "fill: none" in body)
    for cls in ("line-multiple", "line-cand", "line-ctrl"):
        assert f'<path class="{cls}"' in page
        assert f"path.{cls}" in unfilled, cls
    assert "Mean KLD by depth" in page and "Context covered:" in page


def test_without_depth_every_report_says_how_far_its_evidence_reaches(tiny_model, corpus):
    from pytest_refract.report.html.render import render_html

    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("kld",), ctx=512))
    evidence = report["context_evidence"]
    assert evidence["tokens"] == 512 and not evidence["depth_axis"]
    assert "evidence up to 512 tokens of context" in evidence["text"] and "--refract-full" in evidence["text"]
    page = render_html(report)
    assert "evidence up to 512 tokens of context" in page
    # The page leads with what the gate reads; the context it covers qualifies it, after it.
    assert page.index('id="verdict"') < page.index('id="context-covered"')


def test_a_matrix_recommends_by_every_depth_bucket(tiny_model, corpus):
    """Which config to ship reads each depth bucket as a test of its own."""
    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("depth",), depth=1024, depth_stride=8,
                                 candidates=(parse_kv_config("ctk=q8_0,ctv=q8_0"), parse_kv_config("ctk=q4_0,ctv=q4_0"))))
    json.dumps(report, allow_nan=False)
    rec = report["recommendation"]
    assert set(rec["decisions"]) == {"ctk=q8_0,ctv=q8_0", "ctk=q4_0,ctv=q4_0"}
    # Six chunks cannot PASS (46 are needed): nothing is recommended.
    assert rec["recommended"] is None
    for sec in report["candidates"]:
        assert [b["from"] for b in sec["axes"]["depth"]["buckets"]] == [256, 512]


def test_depth_charts_tool_writes_every_candidates_charts_as_standalone_svg(tiny_model, corpus, tmp_path):
    """tools/depth_charts.py: the HTML report draws the depth charts of its leading candidate;
    the tool writes both charts of every candidate as SVG files that parse on their own, and
    refuses to replace one."""
    import importlib.util
    import xml.etree.ElementTree as ET
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("depth_charts", Path(__file__).parent.parent / "tools" / "depth_charts.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("depth",), depth=1024, depth_stride=8,
                                 candidates=(parse_kv_config("ctk=q8_0,ctv=q8_0"), parse_kv_config("ctk=q4_0,ctv=q4_0"))))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report), encoding="utf-8")
    out = tmp_path / "img"
    assert tool.main([str(path), str(out), "--prefix", "tiny"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tiny-q4_0-q4_0-kld.svg", "tiny-q4_0-q4_0-multiple.svg",
                     "tiny-q8_0-q8_0-kld.svg", "tiny-q8_0-q8_0-multiple.svg"]
    svg = ET.parse(out / "tiny-q4_0-q4_0-multiple.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.get("aria-label") == "Multiple of the control's KLD by depth"
    assert "--muted" in svg.find("{http://www.w3.org/2000/svg}style").text  # the report's own colours
    # Each candidate's own buckets: q4_0's multiple is not q8_0's.
    assert (out / "tiny-q4_0-q4_0-multiple.svg").read_text() != (out / "tiny-q8_0-q8_0-multiple.svg").read_text()
    before = (out / "tiny-q8_0-q8_0-kld.svg").read_bytes()
    assert tool.main([str(path), str(out), "--prefix", "tiny"]) == 2
    assert (out / "tiny-q8_0-q8_0-kld.svg").read_bytes() == before
    no_depth = tmp_path / "none.json"
    no_depth.write_text(json.dumps({"axes": {"kld": {}}}), encoding="utf-8")
    assert tool.main([str(no_depth), str(out)]) == 2
    a_file = tmp_path / "a-file"
    a_file.write_text("mine", encoding="utf-8")
    assert tool.main([str(path), str(a_file)]) == 2  # one line, no traceback
    assert a_file.read_text(encoding="utf-8") == "mine"
    assert tool.main([str(tmp_path / "missing.json"), str(out)]) == 2


def test_a_looks_errors_reach_every_bucket(tiny_model, corpus, monkeypatch):
    """A sequential look (stopping.py) or the report reads the axis through verdict.axis_verdict
    with the look's errors: every bucket is tested at the whole PASS error and its share of the
    FAIL error."""
    from pytest_refract.axes.depth import DepthAxis
    from pytest_refract.scoring import depth as D
    from pytest_refract.scoring import verdict as V

    _report, results = audit_every_item(_settings(tiny_model, corpus, axes=("depth",), depth=1024, depth_stride=8))
    cand, ctrl = list(results["cand0"]["depth"].values()), list(results["control"]["depth"].values())
    seen = []
    real = V.axis_verdict

    def spy(axis, *args, **kwargs):
        if not isinstance(axis, DepthAxis):
            seen.append(kwargs.get("errors"))
        return real(axis, *args, **kwargs)

    monkeypatch.setattr(D.V, "axis_verdict", spy)
    v = real(DepthAxis(), cand, ctrl, errors=(0.0125, 0.004))
    assert seen == [(0.0125, 0.002), (0.0125, 0.002)]
    assert (v.pass_error, v.fail_error) == (0.0125, 0.004)
    assert v.verdict == D.combine([b["verdict"] for b in v.detail["buckets"]])


def test_no_control_still_reports_every_bucket(tiny_model, corpus):
    report, _ = audit_every_item(_settings(tiny_model, corpus, axes=("depth",), depth=1024, depth_stride=8, sensitivity=None,
                                 gate_basis="raw"))
    json.dumps(report, allow_nan=False)
    buckets = report["axes"]["depth"]["buckets"]
    assert len(buckets) == 2 and all(b["mean_kld"] > 0 and b["control_mean_kld"] is None for b in buckets)
    assert report["axes"]["depth"]["growth"] is None


def test_a_depth_chunk_repeated_token_for_token_counts_once(tiny_model, tmp_path):
    # 512 words, then the same 512 twice more: with BOS over each chunk's first token, depth
    # chunks 1 and 2 are chunk 0 again. Counted three times they would narrow every bucket's
    # interval as if they were independent.
    words = " ".join(f"w{i % 97}x{i % 13}" for i in range(512))
    path = tmp_path / "loop.txt"
    path.write_text(" ".join([words] * 3 + ["tail"] * 20), encoding="utf-8")
    settings = _settings(tiny_model, path, axes=("depth",), depth=512, depth_stride=8)
    report, results = audit_every_item(settings)
    ids = [item["id"] for item in report["axes"]["depth"]["items"]]
    assert len(ids) == 1, ids
    assert "2 depth chunk(s) of 512 tokens repeat an earlier one and count once" in report["settings"]["chunks_note"]
