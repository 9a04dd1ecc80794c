"""A sweep's pairs that need no more measuring: those the family's procedure can no longer
recommend (scoring/family.py, Holm over every candidate).

Holm passes, at its first step, every candidate that PASSes at error / m (m: the candidates),
whatever the others' data. So once a candidate has every axis decided PASS (its data will not
grow) and PASSes at error / m, it is in the final PASS set, and no candidate with a strictly
larger KV cache can be the recommendation (the smallest cache that PASSes). Such candidates stop:
their remaining items are skipped, and the report lists them under the sweep's "skipped" with
this reason. With --refract-kv-budget, a candidate within the budget may be the best config
under it, so only those beyond the budget stop. Skipping can only keep a candidate from passing,
and Holm is monotone in its tests, so the family's error is never raised. It may cost power: a
skipped pair that would have PASSed no longer loosens Holm's later steps for the others
(--refract-sweep-exhaustive measures every pair). Nothing here assumes that a larger cache
loses less."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

from .scoring import family
from .scoring import verdict as V


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

    def decided(self, role: str) -> Optional[str]:
        """Called when one of ``role``'s axes is decided: prune what it rules out; the line to show."""
        states = {axis: st for (r, axis), st in self.stopping.progress.items() if r == role}
        if not states or any(st.open or not st.decided or st.verdict is None or st.verdict.verdict != V.PASS
                             for st in states.values()):
            return None
        size = self.sizes.get(role)
        if size is None:
            return None
        results = self.results()
        control = results.get(self.control_role, {})
        tables, errors = {}, {}
        for axis_name, st in states.items():
            axis = self.axes[axis_name]
            cand = list(results.get(role, {}).get(axis_name, {}).values())
            ctrl = list(control.get(axis_name, {}).values())
            _ids, cand_t, ctrl_t = V.paired_tables(axis, cand, ctrl)
            tables[axis_name] = (cand_t, ctrl_t)
            errors[axis_name] = st.design.errors_at(st.look)[0]
        m = len(self.sizes)
        contender = family.Contender(self.labels[role], size, tables, errors)
        if not family.passes_strictest(contender, self.axes, m):
            return None
        why = (f"not needed: {self.labels[role]} ({size:g} B/token) PASSes at the family's strictest error "
               f"(2.5 % / {m}), so no larger cache can be the recommendation")
        if self.budget_bytes is not None:
            why += f", and this one is beyond the budget of {self.budget_bytes:g} B/token"
        stopped = []
        for other, other_size in self.sizes.items():
            if other in self.pruned or other_size is None or other_size <= size:
                continue
            if self.budget_bytes is not None and other_size <= self.budget_bytes:
                continue
            open_states = [st for (r, _a), st in self.stopping.progress.items() if r == other and st.open]
            if not open_states:
                continue
            for st in open_states:
                st.pruned = why
            self.pruned[other] = why
            stopped.append(self.labels[other])
        if not stopped:
            return None
        return f"the sweep skips {len(stopped)} larger cache{'s' if len(stopped) > 1 else ''} ({', '.join(stopped)})"
