"""Numbers and values as the page shows them: the template filters.

Every function here returns plain text (never markup); the template escapes it on output.
Numbers are formatted only from a real ``int``/``float``, so a string in a numeric field of a
hand-made report shows as a dash instead of reaching the page.

Robustness rule: older reports lack newer fields and a failed axis is only
``{"score": null, "band": null, "error": ...}``, so every helper accepts anything.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ...scoring.metrics import BANDS, band_for

if TYPE_CHECKING:  # a type hint only (typing.TypeGuard is Python 3.10+)
    from typing_extensions import TypeGuard

BAND_NAMES = tuple(name for name, _ in BANDS)
MISSING = "\u2014"  # em dash: "not in this report"


def is_num(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, spec: str = ".2f", missing: str = MISSING) -> str:
    if not is_num(x):
        return missing
    if spec == "d" and isinstance(x, float):  # a count written as 6.0 by some other producer
        return format(int(x), "d") if x.is_integer() else format(x, "g")
    return format(x, spec)


def pct(fraction: Any, spec: str = ".0f") -> str:
    return format(100.0 * fraction, spec) + "%" if is_num(fraction) else MISSING


def dash(value: Any) -> Any:
    """A missing or empty value shows as a dash rather than vanishing."""
    return MISSING if value is None or value == "" else value


def as_int(x: Any) -> int:
    return int(x) if is_num(x) else 0


def as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list:
    return x if isinstance(x, list) else []


def dicts(x: Any) -> List[dict]:
    return [i for i in as_list(x) if isinstance(i, dict)]


def as_str(x: Any) -> str:
    return x if isinstance(x, str) else ""


def duration(seconds: Any) -> str:
    if not is_num(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def si(x: Any, unit: str = "") -> str:
    """98362432 -> '98.4 M' (decimal, as the terminal summary prints model sizes)."""
    if not is_num(x):
        return MISSING
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.1f} {prefix}{unit}"
    return f"{x:g} {unit}".strip()


def ci(interval: Any, spec: str = ".1f") -> str:
    """' [lo, hi]' for a two-number interval, '' otherwise."""
    pair = as_list(interval)
    if len(pair) != 2 or not all(is_num(v) for v in pair):
        return ""
    return f" [{num(pair[0], spec)}, {num(pair[1], spec)}]"


def value(v: Any) -> str:
    """Any settings-like value as readable text."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if is_num(v):
        return num(v, "d") if isinstance(v, int) else num(v, "g")
    if isinstance(v, float):  # NaN or infinity in a hand-made report
        return MISSING
    if isinstance(v, (list, tuple)):
        return ", ".join(value(i) for i in v) or MISSING
    if isinstance(v, dict):
        return "; ".join(f"{k}={value(i)}" for k, i in v.items()) or MISSING
    return str(v)


def band_of(section: Any) -> Optional[str]:
    """The section's band; derived from its score when an older report left the band out."""
    section = as_dict(section)
    band = section.get("band")
    if isinstance(band, str) and band.upper() in BAND_NAMES:
        return band.upper()
    score = section.get("score")
    return band_for(score) if is_num(score) else None


def score_band(score: Any) -> Optional[str]:
    return band_for(score) if is_num(score) else None


def band_class(band: Any) -> str:
    # Only our own class names reach the class attribute, whatever the report's band says.
    return "b-" + band.lower() if band in BAND_NAMES else "b-na"


def shown_score(section: Any, spec: str = ".1f") -> str:
    """An axis score as its card and heading show it: n/a for an axis with nothing to score."""
    section = as_dict(section)
    score = section.get("score")
    if is_num(score):
        return num(score, spec)
    return "n/a" if section.get("status") == "n/a" else MISSING


def min_key(mapping: Any) -> Any:
    """The key of the smallest finite number among a dict's values (the first on a tie), or None."""
    numbers = {k: v for k, v in as_dict(mapping).items() if is_num(v)}
    return min(numbers, key=numbers.__getitem__) if numbers else None


def clamp(x: float, lo: float = 0.0, hi: float = 100.0) -> float:
    return min(max(x, lo), hi)


def ruler_segments() -> List[tuple]:
    """(band class, width) of each band on a 0-100 strip, lowest band first: the band floors
    from scoring.BANDS, so the strip moves with the thresholds."""
    ordered = sorted(BANDS, key=lambda b: b[1])
    tops = [floor for _, floor in ordered[1:]] + [100.0]
    return [(band_class(name), format(top - floor, "g")) for (name, floor), top in zip(ordered, tops)]


FILTERS: Dict[str, Callable[..., Any]] = {f.__name__: f for f in (num, pct, dash, duration, si, ci, value, band_of, band_class,
                                   shown_score, clamp, min_key, as_dict, as_list, dicts, as_str, as_int, score_band)}
FILTERS["fmt"] = format
