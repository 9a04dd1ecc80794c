"""The self-contained HTML report for a JSON report (schema ``pytest-refract.report.v3``, or a v2 or v1 report):
``render_html(report) -> str``. See render.py for how the page is put together."""

from .render import render_html

__all__ = ["render_html"]
