"""The report as a JSON file: strict JSON, meaning ``json.loads(..., parse_constant=reject)``
accepts it: no NaN or Infinity ever, anything not measured is ``null``; versioned by SCHEMA.
Files are written atomically (files.write_atomic), so a crash mid-write leaves the previous
report intact."""

from __future__ import annotations

import json
import math

# v2 added, and changed nothing of v1: per config what really ran ("ran", "reference_ran",
# sensitivity.ran), the no-op flag ("no_op"), the decode axis (axes.decode) and the KLD axis's
# logits_identical_to_reference. Readers accept every version in schema.READABLE_SCHEMAS.
SCHEMA = "pytest-refract.report.v2"


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
