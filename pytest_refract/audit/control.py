"""The sensitivity control's items. The control (a rounding-only KV config, audit/roles.py) is
measured on the same units as the candidates, inside the first selected candidate item of each
unit, so item ids, counts and -k selection stay as they are; it is never ranked or gated
itself. Its results depend only on what their key holds, so they are cached beside the
reference's (reference/store.py) and read back by later runs and other candidates."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, Optional

from ..axes.base import Unit
from .roles import Role


class SensitivityControl:
    def __init__(self, store, label: str, axes: Dict[str, object], run, planned_units: Callable):
        """``store``: the reference store; ``label``: the control's KV config; ``run``: the
        facade (what an axis's cache_reads read); ``planned_units(axis, unit)``: the units of
        the unit's decode batch."""
        self.store = store
        self.label = label
        self.axes = axes
        self.run = run
        self.planned_units = planned_units
        self._done: set = set()

    def due(self, axis_name: str, unit_id: str) -> bool:
        """True once per unit: the first candidate item of a unit measures the control."""
        if (axis_name, unit_id) in self._done:
            return False
        self._done.add((axis_name, unit_id))
        return True

    def key(self, axis_name: str, unit: Unit) -> str:
        batch = [u.id for u in self.planned_units(axis_name, unit)] if unit.batch is not None else None
        axis = self.axes[axis_name]
        return self.store.control_key(axis.NAME, unit, batch, self.label, axis.cache_reads(self.run))

    def cached(self, axis_name: str, unit: Unit) -> bool:
        return self.store.has_control(axis_name, self.key(axis_name, unit))

    def measure(self, axis, unit: Unit, measure_once: Callable) -> dict:
        """The control's item: read from the reference cache when there, else measured like a
        candidate's by ``measure_once(axis, unit)`` and stored."""
        unit = replace(unit, candidate=Role.CONTROL)
        key = self.key(axis.NAME, unit)
        result: Optional[dict] = self.store.load_control(axis.NAME, key)
        if result is not None:
            result["compute"] = {}
            result["reference_cache"] = {"hits": 1, "misses": 0}
            result["wall_s"] = 0.0  # read, not measured: this run paid nothing for it
            result["control_cached"] = True
            return result
        result = measure_once(axis, unit)
        self.store.store_control(axis.NAME, key, {k: v for k, v in result.items()
                                                  if k not in ("compute", "reference_cache")})
        result["control_cached"] = False
        return result
