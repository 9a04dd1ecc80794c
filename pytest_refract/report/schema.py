"""The report file as this package writes it: its schema name, and loading a report back with
every field the readers (compare, --refract-baseline) use checked for its type, so a
hand-edited or foreign file is one line naming the field, never a TypeError later."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..axes import BUILTIN
from ..errors import UsageProblem
from ..files import MAX_REPORT_BYTES, read_input
from .jsonio import SCHEMA

# Reports this package reads: its own, v2 (v3 only added fields to it), and v1 (the fields readers
# use kept their meaning; v1's calibrated fields are simply not read any more).
READABLE_SCHEMAS = (SCHEMA, "pytest-refract.report.v2", "pytest-refract.report.v1")
# What v2 no longer writes: the calibrated (retention) score, whose point was the upper end of
# its own interval by construction, and which the verdict replaced ("--refract-gate=calibrated"
# is retired with it). The raw scores' intervals (ci95, composite_ci95) stay.
REMOVED_IN_V2 = (
    "calibrated_composite", "calibrated_band", "calibrated_composite_ci95",  # top level, candidates[], ranking[]
    "axes.<axis>.calibrated_score", "axes.<axis>.calibration",
)

# A report nests a few levels (axes -> axis -> percentiles); deeper is not one of ours, and
# Python's parser would hit its recursion limit on thousands of levels.
MAX_REPORT_DEPTH = 32
# Whole numbers in a report are counts and sizes: 19 digits hold any of them (a 10**400
# integer overflowed later, when turned into a float).
_MAX_INT_DIGITS = 19


def _depth_problem(data, limit: int = MAX_REPORT_DEPTH) -> bool:
    """Whether ``data`` nests deeper than ``limit`` (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


class ReportFileError(Exception):
    """A report file that cannot be read as a pytest-refract report; the message says why."""


def load_report(path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ReportFileError(f"{p} is a folder, not a report file; give the JSON report's path")
    if not p.exists():
        raise ReportFileError(f"{p}: no such report file")
    try:
        raw = read_input(p, "report", MAX_REPORT_BYTES)
    except UsageProblem as exc:
        raise ReportFileError(str(exc)) from None

    def reject(constant):
        raise ReportFileError(f"{p}: not strict JSON ({constant})")

    def whole(text):
        if len(text.lstrip("-")) > _MAX_INT_DIGITS:
            raise ReportFileError(f"{p}: the number {text[:12]}... has {len(text)} digits; no report field is that large")
        return int(text)

    def real(text):
        value = float(text)
        if not math.isfinite(value):
            raise ReportFileError(f"{p}: the number {text[:24]} is out of range (a report holds finite numbers "
                                  "or null)")
        return value

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=reject, parse_int=whole, parse_float=real)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportFileError(f"{p}: not a JSON report ({exc})") from None
    except RecursionError:
        raise ReportFileError(f"{p}: JSON nested deeper than any report (at most {MAX_REPORT_DEPTH} levels)") from None
    if _depth_problem(data):
        raise ReportFileError(f"{p}: JSON nested deeper than any report (at most {MAX_REPORT_DEPTH} levels)")
    if not isinstance(data, dict) or data.get("schema") not in READABLE_SCHEMAS:
        raise ReportFileError(f"{p}: not a pytest-refract report (schema {SCHEMA} expected)")
    problem = report_problem(data)
    if problem:
        raise ReportFileError(f"{p}: {problem}")
    return data


# Fields read from a report, with the types they must have (None allowed everywhere: a
# report writes null for what it did not measure). A hand-edited or foreign file with a
# string where a number belongs is one line naming the field, never a TypeError later.
_NUMBER, _TEXT, _OBJECT, _LIST = "a number", "a string", "an object", "a list"


def _axis_fields() -> dict:
    """What every axis section has, and each field an axis's compare rows read: a number, or
    an object of numbers for a dotted key (e.g. kld_percentiles.99)."""
    fields = {"score": _NUMBER, "band": _TEXT, "floor_score": _NUMBER, "status": _TEXT}
    for axis in BUILTIN.values():
        for _label, key, _fmt, _better in axis.COMPARE_METRICS:
            head, _, rest = key.partition(".")
            fields.setdefault(head, _OBJECT if rest else _NUMBER)
    return fields


_AXIS_FIELDS = _axis_fields()
_NESTED_NUMBERS = tuple(name for name, kind in _AXIS_FIELDS.items() if kind == _OBJECT)
_SECTION_FIELDS = {"candidate": _TEXT, "composite": _NUMBER, "band": _TEXT, "axes": _OBJECT, "kv_cache": _OBJECT}
_TOP_FIELDS = dict(_SECTION_FIELDS, reference=_TEXT, timestamp=_TEXT, model=_OBJECT, candidates=_LIST)
_MODEL_FIELDS = {"path": _TEXT, "size_bytes": _NUMBER, "sha256_first_mib": _TEXT, "sha256": _TEXT, "name": _TEXT}


def _type_problem(value, kind: str) -> bool:
    if value is None:
        return False
    if kind == _NUMBER:
        return isinstance(value, bool) or not isinstance(value, (int, float))
    return not isinstance(value, {_TEXT: str, _OBJECT: dict, _LIST: list}[kind])


def _fields_problem(obj: dict, fields: dict, where: str) -> Optional[str]:
    for name, kind in fields.items():
        if _type_problem(obj.get(name), kind):
            return f"field {where}{name} must be {kind} or null, not {type(obj[name]).__name__} ({obj[name]!r:.40})"
    return None


def _section_problem(section: dict, where: str) -> Optional[str]:
    problem = _fields_problem(section, _SECTION_FIELDS, where)
    if problem:
        return problem
    for name, axis in (section.get("axes") or {}).items():
        if not isinstance(axis, dict):
            return f"field {where}axes.{name} must be an object, not {type(axis).__name__}"
        problem = _fields_problem(axis, _AXIS_FIELDS, f"{where}axes.{name}.")
        if problem:
            return problem
        for nested in _NESTED_NUMBERS:
            for key, value in (axis.get(nested) or {}).items():
                if _type_problem(value, _NUMBER):
                    return f"field {where}axes.{name}.{nested}.{key} must be a number or null, not {type(value).__name__}"
    return _fields_problem(section.get("kv_cache") or {}, {"vs_reference": _NUMBER}, f"{where}kv_cache.")


def report_problem(data: dict) -> Optional[str]:
    """The first field of a report that does not have the type this package writes, or None."""
    problem = _fields_problem(data, _TOP_FIELDS, "") or _section_problem(data, "")
    if problem:
        return problem
    problem = _fields_problem(data.get("model") or {}, _MODEL_FIELDS, "model.")
    if problem:
        return problem
    for i, section in enumerate(data.get("candidates") or []):
        if not isinstance(section, dict):
            return f"field candidates[{i}] must be an object, not {type(section).__name__}"
        problem = _section_problem(section, f"candidates[{i}].")
        if problem:
            return problem
    return None
