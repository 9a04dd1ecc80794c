"""PLAD: per-perturbation scores in the perturbations' own order."""

from __future__ import annotations

from ....axes.plad import PERTURBATIONS
from ..fmt import as_dict, dicts


def view(section: dict, report: dict) -> dict:
    per = as_dict(section.get("per_perturbation"))
    kinds = [k for k in PERTURBATIONS if k in per] + [k for k in per if k not in PERTURBATIONS]
    items = dicts(section.get("items"))
    return {"per_kind": [(k, per.get(k)) for k in kinds], "items": items,
            "n_skipped": sum(1 for i in items if i.get("skipped")),
            "paired": any(isinstance(i.get("vs_control"), dict) for i in items)}
