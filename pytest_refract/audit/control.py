"""The sensitivity control's items. The control (a rounding-only KV config, audit/roles.py) is
measured on the same units as the candidates, inside the first selected candidate item of each
unit, so item ids, counts and -k selection stay as they are; it is never ranked or gated
itself. Its results depend only on what their key holds, so they are cached beside the
reference's (reference/store.py) and read back by later runs and other candidates."""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Callable, Dict, List, Optional

import numpy as np

from ..axes.base import Unit
from ..reference import store as store_mod
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
        # The spot check of the cache: anyone who can write to the cache folder can rewrite an
        # entry and its checksum, so every run re-measures one cached item per axis, drawn with
        # a fresh seed (so a forger cannot know which), and compares it bit for bit.
        self.spot_seed = secrets.randbits(32)
        self._spot_at: Dict[str, int] = {}
        self._cached_reads: Dict[str, int] = {}
        self.spot_checks: List[dict] = []

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
        if result is not None and self._spot_due(axis.NAME):
            live = measure_once(axis, unit)
            same = _same_result(axis, result, live)
            self.spot_checks.append({"axis": axis.NAME, "unit": unit.id, "match": same})
            if not same:
                removed = self.store.invalidate(
                    f"the cached control result of {axis.NAME} {unit.id} differs from its re-measurement: the cache "
                    f"was altered; its {{removed}} entries were deleted, and results read before may be forged")
                self.store.tampered = self.store.tampered.format(removed=removed)
                self.store.store_control(axis.NAME, key, {k: v for k, v in live.items()
                                                          if k not in ("compute", "reference_cache")})
                live["control_cached"] = False
                live["cache_tampered"] = self.store.tampered  # rides to the report, also from xdist workers
                return live
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

    def _spot_due(self, axis_name: str) -> bool:
        """Whether this cached read of the axis is the one its spot check re-measures (never a
        reference pack's control: the pack was verified whole, and made by another build)."""
        return not self.store.from_pack and store_mod.spot_due(self.spot_seed, axis_name, self._spot_at, self._cached_reads)

    def spot_check_facts(self) -> dict:
        """For the report: the seed, what was re-measured, and whether the cache was distrusted."""
        return {"seed": self.spot_seed, "window": store_mod.SPOT_WINDOW, "checked": list(self.spot_checks),
                "reference_seed": self.store.spot_seed, "reference_checked": list(self.store.spot_checks),
                "tampered": self.store.tampered}


def _same_result(axis, cached: dict, live: dict) -> bool:
    """Whether a cached item result is the one measuring it again gives: the numbers the
    verdict reads (its damage table) and the score, bit for bit (one build gives the same bits
    on every run, so any difference is an altered entry, not noise)."""
    try:
        _ids, a = axis.damage_table([cached])
        _ids, b = axis.damage_table([live])
    except (KeyError, TypeError, ValueError):
        return False
    return bool(np.array_equal(np.asarray(a), np.asarray(b))) and cached.get("score") == live.get("score")
