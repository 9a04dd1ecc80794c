"""Decode batches: which planned units decode together (under which roles), the results of the
batch in flight until its items have all run, and the share of the batch's time each item
carries. One per runner; the axes reach it through the facade's ``batch``."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

from ..axes.base import Unit
from .roles import Role


class DecodeBatches:
    def __init__(self, item_roles: List[str], control_role: Optional[str], control_cached: Callable[[str, Unit], bool]):
        """``item_roles``: the roles measured as items (candidates, then the control);
        ``control_cached(axis, unit)``: whether the control's result for a unit is in the cache
        (then the control needs no place in the batch)."""
        self.item_roles = item_roles
        self.control_role = control_role
        self.control_cached = control_cached
        self._plan: Dict[tuple, Dict[str, tuple]] = {}
        # The batch in flight: what it measured per (axis, role, unit id), each item's share of
        # its wall time, and the time the current item itself spent decoding batches.
        self._values: Dict[tuple, object] = {}
        # axis -> the candidates whose verdict there is decided (sequential stopping, set by the
        # session): their items are skipped, so their batches decode without them.
        self.closed: Callable[[str], set] = lambda axis: set()
        # candidate role -> its place in a sweep's measuring order (set by the runner): a batch
        # then decodes only the candidate measured now, not the ones whose turn comes later.
        self.rank: Dict[str, int] = {}
        self._seconds: Dict[tuple, float] = {}
        self.time_in_item = 0.0

    def set_plan(self, planned) -> None:
        """The unit of every item this process may run, after -k/-m deselection. A batch is
        the planned units of an axis that share a batch number (given at collection); under
        xdist's loadgroup a batch is one group, so it runs on one worker."""
        self._plan = {}
        for unit in planned:
            if unit.batch is None:
                continue
            units = self._plan.setdefault((unit.axis, unit.batch), {})
            entry = units.setdefault(unit.id, (unit, set()))
            entry[1].add(unit.candidate)

    def batch_of(self, axis: str, unit: Unit):
        """(units, roles) decoded together with ``unit``, in plan order: the unit alone when
        it is in no planned batch."""
        planned = self._plan.get((axis, unit.batch))
        if not planned or unit.id not in planned:
            return [unit], [unit.candidate]
        roles = set().union(*(r for _, r in planned.values())) - self.closed(axis)
        if self.rank:
            mine = self.rank.get(unit.candidate or "")
            roles = {r for r in roles if self.rank.get(r) == mine}
        roles.add(unit.candidate)  # the item asking always measures
        units = self.planned_units(axis, unit)
        # The control decodes in the candidates' batches, unless the cache holds its results.
        if self.control_role and not all(self.control_cached(axis, u) for u in units):
            roles.add(Role.CONTROL)
        return units, [r for r in self.item_roles if r in roles]

    def planned_units(self, axis: str, unit: Unit) -> List[Unit]:
        planned = self._plan.get((axis, unit.batch))
        if not planned or unit.id not in planned:
            return [unit]
        return [u for u, _ in planned.values()]

    def batch_done(self, axis: str, unit: Unit) -> bool:
        """Whether the unit's decode batch already ran (its items then cost nothing more)."""
        return (axis, unit.candidate, unit.id) in self._values

    def batch(self, axis: str, unit: Unit, decode: Callable[[List[Unit], List[str]], Tuple[dict, dict]]):
        """This item's part of its decode batch. The first item of a batch runs
        ``decode(units, roles)``, which measures every unit of the batch under every role that
        needs it and returns ``({(role, unit id): value}, {role: seconds})``; the values are kept
        until the batch's other items (other candidates, the control) ask for theirs, and the
        seconds are shared out over the items (see _share_time)."""
        key = (axis, unit.candidate, unit.id)
        if key not in self._values:
            units, roles = self.batch_of(axis, unit)
            # One batch in flight: the previous batch's items have all run (plan order).
            self._values.clear()
            self._seconds.clear()
            started = time.perf_counter()
            values, seconds = decode(units, roles)
            self.time_in_item += time.perf_counter() - started
            for (role, unit_id), value in values.items():
                self._values[(axis, role, unit_id)] = value
            measured = {unit_id for (_role, unit_id) in values}
            self._share_time(axis, [u for u in units if u.id in measured], seconds)
        return self._values[key]

    def _share_time(self, axis: str, units: List[Unit], role_seconds: Dict[str, float]) -> None:
        """Spread a batch's measured time over its items: each candidate's items carry that
        candidate's decode time plus an equal part of the shared work (reference, floor), so
        per-item and per-candidate wall times stay true although one item ran the batch."""
        cands = [r for r in role_seconds if r in self.item_roles]
        if not cands or not units:
            return
        shared = sum(sec for r, sec in role_seconds.items() if r not in cands) / len(cands)
        for role in cands:
            for u in units:
                self._seconds[(axis, role, u.id)] = (role_seconds[role] + shared) / len(units)

    def seconds_of(self, axis: str, unit: Unit) -> float:
        """The unit's share of its batch's time (0 outside a batch)."""
        return self._seconds.get((axis, unit.candidate, unit.id), 0.0)

    def forget(self) -> None:
        self._values.clear()
        self._seconds.clear()
