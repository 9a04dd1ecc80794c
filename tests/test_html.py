"""The HTML report: structure and stable ids, offline-ness, page size for a full audit, escaping
of everything that came from the model or the user, robustness to partial reports, and a real
headless Chromium rendering the page in light and dark mode."""

from __future__ import annotations

import copy
import html
import importlib.util
import json
import os
import random
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_refract.report.html import render_html

# Real reports written by the plugin (pytest-refract.report.v1). They live outside the repository,
# so their tests skip where the directory is absent; everything else uses the report built below.
SAMPLES_DIR = Path(os.environ.get("REFRACT_SAMPLES", Path(__file__).parent / "data"))
SAMPLE_NAMES = ("report_small_full.json", "report_traj_kld.json")
MAX_PAGE_BYTES = 300_000


# --------------------------------------------------------------------------- reports


def _mini_report() -> dict:
    """A small but complete report with all four axes and the newer per-item "divergence"."""
    shared = "The largest planet in our solar system is Neptune,"
    return {
        "schema": "pytest-refract.report.v1",
        "plugin_version": "0.1.0",
        "llama_cpp_python_version": "0.3.36",
        "llama_cpp_build": {"llama_cpp_python": "0.3.36", "ggml_version": "0.25.3", "ggml_commit": "0c1e570",
                            "system_info": "CPU : AVX2 = 1 | F16C = 1 |"},
        "timestamp": "2026-11-26T19:57:18+00:00",
        "complete": True,
        "host": {"machine": "x86_64", "system": "Linux", "cpus": 2},
        "model": {"name": "Tiny Test Model", "path": "tiny.gguf", "size_bytes": 98362432, "architecture": "llama",
                  "n_params": 134515008, "n_ctx_train": 8192, "sha256_first_mib": "10aa646aae6188d0a2d1" * 3},
        "reference": "ctk=f16,ctv=f16",
        "candidate": "ctk=q8_0,ctv=q4_0",
        "self_reference": False,
        "settings": {"axes": ["trajectory", "kld", "rniah", "plad"], "fail_under": 60.0, "n_predict": 32,
                     "ctx": 512, "chunks": 2, "flash_attn": True, "floor": False,
                     "rniah": {"lengths": [512], "positions": [0.1, 0.9], "trials": 3}},
        "repro_command": "pytest --refract-model=smollm2 --refract-candidate=ctk=q8_0,ctv=q4_0 --refract-full",
        "composite": 72.5,
        "band": "DEGRADED",
        "gate": {"passed": True, "threshold": 60.0, "reasons": []},
        "diagnosis": ["Generated text drifts: greedy continuations leave the reference's path."],
        "floor": None,
        "wall_s": 42.0,
        "axes": {
            "trajectory": {
                "score": 55.0, "band": "FAIL", "n_items": 2, "full_match_rate": 0.5,
                "median_first_divergence": 9, "mean_prefix_agreement": 20.5, "teacher_forced_kld": 0.0147,
                "wall_s": 3.5, "floor_score": None,
                "items": [
                    {"id": "fact-001", "category": "factual", "prompt": "What is the largest planet?",
                     "ref_len": 32, "cand_len": 32, "prefix_agreement": 9, "first_divergence": 9,
                     "full_match": False, "teacher_forced_kld": 0.015, "score": 28.1, "band": "FAIL",
                     "ref_tokens": list(range(32)), "cand_tokens": list(range(9)) + list(range(100, 123)),
                     "ref_text": shared + " but it is a gas giant.", "cand_text": shared + " which is far away.",
                     "divergence": {"shared_text": shared, "ref_token_text": " but", "cand_token_text": " which",
                                    "ref_rest": " it is a gas giant.", "cand_rest": " is far away."},
                     "wall_s": 1.5},
                    {"id": "fact-002", "category": "factual", "prompt": "Which gas do plants absorb?",
                     "ref_len": 32, "cand_len": 32, "prefix_agreement": 32, "first_divergence": None,
                     "full_match": True, "teacher_forced_kld": 0.02, "score": 100.0, "band": "EXCELLENT",
                     "ref_tokens": list(range(32)), "cand_tokens": list(range(32)),
                     "ref_text": "Carbon dioxide.", "cand_text": "Carbon dioxide.",
                     "divergence": {"shared_text": "Carbon dioxide.", "ref_token_text": "", "cand_token_text": "",
                                    "ref_rest": "", "cand_rest": ""},
                     "wall_s": 2.0},
                ],
            },
            "kld": {
                "score": 98.9, "band": "EXCELLENT", "n_chunks": 2, "mean_kld": 0.0111, "mean_kld_unc": 0.0007,
                "kld_percentiles": {"max": 0.2278, "99.9": 0.21, "99": 0.0529, "95": 0.0297, "90": 0.0197,
                                    "median": 0.0082},
                "rms_dp_pct": 2.144, "rms_dp_pct_unc": 0.151, "mean_dp_pct": -0.27, "mean_dp_pct_unc": 0.094,
                "same_top_p_pct": 92.94, "same_top_p_pct_unc": 1.13, "ppl_ref": 35.89, "ppl_cand": 36.01,
                "n_positions": 510, "wall_s": 18.0, "floor_score": None,
                "corpus": {"name": "corpus_en.txt", "sha256": "a397d09568b0b819", "bytes": 97669},
                "items": [
                    {"id": "chunk-00", "chunk": 0, "score": 99.0, "band": "EXCELLENT", "mean_kld": 0.0099,
                     "mean_kld_unc": 0.0005, "max_kld": 0.077, "same_top_p_pct": 92.5, "rms_dp_pct": 1.97,
                     "ppl_ref": 49.07, "ppl_cand": 49.54, "n_positions": 255, "wall_s": 8.9},
                    {"id": "chunk-01", "chunk": 1, "score": 98.8, "band": "EXCELLENT", "mean_kld": 0.0123,
                     "mean_kld_unc": 0.0009, "max_kld": 0.228, "same_top_p_pct": 93.3, "rms_dp_pct": 2.31,
                     "ppl_ref": 26.25, "ppl_cand": 26.17, "n_positions": 255, "wall_s": 9.1},
                ],
            },
            "rniah": {
                "score": 83.3, "band": "PASS", "status": "scored", "confidence": "ok", "ref_hit_rate": 1.0,
                "cand_hit_rate": 0.83, "n_cells": 2, "n_scored_cells": 2, "wall_s": 12.0, "floor_score": None,
                "cells": [_rniah_cell(512, 0.1, 3, 3), _rniah_cell(512, 0.9, 3, 2)],
            },
            "plad": {
                "score": 61.0, "band": "DEGRADED", "status": "scored",
                "per_perturbation": {"typo": 60.9, "case": 43.5, "punct": 58.3, "paraphrase": 81.0},
                "n_pairs": 2, "n_skipped": 1, "wall_s": 4.0, "floor_score": None,
                "items": [
                    {"id": "fact-001-case", "prompt_id": "fact-001", "perturbation": "case", "skipped": False,
                     "perturbed_prompt": "what is the largest planet?", "ref_drift": 0.4, "cand_drift": 0.69,
                     "excess": 0.28, "score": 24.5, "band": "FAIL", "wall_s": 2.0},
                    {"id": "fact-001-typo", "prompt_id": "fact-001", "perturbation": "typo", "skipped": False,
                     "perturbed_prompt": "What is the lragest planet?", "ref_drift": 0.7, "cand_drift": 0.7,
                     "excess": 0.0, "score": 100.0, "band": "EXCELLENT", "wall_s": 2.0},
                    {"id": "fact-002-punct", "prompt_id": "fact-002", "perturbation": "punct", "skipped": True,
                     "reason": "punct does not apply to this prompt", "score": None, "band": None},
                ],
            },
        },
    }


def _rniah_cell(length: int, position: float, ref_hits: int, cand_hits: int, trials: int = 3) -> dict:
    scored = ref_hits > 0
    degradation = max(0.0, (ref_hits - cand_hits) / trials) if scored else None
    score = 100.0 * (1.0 - degradation) if scored else None
    answers = [{"value": f"{1000 + t}", "needle_offset": 40,
                "reference": {"answer": f"The magic number is {1000 + t}.", "hit": t < ref_hits},
                "candidate": {"answer": f"The magic number is {1000 + t}.", "hit": t < cand_hits}}
               for t in range(trials)]
    return {"id": f"{length}-{position:.2f}", "length": length, "position": position, "prompt_tokens": length + 38,
            "trials": trials, "ref_hits": ref_hits, "cand_hits": cand_hits, "degradation": degradation,
            "status": "scored" if scored else "n/a", "score": score,
            "band": None if score is None else ("EXCELLENT" if score >= 90 else "PASS" if score >= 80 else "FAIL"),
            "answers": answers, "wall_s": 4.0}


def _sample(name: str) -> dict:
    path = SAMPLES_DIR / name
    if not path.is_file():
        pytest.skip(f"sample report {path} not present (set REFRACT_SAMPLES to its directory)")
    return json.loads(path.read_text(encoding="utf-8"))


def _base_for_full_size() -> dict:
    """The richest report at hand: the real full sample when present (real continuations)."""
    path = SAMPLES_DIR / "report_small_full.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else _mini_report()


def _full_size_report() -> dict:
    """A default full audit's shape: 36 prompts x 128 tokens, 32 KLD chunks, 9 R-NIAH cells
    (3 trials each), 144 PLAD items, made by replicating the base report's items."""
    rng = random.Random(0)
    report = copy.deepcopy(_base_for_full_size())
    axes = report["axes"]
    report["settings"]["n_predict"] = 128

    def stretch(text: str) -> str:  # a 32-token continuation made 128 tokens long
        return " ".join([text] * 4)

    trajectory = []
    for k in range(36):
        item = copy.deepcopy(axes["trajectory"]["items"][k % len(axes["trajectory"]["items"])])
        item["id"] = f"{item['category'][:4]}-{k:03d}"
        item["ref_len"] = item["cand_len"] = 128
        item["ref_tokens"] = [rng.randrange(49152) for _ in range(128)]
        item["cand_tokens"] = [rng.randrange(49152) for _ in range(128)]
        ref, cand = stretch(item["ref_text"]), stretch(item["cand_text"])
        item["ref_text"], item["cand_text"] = ref, cand
        cut = len(os.path.commonprefix([ref, cand]))
        item["divergence"] = {"shared_text": ref[:cut], "ref_token_text": ref[cut:cut + 4],
                              "cand_token_text": cand[cut:cut + 4], "ref_rest": ref[cut + 4:],
                              "cand_rest": cand[cut + 4:]}
        trajectory.append(item)
    axes["trajectory"]["items"] = trajectory

    chunks = []
    for k in range(32):
        chunk = copy.deepcopy(axes["kld"]["items"][k % len(axes["kld"]["items"])])
        chunk["id"], chunk["chunk"] = f"chunk-{k:02d}", k
        chunk["mean_kld"] *= 0.8 + 0.4 * rng.random()
        chunks.append(chunk)
    axes["kld"]["items"], axes["kld"]["n_chunks"] = chunks, 32

    cells = []
    for length in (1024, 2048, 4096):
        for position in (0.1, 0.5, 0.9):
            cell = copy.deepcopy(axes["rniah"]["cells"][len(cells) % len(axes["rniah"]["cells"])])
            cell.update(id=f"{length}-{position:.2f}", length=length, position=position)
            cells.append(cell)
    axes["rniah"]["cells"], axes["rniah"]["n_cells"] = cells, 9

    scored_plad = [i for i in axes["plad"]["items"] if not i.get("skipped")]
    plad = []
    for k in range(144):
        item = copy.deepcopy(scored_plad[k % len(scored_plad)])
        item["prompt_id"] = trajectory[k // 4]["id"]
        item["perturbation"] = ("typo", "case", "punct", "paraphrase")[k % 4]
        item["id"] = f"{item['prompt_id']}-{item['perturbation']}"
        plad.append(item)
    axes["plad"]["items"], axes["plad"]["n_pairs"] = plad, 144
    return report


# --------------------------------------------------------------------------- HTML inspection


class _Collector(HTMLParser):
    """Start tags and ids as a browser's tokenizer would see them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.ids, self.classes = [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "id":
                self.ids.add(value)
            elif name == "class":
                self.classes.append(value)


def _parse(page: str) -> _Collector:
    parser = _Collector()
    parser.feed(page)
    parser.close()
    return parser


def _check_page(report: dict) -> str:
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "xmlns" not in page
    assert "Could not render" not in page
    parsed = _parse(page)
    assert "script" not in parsed.tags
    assert {"composite", "raw-json"} <= parsed.ids
    for name in report.get("axes", {}):
        assert f"axis-{name}" in parsed.ids
        assert f"section-{name}" in parsed.ids
    if "rniah" in report.get("axes", {}):
        assert "rniah-heatmap" in parsed.ids
    return page


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_renders_sample(name):
    report = _sample(name)
    page = _check_page(report)
    assert f"{report['composite']:.1f}" in page
    assert report["band"] in page
    for axis in report["axes"].values():
        assert axis["band"] in page
    for diagnosis in report["diagnosis"]:
        assert html.escape(diagnosis) in page
    assert html.escape(report["repro_command"]) in page
    # Token ids are left out of the embedded JSON (the one-line note says so).
    assert "&quot;ref_tokens&quot;" not in page and "&quot;cand_tokens&quot;" not in page
    assert "Left out here to keep the page small: token-id lists" in page
    parsed = _parse(page)
    # One collapsible row per prompt, each with a highlighted first differing token (or a full match).
    items = report["axes"]["trajectory"]["items"]
    assert parsed.classes.count("item") == len(items)
    assert parsed.tags.count("mark") == 2 * sum(1 for i in items if not i["full_match"])


def test_gate_failure_and_reasons_shown():
    report = _mini_report()
    report["gate"] = {"passed": False, "threshold": 60.0, "reasons": ["composite 57.09 is below FAIL (60)"]}
    page = _check_page(report)
    assert "Gate failed" in page and "composite 57.09 is below FAIL (60)" in page


def test_divergence_is_split_at_the_first_differing_token():
    page = _check_page(_mini_report())
    shared = "The largest planet in our solar system is Neptune,"
    assert f"{shared}<mark> but</mark>" in page
    assert f"{shared}<mark> which</mark>" in page
    assert "Split at the first differing character" not in page


def test_older_report_without_divergence_falls_back_to_texts():
    report = _mini_report()
    for item in report["axes"]["trajectory"]["items"]:
        del item["divergence"]
    page = _check_page(report)
    assert "Split at the first differing character" in page
    assert "<mark>but</mark>" in page and "<mark>which</mark>" in page


def test_incomplete_run_banner():
    report = _mini_report()
    assert "Incomplete run" not in render_html(report)
    report.update(complete=False, composite=None, band=None)
    page = _check_page(report)
    assert "Incomplete run" in page and "no composite: the run is incomplete" in page


def test_full_size_report_is_under_300_kb():
    report = _full_size_report()
    page = _check_page(report)
    size = len(page.encode("utf-8"))
    print(f"full-size report page: {size} bytes")
    assert size < MAX_PAGE_BYTES, size
    parsed = _parse(page)
    assert parsed.classes.count("item") == 36
    assert sum(1 for c in parsed.classes if c.split()[0] == "heat") == 9
    assert parsed.tags.count("tr") >= 144


def test_interrupted_axes_show_what_was_measured():
    report = _mini_report()
    report.update(complete=False, composite=None, band=None)
    for section in report["axes"].values():
        section.update(score=None, band=None, status="incomplete")
    page = _check_page(report)
    assert page.count("<strong>Incomplete:</strong>") == 4
    assert _parse(page).classes.count("item") == 2  # the prompts measured before the interruption


def test_repeat_spread_and_custom_gates():
    report = _mini_report()
    report["repeat"] = {"n": 3, "scores": [72.5, 72.5, 72.5], "mean": 72.5, "stdev": 0.0, "range": 0.0,
                        "verdict": "HEALTHY"}
    report["axes"]["kld"]["repeat"] = {"n": 3, "scores": [98.9, 97.0, 99.5], "mean": 98.5, "stdev": 1.3,
                                       "range": 2.5, "verdict": "NOISY"}
    report["custom"] = {"gates": {"support <answers>": 71.5}, "measurements": []}
    page = _check_page(report)
    assert "3 repeats: stdev 0.00, range 0.00 &middot; HEALTHY" in page
    assert "3 repeats: stdev 1.30, range 2.50 &middot; NOISY" in page
    assert "and 1 custom gate" in page and "support &lt;answers&gt;" in page


# --------------------------------------------------------------------------- escaping

# Fragments that break out of text, attributes, comments or raw-text elements if not escaped.
DANGEROUS = ["<script>alert(1)</script>", "</textarea>", "<img src=x onerror=alert(1)>", '"', "'", "&", "&amp;",
             "&lt;", "<", ">", "<!--", "-->", "</details>", "</style>", "</title>", "</pre>", "]]>", "\n", "</svg>"]
_fragments = st.one_of(
    st.sampled_from(DANGEROUS),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
)
user_text = st.lists(_fragments, min_size=1, max_size=6).map("".join)


def _plant(report: dict, s: str) -> dict:
    """Put s into every place the page displays model- or user-written text."""
    axes = report["axes"]
    item = axes["trajectory"]["items"][0]
    item.update(id=s, category=s, prompt=s, ref_text=s + " a", cand_text=s + " b")
    item["divergence"] = {"shared_text": s, "ref_token_text": s, "cand_token_text": s, "ref_rest": s,
                          "cand_rest": s}
    axes["plad"]["items"][0]["perturbed_prompt"] = s
    axes["plad"]["items"][0]["prompt_id"] = s
    axes["rniah"]["cells"][0]["answers"][0]["reference"]["answer"] = s
    axes["rniah"]["cells"][0]["answers"][0]["candidate"]["answer"] = s
    axes["kld"]["corpus"]["name"] = s
    report["model"]["name"] = s
    report["model"]["path"] = s
    report["repro_command"] = s
    report["candidate"] = s
    report["diagnosis"] = [s]
    report["gate"]["reasons"] = [s]
    report["settings"]["decode_layout"] = s
    return report


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user_text)
def test_user_and_model_text_is_escaped(text):
    # Markers around the text: a bare "<t" legitimately occurs in "<table"; "QZX<t...XZQ" never does.
    payload = f"QZX{text}XZQ"
    page = render_html(_plant(_mini_report(), payload))
    if any(c in text for c in "<>&\"'"):
        assert payload not in page
    # Shown as text, verbatim after escaping (the JSON block shows it JSON-encoded, so not counted).
    assert page.count(html.escape(payload)) >= 10
    parsed = _parse(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags and "textarea" not in parsed.tags
    # The document's structure does not depend on the text: same tags as with a harmless string.
    assert parsed.tags == _parse(render_html(_plant(_mini_report(), "QZXplainXZQ"))).tags


def test_string_in_numeric_field_is_never_inserted():
    report = _mini_report()
    report["composite"] = "<b>99</b>"
    report["axes"]["kld"]["mean_kld"] = "<i>0.1</i>"
    report["axes"]["trajectory"]["items"][0]["first_divergence"] = "<u>3</u>"
    report["axes"]["rniah"]["cells"][0]["ref_hits"] = "<s>3</s>"
    page = render_html(report)
    for raw in ("<b>99</b>", "<i>0.1</i>", "<u>3</u>", "<s>3</s>"):
        assert raw not in page
    assert "script" not in _parse(page).tags


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("axis", ["trajectory", "kld", "rniah", "plad"])
def test_failed_axis_section(axis):
    report = _mini_report()
    report["axes"][axis] = {"score": None, "band": None, "error": "x"}
    report.update(composite=None, band=None)
    page = _check_page(report)
    assert "<strong>No score:</strong> x" in page


def test_every_axis_failed_and_report_mostly_empty():
    report = {"axes": {n: {"score": None, "band": None, "error": "3 item(s) failed"} for n in
                       ("trajectory", "kld", "rniah", "plad")}, "complete": False}
    page = _check_page(report)
    assert "Incomplete run" in page
    for junk in ({}, {"axes": None, "model": "x", "gate": [], "settings": 3, "diagnosis": None},
                 {"axes": {"trajectory": "broken", "future-axis": {"score": 50.0}}}):
        render_html(junk)


def test_rniah_not_applicable_everywhere():
    report = _mini_report()
    cells = [_rniah_cell(512, p, 0, 0) for p in (0.1, 0.5, 0.9)]
    report["axes"]["rniah"] = {"score": None, "band": None, "status": "n/a", "confidence": "low",
                               "ref_hit_rate": 0.0, "cand_hit_rate": 0.0, "n_cells": 3, "n_scored_cells": 0,
                               "cells": cells, "wall_s": 9.0, "floor_score": None}
    page = _check_page(report)
    parsed = _parse(page)
    assert parsed.classes.count("heat na") == 3
    assert "low confidence" in page
    assert "the reference never retrieves the needle" in page


def test_rniah_heatmap_colours_degradation():
    report = _mini_report()
    report["axes"]["rniah"]["cells"] = [_rniah_cell(512, 0.1, 3, 3), _rniah_cell(512, 0.9, 3, 0),
                                        _rniah_cell(1024, 0.1, 0, 0)]
    page = _check_page(report)
    assert 'style="--d:0.000"' in page and 'style="--d:1.000"' in page
    assert "3/3<span class=\"vs\"> vs </span>3/3" in page
    assert "0/3<span class=\"vs\"> vs </span>3/3" in page
    assert _parse(page).classes.count("heat missing") == 1  # (1024, 0.9) was never run


def test_plad_null_perturbations_and_skipped_items():
    report = _mini_report()
    report["axes"]["plad"]["per_perturbation"] = {"typo": None, "case": 43.5, "punct": None, "paraphrase": None}
    page = _check_page(report)
    assert page.count(">n/a</td>") == 3
    assert "skipped: punct does not apply to this prompt" in page


def test_nonfinite_and_missing_numbers():
    report = _mini_report()
    report["axes"]["kld"]["kld_percentiles"] = {"max": float("nan"), "median": None}
    report["axes"]["kld"]["ppl_cand"] = float("inf")
    report["axes"]["trajectory"]["items"][0].pop("score")
    report["floor"] = None
    page = _check_page(report)
    shown = page.split('<section id="raw">')[0].lower()
    assert re.search(r"\bnan\b|\binf\b", shown) is None


# --------------------------------------------------------------------------- real browser


def _browser_or_skip():
    missing = [what for what, ok in (
        ("selenium (pip install 'selenium>=4.20')", importlib.util.find_spec("selenium") is not None),
        ("/usr/bin/chromium (apt-get install chromium)", Path("/usr/bin/chromium").exists()),
        ("/usr/bin/chromedriver (apt-get install chromium-driver)", Path("/usr/bin/chromedriver").exists()),
    ) if not ok]
    if missing:
        reason = "browser test needs " + ", ".join(missing)
        if os.environ.get("REFRACT_REQUIRE_BROWSER"):
            pytest.fail(reason + " (REFRACT_REQUIRE_BROWSER is set)")
        pytest.skip(reason)


def _chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_html_in_chromium(tmp_path):
    _browser_or_skip()
    from selenium.webdriver.common.by import By

    path = SAMPLES_DIR / "report_small_full.json"
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else _mini_report()
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")

    driver = _chromium(tmp_path)
    try:
        driver.set_window_size(1280, 2000)
        driver.get(page.as_uri())
        assert driver.find_element(By.ID, "composite").is_displayed()
        for name in report["axes"]:
            assert driver.find_element(By.ID, f"axis-{name}").is_displayed(), name
        assert driver.find_element(By.ID, "rniah-heatmap").is_displayed()
        # Nothing wider than the window: no horizontal scrolling at a laptop width.
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")

        light = tmp_path / "report.png"
        assert driver.save_screenshot(str(light))
        shutil.copy(light, "/tmp/refract_report_screenshot.png")
        light_bg = driver.execute_script("return getComputedStyle(document.documentElement).backgroundColor")

        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark_bg = driver.execute_script("return getComputedStyle(document.documentElement).backgroundColor")
        assert dark_bg != light_bg  # the dark theme really follows the OS preference
        dark = tmp_path / "report_dark.png"
        assert driver.save_screenshot(str(dark))
        shutil.copy(dark, "/tmp/refract_report_screenshot_dark.png")

        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


# Where the verdict card, the raw composite and the first axis card sit, and whether the page
# scrolls sideways; the raw composite's number colour against the page's text colour.
_STORY_LAYOUT = """
function box(sel) { var r = document.querySelector(sel).getBoundingClientRect(); return [r.top, r.bottom]; }
return {scroll: document.body.scrollWidth, inner: window.innerWidth, height: window.innerHeight,
        verdict: box('#verdict'), composite: box('#composite'), axis: box('.axis-card'), gate: box('#gate'),
        raw_colour: getComputedStyle(document.querySelector('#composite .mid')).color,
        word_lines: document.querySelector('#verdict .big').getBoundingClientRect().height
                    / parseFloat(getComputedStyle(document.querySelector('#verdict .big')).lineHeight),
        text_colour: getComputedStyle(document.body).color,
        raw_border: getComputedStyle(document.querySelector('#composite')).borderTopColor,
        fail_colour: getComputedStyle(document.documentElement).getPropertyValue('--fail').trim()};
"""


def _rgb(css_hex):
    h = css_hex.lstrip("#")
    return "rgb({}, {}, {})".format(*(int(h[i:i + 2], 16) for i in (0, 2, 4)))


@pytest.mark.parametrize("verdict", ["PASS", "UNDECIDED"])
def test_one_story_in_chromium_at_desktop_and_phone(tmp_path, verdict, record_property):
    """A verdict beside raw scores in the FAIL band, as a user sees it at 1400 px and on a phone:
    the verdict above the fold, nothing wider than the window, the raw composite after the gate
    and the axes and in plain text colour. The screenshots are kept under tmp_path."""
    _browser_or_skip()
    from test_verdict_report import _pass_with_failing_raw_bands

    report = _pass_with_failing_raw_bands()
    report["verdict"]["verdict"] = verdict  # the longest word checks the headline's fit on a phone
    assert report["axes"]["trajectory"]["band"] == "FAIL"
    page = tmp_path / "story.html"
    page.write_text(render_html(report), encoding="utf-8")
    driver = _chromium(tmp_path)
    try:
        for width in (1400, 390):
            driver.set_window_size(width, 900)
            driver.get(page.as_uri())
            shot = tmp_path / f"story_{verdict}_{width}px.png"
            assert driver.save_screenshot(str(shot))
            record_property(f"screenshot_{width}px", str(shot))
            print(f"screenshot: {shot}")
            at = driver.execute_script(_STORY_LAYOUT)
            assert at["inner"] <= width
            assert at["scroll"] <= at["inner"] + 1, (width, at)  # no sideways scrolling of the page
            verdict_top, verdict_bottom = at["verdict"]
            assert 0 <= verdict_top < at["height"], (width, at)  # the verdict starts above the fold
            assert at["word_lines"] < 1.5, (width, at)  # the verdict word is not broken over two lines
            if width == 1400:
                assert verdict_bottom <= at["height"], at  # and is wholly visible on a desktop
                assert at["gate"][0] < at["height"], at  # with the gate beside it
            # What the gate read comes first: the gate, then the axes, the raw composite last.
            assert at["verdict"][1] <= at["gate"][0] <= at["axis"][0] <= at["composite"][0], (width, at)
            # The raw composite is a reference figure: text colour, not the FAIL band's.
            assert at["raw_colour"] == at["text_colour"], at
            assert at["raw_border"] != _rgb(at["fail_colour"]), at
    finally:
        driver.quit()


# Every element drawn as a card, and by how many pixels its content overflows it (0 when it
# fits). A card's overflow is visible, so content wider than the card widens its scrollWidth.
_CARD_OVERFLOWS = """
return Array.from(document.querySelectorAll('.card')).map(function (card) {
  var title = card.querySelector('h3, .label');
  return [card.id || (title ? title.textContent.trim() : card.className),
          card.scrollWidth - card.clientWidth,
          Math.round(card.getBoundingClientRect().right - document.documentElement.clientWidth)];
});
"""


@pytest.mark.parametrize("sample", ["report_small_full.json", "report_traj_kld.json"])
def test_no_card_overflows_at_phone_and_desktop_widths(tmp_path, sample):
    """The run details' "Wall time" card once let its timestamp run out of the card at 1400 px."""
    _browser_or_skip()
    report = json.loads((SAMPLES_DIR / sample).read_text(encoding="utf-8"))
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    driver = _chromium(tmp_path)
    try:
        for width in (375, 1400):
            driver.set_window_size(width, 1600)
            driver.get(page.as_uri())
            assert driver.execute_script("return window.innerWidth") <= width
            cards = driver.execute_script(_CARD_OVERFLOWS)
            titles = [title for title, _, _ in cards]
            assert "Wall time" in titles and len(cards) >= 5, titles
            overflowing = [(title, over) for title, over, _ in cards if over > 1]
            assert not overflowing, (width, overflowing)
            outside = [(title, right) for title, _, right in cards if right > 1]
            assert not outside, (width, outside)
            assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), width
    finally:
        driver.quit()


def test_matrix_report_shows_the_ranking():
    base = json.loads((Path(__file__).parent / "data" / "report_traj_kld.json").read_text())
    other = dict(base, candidate="ctk=<b>q4_0</b>,ctv=q4_0", composite=12.5, band="FAIL")
    base["candidates"] = [base.copy(), other]
    base["ranking"] = [
        {"candidate": base["candidate"], "composite": base["composite"], "band": base["band"], "passed": True,
         "axes": {"trajectory": 40.0, "kld": 99.0}, "kv_vs_reference": 0.40625},
        {"candidate": other["candidate"], "composite": 12.5, "band": "FAIL", "passed": False,
         "axes": {"trajectory": 5.0, "kld": None}},
    ]
    out = render_html(base)
    assert 'id="ranking"' in out and "Candidates ranked" in out
    assert "<td>41%</td>" in out and "<td>?</td>" in out  # KV memory; unknown for the second row
    assert "ctk=&lt;b&gt;q4_0&lt;/b&gt;,ctv=q4_0" in out and "<b>q4_0</b>" not in out
    single = json.loads((Path(__file__).parent / "data" / "report_traj_kld.json").read_text())
    assert 'id="ranking"' not in render_html(single)


def _with_control(report):
    """The mini report with a sensitivity control, a verdict read by the gate, and its first
    prompt beside the control's same prompt."""
    traj = report["axes"]["trajectory"]
    traj.update(ci95=[40.0, 70.0], teacher_forced_top1_pct=93.0, n_divergences=1, n_near_tie_divergences=1,
                verdict={"axis": "trajectory", "label": "greedy flips", "verdict": "PASS", "basis": "multiple",
                         "margin": 3.0, "n": 2, "multiple": 1.4, "multiple_ci95": [0.9, 2.1], "damage": 0.07,
                         "damage_ci95": [0.05, 0.09], "reason": ""})
    traj["items"][0].update(ref_margin_at_divergence=0.031, near_tie_divergence=True,
                            vs_control={"damage": 0.047, "control_damage": 0.016,
                                        "text": "3 flips vs 1 in the control (of 64 reference tokens)"})
    report.update(composite_ci95=[60.1, 80.2],
                  verdict={"verdict": "PASS", "score": 85.0, "headline": "PASS: greedy flips 1.4x the control's",
                           "axes": {"trajectory": traj["verdict"]}, "control_problems": [], "advice": []},
                  sensitivity={"config": "ctk=bf16,ctv=bf16", "note": "bf16 cache: the same 16 bits rounded differently",
                               "cached": True, "axes": {"trajectory": {"score": 77.0, "ci95": [60.0, 90.0],
                                                                       "n_divergences": 1, "n_near_tie_divergences": 1,
                                                                       "teacher_forced_top1_pct": 94.0}},
                               "composite": 77.0, "composite_ci95": [60.0, 90.0]})
    report["gate"].update(basis="verdict", undecided="fail", verdict="PASS")
    return report


def test_candidate_beside_the_control_and_near_tie_marks():
    page = _check_page(_with_control(_mini_report()))
    assert 'id="control"' in page and "Candidate beside the sensitivity control" in page
    assert "<code>ctk=bf16,ctv=bf16</code>" in page and "this run paid nothing for it" in page
    control = page.split('id="control"')[1].split("</section>")[0]
    # The verdict beside the control, and both raw scores as plain reference figures.
    assert "greedy flips 1.40&times; [0.90, 2.10] the control" in control.replace("×", "&times;")
    assert "77.00 [60.00, 90.00]" in control and "calibrated" not in page
    assert "beyond the control" not in page and "indistinguishable" not in control
    assert "raw 95% CI [60.1, 80.2]" in page
    assert 'class="bar-tie"' in page and "(near-tie flip)" in page
    # The prompt row says how it compares with the control's same prompt, with no band badge.
    row = page.split('<summary class="row paired">')[1].split("</summary>")[0]
    assert "3 flips vs 1 in the control (of 64 reference tokens)" in row and "badge" not in row


def test_raw_figures_carry_no_band_beside_a_verdict():
    """A PASS verdict beside raw scores in the FAIL band: no band colour or badge on any raw figure."""
    report = _with_control(_mini_report())
    report.update(composite=40.7, band="FAIL")
    report["axes"]["trajectory"].update(score=25.6, band="FAIL")
    page = _check_page(report)
    glance = page.split('id="glance"')[1].split('id="control"')[0]
    assert "b-fail" not in glance and ">FAIL<" not in glance and "DEGRADED" not in glance
    assert 'class="card composite reference"' in glance
    assert "Raw composite (REFRACT-comparable, not the verdict)" in glance
    assert "raw score <b>25.6</b>" in glance
    card = glance.split('id="axis-trajectory"')[1].split("</a>")[0]
    assert "b-pass" in glance.split('id="axis-trajectory"')[0][-80:]  # the card takes the axis verdict's colour
    assert ">PASS<" in card
    section = page.split('id="section-trajectory"')[1].split("</h2>")[0]
    assert ">PASS<" in section and "25.6" not in section and "b-fail" not in section
    # Under the raw gate the composite is what the gate reads: it keeps its band.
    report["gate"]["basis"] = "raw"
    raw_card = render_html(report).split('id="composite"')[1].split("harmonic mean")[0]
    assert ">FAIL<" in raw_card and "b-fail" in raw_card


def test_report_without_control_says_so():
    report = _mini_report()
    report["sensitivity"] = {"config": None, "note": "skipped (--refract-no-sensitivity)", "axes": {}, "composite": None}
    page = _check_page(report)
    assert "skipped (--refract-no-sensitivity)" in page


# --------------------------------------------------------------------------- templates


def test_autoescaping_covers_prompts_and_axis_names():
    report = _mini_report()
    report["axes"]["trajectory"]["items"][0]["prompt"] = "<script>alert('p')</script>"
    report["axes"]["<script>x</script>"] = {"score": 50.0, "band": "FAIL",
                                            "items": [{"id": "<script>i</script>", "score": 50.0}]}
    page = _check_page(report)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;p&#x27;)&lt;/script&gt;" in page  # the prompt, shown as text
    assert 'id="section-&lt;script&gt;x&lt;/script&gt;"' in page  # the axis name, in an attribute
    assert "<td>&lt;script&gt;i&lt;/script&gt;</td>" in page  # an item id in the generic table


def test_unknown_axis_gets_the_generic_section():
    report = _mini_report()
    report["axes"]["length"] = {"score": 91.0, "band": "EXCELLENT", "wall_s": 1.0,
                                "items": [{"id": "fact-001", "score": 91.0, "band": "EXCELLENT"},
                                          {"id": "fact-002", "score": 42.0}]}
    report["axes"] = {"length": report["axes"].pop("length"), **report["axes"]}  # reported first
    page = _check_page(report)
    parsed = _parse(page)
    # Built-in axes keep their order; the other one follows them, in the nav as in the sections.
    order = [re.search(r'id="section-([^"]+)"', s).group(1) for s in re.findall(r'<section class="axis-section[^>]*>', page)]
    assert order == ["trajectory", "kld", "rniah", "plad", "length"]
    nav = page.split('<nav class="toc">')[1].split("</nav>")[0]
    assert re.findall(r'href="#section-([^"]+)"', nav) == order
    section = page.split('id="section-length"')[1].split("</section>")[0]
    assert "91.0" in section and "calibrated" not in section
    assert "<td>fact-001</td><td class=\"r\">91.0</td>" in section
    assert "<td>fact-002</td><td class=\"r\">42.0</td><td><span class=\"badge b-fail\">FAIL</span>" in section
    assert "grid-table generic-items" in parsed.classes
    # R-NIAH names its items "cells"; an unknown axis may too.
    report["axes"]["length"] = {"score": 80.0, "cells": [{"id": "c-1", "score": 80.0, "band": "PASS"}]}
    assert "<td>c-1</td>" in render_html(report)


def test_ranking_header_names_the_axis_columns():
    base = json.loads((Path(__file__).parent / "data" / "report_traj_kld.json").read_text())
    base["candidates"] = [base.copy(), dict(base, candidate="ctk=q4_0,ctv=q4_0")]
    base["ranking"] = [{"candidate": "a", "axes": {"kld": 99.0, "trajectory": 40.0, "length": 70.0}},
                       {"candidate": "b", "axes": {"trajectory": 5.0}}]
    head = render_html(base).split('id="ranking"')[1].split("</thead>")[0]
    assert "<th>raw band</th><th>trajectory</th><th>kld</th><th>length</th><th title=" in head


def test_ruler_splits_at_the_band_floors():
    from pytest_refract.report.html.fmt import ruler_segments
    from pytest_refract.scoring.metrics import BANDS

    segments = ruler_segments()
    floors = sorted(floor for _, floor in BANDS)
    assert [float(w) for _, w in segments] == [b - a for a, b in zip(floors, floors[1:] + [100.0])]
    page = render_html(_mini_report())
    assert "".join(f'<span class="{c}" style="flex:{w}"></span>' for c, w in segments) in page


def test_template_line_breaks_are_layout_only():
    import jinja2

    from pytest_refract.report.html.render import ENV

    source = "<p>\n  {{ a }}\n  and\n  wrapped prose\n  <b>{{ b }}</b>\n</p>"
    assert ENV.from_string(source).render(a="<x>", b=None) == "<p>&lt;x&gt;and wrapped prose<b></b></p>"
    # Line numbers in errors still point at the template's own lines.
    with pytest.raises(jinja2.TemplateSyntaxError) as err:
        ENV.from_string("<p>\n  {{ a }}\n  {% if %}\n</p>")
    assert err.value.lineno == 3
