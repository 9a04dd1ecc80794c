"""The runner, the axes, the reference store and the decode loop, in process, on the fake
engine (tests/fake_engine.py): milliseconds per audit, no llama.cpp. What only a subprocess
shows (exit codes, signals, xdist) stays in the pytester tests."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import fake_engine
import pytest

from pytest_refract.audit.runner import Runner
from pytest_refract.axes import Axis, resolve
from pytest_refract.engines.kvconfig import parse_kv_config
from pytest_refract.errors import UsageProblem
from pytest_refract.report.build import build_report
from pytest_refract.settings import Settings


def _settings(model, prompts, corpus, candidate="ctk=q4_0,ctv=q4_0", **over) -> Settings:
    values = dict(model=str(model), reference=parse_kv_config("ctk=f16,ctv=f16"),
                  candidates=(parse_kv_config(candidate),), axes=("trajectory", "kld", "rniah", "plad"),
                  fail_under=60.0, fail_under_text="FAIL", item_fail_under=None, json_path=None,
                  prompts_path=str(prompts), corpus_path=str(corpus), n_predict=8, ctx=64, chunks=3, seed=0,
                  threads=1, gpu_layers=0, floor=False, rniah_lengths=(96,), rniah_trials=2, decode_batch=16,
                  sensitivity=parse_kv_config("ctk=bf16,ctv=bf16"), gate_basis="raw")
    values.update(over)
    return Settings(**values)


def _run(settings, axes=None) -> tuple:
    """Every item of every selected axis, as the plugin collects and runs them (units in
    order, candidates innermost, consecutive units forming decode batches); returns the
    runner and results as role -> axis -> unit id -> result, the control's under "control"."""
    runner = Runner(settings, axes or resolve(), engine_mod=fake_engine)
    results = measure_every_item(runner)
    runner.close()
    return runner, results


def audit_every_item(settings) -> tuple:
    """Every item on the fake engine, as the plugin runs them, and the report built from the
    results: returns (report, results)."""
    axes = resolve()
    runner = Runner(settings, axes, engine_mod=fake_engine)
    results = measure_every_item(runner)
    # One result per planned item (the control's ride along under "control").
    items = sum(len(per_axis) for role, axes_of in results.items() if role != "control" for per_axis in axes_of.values())
    facts = runner.record(None, wall_s=1.0, items_selected=items)
    report = build_report(facts=facts, results=results, failed={}, custom=[], invocation_args=[], complete=True,
                          registry=axes)
    runner.close()
    return report, results


def measure_every_item(runner) -> dict:
    """Plan every item the runner has and measure each; results as role -> axis -> unit id ->
    result, the control's under "control"."""
    planned = [unit for unit, _group in runner.items()]
    runner.set_plan(planned)
    results: dict = {}
    for unit in planned:
        item = runner.measure(unit)
        for measured in (item, item.control):
            if measured is not None:
                results.setdefault(measured.role, {}).setdefault(unit.axis, {})[measured.unit] = measured.result
    return results


@pytest.fixture
def inputs(tiny_model, tiny_prompts, tiny_corpus):
    return tiny_model, tiny_prompts, tiny_corpus


def _scores(results, role="cand0"):
    return {axis: {uid: r["score"] for uid, r in items.items()} for axis, items in results[role].items()}


def test_self_reference_matches_on_every_axis(inputs):
    _, results = _run(_settings(*inputs, candidate="ctk=f16,ctv=f16"))
    scores = _scores(results)
    assert set(scores) == {"trajectory", "kld", "rniah", "plad"}
    assert all(s == 100.0 for s in scores["trajectory"].values())
    # The candidate is compared with the reference's 16-bit log-probs: the storage floor only.
    assert all(99.99 < s <= 100.0 for s in scores["kld"].values())
    assert all(r["excess"] == 0.0 for r in results["cand0"]["plad"].values() if not r["skipped"])


def test_a_noisy_cache_scores_lower_than_a_precise_one(inputs):
    _, noisy = _run(_settings(*inputs, candidate="ctk=q4_0,ctv=q4_0"))
    _, precise = _run(_settings(*inputs, candidate="ctk=q8_0,ctv=q8_0"))
    for axis in ("trajectory", "kld"):
        mean = {name: sum(_scores(r)[axis].values()) / len(_scores(r)[axis]) for name, r in
                (("noisy", noisy), ("precise", precise))}
        assert mean["noisy"] < mean["precise"], axis


def test_serial_decoding_is_a_batch_of_one(inputs):
    """--refract-decode-batch=1 runs the same decode loop one sequence at a time: on an engine
    whose rows do not depend on the batch, every item's result is the same."""
    keys = ("cand_tokens", "ref_tokens", "teacher_forced_kld", "teacher_forced_top1_pct", "score")
    _, serial = _run(_settings(*inputs, decode_batch=1, axes=("trajectory", "plad")))
    _, batched = _run(_settings(*inputs, decode_batch=16, axes=("trajectory", "plad")))
    for uid, r in serial["cand0"]["trajectory"].items():
        assert {k: r[k] for k in keys} == {k: batched["cand0"]["trajectory"][uid][k] for k in keys}
    assert {u: r["score"] for u, r in serial["cand0"]["plad"].items()} == \
        {u: r["score"] for u, r in batched["cand0"]["plad"].items()}
    # Batched items decoded their prompts in multi-sequence steps; serial ones never did.
    assert any(c.get("seq_decode_steps") for r in batched["cand0"]["trajectory"].values() for c in r["compute"].values())
    assert not any(c.get("seq_decode_steps") for r in serial["cand0"]["trajectory"].values() for c in r["compute"].values())


def test_the_control_is_measured_inside_the_first_candidate_item(inputs):
    _, results = _run(_settings(*inputs, axes=("trajectory", "kld")))
    for axis in ("trajectory", "kld"):
        assert set(results["control"][axis]) == set(results["cand0"][axis])
        for uid, r in results["cand0"][axis].items():
            control = results["control"][axis][uid]
            assert control["id"] == r["id"] and control["score"] is not None and not control["control_cached"]


def test_the_reference_store_reads_back_what_it_wrote(inputs, tmp_path, monkeypatch):
    from pytest_refract.reference import store

    # The spot check re-measures one of the first SPOT_WINDOW cached reads (test_safety_gate);
    # beyond any read here it takes none, so the warm run is all reads.
    monkeypatch.setattr(store, "SPOT_WINDOW", 10**6)
    settings = _settings(*inputs, axes=("trajectory", "kld", "plad"), cache_dir=str(tmp_path / "cache"))
    _, cold = _run(settings)
    _, warm = _run(settings)
    strip = ("compute", "reference_cache", "wall_s")
    for axis, items in cold["cand0"].items():
        for uid, r in items.items():
            w = warm["cand0"][axis][uid]
            assert {k: v for k, v in r.items() if k not in strip} == {k: v for k, v in w.items() if k not in strip}
            assert warm["control"][axis][uid]["control_cached"]
    # Warm: the reference decoded and evaluated nothing; it was all read.
    ref_tokens = sum(sum(r["compute"].get("reference", {}).values()) for items in warm["cand0"].values()
                     for r in items.values())
    hits = sum(r["reference_cache"]["hits"] for items in warm["cand0"].values() for r in items.values())
    assert ref_tokens == 0 and hits > 0


def test_a_fifth_axis_from_outside_the_package_runs_beside_the_others(inputs):
    spec = importlib.util.spec_from_file_location(
        "custom_axis_conftest", Path(__file__).parent.parent / "examples" / "custom_axis" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    axes = resolve(module.pytest_refract_axes(None))
    assert list(axes)[-1] == "length"
    runner, results = _run(_settings(*inputs, axes=("trajectory", "length")), axes)
    items = results["cand0"]["length"]
    assert set(items) == {p.id for p in runner.inputs.prompts}
    for r in items.values():
        assert r["score"] == pytest.approx(100.0 * (1 - r["gap_tokens"] / max(r["ref_len"], r["cand_len"])))
        assert results["control"]["length"][r["id"]]["score"] is not None
    section = axes["length"].aggregate(list(items.values()))
    assert section["score"] == pytest.approx(sum(r["score"] for r in items.values()) / len(items))


@pytest.mark.parametrize("bad, message", [
    (type("Nameless", (Axis,), {}), "must be a lowercase word"),
    (type("Taken", (Axis,), {"NAME": "kld"}), "registered twice"),
    (type("Lacking", (), {"NAME": "x"}), "lacks units, planned_tokens, measure, aggregate"),
])
def test_an_axis_without_the_protocol_is_refused(bad, message):
    with pytest.raises(UsageProblem, match=message):
        resolve([bad()])


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# The llama.cpp engine: llamacpp.py and the two modules it draws on that talk to the library.
_ENGINE_PARTS = ["engines/ggml_types.py", "engines/llama_log.py", "engines/llamacpp.py"]


def test_no_module_but_the_llamacpp_engine_imports_llama_cpp():
    package = Path(__file__).parent.parent / "pytest_refract"
    importers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "llama_cpp" in _imports(p))
    assert importers == _ENGINE_PARTS
    # ... and the engine's parts are reached only through llamacpp.py (loaded lazily by name).
    for path in package.rglob("*.py"):
        if str(path.relative_to(package)) in _ENGINE_PARTS:
            continue
        text = path.read_text()
        assert "ggml_types" not in text and "llama_log" not in text, path



def _cut_counts(results) -> dict:
    """(context role, axis) -> its cut_* compute counts summed over every measured item (the
    reference's contexts count inside the candidates' items; engines.base.CutCounts)."""
    total: dict = {}
    for items in results.values():
        for axis, by_unit in items.items():
            for r in by_unit.values():
                for role, counts in r["compute"].items():
                    into = total.setdefault((role, axis), {})
                    for key, value in counts.items():
                        if key.startswith("cut_"):
                            into[key] = into.get(key, 0) + value
    return total


def test_a_sliding_window_changes_which_cut_path_runs_and_no_number(inputs, monkeypatch):
    """Teacher forcing cuts a diverged sequence back; an R-NIAH trial reuses the haystack its
    previous trial cached (n_batch 32: whole batches of the 96-token haystack are shared).
    Without a window every such cut keeps its cells; with a window shorter than any sequence,
    each is recomputed instead, counted under its own path, and every result stays the same."""
    settings = _settings(*inputs, axes=("trajectory", "rniah"), n_batch=32, n_ubatch=32,
                         rniah_positions=(0.5, 0.9))
    _, whole = _run(settings)
    monkeypatch.setattr(fake_engine.FakeContext, "window", 4)
    _, windowed = _run(settings)
    plain, cut = _cut_counts(whole), _cut_counts(windowed)
    assert plain[("cand0", "trajectory")]["cut_kept"] > 0  # q4_0 diverges: teacher forcing cuts back
    for role in ("reference", "cand0", "control"):
        assert plain[(role, "rniah")]["cut_kept"] > 0, role  # trial 2 reuses trial 1's haystack
    assert set(plain) == set(cut)
    for (role, axis), counts in plain.items():
        assert counts["cut_rebuilt_window"] == counts["cut_reuse_refused_window"] == 0, (role, axis)
        assert cut[(role, axis)]["cut_kept"] == 0 and cut[(role, axis)]["cut_rebuilt_engine"] == 0, (role, axis)
        # Teacher forcing's cuts are rebuilt, R-NIAH's prefix reuse is refused: one for one.
        moved = "cut_rebuilt_window" if axis == "trajectory" else "cut_reuse_refused_window"
        assert cut[(role, axis)][moved] == counts["cut_kept"], (role, axis)
    strip = ("compute", "wall_s", "reference_cache")
    for role, items in whole.items():
        for axis, by_unit in items.items():
            for uid, r in by_unit.items():
                assert ({k: v for k, v in r.items() if k not in strip}
                        == {k: v for k, v in windowed[role][axis][uid].items() if k not in strip}), (role, axis, uid)
