"""Sequential stopping in a pytest session: per candidate and axis, the planned looks
(scoring/sequential.py), the verdict at each look, and the items an axis no longer needs.

The session tells this module every item result it files (``observe``) and asks it, before an
item runs, whether the item's axis is already decided for its candidate (``skip_reason``). A
decided axis of one candidate closes its decode batches to that candidate (audit/batches.py), so
the reference and the control go on only for the units some undecided candidate still needs.

A candidate's verdict is FAIL as soon as one axis FAILs (scoring/verdict.run_verdict), whatever
the others say, so that decides the candidate: its axes still open stop too ("stopped by" that
axis). Such an axis claims no verdict of its own: the report gives it UNDECIDED with the reason,
since it stopped where its design had planned no look.

With stopping on, the axes run in stages (``look_order``): each up to its next look in turn, so
a FAIL on any axis stops the others early.

Stopping is off (one look at the end) with --refract-exhaustive, without a control (no verdict
to decide), with a gate that reads the raw composite, and under xdist, where no
process sees every result (settings.py says why in the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .scoring import sequential as seq
from .scoring import verdict as V

if TYPE_CHECKING:  # a type hint only
    from .axes.base import Axis


@dataclass
class AxisProgress:
    """Where one candidate's axis stands."""

    design: seq.Design
    measured: int = 0                     # paired items (candidate and control) so far
    verdict: Optional[V.AxisVerdict] = None   # at the last look reached
    looked_at: Optional[int] = None       # the item count of that look
    look: Optional[int] = None            # that look's index in the design
    decided: bool = False
    stopped_by: Optional[str] = None      # the axis whose FAIL decided the candidate first
    skipped: List[str] = field(default_factory=list)
    # A sweep's candidate the family can no longer recommend (sweep.py): why it stopped.
    pruned: Optional[str] = None

    @property
    def open(self) -> bool:
        return not self.decided and self.stopped_by is None and self.pruned is None

    def as_json(self) -> dict:
        out = self.design.as_json()
        out.update({"measured": self.measured, "decided": self.decided,
                    "decided_after": self.looked_at if self.decided else None,
                    # The level of the look the verdict was read at (the first's before any).
                    "look_level": self.design.level_at(self.look),
                    "look_read": None if self.look is None else self.look + 1,   # 1-based
                    "verdict_at_last_look": self.verdict.verdict if self.verdict else None,
                    "stopped_by": self.stopped_by,
                    **({"pruned": self.pruned} if self.pruned else {}),
                    "skipped": list(self.skipped)})
        return out


class SequentialStopping:
    def __init__(self, settings, axes: Dict[str, Axis], control_role: Optional[str],
                 self_reference: Dict[str, bool], labels: Dict[str, str], matrix: bool = False):
        self.settings = settings
        self.axes = axes
        self.control_role = control_role
        self.self_reference = self_reference
        self.labels = labels
        self.matrix = matrix
        self.progress: Dict[Tuple[str, str], AxisProgress] = {}
        # Called with a candidate role each time one of its axes is decided or has measured all
        # its items (a sweep's pruning).
        self.on_decided = None

    @property
    def active(self) -> bool:
        return bool(self.settings.sequential and self.control_role)

    def plan(self, planned) -> None:
        """Fix every (candidate, axis) design from the items selected to run (their axes.Unit),
        before any runs."""
        counts: Dict[Tuple[str, str], int] = {}
        for unit in planned:
            key = (unit.candidate, unit.axis)
            counts[key] = counts.get(key, 0) + 1
        s = self.settings
        self.progress = {}
        # A candidate FAILs when any of its axes FAILs: the FAIL side's error is split over them.
        n_axes = {role: sum(1 for (r, _a) in counts if r == role) for role, _ in counts}
        for (role, axis_name), n in counts.items():
            axis = self.axes[axis_name]
            batched = s.decode_batch > 1 and bool(getattr(axis, "BATCHED", 0))
            first = s.decode_batch * axis.BATCHED if batched else 1
            self.progress[(role, axis_name)] = AxisProgress(seq.Design.plan(n, first, stopping=self.active,
                                                                            n_axes=n_axes[role]))

    def look_order(self, planned, rank: Optional[Dict[str, int]] = None) -> List[int]:
        """The order to run ``planned`` (its indices; collection order in, axes.Unit items):
        every axis up to its first look, then every axis up to its second, and so on, collection
        order within a stage. A candidate FAILs as soon as one axis FAILs, so an axis collected
        later (KLD after trajectory) that FAILs at its first look stops the others at theirs,
        not after they ran their whole pool. A decode batch is never split across stages (it
        takes the stage of its first item), so batches stay whole. Reads the designs ``plan``
        fixed for the same items (the order does not change them).

        ``rank`` (candidate role -> place, a sweep's measuring order): the candidates one after
        another in that order, each through all its stages before the next; the control's items
        ride with the candidates' as always. Without it, and with stopping off, unchanged."""
        if not self.active and rank is None:
            return list(range(len(planned)))
        count: Dict[Tuple[str, str], int] = {}
        batch_stage: Dict[tuple, int] = {}
        keys = []
        for i, unit in enumerate(planned):
            key = (unit.candidate, unit.axis)
            count[key] = n = count.get(key, 0) + 1
            stage = 0
            if self.active:
                looks = self.progress[key].design.looks
                stage = next((k for k, at in enumerate(looks) if n <= at), len(looks))
                if unit.batch is not None:
                    stage = batch_stage.setdefault((*key, unit.batch), stage)
            keys.append(((rank or {}).get(unit.candidate, 0), stage, i))
        return [k[-1] for k in sorted(keys)]

    # -- before an item --------------------------------------------------------------------

    def skip_reason(self, role: str, axis_name: str, unit_id: str) -> Optional[str]:
        state = self.progress.get((role, axis_name))
        if state is None or state.open:
            return None
        state.skipped.append(unit_id)
        if state.pruned is not None:
            return state.pruned
        if state.stopped_by is not None:
            return self._stopped_reason(role, state.stopped_by)
        noun = _noun(self.axes[axis_name])
        assert state.verdict is not None and state.looked_at is not None  # decided: a look was read
        return seq.skip_reason(state.looked_at, state.design.n_max, noun, _decision_text(state.verdict))

    def _stopped_reason(self, role: str, by: str) -> str:
        decider = self.progress[(role, by)]
        noun = _noun(self.axes[by])
        assert decider.verdict is not None and decider.looked_at is not None  # it decided FAIL at a look
        return (f"not needed: the verdict is FAIL on {by} "
                f"({seq.skip_reason(decider.looked_at, decider.design.n_max, noun, _decision_text(decider.verdict))})")

    def closed(self, axis_name: str) -> set:
        """The candidates that need no more of the axis (their batches leave them out)."""
        return {role for (role, name), st in self.progress.items() if name == axis_name and not st.open}

    # -- after an item ---------------------------------------------------------------------

    def observe(self, role: str, axis_name: str, candidate_results: Dict[str, dict],
                control_results: Optional[Dict[str, dict]]) -> Optional[str]:
        """Note a candidate's filed result; at a planned look, decide. Returns the progress
        line to show (None when there is nothing new to say)."""
        state = self.progress.get((role, axis_name))
        if state is None or not state.open or not self.control_role or control_results is None:
            return None
        axis = self.axes[axis_name]
        shared = [unit for unit in candidate_results if unit in control_results]
        state.measured = len(shared)
        design = state.design
        look = design.look_at(state.measured)
        if look is None or design.looks[look] <= (state.looked_at or 0):
            return None  # not at a new look
        pass_error, fail_error, pass_from = design.errors_at(look)
        verdict = V.axis_verdict(axis, [candidate_results[u] for u in shared], [control_results[u] for u in shared],
                                 errors=(pass_error, fail_error), min_pass_items=pass_from,
                                 same_computation=self.self_reference.get(role, False))
        state.verdict, state.looked_at, state.look = verdict, design.looks[look], look
        decided = verdict.verdict != V.UNDECIDED and verdict.basis != "broken control"
        state.decided = decided and design.stopping
        stopped = self._stop_the_candidate(role, axis_name) if state.decided and verdict.verdict == V.FAIL else []
        line = self._line(role, axis_name, state)
        if stopped:
            line += f"; the verdict is FAIL, so {', '.join(stopped)} stop{'s' if len(stopped) == 1 else ''} too"
        # The sweep's pruning reads a candidate's data once it is final: decided, or every item
        # of the axis measured (an UNDECIDED at the last look is as final as a decision).
        if (state.decided or state.measured >= design.n_max) and self.on_decided is not None:
            more = self.on_decided(role)
            if more:
                line += f"; {more}"
        return line

    def _stop_the_candidate(self, role: str, by: str) -> List[str]:
        """A FAIL on one axis decides the candidate: its other axes with items left stop."""
        stopped = []
        for (r, name), other in self.progress.items():
            if r == role and name != by and other.open and other.measured < other.design.n_max:
                other.stopped_by = by
                stopped.append(name)
        return stopped

    def _line(self, role: str, axis_name: str, state: AxisProgress) -> str:
        noun = _noun(self.axes[axis_name])
        who = f" [{self.labels.get(role, role)}]" if self.matrix else ""
        text = f"refract: {axis_name}{who}: {state.measured} {noun}, {_state_text(state.verdict)}"
        left = state.design.n_max - state.measured
        if state.decided:
            return f"{text} decided" + (f": the remaining {left} are skipped" if left > 0 else "")
        nxt = state.design.next_look(state.measured)
        assert state.verdict is not None  # a line is shown once a look was read
        if state.verdict.verdict == V.UNDECIDED and nxt is not None:
            return f"{text}, next look at {nxt}"
        return text

    def report(self) -> Dict[str, Dict[str, dict]]:
        """role -> axis -> the design and where it stopped (for the report)."""
        out: Dict[str, Dict[str, dict]] = {}
        for (role, axis_name), state in self.progress.items():
            out.setdefault(role, {})[axis_name] = state.as_json()
        return out


def _noun(axis) -> str:
    return getattr(axis, "ITEMS_NOUN", None) or "items"


def _decision_text(verdict: V.AxisVerdict) -> str:
    """``PASS (M 2.5x [2.3, 2.7])``: the decision, then what it rests on."""
    return f"{verdict.verdict} ({_basis_text(verdict)})"


def _state_text(verdict: Optional[V.AxisVerdict]) -> str:
    """``M 2.5x [2.3, 2.7], PASS`` or the absolute damage where the multiple is undefined."""
    if verdict is None:
        return "no look yet"
    if verdict.basis == "multiple" or (verdict.basis == "absolute" and verdict.damage is not None):
        return f"{_basis_text(verdict)}, {verdict.verdict}"
    return f"{verdict.verdict} ({verdict.reason})"


def _basis_text(verdict: V.AxisVerdict) -> str:
    """What a verdict rests on: the multiple with its interval, or the damage against the
    absolute tolerance, or (no figure) its reason."""
    if verdict.basis == "multiple":
        return seq.fmt_multiple(verdict.multiple, verdict.multiple_ci95)
    if verdict.basis == "absolute" and verdict.damage is not None:
        ci = verdict.damage_ci95
        inside = f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""
        return f"{verdict.label} {verdict.damage:.3g}{inside} (tolerance {verdict.margin:g})"
    return verdict.reason
