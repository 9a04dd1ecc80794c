"""The axis registry: the built-in four, and axes other plugins add through the
``pytest_refract_axes`` hook (see pytest_refract/axis.py for the protocol).

The built-in axes are modules, one per axis; each holds everything about its axis (inputs,
units, measurement, aggregation, diagnosis, terminal detail, compare rows, bootstrap table).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable

from ..axis import Axis
from . import kld, plad, rniah, trajectory

BUILTIN = {m.NAME: m for m in (trajectory, kld, rniah, plad)}
ORDER = tuple(BUILTIN)
AXES = BUILTIN  # the built-in axes by name
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_REQUIRED = ("units", "measure", "aggregate")


class _Defaults(Axis):
    """An axis object that lacks optional members, completed with Axis's defaults."""

    def __init__(self, axis):
        self._axis = axis

    def __getattribute__(self, name):
        axis = object.__getattribute__(self, "_axis")
        if name == "_axis":
            return axis
        if hasattr(axis, name):
            return getattr(axis, name)
        return object.__getattribute__(self, name)


def complete(axis):
    """``axis`` with every optional member of the protocol present."""
    return axis if isinstance(axis, Axis) else _Defaults(axis)


def resolve(extra: Iterable = ()) -> Dict[str, object]:
    """Name -> axis: the built-ins in their order, then ``extra`` (from the hook) in the order
    given. An extra axis must have a new, well-formed name and the required members."""
    out = {name: complete(m) for name, m in BUILTIN.items()}
    for axis in extra:
        name = getattr(axis, "NAME", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"an axis from pytest_refract_axes has no valid NAME (lowercase letters, digits, _): {name!r}")
        if name in out:
            raise ValueError(f"an axis from pytest_refract_axes is named {name!r}, which is taken")
        missing = [m for m in _REQUIRED if not callable(getattr(axis, m, None))]
        if missing:
            raise ValueError(f"axis {name!r} from pytest_refract_axes lacks {', '.join(missing)}")
        out[name] = complete(axis)
    return out
