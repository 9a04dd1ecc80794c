"""The verdict in the report (report/verdicts.py, report/build.py): what the gate reads, the
broken-yardstick check of the control, --refract-undecided, the ranking, and the terminal
summary leading with the verdict. Pure data, no llama.cpp."""

from __future__ import annotations

import math

import pytest

from pytest_refract.axes import BUILTIN
from pytest_refract.report import terminal
from pytest_refract.report.build import build_report
from pytest_refract.report.verdicts import pareto, rank
from pytest_refract.scoring.metrics import band_for

from test_report_data import _facts, _settings

# A PASS needs 46 items (scoring/verdict.MIN_ITEMS_FOR_PASS).
N_PROMPTS, N_CHUNKS, LEN = 48, 48, 64


def _trajectory(flips_per_prompt, agree=None) -> dict:
    out = {}
    for i in range(N_PROMPTS):
        flips = flips_per_prompt(i)
        a = LEN if agree is None else agree
        out[f"p{i:02d}"] = dict(id=f"p{i:02d}", category="c", prompt_tokens=5, ref_len=LEN, cand_len=LEN,
                                prefix_agreement=a, first_divergence=None if a == LEN else a, full_match=a == LEN,
                                teacher_forced_kld=0.001 * flips, teacher_forced_top1_pct=100.0 * (1 - flips / LEN),
                                near_tie_divergence=False, score=100.0 * a / LEN, band=band_for(100.0 * a / LEN),
                                wall_s=0.1, control_cached=False)
    return out


def _kld(mean_of) -> dict:
    out = {}
    for i in range(N_CHUNKS):
        mean = mean_of(i)
        raw = {"kld": [mean] * 4, "p_diff": [0.0] * 4, "nll_ref": [2.0] * 4, "nll_cand": [2.0 + mean] * 4,
               "same_top": [1.0] * 4}
        out[f"chunk-{i:02d}"] = dict(id=f"chunk-{i:02d}", chunk=i, score=100 * math.exp(-mean),
                                     band=band_for(100 * math.exp(-mean)), mean_kld=mean, mean_kld_unc=0.0,
                                     max_kld=mean, p99_kld=mean, same_top_p_pct=100.0, rms_dp_pct=0.1,
                                     ppl_ref=math.exp(2.0), ppl_cand=math.exp(2.0 + mean), n_positions=4, _raw=raw,
                                     wall_s=0.1, control_cached=False)
    return out


def _control(kld_scale=1.0, agree=None):
    # The control flips 1-2 tokens per prompt and has 0.004 nats of KLD, varying by item.
    return {"trajectory": _trajectory(lambda i: 1 + i % 2, agree), "kld": _kld(lambda i: kld_scale * 0.004 * (1 + 0.3 * (i % 3)))}


NOISE = (0.5, 1.5, 0.8, 1.2, 1.0)  # item-to-item variation of the candidate's damage, mean 1


def _candidate(multiple):
    return {"trajectory": _trajectory(lambda i: round(multiple * (1 + i % 2) * NOISE[i % 5])),
            "kld": _kld(lambda i: multiple * 0.004 * (1 + 0.3 * (i % 3)) * NOISE[i % 5])}


def _report(cand0=1.2, cand1=20.0, control=None, **settings):
    s = _settings(**{"axes": ("trajectory", "kld"), "gate_basis": "verdict", **settings})
    facts = _facts(settings=s, selected={r: {"trajectory": N_PROMPTS, "kld": N_CHUNKS} for r in ("cand0", "cand1")})
    results = {"cand0": _candidate(cand0), "cand1": _candidate(cand1), "control": control or _control()}
    return build_report(facts=facts, results=results, failed={}, custom=[], invocation_args=[], complete=True,
                        registry=BUILTIN)


def test_gate_reads_the_verdict_of_each_candidate():
    report = _report()
    near, far = report["candidates"]
    assert near["verdict"]["verdict"] == "PASS" and far["verdict"]["verdict"] == "FAIL"
    assert near["gate"]["passed"] is True and far["gate"]["passed"] is False
    assert any("verdict FAIL" in r and "beyond the 3x margin" in r for r in far["gate"]["reasons"])
    assert report["gate"]["basis"] == "verdict" and report["gate"]["passed"] is False
    # The verdict leads the diagnosis, and the raw scores are still there.
    assert near["diagnosis"][0].startswith("Verdict PASS: greedy flips")
    assert near["composite"] is not None and near["axes"]["kld"]["score"] is not None
    kld = near["verdict"]["axes"]["kld"]
    assert kld["basis"] == "multiple" and kld["multiple_ci95"][0] <= kld["multiple"] <= kld["multiple_ci95"][1]
    assert kld["multiple"] == pytest.approx(1.2, rel=0.05)


def test_undecided_fails_by_default_and_passes_when_asked():
    # 3x the control's damage, on the margin: the interval straddles it.
    for undecided, passed in (("fail", False), ("pass", True)):
        report = _report(cand0=3.0, cand1=3.0, undecided=undecided)
        sec = report["candidates"][0]
        assert sec["verdict"]["verdict"] == "UNDECIDED"
        assert sec["gate"]["passed"] is passed
        if not passed:
            assert any("verdict UNDECIDED" in r and "--refract-undecided=pass" in r for r in sec["gate"]["reasons"])
        assert any(line.startswith("To decide:") for line in sec["diagnosis"])


def test_a_control_beyond_rounding_breaks_the_yardstick():
    # A "control" with 0.04-0.06 nats of KLD x 2 (beyond the 0.05 a rounding-only change can
    # cause): no candidate is flattered by it; the gate fails and says why, even with
    # --refract-undecided=pass.
    report = _report(control=_control(kld_scale=20.0), undecided="pass")
    for sec in report["candidates"]:
        assert sec["verdict"]["control_problems"]
        assert sec["verdict"]["axes"]["kld"]["basis"] == "broken control"
        assert sec["verdict"]["axes"]["kld"]["score"] is None
        assert sec["gate"]["passed"] is False
        assert any(r.startswith("the yardstick is broken: kld:") for r in sec["gate"]["reasons"])


def test_a_control_scoring_zero_breaks_the_yardstick():
    report = _report(control=_control(agree=0))
    sec = report["candidates"][0]
    assert report["sensitivity"]["axes"]["trajectory"]["score"] == 0.0
    assert sec["verdict"]["axes"]["trajectory"]["basis"] == "broken control"
    assert any("scores 0 on trajectory" in r for r in sec["gate"]["reasons"])
    assert sec["verdict"]["score"] is None  # never 100 by default


def test_raw_gate_still_gates_the_seed_defined_composite():
    report = _report(gate_basis="raw", fail_under=99.0, fail_under_text="99")
    assert report["gate"]["basis"] == "raw"
    assert all("composite" in r and "below --refract-fail-under=99" in r
               for r in report["gate"]["reasons"])
    assert report["candidates"][0]["verdict"]["verdict"] == "PASS"  # still reported


def test_ranking_ships_the_smallest_passing_cache_first():
    def sec(name, verdict, score, kv):
        return {"candidate": name, "verdict": {"verdict": verdict, "score": score},
                "kv_allocation": {"bytes_per_token": kv}, "kv_cache": None}

    sections = [sec("big-pass", "PASS", 99.0, 100), sec("fail", "FAIL", 40.0, 10), sec("small-pass", "PASS", 85.0, 50),
                sec("undecided", "UNDECIDED", 82.0, 30)]
    assert [s["candidate"] for s in rank(sections)] == ["small-pass", "big-pass", "undecided", "fail"]
    front = pareto(sections)
    assert front == {"big-pass": True, "fail": True, "small-pass": True, "undecided": True}
    sections.append(sec("dominated", "PASS", 80.0, 60))
    assert pareto(sections)["dominated"] is False


def test_ranking_in_the_report_lists_verdicts_and_multiples():
    report = _report(cand0=20.0, cand1=1.2)
    first = report["ranking"][0]
    assert first["candidate"] == "ctk=q4_0,ctv=q4_0" and first["verdict"] == "PASS"
    assert set(first["multiples"]) == {"trajectory", "kld"}
    assert report["ranking"][1]["verdict"] == "FAIL"


class _Writer:
    def __init__(self):
        self.lines, self._cur, self.marked = [], "", []

    def write_sep(self, sep, title=""):
        self.lines.append(f"== {title}")

    def write(self, text, **markup):
        self._cur += text
        self.marked.append((text, markup))

    def write_line(self, text="", **markup):
        self.marked.append((text, markup))
        self.lines.append(self._cur + text)
        self._cur = ""


def test_terminal_leads_each_candidate_with_its_verdict():
    report = _report()
    tr = _Writer()
    terminal.render(tr, report, None, BUILTIN)
    text = "\n".join(tr.lines)
    first_candidate = next(i for i, l in enumerate(tr.lines) if l.startswith("candidate  "))
    after = [l for l in tr.lines[first_candidate + 1:] if l.strip()]
    assert after[0].startswith("verdict    PASS")
    assert "x [" in text and "the control's (margin 3x)" in text
    assert "REFRACT-comparable" in text
    assert "calibrated " not in text  # the older retention bound is not shown beside the verdict
    assert "which config to ship" in text
    assert "gate FAILED: ctk=q4_0,ctv=q4_0: verdict FAIL" in text


def test_html_leads_with_the_verdict_and_shows_the_raw_composite_smaller():
    from pytest_refract.report.html.render import render_html, render_template

    report = _report()
    page = render_html(report)
    assert page.index('id="verdict"') < page.index('id="gate"') < page.index('id="axis-trajectory"') < page.index('id="composite"')
    assert "Raw composite (REFRACT-comparable, not the verdict)" in page
    verdict_card = page[page.index('id="verdict"'):page.index('id="gate"')]
    assert 'class="big">PASS<' in verdict_card.replace("\n", "")
    composite_card = page[page.index('id="composite"'):page.index('id="composite"') + 400]
    assert 'class="mid"' in composite_card and 'class="big"' not in composite_card
    assert 'class="card composite reference" id="composite"' in page and "badge" not in composite_card
    assert "the control&#39;s (margin 3" in page or "the control's (margin 3" in page
    assert 'id="verdict-ranking"' in page and "reads the verdict" in page
    summary = render_template("pytest_html/summary.html.j2", report=report, colours={})
    assert summary.index("verdict PASS") < summary.index("raw composite (REFRACT-comparable, not the verdict)")


def test_no_band_story_beside_a_verdict():
    report = _report(cand0=1.2, cand1=20.0)
    near, far = report["candidates"]
    # The raw scores of both are EXCELLENT on this data; the raw bands tell no story beside either.
    assert far["band"] == "EXCELLENT" and far["verdict"]["verdict"] == "FAIL"
    for section in (near, far):
        assert not any(d.startswith(("All clear", "Minor drift", "Catastrophic")) for d in section["diagnosis"])


def _pass_with_failing_raw_bands():
    """A candidate whose greedy continuations leave the reference early (raw trajectory score in
    the FAIL band), as the control's do: the verdict is PASS."""
    s = _settings(axes=("trajectory", "kld"), gate_basis="verdict")
    facts = _facts(settings=s, candidate_roles=["cand0"], selected={"cand0": {"trajectory": N_PROMPTS, "kld": N_CHUNKS}})
    control = {"trajectory": _trajectory(lambda i: 1 + i % 2, agree=8), "kld": _control()["kld"]}
    cand = {"trajectory": _trajectory(lambda i: round(1.2 * (1 + i % 2) * NOISE[i % 5]), agree=8),
            "kld": _candidate(1.2)["kld"]}
    return build_report(facts=facts, results={"cand0": cand, "control": control}, failed={}, custom=[],
                        invocation_args=[], complete=True, registry=BUILTIN)


def test_a_pass_tells_no_damage_story_from_the_raw_bands():
    report = _pass_with_failing_raw_bands()
    assert report["verdict"]["verdict"] == "PASS" and report["axes"]["trajectory"]["band"] == "FAIL"
    assert report["diagnosis"][0].startswith("Verdict PASS")
    text = " ".join(report["diagnosis"])
    assert "Catastrophic" not in text and "Generated text drifts" not in text and "FAIL band" not in text
    # JSON leads with what the gate read, and says what the raw scores are.
    keys = list(report)
    assert keys[:5] == ["schema", "candidate", "gate", "verdict", "raw_scores_note"]
    assert keys.index("verdict") < keys.index("composite")
    assert "not the verdict" in report["raw_scores_note"]
    assert not any("calibrated" in k for k in report)
    # Each prompt beside the control's same prompt.
    item = report["axes"]["trajectory"]["items"][3]
    assert item["vs_control"]["text"].endswith("in the control (of 64 reference tokens)")


def test_terminal_shows_raw_figures_without_bands_beside_a_verdict():
    out = _Writer()
    terminal.render(out, _pass_with_failing_raw_bands(), None)
    text = "\n".join(out.lines)
    assert text.index("verdict    PASS") < text.index("raw scores (REFRACT-comparable, not the verdict")
    raw = text[text.index("raw scores (REFRACT-comparable, not the verdict"):]
    assert not any(word in raw.split("gate:")[0] for word in ("FAIL", "DEGRADED", "EXCELLENT"))
    assert not any(m.get("red") for t, m in out.marked)  # a PASS: nothing red anywhere
    assert "flips vs" in text and "calibrated" not in text
    # The verdict comes before the control's block.
    assert text.index("verdict    PASS") < text.index("control    ")


def test_json_under_the_raw_gate_leads_with_the_composite():
    report = _report(gate_basis="raw")
    assert list(report)[:5] == ["schema", "candidate", "gate", "composite", "band"]
    assert "raw_scores_note" not in report and report["verdict"] is not None
