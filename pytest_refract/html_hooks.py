"""pytest-html integration through its own hooks (no fork of its template): the audit summary
in the report's summary section, each item's score and band in a column, details as extras.
Registered only when pytest-html is active."""

from __future__ import annotations

from html import escape

from .scoring import band_for

_BAND_COLOURS = {"EXCELLENT": "#1a7f37", "PASS": "#0f766e", "DEGRADED": "#b45309", "FAIL": "#b91c1c"}


def _badge(score, band) -> str:
    if score is None:
        return '<span class="refract-na">n/a</span>'
    colour = _BAND_COLOURS.get(band, "#555")
    return f'<span style="color:{colour};font-weight:bold">{score:.2f} {escape(str(band))}</span>'


class HtmlHooks:
    def __init__(self, refract_session):
        self.rs = refract_session

    def pytest_html_results_summary(self, prefix, summary, postfix, session):
        report = self.rs.report
        if report is None:
            return
        rows = "".join(
            f"<tr><td>{escape(name)}</td><td>{_badge(a.get('score'), a.get('band'))}</td></tr>"
            for name, a in report["axes"].items()
        )
        diagnosis = "".join(f"<li>{escape(line)}</li>" for line in report.get("diagnosis", []))
        gate = report.get("gate", {})
        gate_text = "passed" if gate.get("passed") else "FAILED: " + "; ".join(gate.get("reasons", []))
        prefix.append(
            '<div class="refract-summary"><h2>refract KV-cache audit</h2>'
            f"<p>model {escape(report['model']['path'])} &middot; reference {escape(report['reference'])} "
            f"&middot; candidate {escape(report['candidate'])}</p>"
            f"<p>composite {_badge(report.get('composite'), report.get('band'))} &middot; gate {escape(gate_text)}</p>"
            f"<table>{rows}</table><ul>{diagnosis}</ul></div>"
        )

    def pytest_html_results_table_header(self, cells):
        cells.insert(2, "<th>refract score</th>")

    def pytest_html_results_table_row(self, report, cells):
        info = getattr(report, "refract", None)
        result = (info or {}).get("result") or {}
        score = result.get("score")
        cells.insert(2, f"<td>{_badge(score, band_for(score)) if info else ''}</td>")


def item_extras(result: dict) -> list:
    """pytest-html extras for one item: a compact HTML block with its key numbers."""
    try:
        from pytest_html import extras
    except ImportError:  # pragma: no cover - only called when pytest-html is active
        return []
    keys = [k for k in ("score", "band", "first_divergence", "prefix_agreement", "teacher_forced_kld", "mean_kld",
                        "same_top_p_pct", "ref_hits", "cand_hits", "ref_drift", "cand_drift", "excess", "perturbed_prompt")
            if k in result]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(result[k]))}</td></tr>" for k in keys)
    texts = ""
    if "ref_text" in result:
        texts = (f"<p><b>reference</b>: {escape(result['ref_text'])}</p>"
                 f"<p><b>candidate</b>: {escape(result['cand_text'])}</p>")
    return [extras.html(f"<table>{rows}</table>{texts}")]
