"""The report dict to one HTML page, through the Jinja2 templates in ``templates/``.

The page has to open anywhere a CI artifact ends up, offline included: CSS (``report.css``,
inlined) and charts (SVG) are in the page, nothing is fetched, and there is no JavaScript
(``<details>`` shows things on demand).

Safety: autoescaping is on for every template, so text from the report (prompts,
continuations, answers, file names, the command line) is escaped wherever it is inserted.
Markup reaches a template only as the output of another template or of ``svg``.

Axes: a section comes from ``templates/axes/<name>.html.j2`` (macros ``headline``, ``body``
and optionally ``failed_body`` and ``control_detail``; variables ``TITLE``, ``WHAT``,
``EMBED_OMIT``, ``MEASURED_KEYS``), with ``views/<name>.py`` when it needs data prepared in
Python (charts, grids). An axis without a template, such as one a plugin adds, gets
``axes/_generic.html.j2``: score, band and a table of its items.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Dict, List

import jinja2
from jinja2.ext import Extension
from markupsafe import Markup

from ... import axes as _axes
from . import fmt, rawjson, views
from .escaping import escape

GENERIC = "axes/_generic.html.j2"
# Where an axis template says nothing, an errored axis counts as measured when it has these.
MEASURED_KEYS = ("items", "cells")


class _LayoutOnly(Extension):
    """Line breaks and indentation in the templates are layout for their reader, not output:
    the page stays as compact as it always was, and no stray space appears between inline
    elements. A line break with the next line's indentation is dropped; it becomes one space
    only between two runs of plain text (neither side a tag, ``{{ }}``, ``{% %}`` or
    ``{# #}``), so prose may wrap. Inside a ``{{ }}``, ``{% %}`` or ``{# #}`` spanning lines
    the source is left as it is. The break is kept inside an empty comment so line numbers
    in template errors stay right."""

    OPENERS, CLOSERS = ("{{", "{%", "{#"), ("}}", "%}", "#}")

    def preprocess(self, source: str, name: Any, filename: Any = None) -> str:
        lines = source.split("\n")
        out = [lines[0]]
        last = lines[0].rstrip(" ")  # the last non-blank line, to decide the glue
        depth = self._depth(lines[0])
        for line in lines[1:]:
            if depth > 0:  # inside a construct: whitespace is insignificant there
                out.append("\n" + line)
            else:
                out[-1] = out[-1].rstrip(" ")
                text = line.lstrip(" ")
                plain = last and text and not last.endswith((">", *self.CLOSERS)) \
                    and not text.startswith(("<", *self.OPENERS))
                out.append((" " if plain else "") + "{#\n#}" + text)
                last = text.rstrip(" ") or last
            depth += self._depth(line)
        return "".join(out)

    @classmethod
    def _depth(cls, line: str) -> int:
        return sum(line.count(o) for o in cls.OPENERS) - sum(line.count(c) for c in cls.CLOSERS)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pytest_refract.report.html", "templates"),
        autoescape=True,
        # escape() of the stdlib flavour on every {{ }}; see escaping.py. None prints as "".
        finalize=escape,
        extensions=[_LayoutOnly],
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
    )
    env.filters.update(fmt.FILTERS)
    # What really ran per config (report/ran.py): one line, and its warnings.
    from ..ran import ran_text, warning_lines

    env.filters.update(ran_text=lambda r: ran_text(r if isinstance(r, dict) else None),
                       ran_warnings=lambda r: warning_lines(r if isinstance(r, dict) else None))
    env.globals.update(BAND_NAMES=fmt.BAND_NAMES, RULER=fmt.ruler_segments(), MISSING=fmt.MISSING,
                       is_num=fmt.is_num, part=_part, axis_body=_axis_body,
                       embedded_json=embedded_json, guard=_guard, ranking_axes=ranking_axes,
                       verdict_led=verdict_led, sweep_pareto=_sweep_view("pareto_chart"),
                       sweep_heat_map=_sweep_view("heat_map"), sweep_reasons=_sweep_reasons)
    return env


# The stylesheet is written to be read; the page gets it with runs of whitespace collapsed.
# It is the package's own file, never report data, so it goes in as markup (a <style> body is
# raw text: escaping would break its quotes).
STYLESHEET = re.sub(r"\s+", " ", resources.files(__package__).joinpath("report.css").read_text(encoding="utf-8")).strip()
assert "</" not in STYLESHEET, "report.css must not contain '</' (it is inlined in a <style> element)"

# Python helpers of the per-axis templates, by axis name (views/<name>.py).
_VIEWS = {m.name: importlib.import_module(f"{views.__name__}.{m.name}")
          for m in pkgutil.iter_modules(views.__path__) if not m.name.startswith("_")}


@dataclass
class AxisView:
    """One axis section as the templates see it."""

    name: str
    section: dict
    tpl: Any  # the template module: its macros and variables
    title: str
    what: str
    view: Callable[[dict, dict], dict]  # section, report -> extra data for the template

    @property
    def score(self) -> Any:
        return self.section.get("score")

    @property
    def status(self) -> Any:
        return self.section.get("status")


def _axis_template(name: str) -> Any:
    """The axis's own template module, or None. Only a plain name selects a file."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        try:
            return ENV.get_template(f"axes/{name}.html.j2").module
        except jinja2.TemplateNotFound:
            pass
    return None


def present_axes(report: dict) -> List[AxisView]:
    """Axis sections in the built-in order (``axes.ORDER``), then any other in report order."""
    sections = fmt.as_dict(report.get("axes"))
    names = [n for n in _axes.ORDER if n in sections] + [n for n in sections if n not in _axes.ORDER]
    out = []
    for n in map(str, names):
        # A section that is not an object is as good as a failed axis.
        section = sections[n] if isinstance(sections[n], dict) else {"error": "malformed axis section"}
        tpl = _axis_template(n)
        view = getattr(_VIEWS.get(n), "view", None) if tpl is not None else None
        tpl = tpl or ENV.get_template(GENERIC).module
        out.append(AxisView(n, section, tpl, getattr(tpl, "TITLE", None) or n, getattr(tpl, "WHAT", ""),
                            view or _no_view))
    return out


def ranking_axes(ranking: List[dict]) -> List[str]:
    """The axes scored in a candidate ranking: built-ins in order, then others as first seen."""
    seen: Dict[str, None] = {}
    for row in ranking:
        seen.update(dict.fromkeys(map(str, fmt.as_dict(row.get("axes")))))
    return [n for n in _axes.ORDER if n in seen] + [n for n in seen if n not in _axes.ORDER]


def verdict_led(report: Any) -> bool:
    """Whether the gate read a verdict: then the verdict leads the page and the raw scores are
    neutral reference figures (no band colours, no band badges). A report from before the gate
    had a basis, with a verdict, counts as verdict-led."""
    report = fmt.as_dict(report)
    gate = fmt.as_dict(report.get("gate"))
    return bool(fmt.as_dict(report.get("verdict"))) and gate.get("basis", "verdict") == "verdict"


def _no_view(section: dict, report: dict) -> dict:
    return {}


def embedded_json(report: dict, axes: List[AxisView]) -> str:
    """The raw JSON block's text (escaped by the template like any other text)."""
    omit = {ax.name: getattr(ax.tpl, "EMBED_OMIT", ()) for ax in axes}
    return rawjson.pretty_json(rawjson.embedded_copy(report, omit))


def _guarded(render: Callable[[], str]) -> Markup:
    """Render one part; if unexpected data breaks it, say so in place and keep the rest of the
    page: a report viewer that dies on one odd field shows nothing at all."""
    try:
        return Markup(render())
    except Exception as exc:  # noqa: BLE001 - deliberately broad, see docstring
        return Markup(ENV.get_template("parts/broken.html.j2").render(exc=exc))


def _sweep_view(name: str) -> Callable[..., Markup]:
    """A sweep picture (views/sweep.py), behind _guarded."""
    def draw(*args: Any) -> Markup:
        return _guarded(lambda: getattr(_VIEWS["sweep"], name)(*args) or Markup(""))
    return draw


def _sweep_reasons(entries: Any) -> list:
    """A sweep's skipped or refused pairs grouped by their reason (report/sweep.py), for the
    page's lists: a hundred pairs share a handful of reasons."""
    from ..sweep import reasons

    return reasons([e for e in entries if isinstance(e, dict)]) if isinstance(entries, list) else []


def _guard(macro: Callable[..., str], *args: Any) -> Markup:
    """A template macro's output behind _guarded."""
    return _guarded(lambda: macro(*args))


def _part(name: str, **context: Any) -> Markup:
    """A template for one part of the page, rendered on its own behind _guarded."""
    return _guarded(lambda: ENV.get_template(name).render(**context))


def _axis_body(ax: AxisView, report: dict) -> Markup:
    """An axis section's body: its data prepared by its view helper, then its template."""
    section = ax.section
    measured = getattr(ax.tpl, "MEASURED_KEYS", MEASURED_KEYS)
    if section.get("error") and not any(section.get(k) for k in measured):
        # A failed axis with nothing measured is just its error: empty charts would only add
        # noise. One with some items measured still shows those.
        failed = getattr(ax.tpl, "failed_body", None)
        return _guarded(lambda: failed(section)) if failed else Markup("")
    return _guarded(lambda: ax.tpl.body(section, report, ax.view(section, report)))


def render_template(name: str, **context: Any) -> str:
    """Any template of the package (the pytest-html fragments use this), autoescaped."""
    return ENV.get_template(name).render(**context)


def render_html(report: dict) -> str:
    """The report as one self-contained HTML5 document (no external resources, no script)."""
    report = report if isinstance(report, dict) else {}
    axes = present_axes(report)
    return ENV.get_template("page.html.j2").render(report=report, axes=axes, css=Markup(STYLESHEET))


ENV = _env()
