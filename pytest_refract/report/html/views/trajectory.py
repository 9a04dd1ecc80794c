"""Trajectory: the first-divergence chart and each prompt's two continuations split at the
first token where they differ."""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

from markupsafe import Markup

from .. import svg
from ..fmt import MISSING, as_int, as_str, dicts, is_num

Split = Tuple[str, str, str, str, str]  # shared, ref token, cand token, ref rest, cand rest


def full_match(item: dict) -> bool:
    if isinstance(item.get("full_match"), bool):
        return item["full_match"]
    return item.get("first_divergence") is None and as_int(item.get("ref_len")) == as_int(item.get("cand_len")) > 0


def _length(item: dict) -> int:
    return max(as_int(item.get("ref_len")), as_int(item.get("cand_len")))


def chart(items: List[dict]) -> Optional[Markup]:
    if not items:
        return None
    bars = []
    for item in items:
        length = _length(item)
        pid = as_str(item.get("id")) or "?"
        if full_match(item):
            bars.append({"label": pid, "value": length, "cls": "bar-full",
                         "title": f"{pid}: identical for all {length} tokens"})
        else:
            fd = item.get("first_divergence")
            fd = fd if is_num(fd) else None
            where = f"diverges at token {fd:g}" if fd is not None else "no divergence index"
            margin = item.get("ref_margin_at_divergence")
            tie = item.get("near_tie_divergence") is True
            how = (f"; reference top-2 margin {margin:.3f}" + (" (near-tie flip)" if tie else " (confident token changed)")
                   if is_num(margin) else "")
            bars.append({"label": pid, "value": fd, "ghost": length or None, "cls": "bar-tie" if tie else "bar-div",
                         "title": f"{pid}: {where} of {length}{how}"})
    n = len(bars)
    width = max(640, min(1100, 90 + 26 * n))
    return svg.bars(bars, width=width, height=330, label="First divergence per prompt", y_title="token index",
                    value_fmt=lambda v: format(v, "g"), rotate_labels=True, show_values=n <= 60,
                    label_every=max(1, math.ceil(n / 60)))


def split_by_chars(ref: str, cand: str) -> Split:
    """Fallback for reports without token-level "divergence": split at the first differing
    character, widened to whole words so the highlight reads like a token."""
    n = len(os.path.commonprefix([ref, cand]))
    start = n
    while start > 0 and not ref[start - 1].isspace():
        start -= 1

    def word_end(text: str) -> int:
        i = start
        while i < len(text) and text[i].isspace():
            i += 1
        while i < len(text) and not text[i].isspace():
            i += 1
        return i

    re_, ce = word_end(ref), word_end(cand)
    return ref[:start], ref[start:re_], cand[start:ce], ref[re_:], cand[ce:]


def divergence(item: dict) -> Tuple[Split, bool]:
    """The continuations split at the first difference, and whether the split is token-exact."""
    d = item.get("divergence")
    keys = ("shared_text", "ref_token_text", "cand_token_text", "ref_rest", "cand_rest")
    if isinstance(d, dict) and all(isinstance(d.get(k), str) for k in keys):
        return tuple(d[k] for k in keys), True
    return split_by_chars(as_str(item.get("ref_text")), as_str(item.get("cand_text"))), False


def mark_class(token: str) -> str:
    """The highlight's class: a whitespace token would be an invisible highlight."""
    if token.strip():
        return ""
    return "ws nl" if "\n" in token else "ws"


def row(item: dict) -> dict:
    full = full_match(item)
    fd = item.get("first_divergence")
    length = _length(item)
    if full:
        where = f"full match ({length} tokens)"
    elif is_num(fd):
        where = f"diverges at token {fd:g} / {length}"
    else:
        where = MISSING
    (shared, ref_tok, cand_tok, ref_rest, cand_rest), exact = divergence(item)
    return {"item": item, "full": full, "where": where, "exact": exact, "shared": shared,
            "both": shared + ref_rest if exact else as_str(item.get("ref_text")),
            "sides": (("reference", "ref_len", ref_tok, ref_rest, mark_class(ref_tok)),
                      ("candidate", "cand_len", cand_tok, cand_rest, mark_class(cand_tok)))}


def view(section: dict, report: dict) -> dict:
    items = dicts(section.get("items"))
    return {"n_prompts": len(items), "chart": chart(items), "rows": [row(i) for i in items],
            "paired": any(isinstance(i.get("vs_control"), dict) for i in items)}
