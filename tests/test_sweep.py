"""--refract-sweep: the family's procedure (Holm over rows, a fixed sequence within each row) in
a seeded simulation with 60 pairs at the margin, its rows against gatekeeping by size, and a
whole sweep on the fake engine with known damage per cache type (the recommendation is the
smallest PASS config, every skipped pair is one the procedure could no longer recommend, the
grid and frontier match the items), its gate and its bad input; the tiny model checks the
plumbing against the real llama.cpp type table (refused pairs with llama.cpp's reason)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import read_report

import pytest_refract.audit.runner  # noqa: F401  # in sys.modules before pytester snapshots it, so fake_llamacpp's patch holds
from pytest_refract.scoring import verdict as V
from pytest_refract.scoring.family import NOT_PASS, NOT_TESTED, Contender, recommend
from tests.test_verdict_sim import binomial_quantile

AXES = {"kld": SimpleNamespace(MARGIN=3.0, damage=V.ratio_of_sums, ZERO_DAMAGE_EXACT=True, DAMAGE_COUNTS=False)}


def _grid(rng, n: int, multiple, rows: int = 6, cols: int = 10):
    """One shared control and rows x cols candidates (heavy-tailed KLD-like damage per chunk),
    candidate (k, j) at true multiple ``multiple(k, j)`` of the control's damage; sizes fall
    along each row and down the rows."""
    d = 0.004 * rng.lognormal(-0.5, 1.0, n)
    pos = np.full(n, 255.0)
    ctrl = np.column_stack([d * rng.lognormal(-0.01125, 0.15, n) * pos, pos])
    tables, contenders = [], []
    for k in range(rows):
        for j in range(cols):
            cand = np.column_stack([multiple(k, j) * d * rng.lognormal(-0.5, 1.0, n) * pos, pos])
            tables.append(cand)
            contenders.append(Contender(f"ctk=k{k},ctv=v{j}", float(10_000 - 100 * k - 7 * j), {"kld": (cand, ctrl)}))
    return contenders, np.stack(tables), ctrl


def test_sixty_pairs_at_the_margin_are_recommended_at_most_the_family_error():
    """60 pairs exactly at the margin (6 K rows of 10), one shared control, 75 heavy-tailed
    chunks: the per-pair verdict PASSes some pair far more often than 2.5 %, and so would
    "the smallest pair that PASSes on its own"; the sweep's procedure recommends one at most
    2.5 % of the time (within simulation error: the 99.9 % binomial quantile)."""
    rng = np.random.default_rng(60)
    runs, n = 120, 75
    recommended = alone = 0
    for _ in range(runs):
        contenders, tables, ctrl = _grid(rng, n, lambda k, j: 3.0)
        own = V.margin_test(tables, np.stack([ctrl] * len(tables)), 3.0, 0.025, 0.025, exact_zero=True).verdict
        alone += bool((own == V.PASS).any())
        recommended += recommend(contenders, AXES, by_rows=True).recommended is not None
    assert recommended <= binomial_quantile(runs, 0.025), recommended
    assert alone > 5 * binomial_quantile(runs, 0.025), alone  # the uncorrected rule this replaces


def test_a_k_sensitive_pair_stops_only_its_own_row():
    """Rows: K=a [good 512, bad 400, good 300]; K=b [good 450, good 200]. Gatekeeping by size
    stops at the bad 400 and recommends 450; the sweep's rows test b's 200 and recommend it,
    while a's 300, behind a config that did not PASS, is never tested."""
    rng = np.random.default_rng(4)
    n = 96
    d = 0.004 * rng.lognormal(-0.5, 0.3, n)
    pos = np.full(n, 255.0)
    ctrl = np.column_stack([d * pos, pos])
    good = np.column_stack([1.0 * d * pos, pos])
    bad = np.column_stack([12.0 * d * pos, pos])
    contenders = [Contender("ctk=a,ctv=x", 512.0, {"kld": (good, ctrl)}),
                  Contender("ctk=a,ctv=y", 400.0, {"kld": (bad, ctrl)}),
                  Contender("ctk=a,ctv=z", 300.0, {"kld": (good, ctrl)}),
                  Contender("ctk=b,ctv=x", 450.0, {"kld": (good, ctrl)}),
                  Contender("ctk=b,ctv=z", 200.0, {"kld": (good, ctrl)})]
    rows = recommend(contenders, AXES, by_rows=True)
    assert rows.decisions == {"ctk=a,ctv=x": V.PASS, "ctk=a,ctv=y": NOT_PASS, "ctk=a,ctv=z": NOT_TESTED,
                              "ctk=b,ctv=x": V.PASS, "ctk=b,ctv=z": V.PASS}
    assert rows.recommended == "ctk=b,ctv=z"
    assert rows.order == [["ctk=a,ctv=x", "ctk=a,ctv=y", "ctk=a,ctv=z"], ["ctk=b,ctv=x", "ctk=b,ctv=z"]]
    # Two rows unfinished at first: each head at 2.5 % / 2; once b is done, a's next at 2.5 %.
    assert rows.factors["ctk=a,ctv=x"] == 2.0 and rows.factors["ctk=a,ctv=y"] == 1.0
    assert recommend(contenders, AXES).recommended == "ctk=b,ctv=x"  # gatekeeping by size


def test_equal_caches_are_told_apart_by_the_verdict_score():
    rng = np.random.default_rng(5)
    n = 96
    d = 0.004 * rng.lognormal(-0.5, 0.3, n)
    pos = np.full(n, 255.0)
    ctrl = np.column_stack([d * pos, pos])
    good = np.column_stack([d * pos, pos])
    contenders = [Contender("ctk=a,ctv=x", 300.0, {"kld": (good, ctrl)}, score=80.0),
                  Contender("ctk=b,ctv=x", 300.0, {"kld": (good, ctrl)}, score=95.0)]
    assert recommend(contenders, AXES, by_rows=True).recommended == "ctk=b,ctv=x"


# --------------------------------------------------------------------------- the fake engine


@pytest.fixture
def swept_types(monkeypatch, fake_llamacpp):
    """Known damage per type: "good" costs 0.75 bytes a value and adds less logit noise than the
    bf16 control (PASS); "bad" costs 0.5 and adds 25 times more (FAIL); "meh" costs 0.625."""
    import fake_engine

    monkeypatch.setitem(fake_engine.TYPES, "good", (40, 6, 1, 0.75, 0.0015))
    monkeypatch.setitem(fake_engine.TYPES, "bad", (41, 4, 1, 0.5, 0.05))
    # Near the margin (noise sqrt(3) times the control's: a multiple just under 3), so it takes
    # more items to PASS than "good".
    monkeypatch.setitem(fake_engine.TYPES, "meh", (42, 5, 1, 0.625, 0.002 * 3 ** 0.5))
    return fake_engine


def _sweep(pytester, model, corpus, *extra):
    """A sweep on the fake engine; without a --refract-cache-dir among ``extra``, no reference
    cache (its pairs then run side by side)."""
    report = pytester.path / "sweep.json"
    if report.exists():
        report.unlink()
    cached = any(e.startswith("--refract-cache-dir") for e in extra)
    result = pytester.runpytest_inprocess(
        f"--refract-model={model}", f"--refract-corpus={corpus}", "--refract-ctx=64", "--refract-threads=1",
        *([] if cached else ["--refract-no-cache"]), "--refract-axes=kld", f"--refract-json={report}", "-p",
        "no:cacheprovider", *extra)
    return result, (read_report(report) if report.exists() else None)


def _bytes(k: float, v: float) -> float:
    import fake_engine

    return fake_engine.N_LAYER * fake_engine.N_HEAD_KV * fake_engine.HEAD * (k + v)


def test_the_sweep_recommends_the_smallest_pass_and_skips_only_what_it_cannot_recommend(
        pytester, swept_types, tiny_model, long_corpus):
    html = pytester.path / "sweep.html"
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,bad", f"--refract-html={html}")
    sweep = report["sweep"]
    assert sweep["types"] == ["bad", "good", "f16"]  # fewest bytes per value first
    page = html.read_text()
    for part in ('id="sweep-answer"', 'id="sweep-grid"', 'id="sweep-pareto"', 'id="sweep-frontier"',
                 'id="sweep-recommended"', "recommended: ctk=good,ctv=good"):
        assert part in page, part
    assert "http" not in page.split('id="sweep"')[1].split("</section>")[0]  # offline: nothing fetched
    assert len(sweep["pairs"]) == 8 and "ctk=f16,ctv=f16" not in sweep["pairs"]
    assert sweep["recommendation"]["config"] == "ctk=good,ctv=good"
    assert sweep["recommendation"]["kv_bytes_per_token"] == _bytes(0.75, 0.75)
    assert result.ret == 0, result.stdout.str()
    # Every pair with a "bad" side FAILs; the recommendation PASSes as a family.
    sections = {s["candidate"]: s for s in report["candidates"]}
    for label, sec in sections.items():
        if "bad" in label and label not in {s["candidate"] for s in sweep["skipped"]}:
            assert sec["verdict"]["verdict"] == "FAIL", label
    assert report["recommendation"]["decisions"]["ctk=good,ctv=good"] == "PASS"
    # Skipped: only pairs the procedure can no longer recommend, each saying why.
    rec_size = sweep["recommendation"]["kv_bytes_per_token"]
    for entry in sweep["skipped"]:
        size = sweep["grid"]["cells"][entry["candidate"].split(",")[0][4:]][entry["candidate"].split(",")[1][4:]][
            "kv_bytes_per_token"]
        assert entry["why"].startswith("not needed: ")
        if "PASSes for certain" in entry["why"]:
            assert size > rec_size
        else:
            assert "does not PASS even at the family's full error" in entry["why"]
    assert sorted(sweep["measured"] + [s["candidate"] for s in sweep["skipped"]]) == sorted(sections)
    # The grid is the items' verdicts; the frontier is non-dominated among the measured.
    for label, sec in sections.items():
        k, v = (p.split("=")[1] for p in label.split(","))
        cell = sweep["grid"]["cells"][k][v]
        assert cell["candidate"] == label
        assert cell["skipped"] == (label not in sweep["measured"])
        if not cell["skipped"]:
            assert cell["verdict"] == sec["verdict"]["verdict"]
            assert cell["worst_axis"]["multiple"] == sec["verdict"]["axes"]["kld"]["multiple"]
    points = {c["candidate"]: (c["kv_bytes_per_token"], c["worst_axis"]["multiple"])
              for row in sweep["grid"]["cells"].values() for c in row.values()
              if c.get("worst_axis") and not c.get("skipped")}
    assert sweep["frontier"] and set(sweep["frontier"]) <= set(points)
    for name in sweep["frontier"]:
        kv, m = points[name]
        assert not any(k2 <= kv and m2 <= m and (k2, m2) != (kv, m) for k2, m2 in points.values())
    out = result.stdout.str()
    assert "recommended: ctk=good,ctv=good (38 % of f16's cache), PASS on every axis; smaller caches FAIL on kld" in out
    assert "K \\ V" in out and "*PASS 192" in out
    assert "gate: passed (the sweep recommends ctk=good,ctv=good)" in out


def test_pairs_larger_than_a_certain_pass_are_skipped_and_measuring_them_changes_nothing(
        pytester, swept_types, tiny_model, long_corpus):
    """"meh" (multiple just under the margin) PASSes; its row (meh/f16 down to meh/meh) PASSes at
    the strictest level while the largest pairs (f16/good, good/f16) are still measuring: those
    can no longer be the recommendation, so they stop. Measuring every pair recommends the same."""
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,meh")
    sweep = report["sweep"]
    assert sweep["recommendation"]["config"] == "ctk=meh,ctv=meh" and result.ret == 0
    skipped = {s["candidate"]: s["why"] for s in sweep["skipped"]}
    assert set(skipped) == {"ctk=f16,ctv=good", "ctk=good,ctv=f16"}, skipped
    for label, why in skipped.items():
        k, v = (p.split("=")[1] for p in label.split(","))
        assert why.startswith("not needed: ctk=meh,ctv=meh (160 B/token) PASSes for certain"), why
        assert sweep["grid"]["cells"][k][v]["kv_bytes_per_token"] > 160
        assert sweep["grid"]["cells"][k][v]["skipped"] is True
        assert report["recommendation"]["decisions"][label] != "PASS"
    measured_items = sum(len(s["axes"]["kld"].get("items") or []) for s in report["candidates"])
    result, every = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,meh",
                           "--refract-sweep-exhaustive")
    assert every["sweep"]["skipped"] == [] and len(every["sweep"]["measured"]) == 8
    assert every["sweep"]["recommendation"]["config"] == "ctk=meh,ctv=meh" and result.ret == 0
    assert sum(len(s["axes"]["kld"].get("items") or []) for s in every["candidates"]) > measured_items


def test_pairs_measured_one_after_another_skip_every_row_a_certain_pass_rules_out(
        pytester, swept_types, tiny_model, long_corpus):
    """With the reference cache read, the pairs run one at a time in sweep.measuring_order: the
    "meh" row (the smallest caches) first, top down. Once meh/meh PASSes for certain, every
    other pair is larger, so the "good" and "f16" rows never run an item, where side by side
    (no cache) they ran until the same look. Same recommendation, fewer items, one
    candidate's KV cache open at a time."""
    cache = pytester.path / "refcache"
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,meh",
                            f"--refract-cache-dir={cache}", "-v")
    sweep = report["sweep"]
    assert sweep["recommendation"]["config"] == "ctk=meh,ctv=meh" and result.ret == 0
    meh_row = ["ctk=meh,ctv=f16", "ctk=meh,ctv=good", "ctk=meh,ctv=meh"]
    assert sorted(sweep["measured"]) == sorted(meh_row)
    assert len(sweep["skipped"]) == 5
    for entry in sweep["skipped"]:
        # Ruled out by a pair of the meh row that PASSes for certain and is smaller.
        k, v = (p.split("=")[1] for p in entry["candidate"].split(","))
        certain = entry["why"].split("not needed: ", 1)[1].split(" (", 1)[0]
        assert certain in meh_row and "PASSes for certain" in entry["why"], entry
        assert sweep["grid"]["cells"][k][v]["kv_bytes_per_token"] > float(entry["why"].split("(")[1].split(" B")[0])
    sections = {s["candidate"]: s for s in report["candidates"]}
    for label in set(sections) - set(meh_row):
        assert not sections[label]["axes"]["kld"].get("items"), label  # not one item measured
        assert report["recommendation"]["decisions"][label] != "PASS"
    # Run order: each pair's items back to back, the meh row top down.
    ran = [line.split("[", 1)[1].split("-chunk-")[0] for line in result.stdout.lines
           if line.startswith("refract::test_kld[") and " PASSED" in line]
    firsts = list(dict.fromkeys(ran))
    assert firsts == ["meh-f16", "meh-good", "meh-meh"], firsts
    assert all(ran[i] == ran[i - 1] or ran[i] not in ran[:i] for i in range(1, len(ran)))
    side_by_side_result, side = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,meh")
    assert side["sweep"]["recommendation"]["config"] == "ctk=meh,ctv=meh"
    items = lambda rep: sum(len(s["axes"]["kld"].get("items") or []) for s in rep["candidates"])  # noqa: E731
    assert items(report) < items(side)
    # The KV memory held at once: reference, control and one pair, not all eight.
    assert report["kv_cache_bytes_peak"] < side["kv_cache_bytes_peak"] / 2


def test_the_answer_counts_the_smaller_pairs_skipped_instead_of_listing_them(
        pytester, swept_types, tiny_model, long_corpus):
    """One after another, the "bad" row goes first: bad/f16 FAILs at its first look and the
    rest of its row is never measured. The answer names the smaller pair that FAILed and counts
    the skipped ones (a sweep of every type skips a hundred; their reasons are in the JSON)."""
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,bad",
                            f"--refract-cache-dir={pytester.path / 'refcache'}")
    sweep = report["sweep"]
    assert sweep["recommendation"]["config"] == "ctk=good,ctv=good" and result.ret == 0
    assert {s["candidate"] for s in sweep["skipped"]} >= {"ctk=bad,ctv=good", "ctk=bad,ctv=bad"}
    line = sweep["recommendation"]["line"]
    assert line == ("recommended: ctk=good,ctv=good (38 % of f16's cache), PASS on every axis; smaller caches FAIL "
                    "on kld (ctk=good,ctv=bad); 2 smaller pairs skipped (the procedure could no longer recommend "
                    "them)"), line
    assert line in result.stdout.str()


def test_the_pareto_chart_keeps_the_pairs_near_the_margin_apart_beside_a_pair_at_600x():
    """A sweep of every type puts a 1-bit K cache at 600x beside pairs at 1.1x and 2.5x: on the
    log scale those stay a quarter of the plot apart, and the 3x margin lies between them."""
    import re

    from pytest_refract.report.html.views.sweep import pareto_chart

    def cell(k, v, kv, m, verdict):
        return {"candidate": f"ctk={k},ctv={v}", "verdict": verdict, "kv_bytes_per_token": kv,
                "worst_axis": {"axis": "kld", "multiple": m, "ci": [m * 0.9, m * 1.1]}}

    cells = {"q8_0": {"q8_0": cell("q8_0", "q8_0", 200.0, 1.1, "PASS"), "q4_0": cell("q8_0", "q4_0", 150.0, 2.5, "PASS")},
             "q1_0": {"f16": cell("q1_0", "f16", 180.0, 600.0, "FAIL")}}
    svg = str(pareto_chart({"grid": {"rows": list(cells), "columns": ["q8_0", "q4_0", "f16"], "cells": cells},
                            "frontier": [], "recommendation": None}))
    ys = {float(cx): float(cy) for cx, cy in re.findall(r'<circle cx="([0-9.]+)" cy="([0-9.]+)" r="4.5"', svg)}
    y_of = dict(zip(sorted(ys, key=lambda x: x), [ys[x] for x in sorted(ys)]))  # by x: 150, 180, 200 B
    y25, y600, y11 = list(y_of.values())
    margin = float(re.search(r'y1="([0-9.]+)" y2="[0-9.]+" stroke="currentColor" stroke-dasharray', svg).group(1))
    assert y600 < margin < y25 < y11  # higher multiple, higher on the page
    assert y11 - y25 > 0.1 * (340 - 16 - 40)
    assert "log scale" in svg


def test_the_terminal_does_not_count_the_control_among_the_skipped_pairs():
    """The JSON lists the control's pair under sweep.skipped with its reason; the terminal's
    count of skipped pairs is of candidates only (the grid names the control)."""
    from pytest_refract.report.sweep_text import render_sweep

    control = "the sensitivity control: every candidate's damage is divided by its damage"
    cells = {"bf16": {"bf16": {"candidate": "ctk=bf16,ctv=bf16", "verdict": None, "excluded": control},
                      "f16": {"candidate": "ctk=bf16,ctv=f16", "verdict": "PASS", "kv_bytes_per_token": 10.0}},
             "f16": {"bf16": {"candidate": "ctk=f16,ctv=bf16", "verdict": None, "skipped": True,
                              "kv_bytes_per_token": 10.0}}}
    sweep = {"grid": {"rows": ["bf16", "f16"], "columns": ["bf16", "f16"], "cells": cells},
             "skipped": [{"candidate": "ctk=f16,ctv=bf16", "why": "not needed: ruled out"},
                         {"candidate": "ctk=bf16,ctv=bf16", "why": control}],
             "refused": [], "recommendation": None, "budget": None}
    written: list = []
    tr = SimpleNamespace(write=lambda text, **kw: written.append(text),
                         write_line=lambda text="", **kw: written.append(text + "\n"))
    render_sweep(tr, sweep, "ctk=f16,ctv=f16")
    out = "".join(written)
    assert "  skipped: 1 pair\n" in out and "not needed: ruled out" in out
    assert control not in out and "control" in out  # named in its grid cell, not as a skipped pair


def test_the_sweep_charts_tool_writes_the_pareto_chart_and_the_grid_as_standalone_svg(
        pytester, swept_types, tiny_model, long_corpus, monkeypatch):
    """tools/sweep_charts.py: the HTML report's two sweep charts as SVG files that parse on their
    own, the recommendation ringed; it refuses to replace a file, and a report without a sweep
    is a one-line error."""
    import importlib.util
    import json
    import xml.etree.ElementTree as ET
    from pathlib import Path

    tools = Path(__file__).parent.parent / "tools"
    monkeypatch.syspath_prepend(str(tools))
    spec = importlib.util.spec_from_file_location("sweep_charts", tools / "sweep_charts.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,bad")
    out = pytester.path / "img"
    path = pytester.path / "sweep.json"
    assert tool.main([str(path), str(out), "--prefix", "tiny"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tiny-sweep-grid.svg", "tiny-sweep-pareto.svg"]
    pareto = ET.parse(out / "tiny-sweep-pareto.svg").getroot()
    assert pareto.tag == "{http://www.w3.org/2000/svg}svg" and pareto.get("id") == "sweep-pareto"
    assert pareto.find(".//{http://www.w3.org/2000/svg}circle[@id='sweep-recommended']") is not None
    grid = (out / "tiny-sweep-grid.svg").read_text()
    ET.fromstring(grid)
    assert "--muted" in grid and ">good<" in grid and ">bad<" in grid
    before = (out / "tiny-sweep-grid.svg").read_bytes()
    assert tool.main([str(path), str(out), "--prefix", "tiny"]) == 2
    assert (out / "tiny-sweep-grid.svg").read_bytes() == before
    no_sweep = pytester.path / "none.json"
    no_sweep.write_text(json.dumps({k: v for k, v in report.items() if k != "sweep"}), encoding="utf-8")
    assert tool.main([str(no_sweep), str(pytester.path / "img2")]) == 2
    assert not (pytester.path / "img2").exists()


def test_a_sweep_where_nothing_passes_fails_and_a_budget_names_the_smallest_pass(
        pytester, swept_types, tiny_model, long_corpus):
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,bad")
    assert report["sweep"]["recommendation"] is None and result.ret == 1
    assert "no candidate PASSes" in report["gate"]["reasons"][0]
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,bad",
                            "--refract-kv-budget=0.3")
    budget = report["sweep"]["budget"]
    assert budget["config"] is None and budget["bytes_per_token"] == pytest.approx(0.3 * _bytes(2, 2))
    assert "no PASS config fits the budget" in budget["line"] and "ctk=good,ctv=good" in budget["line"]
    assert result.ret == 1


def test_require_fails_unless_that_config_passes(pytester, swept_types, tiny_model, long_corpus):
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-sweep=f16,good,bad",
                            "--refract-require=ctk=good,ctv=bad")
    assert report["sweep"]["require"] == {"config": "ctk=good,ctv=bad", "verdict": "FAIL", "passed": False}
    assert result.ret == 1
    assert any(r.startswith("--refract-require=ctk=good,ctv=bad") for r in report["gate"]["reasons"])


def test_require_without_a_sweep_adds_its_config_as_a_candidate(pytester, swept_types, tiny_model, long_corpus):
    result, report = _sweep(pytester, tiny_model, long_corpus, "--refract-candidate=ctk=good,ctv=good",
                            "--refract-require=ctk=bad,ctv=good")
    assert [s["candidate"] for s in report["candidates"]] == ["ctk=good,ctv=good", "ctk=bad,ctv=good"]
    assert "--refract-require=ctk=bad,ctv=good: its verdict is FAIL, not PASS" in report["gate"]["reasons"]
    assert result.ret == 1


@pytest.mark.parametrize("flags, said", [
    (("--refract-sweep=f16,q9_9",), "no cache type 'q9_9'; it offers: "),
    (("--refract-sweep=f16,q8_0", "--refract-no-sensitivity"), "drop --refract-no-sensitivity"),
    (("--refract-sweep=f16,q8_0", "--refract-gate=raw"), "drop --refract-gate=raw"),
    (("--refract-sweep=all,q8_0",), "give all or a list"),
    (("--refract-candidate=ctk=q8_0,ctv=q8_0", "--refract-kv-budget=0.5"), "give --refract-sweep=TYPES too"),
    (("--refract-sweep=f16,q8_0", "--refract-kv-budget=lots"), "must be bytes per token"),
    (("--refract-sweep-exhaustive", "--refract-candidate=ctk=q8_0,ctv=q8_0"), "needs --refract-sweep"),
])
def test_bad_sweep_input_is_one_usage_line(pytester, fake_llamacpp, tiny_model, flags, said):
    result = pytester.runpytest_inprocess(f"--refract-model={tiny_model}", "-p", "no:cacheprovider", *flags)
    text = result.stdout.str() + result.stderr.str()
    errors = [line for line in text.splitlines() if line.startswith("ERROR:")]
    assert result.ret == 4 and len(errors) == 1 and "Traceback" not in text, text
    assert said in errors[0], errors[0]


# --------------------------------------------------------------------------- the tiny model


def test_the_build_type_table_and_refused_pairs(pytester, tiny_model, tiny_prompts, tiny_corpus):
    """Real llama.cpp: q2_k's 256-value blocks do not divide the tiny model's 32-wide heads, so
    every pair with q2_k on either side is refused with llama.cpp's reason and never measured;
    "all" is every type of the build's own table."""
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        f"--refract-model={tiny_model}", f"--refract-corpus={tiny_corpus}", "--refract-ctx=64", "--refract-chunks=2",
        "--refract-threads=1", "--refract-axes=kld", "--refract-no-cache", "--refract-sweep=f16,q4_0,q2_k",
        f"--refract-json={report}", f"--refract-html={pytester.path / 'r.html'}")
    sweep = read_report(report)["sweep"]
    refused = {e["candidate"]: e["why"] for e in sweep["refused"]}
    assert set(refused) == {p for p in sweep["pairs"] if "q2_k" in p}
    assert all("block size 256 does not divide" in why for why in refused.values()), refused
    assert sweep["measured"] == ["ctk=q4_0,ctv=q4_0", "ctk=f16,ctv=q4_0", "ctk=q4_0,ctv=f16"]
    # The terminal: one line per reason with its count; q2_k's refused row and column are not drawn.
    out = result.stdout.str()
    assert "  refused: 5 pairs, for 2 reasons" in out, out
    assert "    3 (ctk=q2_k,ctv=q2_k, ...): K type q2_k refused" in out and "): V type q2_k refused" in out
    header = next(line for line in out.splitlines() if line.startswith("  K \\ V"))
    assert "q4_0" in header and "q2_k" not in header
    assert not any(line.startswith("  q2_k") for line in out.splitlines())
    # The page: the same two reasons, each with its pairs folded; no q2_k row or column drawn.
    page = (pytester.path / "r.html").read_text()
    refused_list = page.split('id="sweep-refused"')[1].split("</ul>")[0]
    assert refused_list.count("<li>") == 2 and "<summary>3 pairs</summary>" in refused_list
    grid = page.split('id="sweep-grid"')[1].split("</svg>")[0]
    assert ">q4_0<" in grid and ">q2_k<" not in grid
    bad = pytester.runpytest_subprocess(f"--refract-model={tiny_model}", "--refract-sweep=f16,q9_9")
    line = next(x for x in bad.stderr.str().splitlines() if x.startswith("ERROR:"))
    from pytest_refract.engines.ggml_types import cache_types

    assert line.endswith(f"it offers: {', '.join(sorted(cache_types()))} (or all)"), line


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.smollm2
def test_a_small_smollm2_sweep_end_to_end(pytester, smollm2):
    """The real model, kept small (two types, KLD on four 128-token chunks), with a reference
    cache as users run it: the pairs one at a time, the q4_0 K row first and top down. SmolLM2's
    K cache is the sensitive side: q4_0/f16 FAILs, so q4_0/q4_0 is never measured. The grid, the
    answer and the gate agree with the pairs' own verdicts."""
    report, html = pytester.path / "r.json", pytester.path / "r.html"
    result = pytester.runpytest_subprocess(
        f"--refract-model={smollm2}", "--refract-sweep=f16,q4_0", "--refract-axes=kld", "--refract-ctx=128",
        "--refract-max-items=4", f"--refract-cache-dir={pytester.path / 'cache'}", f"--refract-json={report}",
        f"--refract-html={html}", "-v")
    data = read_report(report)
    sweep = data["sweep"]
    assert sweep["pairs"] == ["ctk=q4_0,ctv=q4_0", "ctk=q4_0,ctv=f16", "ctk=f16,ctv=q4_0"]
    ran = [line.split("[", 1)[1].split("-chunk-")[0] for line in result.stdout.lines
           if line.startswith("refract::test_kld[") and " PASSED" in line]
    assert list(dict.fromkeys(ran)) == ["q4_0-f16", "f16-q4_0"], ran
    assert sweep["refused"] == [] and sorted(sweep["measured"]) == ["ctk=f16,ctv=q4_0", "ctk=q4_0,ctv=f16"]
    assert [s["candidate"] for s in sweep["skipped"]] == ["ctk=q4_0,ctv=q4_0"]
    assert "ctk=q4_0,ctv=f16, before it in its row, does not PASS" in sweep["skipped"][0]["why"]
    cells = sweep["grid"]["cells"]
    for sec in data["candidates"]:
        k, v = (p.split("=")[1] for p in sec["candidate"].split(","))
        if sec["candidate"] in sweep["measured"]:
            assert cells[k][v]["verdict"] == sec["verdict"]["verdict"]
    assert cells["q4_0"]["f16"]["verdict"] == "FAIL" and cells["q4_0"]["q4_0"]["skipped"]
    assert cells["q4_0"]["q4_0"]["kv_bytes_per_token"] < cells["f16"]["q4_0"]["kv_bytes_per_token"]
    assert result.ret == (0 if sweep["recommendation"] else 1)
    out = result.stdout.str()
    assert "K \\ V" in out and ("recommended: ctk=" in out or "recommended: none" in out)
    assert 'id="sweep-grid"' in html.read_text() and 'id="sweep-pareto"' in html.read_text()


def test_a_row_stops_after_a_pair_that_cannot_pass_and_nothing_else_stops():
    """Rule one of the sweep's skipping (sweep.py), on the procedure's own terms: a row's top
    pair whose data is final and that does not PASS even at the full 2.5 % stops the rest of
    its row; another row's open pair goes on, however small."""
    from pytest_refract.scoring import sequential as S
    from pytest_refract.stopping import AxisProgress
    from pytest_refract.sweep import SweepPruning

    axis = SimpleNamespace(MARGIN=3.0, damage=V.ratio_of_sums, ZERO_DAMAGE_EXACT=True, DAMAGE_COUNTS=False,
                           damage_table=lambda items: ([i["id"] for i in items],
                                                       np.array([[i["d"], 255.0] for i in items])))
    units = [f"u{k}" for k in range(64)]
    ctrl = {u: {"id": u, "d": 1.0 + (k % 5) / 10} for k, u in enumerate(units)}
    bad = {u: {"id": u, "d": 12 * r["d"]} for u, r in ctrl.items()}
    progress = {(role, "kld"): AxisProgress(S.Design.plan(64, 8)) for role in ("cand0", "cand1", "cand2")}
    top = progress[("cand0", "kld")]
    top.decided, top.look, top.measured = True, len(top.design.looks) - 1, 64
    stopping = SimpleNamespace(progress=progress)
    labels = {"cand0": "ctk=a,ctv=x", "cand1": "ctk=a,ctv=y", "cand2": "ctk=b,ctv=y"}
    sizes = {"cand0": 300.0, "cand1": 200.0, "cand2": 100.0}
    pruning = SweepPruning(stopping, {"kld": axis}, sizes, labels, "control", None,
                           lambda: {"cand0": {"kld": bad}, "control": {"kld": ctrl}})
    line = pruning.decided("cand0")
    assert list(pruning.pruned) == ["cand1"] and "ctk=a,ctv=y" in (line or "")
    assert "ctk=a,ctv=x, before it in its row, does not PASS even at the family's full error" in pruning.pruned["cand1"]
    assert progress[("cand1", "kld")].pruned and not progress[("cand1", "kld")].open
    assert progress[("cand2", "kld")].open  # another row: not implied by anything measured
    # Final because every item ran, though undecided at its last look: the same.
    progress[("cand1", "kld")].pruned = None
    top.decided = False
    again = SweepPruning(stopping, {"kld": axis}, sizes, labels, "control", None,
                         lambda: {"cand0": {"kld": bad}, "control": {"kld": ctrl}})
    assert again.decided("cand0") and list(again.pruned) == ["cand1"]
    top.measured = 63  # an item left: not final, nothing stops
    progress[("cand1", "kld")].pruned = None
    again = SweepPruning(stopping, {"kld": axis}, sizes, labels, "control", None,
                         lambda: {"cand0": {"kld": bad}, "control": {"kld": ctrl}})
    assert again.decided("cand0") is None and again.pruned == {}
    top.decided, top.measured = True, 64
    # The same top pair within the margin stops nothing.
    progress[("cand1", "kld")].pruned = None
    good = SweepPruning(stopping, {"kld": axis}, sizes, labels, "control", None,
                        lambda: {"cand0": {"kld": dict(ctrl)}, "control": {"kld": ctrl}})
    assert good.decided("cand0") is None and good.pruned == {}


def test_the_measuring_order_is_rows_by_their_smallest_cache_each_top_down():
    from pytest_refract.sweep import measuring_order

    per_value = {"q4_0": 0.5625, "q8_0": 1.0625, "f16": 2.0, "f32": 4.0}
    pairs = [(k, v) for k in per_value for v in per_value if (k, v) != ("f16", "f16")]
    labels = {f"cand{i}": f"ctk={k},ctv={v}" for i, (k, v) in enumerate(pairs)}
    sizes = {f"cand{i}": 100 * (per_value[k] + per_value[v]) for i, (k, v) in enumerate(pairs)}
    unknown = next(r for r, label in labels.items() if label == "ctk=q8_0,ctv=f32")
    sizes[unknown] = None  # a size unknown goes last in its row
    rank = measuring_order(sizes, labels)
    assert sorted(rank.values()) == list(range(len(pairs)))
    ran = [labels[r] for r in sorted(rank, key=rank.get)]
    assert ran == ["ctk=q4_0,ctv=f32", "ctk=q4_0,ctv=f16", "ctk=q4_0,ctv=q8_0", "ctk=q4_0,ctv=q4_0",
                   "ctk=q8_0,ctv=f16", "ctk=q8_0,ctv=q8_0", "ctk=q8_0,ctv=q4_0", "ctk=q8_0,ctv=f32",
                   "ctk=f16,ctv=f32", "ctk=f16,ctv=q8_0", "ctk=f16,ctv=q4_0",
                   "ctk=f32,ctv=f32", "ctk=f32,ctv=f16", "ctk=f32,ctv=q8_0", "ctk=f32,ctv=q4_0"]


def test_all_is_every_type_the_build_has_and_llama_cpp_accepts(pytester, tiny_model, tiny_corpus):
    """--refract-sweep=all probes the build's whole type table: the pairs collected are pairs
    of its types, never the reference's own or the control's, never a type whose blocks the
    tiny model's 32-wide heads cannot hold."""
    from pytest_refract.engines.ggml_types import cache_types

    result = pytester.runpytest_subprocess(
        f"--refract-model={tiny_model}", f"--refract-corpus={tiny_corpus}", "--refract-ctx=64", "--refract-chunks=1",
        "--refract-threads=1", "--refract-axes=kld", "--refract-no-cache", "--refract-sweep=all", "--collect-only",
        "-q")
    pairs = {tuple(line.split("[", 1)[1].split("-chunk-")[0].split("-")) for line in result.stdout.lines
             if line.startswith("refract::test_kld[")}
    table = cache_types()
    assert pairs and all(k in table and v in table for k, v in pairs)
    assert ("q4_0", "q4_0") in pairs and ("f32", "f32") in pairs
    assert ("f16", "f16") not in pairs and ("bf16", "bf16") not in pairs
    assert not any("q2_k" in p for p in pairs)
    accepted = {t for p in pairs for t in p}
    assert pairs == {(k, v) for k in accepted for v in accepted} - {("f16", "f16"), ("bf16", "bf16")}
