"""What measuring one item returns, from the runner to the session (and from an xdist worker to
the controller, as a plain dict on the test report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ItemResult:
    """One item's measurement under ``role``.

    ``result`` is the axis's result (JSON-able, with the compute it cost, its reference-cache
    reads and its wall time). ``control`` is the sensitivity control's result for the same unit
    when this item measured it (the first candidate item of a unit does), ``control_error`` why
    the control could not be measured there. ``repeats`` holds the further measurements that
    ``--refract-repeat`` asked for."""

    role: str
    axis: str
    unit: str
    result: dict
    control: Optional["ItemResult"] = None
    control_error: Optional[str] = None
    repeats: List[dict] = field(default_factory=list)

    def to_wire(self) -> dict:
        """A plain dict that survives xdist's report serialization."""
        return {"role": self.role, "axis": self.axis, "unit": self.unit, "result": self.result,
                "control": self.control.to_wire() if self.control is not None else None,
                "control_error": self.control_error, "repeats": self.repeats}

    @classmethod
    def from_wire(cls, wire: dict) -> "ItemResult":
        control = wire.get("control")
        return cls(role=wire["role"], axis=wire["axis"], unit=wire["unit"], result=wire["result"],
                   control=cls.from_wire(control) if control is not None else None,
                   control_error=wire.get("control_error"), repeats=list(wire.get("repeats") or []))
