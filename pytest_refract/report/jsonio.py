"""The report as a JSON file: strict JSON, meaning ``json.loads(..., parse_constant=reject)``
accepts it: no NaN or Infinity ever, anything not measured is ``null``; versioned by SCHEMA.
Files are written atomically (files.write_atomic), so a crash mid-write leaves the previous
report intact."""

from __future__ import annotations

import json
import math

# v2 retired the calibrated (retention) score and its gate; see schema.REMOVED_IN_V2.
# v3 only added to v2: the reference pack's fields ("build_drift", "reference_pack",
# "saved_reference_pack"), per config what really ran ("ran", "reference_ran", sensitivity.ran),
# the no-op flag ("no_op"), the decode axis (axes.decode) and the KLD axis's
# logits_identical_to_reference; per-axis verdicts' pass_error, fail_error, min_pass_items and
# could_miss, sequential designs' pass_errors, fail_errors and min_pass_items, the family-wise
# "recommendation", and gate["note"] under --refract-undecided=pass.
SCHEMA = "pytest-refract.report.v3"


def text_of(value: str) -> str:
    """``value`` as Unicode text that UTF-8 can hold: a path's byte that is not UTF-8 (Python
    keeps it as a lone surrogate, U+DC80..U+DCFF) is written as the escape ``\\xE9``, any
    other lone surrogate as ``\\uD800``; text without them is returned unchanged."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    out = []
    for ch in value:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02X}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    return "".join(out)


def _clean(value):
    """Replace non-finite floats by None (and numpy scalars by Python ones) recursively, and
    make every string UTF-8 text (text_of)."""
    if isinstance(value, str):
        return text_of(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {text_of(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _clean(value.item())
    return value


def dumps(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, allow_nan=False, ensure_ascii=False)
