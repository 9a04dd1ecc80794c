"""What really ran, per config, in the report's words: the one-line summary of a ``ran``
record (audit.runner.Runner.ran) for the terminal and the HTML page, and the no-op check (a
candidate cache config whose logits are bit-identical to the reference's). Pure functions."""

from __future__ import annotations

from typing import List, Optional

NO_OP = "no-op: this cache config changed nothing"


def no_op_reason(axes: dict, requested, reference) -> Optional[str]:
    """The no-op sentence when the candidate's logits were bit-identical to the reference's on
    every scored position of every KLD chunk while its cache types differ from the reference's
    (``requested``/``reference``: KVConfigs); None otherwise, or where it cannot be told (no
    KLD axis, or chunks whose reference fingerprint is unknown). Such a candidate measured the
    reference's computation, not its own: the build ignored or replaced its cache types."""
    kld = axes.get("kld") or {}
    if kld.get("logits_identical_to_reference") is not True or requested is None or reference is None:
        return None
    asked = (requested.ctk, requested.ctv)
    ref = (reference.ctk, reference.ctv)
    if asked == ref:
        return None
    n = kld.get("n_chunks") or len(kld.get("items") or [])
    return (f"{NO_OP}: its logits are bit-identical to the reference's on every scored position of {n} KLD "
            f"chunk(s), though it asked for K {asked[0]} / V {asked[1]} against the reference's {ref[0]}/{ref[1]}; "
            "llama.cpp ignored or replaced the cache types (see what ran), so this is no PASS of the config")


def _types(ran: dict) -> str:
    def shown(value):
        if value is None:
            return "?"
        return "/".join(value) if isinstance(value, list) else str(value)

    return f"K {shown(ran.get('type_k'))} / V {shown(ran.get('type_v'))}"


def ran_text(ran: Optional[dict]) -> str:
    """E.g. "K q8_0 / V q8_0, flash attention on, rotated K+V; libllama.so sha256 0123abcd4567;
    1 warning (kv_converted_to_f16)"."""
    if not ran:
        return "not recorded"
    parts = [_types(ran)]
    fa = ran.get("flash_attn")
    parts.append(f"flash attention {fa}" if fa else "flash attention not reported")
    rotation = ran.get("rotation")
    if rotation is not None:
        on = [side.upper() for side in ("k", "v") if rotation.get(side)]
        parts.append(f"rotated {'+'.join(on)}" if on else "no rotation")
    text = ", ".join(parts)
    library = ran.get("library") or {}
    if library.get("path"):
        name = str(library["path"]).replace("\\", "/").rsplit("/", 1)[-1]
        sha = (library.get("sha256") or "")[:12]
        text += f"; {name}" + (f" sha256 {sha}" if sha else "")
    warnings = ran.get("warnings") or []
    if warnings:
        names = sorted({n for w in warnings for n in (w.get("names") or [])})
        text += f"; {len(warnings)} warning(s)" + (f" ({', '.join(names)})" if names else "")
    else:
        text += "; no warnings"
    return text


def warning_lines(ran: Optional[dict]) -> List[str]:
    """Each warning as "[name, ...] text" (unnamed ones as they are)."""
    out = []
    for w in (ran or {}).get("warnings") or []:
        names = w.get("names") or []
        out.append((f"[{', '.join(names)}] " if names else "") + str(w.get("text", "")))
    return out
