"""pytest-html integration through its own hooks (no fork of its template): the audit summary
in the report's summary section, each item's score and band in a column, details as extras.
Registered only when pytest-html is active. The markup comes from the report templates in
html/templates/pytest_html/ (autoescaped like the rest of the page)."""

from __future__ import annotations

from ..scoring.metrics import band_for
from .html.render import render_template

_BAND_COLOURS = {"EXCELLENT": "#1a7f37", "PASS": "#0f766e", "DEGRADED": "#b45309", "FAIL": "#b91c1c"}


class HtmlHooks:
    def __init__(self, refract_session):
        self.rs = refract_session

    def pytest_html_results_summary(self, prefix, summary, postfix, session):
        report = self.rs.report
        if report is None:
            return
        prefix.append(render_template("pytest_html/summary.html.j2", report=report, colours=_BAND_COLOURS))

    def _verdict_gate(self) -> bool:
        """The gate reads the verdict: an item's raw score is then a neutral reference figure."""
        return getattr(self.rs.runner.settings, "gate_basis", "verdict") == "verdict"

    def pytest_html_results_table_header(self, cells):
        cells.insert(2, "<th>refract score (raw, REFRACT-comparable, not the verdict)</th>" if self._verdict_gate()
                     else "<th>refract score</th>")

    def pytest_html_results_table_row(self, report, cells):
        info = getattr(report, "refract", None)
        result = (info or {}).get("result") or {}
        score = result.get("score")
        neutral = self._verdict_gate()
        cells.insert(2, render_template("pytest_html/score_cell.html.j2", shown=bool(info), score=score,
                                        band=None if neutral else band_for(score), colours=_BAND_COLOURS))


def item_extras(result: dict, axis) -> list:
    """pytest-html extras for one item: a compact HTML block with the key numbers its axis
    names (EXTRA_KEYS)."""
    try:
        from pytest_html import extras
    except ImportError:  # pragma: no cover - only called when pytest-html is active
        return []
    keys = [k for k in axis.EXTRA_KEYS if k in result]
    return [extras.html(render_template("pytest_html/item_extras.html.j2", keys=keys, result=result))]
