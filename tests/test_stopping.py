"""Sequential stopping through the plugin, in process on the fake engine (tests/fake_engine.py):
decided axes skip their remaining items with the decision as the skip reason, the report lists
them, --refract-exhaustive measures everything, and a decided candidate leaves its decode
batches while the control stays for the candidates still open."""

from __future__ import annotations

from dataclasses import replace

import fake_engine
import pytest
from conftest import read_report

from pytest_refract.audit import runner as runner_mod
from pytest_refract.audit.batches import DecodeBatches
from pytest_refract.axes.base import Unit
from pytest_refract.scoring.sequential import Design
from pytest_refract.stopping import SequentialStopping


def _audit(pytester, model, corpus, *extra):
    report = pytester.path / "r.json"
    result = pytester.runpytest_inprocess(
        f"--refract-model={model}", f"--refract-corpus={corpus}", "--refract-axes=kld", "--refract-ctx=64",
        "--refract-threads=1", "--refract-no-cache", f"--refract-json={report}", "-rs", "-p", "no:cacheprovider",
        *extra)
    return result, read_report(report)


def test_decided_axes_skip_the_rest_and_the_report_lists_them(pytester, fake_llamacpp, tiny_model, long_corpus):
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-candidate=ctk=bf16,ctv=bf16",
                            "--refract-candidate=ctk=q8_0,ctv=q8_0", f"--refract-html={pytester.path / 'r.html'}")
    out = result.stdout.str()
    seq0 = report["candidates"][0]["axes"]["kld"]["sequential"]
    n, looks = seq0["looks"][-1], seq0["looks"]
    assert n >= 48 and 48 in looks
    outcomes = result.parseoutcomes()
    # q8_0 has 25x bf16's noise: FAIL at the first look (8 chunks). bf16 is the control's own
    # config (M 1): a PASS waits for the first look with at least 46 chunks (48).
    assert outcomes["passed"] == 48 + 8 and outcomes["skipped"] == (n - 48) + (n - 8), out
    assert f"decided after 48 of {n} chunks: PASS (M 1x [1, 1])" in out
    assert f"decided after 8 of {n} chunks: FAIL" in out
    by_label = {c["candidate"]: c for c in report["candidates"]}
    for label, verdict, at in (("ctk=bf16,ctv=bf16", "PASS", 48), ("ctk=q8_0,ctv=q8_0", "FAIL", 8)):
        section = by_label[label]["axes"]["kld"]
        seq = section["sequential"]
        assert seq["decided"] and seq["decided_after"] == at and len(seq["skipped"]) == n - at
        assert len(section["items"]) == at and section["n_chunks"] == at  # skipped items are not measured
        assert section["verdict"]["verdict"] == verdict and section["verdict"]["n_items"] == at
        # Read at its look's errors: the interval's level is 1 - (PASS error + FAIL error).
        k = looks.index(at)
        assert section["verdict"]["level"] == pytest.approx(seq["look_level"]) == pytest.approx(seq["look_levels"][k])
        assert section["verdict"]["fail_error"] == pytest.approx(seq["fail_errors"][k])
        assert seq["stopped_by"] is None and seq["look_read"] == k + 1
    # The first look spends half of each side's 2.5 % (the PASS side's shown at its first look).
    assert by_label["ctk=q8_0,ctv=q8_0"]["axes"]["kld"]["sequential"]["look_level"] == pytest.approx(0.975)
    # What the PASS could miss, in the JSON and the terminal.
    assert by_label["ctk=bf16,ctv=bf16"]["verdict"]["axes"]["kld"]["could_miss"] == pytest.approx(1 - 0.05 ** (1 / 48))
    assert "what this PASS could miss: a problem confined to fewer than 6.1 % of chunks could go unseen" in out
    assert report["items_skipped_decided"] == (n - 48) + (n - 8)
    # The control measured the 48 chunks bf16 needed, no more.
    assert len(report["sensitivity"]["axes"]["kld"]["items"]) == 48
    # The decision is a progress line on its own.
    assert "refract: kld [ctk=q8_0,ctv=q8_0]: 8 chunks, M " in out and "FAIL decided: the remaining" in out
    assert result.ret == 1  # q8_0 FAILs (the gate reads every candidate)
    # The terminal's verdict lines and the HTML say where each axis stopped.
    n_looks = len(looks)
    assert f"; decided after 8 of {n} (look 1 of {n_looks}, its interval at 97.5 %), {n - 8} skipped" in out
    # The HTML's sections show the first candidate (bf16), decided at the 48-chunk look.
    k = looks.index(48)
    assert (f"decided after 48 of {n} items; {n - 48} not measured (look {k + 1} of {n_looks} planned"
            in (pytester.path / "r.html").read_text())
    # The family-wise recommendation: bf16's larger cache PASSes first, q8_0 does not.
    assert report["recommendation"]["recommended"] == "ctk=bf16,ctv=bf16"
    assert report["recommendation"]["decisions"]["ctk=q8_0,ctv=q8_0"] == "not PASS"


def test_a_fail_on_one_axis_stops_the_candidates_other_axes(pytester, fake_llamacpp, tiny_model, long_corpus):
    # q8_0 FAILs KLD at its first look; the candidate's verdict is then FAIL whatever PLAD
    # says, so PLAD is not measured at all, and claims no verdict of its own.
    html = pytester.path / "r.html"
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0",
                            "--refract-axes=kld,plad", "--refract-n-predict=8", f"--refract-html={html}")
    out = result.stdout.str()
    kld, plad = report["axes"]["kld"], report["axes"]["plad"]
    assert list(report["axes"]) == ["kld", "plad"]
    # PLAD is in the report, unscored, saying why; nothing failed, and no raw composite is
    # claimed without it.
    assert plad["status"] == "stopped" and plad["score"] is None and plad["items"] == []
    assert plad["verdict"]["verdict"] == "UNDECIDED"
    assert plad["verdict"]["reason"] == "not measured further: the verdict is FAIL on kld"
    assert report["composite"] is None and not any("failed to measure" in d for d in report["diagnosis"])
    assert "not measured: the verdict is FAIL on kld" in out
    assert f"stopped after 0 of {plad['sequential']['looks'][-1]} items" in html.read_text()
    assert kld["sequential"]["decided"] and kld["verdict"]["verdict"] == "FAIL"
    n_plad = plad["sequential"]["looks"][-1]
    assert plad["sequential"]["stopped_by"] == "kld" and not plad["sequential"]["decided"]
    assert plad["sequential"]["measured"] == 0 and len(plad["sequential"]["skipped"]) == n_plad
    assert "not needed: the verdict is FAIL on kld (decided after 8 of" in out
    assert "the verdict is FAIL, so plad stops too" in out
    assert report["verdict"]["verdict"] == "FAIL" and result.ret == 1
    # The gate fails on that FAIL, not on a composite PLAD "failed to measure".
    reasons = report["gate"]["reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("verdict FAIL: kld next-token KLD at least"), reasons
    assert report["items_skipped_decided"] == len(kld["sequential"]["skipped"]) + n_plad
    # The control measured nothing for PLAD either: no candidate needed it.
    assert not (report["sensitivity"]["axes"].get("plad") or {}).get("items")


def test_an_axis_stopped_by_another_claims_no_verdict():
    import numpy as np

    from pytest_refract.report.verdicts import candidate_verdict
    from tests.test_verdict import AXIS, flips

    rng = np.random.default_rng(3)
    cand, ctrl = flips(48, 1.0, rng)

    def section(rows):
        return {"score": 90.0, "items": [{"id": f"i{k}", "row": list(r)} for k, r in enumerate(rows)]}

    class Sim:
        NAME, DAMAGE_LABEL, MARGIN = "sim", "greedy flips", 3.0
        damage = staticmethod(AXIS.damage)

        @staticmethod
        def section_items(s):
            return s["items"]

        @staticmethod
        def damage_table(items):
            return [i["id"] for i in items], np.asarray([i["row"] for i in items], dtype=float)

    registry = {"sim": Sim}
    free = candidate_verdict({"sim": section(cand)}, {"axes": {"sim": section(ctrl)}}, registry)
    assert free["axes"]["sim"]["verdict"] == "PASS"  # the same items decide when nothing stopped them
    stopped = candidate_verdict({"sim": section(cand)}, {"axes": {"sim": section(ctrl)}}, registry,
                                stopped_by={"sim": "kld"})
    axis = stopped["axes"]["sim"]
    assert axis["verdict"] == "UNDECIDED" and axis["reason"] == "not measured further: the verdict is FAIL on kld"
    assert axis["multiple"] == free["axes"]["sim"]["multiple"]  # the figure stays, for what it is
    assert stopped["advice"] == ["sim: not measured further: the verdict is FAIL on kld "
                                 "(--refract-exhaustive measures it anyway)"]


def test_exhaustive_measures_every_item_at_the_fixed_sample_level(pytester, fake_llamacpp, tiny_model, long_corpus):
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-candidate=ctk=bf16,ctv=bf16",
                            "--refract-exhaustive")
    section = report["axes"]["kld"]
    n = section["sequential"]["looks"][-1]
    assert result.parseoutcomes()["passed"] == n and "skipped" not in result.parseoutcomes()
    assert section["sequential"]["looks"] == [n] and not section["sequential"]["stopping"]
    assert section["verdict"]["level"] == pytest.approx(0.95) and section["verdict"]["n_items"] == n
    assert report["settings"]["sequential"]["stopping"] is False


def test_max_items_caps_each_axis_and_ids_stay(pytester, fake_llamacpp, tiny_model, long_corpus):
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-candidate=ctk=bf16,ctv=bf16",
                            "--refract-max-items=5", "--refract-exhaustive")
    items = report["axes"]["kld"]["items"]
    assert len(items) == 5 and report["settings"]["sequential"]["max_items"] == 5
    # The measuring order is a seeded sample of the whole corpus, not its first chunks, and the
    # ids are the chunks' own.
    ids = [i["id"] for i in items]
    assert ids != [f"chunk-{k:02d}" for k in range(5)] and all(i.startswith("chunk-") for i in ids)


@pytest.mark.parametrize("flag", ["--refract-max-items=0", "--refract-max-items=x", "--refract-chunks=some"])
def test_bad_caps_are_usage_errors(pytester, fake_llamacpp, tiny_model, long_corpus, flag):
    from conftest import one_usage_error_line

    result = pytester.runpytest_inprocess(f"--refract-model={tiny_model}", "--refract-candidate=ctk=q8_0,ctv=q8_0", flag)
    line = one_usage_error_line(result)
    assert flag.split("=")[0] in line


def test_a_decided_candidate_leaves_the_batch_and_the_control_stays_for_the_others():
    batches = DecodeBatches(["cand0", "cand1", "control"], "control", lambda axis, unit: False)
    units = [Unit(f"p{i}", axis="trajectory", batch=0) for i in range(4)]
    batches.set_plan([replace(u, candidate=r) for u in units for r in ("cand0", "cand1")])
    unit = replace(units[0], candidate="cand1")
    assert batches.batch_of("trajectory", unit)[1] == ["cand0", "cand1", "control"]
    batches.closed = lambda axis: {"cand0"} if axis == "trajectory" else set()
    assert batches.batch_of("trajectory", unit)[1] == ["cand1", "control"]


def test_no_control_means_no_stopping():
    from types import SimpleNamespace

    settings = SimpleNamespace(sequential=True, decode_batch=16)
    axis = SimpleNamespace(NAME="kld", BATCHED=0)
    stopping = SequentialStopping(settings, {"kld": axis}, None, {}, {})
    stopping.plan([Unit(f"c{i}", axis="kld", candidate="cand0") for i in range(40)])
    design = stopping.progress[("cand0", "kld")].design
    assert design == Design.plan(40, 1, stopping=False)
    assert stopping.observe("cand0", "kld", {"c0": {}}, None) is None
    assert stopping.skip_reason("cand0", "kld", "c1") is None


def _planned(axis, n, roles=("cand0",), batch=None):
    return [Unit(f"{axis}{i}", axis=axis, candidate=r, batch=None if batch is None else i // batch)
            for i in range(n) for r in roles]


def test_the_axes_take_turns_look_by_look_and_batches_stay_whole():
    from types import SimpleNamespace

    settings = SimpleNamespace(sequential=True, decode_batch=16)
    axes = {"trajectory": SimpleNamespace(NAME="trajectory", BATCHED=1), "kld": SimpleNamespace(NAME="kld", BATCHED=0)}
    planned = _planned("trajectory", 40, ("cand0", "cand1"), batch=16) + _planned("kld", 20, ("cand0", "cand1"))
    stopping = SequentialStopping(settings, axes, "control", {}, {})
    stopping.plan(planned)
    order = [planned[i] for i in stopping.look_order(planned)]
    assert sorted(map(id, order)) == sorted(map(id, planned))  # a permutation
    # trajectory looks at 16, 32, 40; kld at 8, 16, 20: stage by stage, collection order inside.
    runs = []
    for unit in order:
        if not runs or runs[-1][0] != unit.axis:
            runs.append([unit.axis, 0])
        runs[-1][1] += 1
    assert runs == [["trajectory", 32], ["kld", 16], ["trajectory", 32], ["kld", 16], ["trajectory", 16], ["kld", 8]]
    # The candidates of a unit stay back to back, and no decode batch is split across stages.
    assert [u.candidate for u in order[:4]] == ["cand0", "cand1", "cand0", "cand1"]
    seen, last = set(), None
    for unit in order:
        key = (unit.axis, unit.batch)
        if unit.axis == "trajectory" and key != last:
            assert key not in seen
            seen.add(key)
        last = key
    # Stopping off (no control): collection order, untouched.
    off = SequentialStopping(settings, axes, None, {}, {})
    off.plan(planned)
    assert off.look_order(planned) == list(range(len(planned)))


def test_a_fail_on_a_later_axis_stops_an_earlier_one_at_its_next_look(pytester, fake_llamacpp, tiny_model, long_corpus):
    # trajectory is collected before kld; q8_0 FAILs kld at 8 chunks, which runs right after
    # trajectory's first look (16 prompts), so trajectory stops there instead of running its pool.
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-candidate=ctk=q8_0,ctv=q8_0",
                            "--refract-axes=trajectory,kld", "--refract-n-predict=4", "-v")
    out = result.stdout.str()
    traj, kld = report["axes"]["trajectory"], report["axes"]["kld"]
    assert kld["verdict"]["verdict"] == "FAIL" and kld["sequential"]["decided_after"] == 8, kld["verdict"]
    assert traj["sequential"]["measured"] == 16 and len(traj["items"]) == 16
    assert traj["sequential"]["decided"] or traj["sequential"]["stopped_by"] == "kld"
    n_traj = traj["sequential"]["looks"][-1]
    assert n_traj > 32 and len(traj["sequential"]["skipped"]) == n_traj - 16
    # The run order: 16 prompts, 8 chunks, then only skips.
    ran = [line.split("::")[1].split("[")[0] for line in out.splitlines()
           if line.startswith("refract::") and " PASSED" in line]
    assert ran == ["test_trajectory"] * 16 + ["test_kld"] * 8, ran
    assert result.ret == 1


def test_an_axis_leaves_no_one_sequence_context_under_the_next(pytester, fake_llamacpp, tiny_model, long_corpus,
                                                              monkeypatch):
    # With the axes taking turns, the contexts one axis sized for itself (KLD's logits buffers:
    # 267 MB each on Gemma 3) must be closed before the next axis opens its own; PLAD's batched
    # contexts came on top of KLD's before (Gemma 3's matrix peaked at 4.06 GB).
    events, axis_now = [], [None]
    real_measure = runner_mod.Runner.measure
    real_init, real_close = fake_engine.FakeContext.__init__, fake_engine.FakeContext.close

    def measure(self, unit):
        axis_now[0] = unit.axis
        return real_measure(self, unit)

    def init(self, *args):
        real_init(self, *args)
        events.append(("open", axis_now[0], id(self)))

    def close(self):
        events.append(("close", axis_now[0], id(self)))
        real_close(self)

    monkeypatch.setattr(runner_mod.Runner, "measure", measure)
    monkeypatch.setattr(fake_engine.FakeContext, "__init__", init)
    monkeypatch.setattr(fake_engine.FakeContext, "close", close)
    # bf16 is the control's own config: KLD PASSes at its 48-chunk look, then PLAD runs.
    result, report = _audit(pytester, tiny_model, long_corpus, "--refract-candidate=ctk=bf16,ctv=bf16",
                            "--refract-axes=kld,plad", "--refract-n-predict=8")
    assert report["axes"]["kld"]["items"] and report["axes"]["plad"]["items"], result.stdout.str()
    opened_by = {ctx: axis for kind, axis, ctx in events if kind == "open"}
    first_plad = next((i for i, (kind, axis, _) in enumerate(events) if kind == "open" and axis == "plad"), None)
    assert first_plad is not None, "PLAD opened no context of its own: it ran in KLD's"
    closed_before = {ctx for kind, _, ctx in events[:first_plad] if kind == "close"}
    # The axes take turns look by look: KLD's contexts opened before PLAD's first are closed
    # before it (KLD opens new ones at its next stage).
    opened_before = {ctx for kind, _, ctx in events[:first_plad] if kind == "open"}
    kld_contexts = {ctx for ctx, axis in opened_by.items() if axis == "kld" and ctx in opened_before}
    assert kld_contexts and kld_contexts <= closed_before, (len(kld_contexts), len(closed_before))
