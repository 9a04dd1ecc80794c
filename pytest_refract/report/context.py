"""What context length a verdict is evidence for. The KLD axis scores positions 256-511 of
512-token chunks and the trajectory decodes after short prompts: a PASS of theirs says nothing
about a cache 8k tokens deep. Every report says up to how many tokens its evidence reaches and,
where the depth axis did not run, how to extend it. Pure functions of plain data."""

from __future__ import annotations

from typing import Dict, Optional

EXTEND = "--refract-axes=...,depth (or --refract-full)"


def context_evidence(by_axis: Dict[str, int], depth_settings: Optional[dict] = None) -> Optional[dict]:
    """{"tokens", "by_axis", "depth_axis", "text"}: the longest context any selected axis measured
    at, and the sentence the terminal, the JSON and the HTML show; None when no axis ran."""
    if not by_axis:
        return None
    tokens = max(by_axis.values())
    depth = "depth" in by_axis
    if depth:
        text = f"evidence up to {tokens} tokens of context (the depth axis scored positions up to {tokens})"
    else:
        longest = max(by_axis, key=lambda a: by_axis[a])
        text = (f"evidence up to {tokens} tokens of context ({longest}); nothing here measures a deeper cache: "
                f"add the depth axis with {EXTEND}"
                + (f" for {depth_settings['depth']} tokens" if depth_settings and depth_settings.get("depth") else ""))
    return {"tokens": tokens, "by_axis": dict(sorted(by_axis.items())), "depth_axis": depth, "text": text}
