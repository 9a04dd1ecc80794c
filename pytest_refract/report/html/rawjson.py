"""The JSON report as embedded at the bottom of the page: smaller, and laid out to be read."""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable

from .fmt import as_dict, dicts

# Token-id lists are most of a full report's bytes and say nothing a reader can use on a page.
OMITTED_KEYS = ("ref_tokens", "cand_tokens")
# Every axis keeps its compute totals; the per-item counters are left out.
COMMON_OMIT = ("items[].compute", "cells[].compute")


def _strip(value: Any) -> Any:
    """The report without token-id lists, wherever they occur."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in OMITTED_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _drop(node: Any, path: str) -> None:
    """Remove the key at a dotted path; a ``name[]`` step goes into every object of a list
    (``cells[].answers[].reference.answer``). Missing steps are no error."""
    head, _, rest = path.partition(".")
    if head.endswith("[]"):
        for child in dicts(as_dict(node).get(head[:-2])):
            _drop(child, rest)
    elif rest:
        _drop(as_dict(node).get(head), rest)
    elif isinstance(node, dict):
        node.pop(head, None)


def embedded_copy(report: dict, omit: Dict[str, Iterable[str]]) -> dict:
    """The report as embedded in the page. Besides token ids it leaves out what the page shows
    verbatim (each axis names its own paths in ``omit``: prompts, continuations, answers...)
    and the per-item compute counters: with those, a default audit's page is about 400 KB
    instead of under 300 KB, for no information a reader of the page lacks. Only these known
    places are touched; everything else stays exactly as written."""
    out = _strip(report)
    for name, section in as_dict(out.get("axes")).items():
        for path in (*COMMON_OMIT, *omit.get(name, ())):
            _drop(section, path)
    return out


def pretty_json(value: Any, level: int = 0, record: bool = False) -> str:
    """Indented JSON with small values on one line and each object in a list (an item, a
    cell) on one line of its own, like a table. Reads as well as indent=2 at well under half
    the bytes, which is what keeps a full audit's page small."""
    flat = json.dumps(value, ensure_ascii=False, default=str)
    if not isinstance(value, (dict, list)) or not value or record or len(flat) + 2 * level <= 100:
        return flat
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(value, dict):
        inner = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {pretty_json(v, level + 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(inner) + "\n" + end + "}"
    return "[\n" + ",\n".join(pad + pretty_json(v, level + 1, isinstance(v, dict)) for v in value) + "\n" + end + "]"
