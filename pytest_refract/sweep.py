"""A sweep's pairs that need no more measuring: those the family's procedure can no longer
recommend (scoring/family.py: Holm over rows, one row per K type, each row a fixed sequence
from its largest cache down). Two rules, each a fact about that procedure, neither an
assumption that a larger cache loses less:

- A row stops at its first config that does not PASS. Once a config's data is final (every
  axis decided, or stopped by a FAIL) and it does not PASS even at the family's full error
  (the loosest level the procedure ever uses), the configs after it in its row can never be
  tested: they stop.
- Once a row's configs from its top down to some Y have final data and all PASS at the
  strictest level (error / the number of rows), Y is in the final PASS set whatever the rest
  does (the procedure's levels only grow). The recommendation is then at most Y's size, so a
  config larger than Y whose whole rest of the row is larger than Y too cannot be it: those
  stop. With --refract-kv-budget, configs within the budget may be the best config under it,
  so only those beyond the budget stop.

A stopped config counts as not measured: it never PASSes, which can only make the procedure
stricter, so the family's error holds. It may cost power (a skipped config that would have
PASSed no longer loosens the other rows' levels); --refract-sweep-exhaustive measures every pair.

Both rules act only on data that is final, so how much they save depends on the order the pairs
are measured in: measured side by side, every pair reaches its last look together and nothing is
left to skip. ``measuring_order`` puts the pairs one after another instead, in the order that
lets the rules act soonest (see there).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

from .scoring import family
from .scoring import verdict as V


def measuring_order(sizes: Mapping[str, Optional[float]], labels: Mapping[str, str]) -> Dict[str, int]:
    """Each sweep role's place in the measuring order (0 first): the pairs one at a time, each
    through all its looks before the next begins.

    Rows (one per K type) go in order of their smallest cache, smallest first: the rows whose
    K type is the cheap one come first, and those are the rows whose K side is most often too
    coarse, so their top pair FAILs at its first look and stops the rest of its row (rule one),
    and otherwise the rows that can certify the smallest PASS and so stop every larger row
    before it starts (rule two). Within a row the pairs go from its largest cache down, the
    procedure's own sequence: a pair is worth measuring only once those above it PASS. The
    order changes no pair's data (an item measures the same whenever it runs), only what the
    rules find final, and when."""
    def smallest_first(row: List[str]) -> tuple:
        known = [size for size in (sizes[r] for r in row) if size is not None]
        return min(known, default=float("inf")), family.row_key(labels[row[0]])

    out: Dict[str, int] = {}
    for row in sorted(procedure_rows(sizes, labels), key=smallest_first):
        for role in row:
            out[role] = len(out)
    return out


def procedure_rows(sizes: Mapping[str, Optional[float]], labels: Mapping[str, str]) -> List[List[str]]:
    """The sweep's roles in the family procedure's rows (scoring/family.rows: one per K type,
    each largest cache first)."""
    role_of = {labels[r]: r for r in sizes}
    skeleton = [family.Contender(labels[r], sizes[r], {}) for r in sizes]
    return [[role_of[c.label] for c in row] for row in family.rows(skeleton)]


class SweepPruning:
    def __init__(self, stopping, axes: Mapping, sizes: Mapping[str, Optional[float]], labels: Mapping[str, str],
                 control_role: str, budget_bytes: Optional[float], results: Callable[[], Dict[str, Dict[str, dict]]]):
        self.stopping = stopping
        self.axes = axes
        self.sizes = dict(sizes)
        self.labels = dict(labels)
        self.control_role = control_role
        self.budget_bytes = budget_bytes
        self.results = results
        self.pruned: Dict[str, str] = {}  # role -> why
        # Each row's roles, largest cache first (the procedure's own order).
        self.rows: List[List[str]] = procedure_rows(sizes, labels)

    def _final(self, role: str) -> Optional[family.Contender]:
        """The role's contender when its data will not grow (every axis decided, stopped, or
        with all its items measured), else None."""
        states = {axis: st for (r, axis), st in self.stopping.progress.items() if r == role}
        if not states or role in self.pruned or any(st.open and st.measured < st.design.n_max
                                                    for st in states.values()):
            return None
        results = self.results()
        control = results.get(self.control_role, {})
        tables, errors = {}, {}
        for axis_name, st in states.items():
            axis = self.axes[axis_name]
            _ids, cand_t, ctrl_t = V.paired_tables(axis, list(results.get(role, {}).get(axis_name, {}).values()),
                                                   list(control.get(axis_name, {}).values()))
            tables[axis_name] = (cand_t, ctrl_t)
            if st.look is not None:
                errors[axis_name] = st.design.errors_at(st.look)[0]
        return family.Contender(self.labels[role], self.sizes.get(role), tables, errors)

    def decided(self, role: str) -> Optional[str]:
        """Called when one of ``role``'s axes is decided or has measured all its items: stop what the procedure can no longer
        recommend; the line to show (None: nothing stopped)."""
        stopped: List[str] = []
        row = next(r for r in self.rows if role in r)
        mine = self._final(role)
        if mine is not None and not family.passes_at(mine, self.axes, 1.0):
            why = (f"not needed: {self.labels[role]}, before it in its row, does not PASS even at the family's full "
                   "error, so the procedure never tests this one")
            stopped += self._stop(row[row.index(role) + 1:], why)
        certain = self._certain_pass_size()
        if certain is not None:
            size, label = certain
            why = (f"not needed: {label} ({size:g} B/token) PASSes for certain (its row down to it PASSes at the "
                   f"strictest level, 2.5 % / {len(self.rows)}), so no larger cache can be the recommendation"
                   + (f"; beyond the budget of {self.budget_bytes:g} B/token" if self.budget_bytes is not None else ""))
            for r in self.rows:
                for k in range(len(r)):
                    rest = [self.sizes.get(o) for o in r[k:]]
                    if all(s is not None and s > size for s in rest) and (
                            self.budget_bytes is None or all(s is not None and s > self.budget_bytes for s in rest)):
                        stopped += self._stop(r[k:], why)
                        break
        if not stopped:
            return None
        return f"the sweep skips {len(stopped)} pair{'s' if len(stopped) > 1 else ''} ({', '.join(stopped)})"

    def _certain_pass_size(self) -> Optional[tuple]:
        """(size, label) of the smallest config known to be in the final PASS set, or None."""
        best: Optional[tuple] = None
        strictest = float(len(self.rows))
        for r in self.rows:
            for other in r:
                c = self._final(other)
                if c is None or not family.passes_at(c, self.axes, strictest):
                    break
                size = self.sizes.get(other)
                if size is not None and (best is None or size < best[0]):
                    best = (size, self.labels[other])
        return best

    def _stop(self, roles: List[str], why: str) -> List[str]:
        out = []
        for other in roles:
            if other in self.pruned:
                continue
            open_states = [st for (r, _a), st in self.stopping.progress.items() if r == other and st.open]
            if not open_states:
                continue
            for st in open_states:
                st.pruned = why
            self.pruned[other] = why
            out.append(self.labels[other])
        return out
