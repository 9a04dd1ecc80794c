"""The report as a JSON file: strict JSON, meaning ``json.loads(..., parse_constant=reject)``
accepts it: no NaN or Infinity ever, anything not measured is ``null``; versioned by SCHEMA.
Files are written atomically (files.write_atomic), so a crash mid-write leaves the previous
report intact."""

from __future__ import annotations

import json
import math

SCHEMA = "pytest-refract.report.v1"
# Additive revisions of SCHEMA (a v1 reader reads every one; see report/schema.py):
# 2: "build_drift" and "reference_pack" (a run against a reference pack), "saved_reference_pack".
SCHEMA_REVISION = 2


def _clean(value):
    """Replace non-finite floats by None (and numpy scalars by Python ones) recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _clean(value.item())
    return value


def dumps(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, allow_nan=False, ensure_ascii=False)
