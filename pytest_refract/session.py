"""The audit's session: its items and their collector, and the RefractSession that collects
their results (also from xdist workers), gates the run and writes the report.

Only the plugin's hooks create it; it asks the runner (audit/) for its items, their
measurements and its record of the run, and hands them to report/."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Dict, List, Literal, Optional, Tuple

import pytest

from . import settings as settings_mod
from .audit.results import ItemResult
from .axes.base import Unit
from .errors import MeasurementError, UsageProblem
from .fixtures import CUSTOM_RESULTS
from .stopping import SequentialStopping

_STASH_KEY = pytest.StashKey["RefractSession"]()


def get_session(config) -> Optional["RefractSession"]:
    return config.stash.get(_STASH_KEY, None)


def install(config, session: "RefractSession") -> None:
    """Make ``session`` this config's: stashed, registered for its hooks, SIGTERM handled,
    and pytest-html fed when that plugin is active."""
    config.stash[_STASH_KEY] = session
    _stop_on_sigterm(session)
    config.pluginmanager.register(session, "refract-session")
    if config.pluginmanager.hasplugin("html"):
        from .report.pytest_html import HtmlHooks

        config.pluginmanager.register(HtmlHooks(session), "refract-html-hooks")


def _stop_on_sigterm(session) -> None:
    """SIGTERM (a CI job cancelled, a container stopped) ends the run like Ctrl-C: pytest
    unwinds, and the report is written with "complete": false instead of not at all."""
    if session.is_worker or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return

    def handler(signum, frame):
        session.interrupted = True
        raise KeyboardInterrupt("SIGTERM")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the default behaviour
        pass


@contextlib.contextmanager
def signals_deferred():
    """While the body runs, SIGTERM and SIGINT are recorded instead of acted on (in the main
    thread; elsewhere no handler can be set and the body runs as is). Yields the list of the
    signal numbers that arrived."""
    arrived: List[int] = []
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                saved[sig] = signal.signal(sig, lambda signum, frame: arrived.append(signum))
            except (ValueError, OSError):
                pass
    try:
        yield arrived
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class RefractCollector(pytest.Collector):
    """Parent of the audit's items, so they exist even in a folder with no test files."""

    def collect(self):
        runner = get_session(self.config).runner
        # xdist_group is xdist's mark, registered by xdist: without it loaded the mark is
        # unknown (a warning on every run, a collection error under --strict-markers).
        grouped = self.config.pluginmanager.hasplugin("xdist")
        for unit, group in runner.items():
            item = RefractItem.from_parent(self, name=item_name(runner, unit), unit=unit)
            if grouped:
                item.add_marker(pytest.mark.xdist_group(group))
            yield item


def item_name(runner, unit: Unit) -> str:
    """``test_<axis>[<candidate prefix><unit id>]``: the candidate prefix only in a matrix."""
    return f"test_{unit.axis}[{runner.id_prefix[unit.candidate]}{unit.id}]"


class RefractItem(pytest.Item):
    def __init__(self, *, unit: Unit, **kwargs):
        super().__init__(**kwargs)
        self.unit = unit
        self.measured: Optional[ItemResult] = None
        for keyword in unit.keywords:
            self.extra_keyword_matches.add(keyword)

    @property
    def axis(self) -> str:
        return self.unit.axis

    def runtest(self):
        rs = get_session(self.config)
        decided = rs.stopping.skip_reason(self.unit.candidate, self.axis, self.unit.id)
        if decided:
            # The axis's verdict for this candidate is decided: the item is not measured (and
            # not counted as measured anywhere); the report lists it under "sequential".
            pytest.skip(decided)
        try:
            self.measured = rs.runner.measure(self.unit)
        except (MeasurementError, UsageProblem) as exc:
            raise RefractItemError(f"{self.axis} {self.name}: {exc}") from None
        result = self.measured.result
        if result.get("score") is not None:
            # On the item, so every report phase carries them: JUnit XML writes user_properties
            # as <property> elements of the test case.
            self.user_properties.append(("refract_score", round(result["score"], 4)))
            self.user_properties.append(("refract_band", result["band"]))
        if result.get("skipped"):
            pytest.skip(result.get("reason") or "not applicable")
        threshold = rs.runner.settings.item_fail_under
        if threshold is not None and result["score"] is not None and result["score"] < threshold:
            raise RefractItemError(
                f"{self.axis} {self.name}: score {result['score']:.2f} ({result['band']}) is below "
                f"--refract-item-fail-under={threshold:g}"
            )

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, RefractItemError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, self.name


class RefractItemError(Exception):
    """An item failure whose message is the whole story (no traceback)."""


class RefractSession:
    """Collects item results (from this process or, under xdist, from workers' reports),
    gates the session on the composite, and writes the summary and the JSON report."""

    def __init__(self, config, runner):
        self.config = config
        self.runner = runner
        # role -> axis -> unit id -> result (or list of failed unit ids, or further results)
        self.results: Dict[str, Dict[str, Dict[str, dict]]] = {}
        self.failed: Dict[str, Dict[str, List[str]]] = {}
        self.repeats: Dict[str, Dict[str, Dict[str, List[dict]]]] = {}
        # Node id -> (role, axis, unit id) of every item the runner plans: an item that died
        # without a result (an xdist worker crash) is still filed under its axis.
        self._item_of: Optional[Dict[str, tuple]] = None
        self.custom: List[dict] = []
        # Node ids of the audit's items that reached an outcome: fewer than were selected is an
        # early stop, however it came about.
        self._finished: set = set()
        self.started = time.time()
        self.report: Optional[dict] = None
        # Set when the report files are written (declared only: read with getattr before that).
        self.write_problems: List[str]
        self.gate: dict = {"passed": None, "threshold": runner.settings.fail_under, "reasons": []}
        self.interrupted = False
        self.is_worker = hasattr(config, "workerinput")
        self.stopping = SequentialStopping(runner.settings, runner.axes, runner.control_role, runner.self_reference,
                                           runner.labels, matrix=len(runner.candidate_roles) > 1)
        # A sweep measures its pairs one after another (sweep.measuring_order), so that what it
        # can skip is found before it is measured. Each pair then reads the reference's results
        # from the reference cache; where the cache is not read (--refract-no-cache, the floor,
        # --refract-repeat) the pairs run side by side instead, so the reference is computed once.
        # So they do under xdist, whose workers get a unit's items for every pair together.
        self.sweep_rank: Optional[Dict[str, int]] = None
        if runner.sweep is not None:
            from . import sweep as sweep_mod

            sizes = {r: runner.kv_bytes_per_token(r) for r in runner.candidate_roles}
            if runner.reference.read and not self.is_worker:
                self.sweep_rank = sweep_mod.measuring_order(sizes, runner.labels)
            if runner.control_role and not runner.settings.sweep_exhaustive:
                pruning = sweep_mod.SweepPruning(self.stopping, runner.axes, sizes, runner.labels, runner.control_role,
                                                 _budget_bytes(runner), lambda: self.results)
                self.stopping.on_decided = pruning.decided
        self.baseline: Optional[dict] = None
        if runner.settings.baseline_path:
            from .report.baseline import load_baseline

            self.baseline = load_baseline(runner.settings.baseline_path, runner.model_summary(),
                                          runner.settings.reference.label())

    def pytest_sessionstart(self, session):
        # Here, not in pytest_configure: the terminal reporter exists by now.
        from .audit.progress import sink_for

        self.runner.show_progress(sink_for(self.config, settings_mod.show_progress(self.config)))

    def pytest_runtest_logstart(self, nodeid, location):
        self.runner.item_starting(nodeid)  # to reopen pytest's line after progress lines (PlainLines.clear)

    # -- collection ---------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session, config, items):
        # tryfirst: our items must exist before -k / -m deselection runs.
        # Reported like any collected node, so pytest's "collected N items" counts them.
        collector = RefractCollector.from_parent(session, name="refract", nodeid="refract")
        report = config.hook.pytest_make_collect_report(collector=collector)
        config.hook.pytest_collectreport(report=report)
        if report.failed:
            raise pytest.UsageError(f"pytest-refract could not collect its items: {report.longreprtext}")
        items.extend(report.result)

    def pytest_collection_finish(self, session):
        # After -k/-m: the items this process may run, so a decode batch holds only those.
        slots = [k for k, item in enumerate(session.items) if isinstance(item, RefractItem)]
        ours = [session.items[k] for k in slots]
        planned = [item.unit for item in ours]
        # Every design is fixed here, before the first item runs (scoring/sequential.py); it
        # depends on how many items each axis has, not on their order.
        self.stopping.plan(planned)
        # With stopping on, the axes take turns look by look (stopping.look_order), a sweep's
        # pairs one after another; our items keep the slots they had among any other tests.
        order = self.stopping.look_order(planned, self.sweep_rank)
        for k, i in zip(slots, order):
            session.items[k] = ours[i]
        planned = [planned[i] for i in order]
        self.runner.set_plan(planned, closed=self.stopping.closed, rank=self.sweep_rank)

    # -- results ------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if call.when == "call":
            custom = item.stash.get(CUSTOM_RESULTS, None)
            if custom:
                report.refract_custom = custom
        if isinstance(item, RefractItem) and call.when == "call" and item.measured is not None:
            # A plain dict attribute survives xdist's report serialization.
            report.refract = item.measured.to_wire()
            if item.config.pluginmanager.hasplugin("html"):
                from .report.pytest_html import item_extras

                report.extras = (getattr(report, "extras", [])
                                 + item_extras(item.measured.result, self.runner.axes[item.axis]))
        return report

    @pytest.hookimpl(trylast=True)  # after pytest's own letter, so a decision line starts a fresh line
    def pytest_runtest_logreport(self, report):
        if report.nodeid.startswith("refract::") and (report.when == "call" or report.outcome != "passed"):
            self._finished.add(report.nodeid)  # the item ran (or its setup ended it)
        custom = getattr(report, "refract_custom", None)
        if custom and report.when == "call":
            self.custom.extend(custom)
        wire = getattr(report, "refract", None)
        if wire is None:
            if report.failed:
                # No result: the item failed to measure, or died outside our code (an xdist
                # worker crash, an error in setup). Its axis must not be scored as if the item
                # never existed.
                planned = self._planned_item(report.nodeid)
                if planned:
                    role, axis, unit = planned
                    self.failed.setdefault(role, {}).setdefault(axis, []).append(unit)
            return
        if report.when != "call":
            return
        measured = ItemResult.from_wire(wire)
        self._file(measured)
        if measured.repeats:
            self.repeats.setdefault(measured.role, {}).setdefault(measured.axis, {})[measured.unit] = measured.repeats
        if measured.control is not None:
            self._file(measured.control)
        if measured.control_error is not None and self.runner.control_role:
            self.failed.setdefault(self.runner.control_role, {}).setdefault(measured.axis, []).append(measured.unit)
        if measured.role in self.runner.candidate_roles:
            control = self.results.get(self.runner.control_role, {}).get(measured.axis) if self.runner.control_role else None
            line = self.stopping.observe(measured.role, measured.axis, self.results[measured.role][measured.axis], control)
            if line:
                self.runner.note(line)

    def _file(self, measured: ItemResult) -> None:
        self.results.setdefault(measured.role, {}).setdefault(measured.axis, {})[measured.unit] = measured.result

    def _planned_item(self, nodeid: str) -> Optional[tuple]:
        if self._item_of is None:
            self._item_of = {f"refract::{item_name(self.runner, unit)}": (unit.candidate, unit.axis, unit.id)
                             for unit, _group in self.runner.items()}
        # xdist's loadgroup mode appends "@<group>" to node ids.
        return self._item_of.get(nodeid.split("@", 1)[0])

    def pytest_generate_tests(self, metafunc):
        if "refract" in metafunc.fixturenames and len(self.runner.candidate_roles) > 1:
            roles = self.runner.candidate_roles
            metafunc.parametrize("refract", roles, indirect=True,
                                 ids=[self.runner.id_prefix[r].rstrip("-") for r in roles])

    def pytest_report_teststatus(self, report, config):
        wire = getattr(report, "refract", None)
        if wire and report.when == "call" and report.passed:
            r = wire["result"]
            shown = f"{r['score']:.2f} {r['band']}" if r.get("score") is not None else "n/a (not scored)"
            return "passed", ".", (f"PASSED {shown}", {"green": True})
        return None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session):
        try:
            return (yield)
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            if not self.is_worker and not session.config.option.collectonly:
                self._finish(session)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        # Interrupted before the test loop began (during collection): still leave a report.
        if (self.report is None and not self.is_worker and not session.config.option.collectonly
                and exitstatus == pytest.ExitCode.INTERRUPTED):
            self.interrupted = True
            self._finish(session)

    def _finish(self, session) -> None:
        from .report.build import build_report

        ran = bool(self.results or self.failed or self.custom)
        if not ran and not self.interrupted and not self.runner.settings.require_complete:
            return  # nothing selected and nothing stopped: there is nothing to report
        selected = sum(1 for item in getattr(session, "items", []) if isinstance(item, RefractItem))
        stopped_early = self._stopped_early(session, selected)
        # From here the audit is finishing: a further SIGTERM/SIGINT must not leave half the
        # reports written (a stale HTML beside a fresh JSON); it is noted and acted on after.
        with signals_deferred() as deferred:
            self._report_and_gate(session, build_report, selected, stopped_early)
        self.deferred_signals = [signal.Signals(n).name for n in deferred]

    def _report_and_gate(self, session, build_report, selected: int, stopped_early: Optional[str]) -> None:
        """Build the report, read its gate and write its files; a failure at any step is one
        line in the summary and a failed run, never an INTERNALERROR."""
        complete = stopped_early is None
        try:
            saved = self._save_pack(complete)
            facts = self.runner.record(self.baseline, wall_s=time.time() - self.started, items_selected=selected,
                                       sequential=self.stopping.report(), saved_pack=saved,
                                       stopped_early=stopped_early, default_axes=settings_mod.DEFAULT_AXES)
            self.report = build_report(facts=facts, results=self.results, failed=self.failed, custom=self.custom,
                                       invocation_args=list(self.config.invocation_params.args),
                                       complete=complete, registry=self.runner.axes, repeats=self.repeats)
        except Exception as exc:  # never an INTERNALERROR that hides every measured item
            self._finish_failed(session, "the report could not be built", exc)
            return
        self.gate = self.report["gate"]
        if not self.gate["passed"]:
            session.testsfailed += 1
        try:
            # Other plugins see the finished report before any file is written (and may add to
            # its "custom" entries).
            self.config.hook.pytest_refract_report(report=self.report, config=self.config)
            self._write_files()
        except Exception as exc:  # the summary is still printed, with this line
            self._finish_failed(session, "the report files could not be written", exc)
            return
        self.write_problems = self.pack_problems + self.write_problems
        if self.write_problems:  # a report (or pack) that was asked for and is not where it was asked
            session.testsfailed += 1
        self._record_gate_in_junit()

    def _record_gate_in_junit(self) -> None:
        """The gate as a test case of its own in --junitxml (``refract::gate``): CI dashboards
        read failures from there, and a failed gate must not show as ``failures="0"``. Only the
        JUnit writer sees it; pytest's own counts stay those of the items."""
        try:
            from _pytest.junitxml import xml_key
            from _pytest.reports import TestReport
        except ImportError:  # pragma: no cover - a pytest without the JUnit writer
            return
        xml = self.config.stash.get(xml_key, None)
        if xml is None:
            return
        reasons = list(self.gate.get("reasons") or []) + list(getattr(self, "write_problems", []) or [])
        passed = bool(self.gate.get("passed")) and not reasons
        text = "refract gate FAILED:\n" + "\n".join(reasons) if not passed else None
        phases: List[Tuple[Literal["setup", "call", "teardown"], Literal["passed", "failed"], Optional[str]]] = [
            ("setup", "passed", None), ("call", "passed" if passed else "failed", text), ("teardown", "passed", None)]
        for when, outcome, longrepr in phases:
            xml.pytest_runtest_logreport(TestReport(
                nodeid="refract::gate", location=("refract", None, "refract gate"), keywords={}, outcome=outcome,
                longrepr=longrepr, when=when, sections=[], duration=0.0,
                user_properties=[("refract_gate", "passed" if passed else "failed")]))

    def _stopped_early(self, session, selected: int) -> Optional[str]:
        """Why the run ended before every selected item ran (None when it did not): an
        interruption, -x / --maxfail, or a plugin that stopped the session. Whatever the
        cause, a verdict of the items that ran is not the audit's."""
        if self.interrupted:
            return "the run was interrupted"
        stop = session.shouldfail or session.shouldstop
        finished = len(self._finished)
        if stop:
            return f"the run stopped early ({stop})" + (f" after {finished} of {selected} items" if selected else "")
        if selected and finished < selected:
            return f"the run ended after {finished} of its {selected} selected items"
        return None

    def _finish_failed(self, session, what: str, exc: Exception) -> None:
        """A failure after measuring: one line in the summary, and the run fails (a report
        that was asked for is missing); never an INTERNALERROR."""
        from .report.jsonio import text_of

        self.written = getattr(self, "written", {})
        self.write_problems = list(getattr(self, "write_problems", [])) + [
            text_of(f"{what} ({type(exc).__name__}: {exc})")]
        session.testsfailed += 1

    def _save_pack(self, complete: bool) -> Optional[dict]:
        """Finish the reference pack this run wrote (--refract-save-reference): only a complete
        run whose items all measured saves one; otherwise nothing is replaced."""
        self.pack_problems: List[str] = []
        writer = self.runner.pack_writer
        if writer is None:
            return None
        target = writer.target
        failed = sorted({axis for role in self.runner.item_roles for axis in self.failed.get(role, {})})
        if not complete or failed:
            writer.discard()
            why = "the run was interrupted" if not complete else f"items of {', '.join(failed)} failed to measure"
            self.pack_problems.append(f"--refract-save-reference={target}: no pack was saved ({why}); "
                                      "an existing pack there is unchanged")
            return None
        import os
        import platform

        from . import __version__

        try:
            writer.finish(self.runner.pack_build(),
                          {"threads": self.runner.settings.threads, "gpu_layers": self.runner.settings.gpu_layers,
                           "machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
                          f"pytest-refract {__version__}")
        except (UsageProblem, OSError) as exc:
            writer.discard()
            self.pack_problems.append(f"--refract-save-reference={target}: no pack was saved ({exc})")
            return None
        from .reference.pack import PackReader

        reader = PackReader(target, None)  # verified once more, as a user of the pack will
        try:
            return reader.summary()
        finally:
            reader.close()

    def _write_files(self) -> None:
        from .files import write_reports
        from .report.jsonio import dumps

        s = self.runner.settings
        report = self.report
        assert report is not None  # built before any file is written

        def html():
            from .report.html import render_html

            return render_html(self.report)

        cache = getattr(self.config, "cache", None)
        try:  # where a report goes when its own path fails late (see files.write_reports)
            fallback = cache.mkdir("refract-reports") if cache is not None else None
        except OSError:
            fallback = None
        self.written, self.write_problems = write_reports(
            [("--refract-json", s.json_path, lambda: dumps(report)), ("--refract-html", s.html_path, html)],
            fallback)

    def pytest_report_header(self, config):
        # What the run does differently from what was asked, said before anything runs.
        return [f"refract: {self.runner.gpu_note}"] if self.runner.gpu_note else []

    def pytest_terminal_summary(self, terminalreporter):
        if self.report is not None:
            from .report.terminal import render

            written = getattr(self, "written", {})
            try:
                render(terminalreporter, self.report, written.get("--refract-json"), self.runner.axes)
            except Exception as exc:  # one line, not an INTERNALERROR after the run
                terminalreporter.write_line(f"refract: the summary could not be printed ({type(exc).__name__}: "
                                            f"{exc})", red=True, bold=True)
        for line in getattr(self, "write_problems", []):
            terminalreporter.write_line(f"refract: {line}", red=True, bold=True)
        deferred = getattr(self, "deferred_signals", [])
        if deferred:
            terminalreporter.write_line(f"refract: {' and '.join(dict.fromkeys(deferred))} arrived while the reports were "
                                        "written; they were finished first", yellow=True)

    def pytest_unconfigure(self, config):
        self.runner.close()



def _budget_bytes(runner) -> Optional[float]:
    """--refract-kv-budget in bytes per token (a fraction is of the reference's cache, f16 by default)."""
    s = runner.settings
    if s.kv_budget is None:
        return None
    if not s.kv_budget_fraction:
        return s.kv_budget
    reference = runner.kv_bytes_per_token("reference")
    return None if reference is None else s.kv_budget * reference
