"""The audit's axes and their registry.

An axis is an Axis subclass (base.py; the six built-ins here) or any object with the same
attributes (an external axis, e.g. returned by a plugin). Required:

- ``NAME``: the axis name used in test ids (``test_<NAME>[unit]``) and in the report;
- ``units(run)``: the per-item units (``Unit``: id, keywords, payload), decided at collection time;
- ``planned_tokens(run, unit)``: tokens an item will feed llama.cpp (progress only);
- ``measure(run, unit)``: run llama.cpp for one unit, return a JSON-able result dict;
- ``aggregate(results)``: the axis section of the report, including ``score`` and ``band``.

Optional (``resolve`` supplies the defaults in ``DEFAULTS`` for an object that lacks them):

- ``TITLE`` (display name; default NAME), ``ITEMS_KEY`` (section key of the per-item list);
- ``diagnose(section, axes)``: the axis's diagnosis sentences, called for a scored axis only;
  ``axes`` holds every axis section of the candidate, so an axis may read another's;
- ``control_diagnosis(section, control_section)``: what the sensitivity control says about the
  axis beyond the verdict the report words for every axis;
- ``item_detail(item)``: the detail shown beside a worst item in the terminal summary;
- ``item_damage_text(row, control_row)``: one item's damage beside the control's on the same
  item, from their ``damage_table`` rows ("3 flips vs 1 in the control"): what the report's
  per-item rows show instead of a band;
- ``section_detail(section, control)``: the axis's figures on its terminal summary line
  (``control`` is True on the sensitivity control's line);
- ``COMPARE_METRICS``: ``(row label, dotted key in the section, format, higher_is_better)``
  rows for ``python -m pytest_refract compare`` (the score row is added by compare);
- ``item_table(items) -> (ids, ndarray)`` and ``statistic(table) -> ndarray``: the per-item
  numbers the bootstrap resamples and the axis score computed from them (see calibration.py);
- ``BATCHED``: decode-batch widths per xdist group (0: not batched);
- ``UNIT_NOUN``: what the progress line calls a unit where its id does not say ("cell");
- ``NEEDS``: which inputs the axis reads ("prompts", "corpus", "haystack");
- ``cache_reads(run)``: what an item's result depends on besides its unit (the sensitivity
  control's cache key; default: every setting);
- ``section_facts(run)`` / ``settings_facts(run)``: what the report adds to the axis's section
  and to ``settings[<name>]`` beyond the measurements.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

from ..errors import UsageProblem
from . import decode, depth, kld, plad, rniah, trajectory
from .base import Axis
from .base import Unit as Unit  # re-exported: axis authors import it from pytest_refract.axes

REQUIRED = ("NAME", "units", "planned_tokens", "measure", "aggregate")

BUILTIN = {axis.NAME: axis for axis in (trajectory.TrajectoryAxis(), kld.KLDAxis(), rniah.RNIAHAxis(), plad.PLADAxis(),
                                        decode.DecodeAxis(), depth.DepthAxis())}
ORDER = tuple(BUILTIN)
# The order in which the axes' own sentences appear in a diagnosis: the trajectory sentence is
# phrased against the KLD's reading ("although distributions stay close"), so KLD comes first.
# Axes not listed here follow in the order they ran.
DIAGNOSIS_ORDER = ("kld", "decode", "depth", "trajectory", "rniah", "plad")


# The optional members, and their defaults: those of the public base class, so an axis that
# subclasses Axis and one that does not get the same.
OPTIONAL = ("ITEMS_KEY", "EXTRA_KEYS", "STREAM", "PRIVATE_KEYS", "NEEDS", "UNIT_NOUN", "BATCHED", "COMPARE_METRICS",
            "section_items", "cache_reads", "section_facts", "settings_facts", "diagnose", "control_diagnosis",
            "item_detail", "item_damage_text", "section_detail", "item_table", "statistic", "DAMAGE_LABEL", "MARGIN",
            "ABSOLUTE_TOLERANCE", "DAMAGE_RESOLUTION", "CONTROL_MAX_DAMAGE", "ZERO_DAMAGE_EXACT", "DAMAGE_COUNTS",
            "damage_table",
            "damage")
DEFAULTS = {name: getattr(Axis, name) for name in OPTIONAL}


class _WithDefaults:
    """An external axis as given, with the documented default for each optional member it
    lacks. Its own attributes always win; nothing is written onto the object itself."""

    def __init__(self, axis):
        self.__dict__["_axis"] = axis

    def __getattr__(self, name):
        try:
            return getattr(self._axis, name)
        except AttributeError:
            if name == "TITLE":
                return self._axis.NAME
            if name in DEFAULTS:
                default = DEFAULTS[name]
                # A default method runs on this view, so it reads the axis's own attributes
                # (section_items reads its ITEMS_KEY).
                return default.__get__(self) if callable(default) else default
            raise

    def __setattr__(self, name, value):
        setattr(self._axis, name, value)

    def __repr__(self):
        return f"<axis {self._axis.NAME!r}: {self._axis!r}>"


def normalise(axis):
    """The axis itself when it has every optional member (the built-ins), else a view of it
    with the defaults filled in."""
    if isinstance(axis, Axis) or all(hasattr(axis, name) for name in ("TITLE", *DEFAULTS)):
        return axis
    return _WithDefaults(axis)


def generic(name: str):
    """An axis a report names but this process does not know (compare reads reports offline):
    only what every section has, its score, band and items, can be shown."""
    stub = type("UnknownAxis", (), {"NAME": name})()
    return _WithDefaults(stub)


def resolve(extra: Iterable = ()) -> Dict[str, Axis]:
    """Name -> axis: the built-ins in ORDER, then the extra axes in the order given, each with
    every optional member present. An extra axis must have the required members and a name of
    its own (a lowercase word, so test ids and JSON keys stay plain)."""
    out: Dict[str, Axis] = dict(BUILTIN)
    for axis in extra:
        missing = [m for m in REQUIRED if not hasattr(axis, m)]
        if missing:
            raise UsageProblem(f"axis {axis!r} lacks {', '.join(missing)}: an axis needs {', '.join(REQUIRED)}")
        name = axis.NAME
        if not isinstance(name, str) or not re.fullmatch(r"[a-z]+", name):
            raise UsageProblem(f"axis name {name!r} must be a lowercase word (letters a-z)")
        if name in out:
            raise UsageProblem(f"axis {name!r} is registered twice")
        out[name] = normalise(axis)
    return out


def known(names: Iterable[str], registry: Dict[str, Axis]) -> List[Tuple[str, Axis]]:
    """(name, axis) for report sections: the registry's order first, then names the registry
    does not know (shown generically), in the order given."""
    names = list(names)
    ordered = [(n, a) for n, a in registry.items() if n in names]
    return ordered + [(n, generic(n)) for n in names if n not in registry]
