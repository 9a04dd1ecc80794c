"""The self-contained HTML report for a JSON report (schema ``pytest-refract.report.v1`` or ``v2``):
``render_html(report) -> str``. See render.py for how the page is put together."""

from .render import render_html

__all__ = ["render_html"]
