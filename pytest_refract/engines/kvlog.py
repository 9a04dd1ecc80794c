"""What llama.cpp logged about the KV cache it created, read back from llama.cpp's own log of its creation, and the rotation
policy of a KV config turned into the environment variables llama.cpp reads at that moment.

Pure functions (no llama.cpp), so they are tested on log text. llama.cpp (upstream and the
TurboQuant fork alike) logs, when it creates a context's KV cache::

    llama_kv_cache: size =    5.62 MiB (   256 cells,  30 layers,  1/1 seqs), K (f16):    2.81 MiB, V (f16):    2.81 MiB
    llama_kv_cache: attn_rot_k = 1, n_embd_head_k_all = 64
    llama_kv_cache: attn_rot_v = 0, n_embd_head_k_all = 64

A model with sliding-window layers (gemma3) gets two caches, each announced first::

    llama_kv_cache_iswa: creating non-SWA KV cache, size = 4096 cells
    llama_kv_cache: size =   12.00 MiB (  4096 cells,   3 layers,  1/1 seqs), K (f16): ...
    llama_kv_cache_iswa: creating     SWA KV cache, size = 1024 cells
    llama_kv_cache: size =   15.00 MiB (  1024 cells,  15 layers,  1/1 seqs), K (f16): ...

The cells are per stream (a stream per sequence unless the cache is unified), the MiB are
over all streams.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

# What rot= may say, and the environment each policy needs. Upstream llama.cpp rotates every
# quantized cache side unless LLAMA_ATTN_ROT_DISABLE=1; the TurboQuant fork rotates nothing
# unless LLAMA_ATTN_ROT_K_OVERRIDE=1 / LLAMA_ATTN_ROT_V_OVERRIDE=1 (and LLAMA_ATTN_ROT_DISABLE=1
# locks rotation off). Setting all of them covers both; what happened is read back, not assumed.
ROTATION_VARS = ("LLAMA_ATTN_ROT_DISABLE", "LLAMA_ATTN_ROT_K_OVERRIDE", "LLAMA_ATTN_ROT_V_OVERRIDE")
_POLICY_ENV: Dict[str, Dict[str, str]] = {
    "default": {},
    "off": {"LLAMA_ATTN_ROT_DISABLE": "1"},
    "k": {"LLAMA_ATTN_ROT_K_OVERRIDE": "1"},
    "v": {"LLAMA_ATTN_ROT_V_OVERRIDE": "1"},
    "kv": {"LLAMA_ATTN_ROT_K_OVERRIDE": "1", "LLAMA_ATTN_ROT_V_OVERRIDE": "1"},
}
# Every variable of these families in effect at context creation goes into the report: any of
# them may change llama.cpp's numbers (TURBO_*: the TurboQuant fork's, e.g. TURBO_AUTO_ASYMMETRIC).
_RECORDED_ENV = re.compile(r"^(LLAMA_|GGML_|TURBO_)")


def rotation_env(policy: str) -> Dict[str, Optional[str]]:
    """The rotation variables for ``policy``: a value to set, or None to unset. ``default``
    unsets all three, so the build's own default applies, not whatever the shell exported."""
    wanted = _POLICY_ENV[policy]
    return {name: wanted.get(name) for name in ROTATION_VARS}


def recorded_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    env: Mapping[str, str] = os.environ if environ is None else environ
    return {k: v for k, v in sorted(env.items()) if _RECORDED_ENV.match(k)}


@dataclass(frozen=True)
class CacheAllocation:
    """One KV cache as llama.cpp logged it: MiB with two decimals, as printed."""

    cells: int
    k_type: str
    k_mib: float
    v_type: str
    v_mib: float
    layers: Optional[int] = None
    streams: int = 1
    # "full" or "swa" when llama.cpp announced the cache as its non-SWA or SWA one; None for
    # a model's only cache.
    kind: Optional[str] = None


@dataclass
class CacheLog:
    """What llama.cpp logged when it created one context's KV cache(s): the rotation it applied,
    each cache it allocated, and its errors and warnings."""
    rotation_k: Optional[bool] = None
    rotation_v: Optional[bool] = None
    caches: List[CacheAllocation] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    # Flash attention as llama.cpp reported it: "on", "off", or None where it said nothing.
    flash_attn: Optional[str] = None

    @property
    def rotation(self) -> Optional[dict]:
        if self.rotation_k is None and self.rotation_v is None:
            return None
        return {"k": bool(self.rotation_k), "v": bool(self.rotation_v)}


_SIZE_RE = re.compile(
    r"size\s*=\s*[\d.]+\s*MiB\s*\(\s*(\d+)\s*cells(?:,\s*(\d+)\s*layers)?(?:,\s*\d+\s*/\s*(\d+)\s*seqs)?"
    r".*?K\s*\(([^)]*)\)\s*:\s*([\d.]+)\s*MiB\s*,\s*V\s*\(([^)]*)\)\s*:\s*([\d.]+)\s*MiB"
)
_KIND_RE = re.compile(r"creating\s+(non-SWA|SWA)\s+KV cache")
_ROT_RE = re.compile(r"attn_rot_([kv])\s*=\s*(\d+)")
# "llama_context: flash_attn    = enabled" (older builds: "= 1"); when asked for auto, the
# scheduler's "Flash Attention was auto, set to disabled" is the last word.
_FA_SET_RE = re.compile(r"\bflash_attn\s*=\s*(\w+)")
_FA_DECIDED_RE = re.compile(r"Flash Attention was \w+, set to (enabled|disabled)", re.IGNORECASE)
_FA_WORDS = {"1": "on", "true": "on", "enabled": "on", "on": "on", "0": "off", "false": "off", "disabled": "off",
             "off": "off"}


def parse_log(lines: Iterable[Tuple[int, str]]) -> CacheLog:
    """What llama.cpp logged, from (level, text) log records of one context's creation. A model with several
    caches (e.g. sliding-window layers) logs several; rotation is on when any cache has it."""
    log = CacheLog()
    kind: Optional[str] = None
    for level, text in lines:
        for line in text.splitlines():
            announced = _KIND_RE.search(line)
            if announced:
                kind = "full" if announced.group(1) == "non-SWA" else "swa"
            m = _SIZE_RE.search(line)
            if m:
                log.caches.append(CacheAllocation(
                    int(m.group(1)), m.group(4).strip(), float(m.group(5)), m.group(6).strip(), float(m.group(7)),
                    layers=int(m.group(2)) if m.group(2) else None, streams=int(m.group(3)) if m.group(3) else 1,
                    kind=kind))
                kind = None
            fa = _FA_DECIDED_RE.search(line) or _FA_SET_RE.search(line)
            if fa and fa.group(1).lower() in _FA_WORDS:
                log.flash_attn = _FA_WORDS[fa.group(1).lower()]
            for side, value in _ROT_RE.findall(line):
                on = int(value) != 0
                if side == "k":
                    log.rotation_k = bool(log.rotation_k) or on
                else:
                    log.rotation_v = bool(log.rotation_v) or on
            if level == 4 and line.strip():  # GGML_LOG_LEVEL_ERROR
                log.errors.append(line.strip())
            elif level == 3 and line.strip():  # GGML_LOG_LEVEL_WARN: e.g. a cache type changed
                log.warnings.append(line.strip())
    return log


def refusal_reason(errors: List[str]) -> Optional[str]:
    """llama.cpp's own reason for refusing a context: its first specific error line, without
    the generic 'failed to create context' lines that follow it."""
    generic = ("failed to initialize the context", "failed to create context", "llama_init_from_model: failed")
    for line in errors:
        if not any(g in line for g in generic):
            return line
    return errors[0] if errors else None


MIB = 1024 * 1024
# llama.cpp prints MiB with two decimals: a printed figure is within this of the true size.
_PRINT_TOLERANCE = 0.005 * MIB + 1


def side_bytes_per_token(logged_mib: float, cells: int, candidates: Iterable[int]) -> Tuple[int, bool]:
    """Bytes per cell of one cache side. ``candidates`` are exact byte counts per cell that ggml
    row arithmetic allows (the unpadded head first, then padded layouts a fork may use); the
    first one that reproduces llama.cpp's printed size is the allocation, exactly. When none
    does, the printed size itself (rounded) is used; the flag says which."""
    total = logged_mib * MIB
    for exact in candidates:
        if abs(exact * cells - total) <= _PRINT_TOLERANCE:
            return int(exact), True
    return int(round(total / cells)), False


def check_rotation(policy: str, rotation: Optional[dict], quantized: Tuple[bool, bool], label: str) -> Optional[str]:
    """One line when the build did not do what ``policy`` asked, else None. A float side has
    nothing to rotate, so asking for it there is not a refusal."""
    if policy == "default":
        return None
    if rotation is None:
        return (f"{label}: rot={policy} asked, but this llama.cpp build logged no attention rotation (attn_rot_k/v); "
                "it predates rotation: remove rot=")
    want_k = policy in ("k", "kv")
    want_v = policy in ("v", "kv")
    wrong = []
    for side, want, got, quant in (("K", want_k, rotation["k"], quantized[0]), ("V", want_v, rotation["v"], quantized[1])):
        if want and not got and quant:
            wrong.append(f"did not rotate {side}")
        elif not want and got:
            wrong.append(f"rotated {side}")
    if not wrong:
        return None
    did = describe_rotation(rotation)
    if policy in ("k", "v") and any(w.startswith("rotated") for w in wrong):
        hint = (" (upstream llama.cpp only knows all-or-nothing rotation, LLAMA_ATTN_ROT_DISABLE; per-side "
                "rotation needs a build such as the TurboQuant fork)")
    elif policy == "off":
        hint = " (this build ignores LLAMA_ATTN_ROT_DISABLE)"
    else:
        hint = " (llama.cpp rotates a side only when its cache type is quantized and the head size is a multiple of 64)"
    return f"{label}: rot={policy} was not honoured: this build {' and '.join(wrong)} ({did}){hint}"


def describe_rotation(rotation: Optional[dict]) -> str:
    if rotation is None:
        return "rotation unknown"
    on = [s.upper() for s in ("k", "v") if rotation[s]]
    return f"rotated {'+'.join(on)}" if on else "no rotation"


def check_cache_types(requested: Tuple[str, str], facts: CacheLog, label: str) -> Optional[str]:
    """One line when a cache llama.cpp created holds other types than ``requested`` (K, V),
    else None. The TurboQuant fork, for one, silently upgrades a symmetric turbo K to q8_0 on
    a model whose GQA ratio is 6 or more: measured under the requested name, that would label
    one configuration with another's. The line names what was used and llama.cpp's reason
    (a warning of the creation naming either type), if it logged one. A build that logs no
    cache sizes cannot be checked here (None)."""
    for cache in facts.caches:
        used = (cache.k_type, cache.v_type)
        # ggml names its k-quants q4_K in its log and q4_k in its type table: the same type.
        if tuple(u.lower() for u in used) == tuple(r.lower() for r in requested):
            continue
        sides = [side for side, want, got in zip("KV", requested, used) if want.lower() != got.lower()]
        names = {n.lower() for n in (*requested, *used)}
        reason = next((w for w in facts.warnings if any(n in w.lower() for n in names)), None)
        why = f"; llama.cpp logged: {' '.join(reason.split())}" if reason else "; llama.cpp logged no reason"
        return (f"{label}: llama.cpp created a {used[0]}/{used[1]} (K/V) cache, not the {requested[0]}/{requested[1]} "
                f"asked for (it changed {' and '.join(sides)}){why}. A config is never measured under another's "
                f"name: ask for ctk={used[0]},ctv={used[1]} to measure what this build uses, or keep it from "
                "changing the types")
    return None


# --------------------------------------------------------------------------- named warnings

# Warnings llama.cpp (or a fork) logs when it computes something other than what was asked,
# each with the name the report gives it. Matched on the message's own words, case-insensitive:
# - kv_converted_to_f16: the CUDA/HIP flash-attention vector kernel (one-token decode) has no
#   kernel for the K/V pair compiled and converts both to f16 ("... converting K and V to f16
#   instead (slow)");
# - attention_on_cpu: the scheduler put the flash-attention op on the CPU backend while the
#   layer runs on a GPU (no kernel for the cache types), or a build says it fell back to the CPU;
# - flash_attn_disabled: flash attention asked as auto and turned off;
# - cache_type_changed: the build stored a cache side in another type than asked (the
#   TurboQuant fork upgrades a symmetric turbo K to q8_0 on high-GQA models);
# - bf16_as_f16: a bf16 cache computed as f16 (a conversion naming bf16, or a bf16 K/V pair
#   converted to f16 by the rule above).
KNOWN_WARNINGS = (
    ("kv_converted_to_f16", re.compile(r"converting K and V to f16", re.IGNORECASE)),
    ("attention_on_cpu", re.compile(r"Flash Attention tensor is assigned to device CPU|(flash.?attention|FLASH_ATTN_EXT|"
                                    r"attention)\b.*\bfall(s|ing)? back to (the )?CPU", re.IGNORECASE)),
    ("flash_attn_disabled", re.compile(r"Flash Attention was auto, set to disabled", re.IGNORECASE)),
    ("cache_type_changed", re.compile(r"\b(K|V|KV|cache)\b.*\b(upgrad\w*|promot\w*|substitut\w*|forc\w*|chang\w*|"
                                      r"switch\w*)\b.*(\bto\b|->)", re.IGNORECASE)),
    ("bf16_as_f16", re.compile(r"\bbf16\b.*\b(as|to|into)\s+f16\b|K/V types bf16-|K/V types \w+-bf16\b",
                               re.IGNORECASE)),
)


def warning_names(text: str) -> List[str]:
    """The known warnings ``text`` (one log message) is, by name; empty for any other."""
    return [name for name, pattern in KNOWN_WARNINGS if pattern.search(text)]


def named_warnings(messages: Iterable[str]) -> List[dict]:
    """Each distinct message once, in order: {"text", "names"} (names empty for a warning this
    package has no name for: it is reported all the same)."""
    out: List[dict] = []
    seen = set()
    for message in messages:
        text = " ".join(str(message).split())
        if not text or text in seen:
            continue
        seen.add(text)
        out.append({"text": text, "names": warning_names(text)})
    return out
