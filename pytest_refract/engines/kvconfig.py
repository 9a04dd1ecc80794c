"""KV-cache configuration strings: ``ctk=q8_0,ctv=q4_0,fa=on``.

Parsing is pure (no llama.cpp); checking a config against the loaded ggml build and the
model's head dimension is done by :func:`validate_for_model`, with the type table passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

from ..errors import UsageProblem

# Cache storage types whose values are plain floats: these do not need flash attention for V.
FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})

# The cache types llama.cpp's own tools accept (--cache-type-k/-v): every backend stores them.
# A context with any other type is first created in a child process (engines/isolated.py),
# since a backend that cannot store it aborts the process instead of refusing.
CLI_CACHE_TYPES = frozenset({"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"})

_KEY_ALIASES = {
    "ctk": "ctk", "cache-type-k": "ctk", "cache_type_k": "ctk", "type_k": "ctk",
    "ctv": "ctv", "cache-type-v": "ctv", "cache_type_v": "ctv", "type_v": "ctv",
    "fa": "fa", "flash-attn": "fa", "flash_attn": "fa",
    "nkvo": "nkvo", "no-kv-offload": "nkvo", "no_kv_offload": "nkvo",
    "swa_full": "swa_full", "swa-full": "swa_full",
    "rot": "rot", "rotation": "rot",
}
_KEYS = "ctk, ctv, fa, nkvo, swa_full, rot"
# Attention rotation policies (see kvlog.py for the environment each one sets).
ROTATION_POLICIES = ("default", "off", "k", "v", "kv")
_TRUE = {"on", "1", "true", "yes"}
_FALSE = {"off", "0", "false", "no"}


@dataclass(frozen=True)
class KVConfig:
    """One side of the comparison. Only ``ctk``/``ctv`` may differ between reference and
    candidate; ``fa`` is here because users think of it as part of a cache setup, but the
    audit requires both sides to share it (flash attention changes llama.cpp's numerics)."""

    ctk: str = "f16"
    ctv: str = "f16"
    fa: bool = True
    nkvo: bool = False  # keep the KV cache in host memory when layers are offloaded to a GPU
    swa_full: bool = False  # full-size cache for sliding-window-attention models
    # Hadamard rotation of the quantized cache sides: the build's default, none, K, V or both.
    # Applied through llama.cpp's environment at context creation and read back from its log.
    rot: str = "default"
    # Whether the user wrote fa=..., so the other side can inherit it; not part of identity.
    fa_explicit: bool = field(default=False, compare=False)

    def label(self) -> str:
        """Canonical string that :func:`parse_kv_config` turns back into an equal config: one
        spelling per computation, so a default spelled out (fa=on) names the same config as
        the default left out (labels key baselines, reports and rankings)."""
        parts = [f"ctk={self.ctk}", f"ctv={self.ctv}"]
        if not self.fa:
            parts.append("fa=off")
        if self.nkvo:
            parts.append("nkvo=on")
        if self.swa_full:
            parts.append("swa_full=on")
        if self.rot != "default":
            parts.append(f"rot={self.rot}")
        return ",".join(parts)

    def short(self) -> str:
        """Compact id fragment for test ids, e.g. ``q8_0-q4_0``."""
        return f"{self.ctk}-{self.ctv}" + (f"-rot_{self.rot}" if self.rot != "default" else "")

    @property
    def quantized(self) -> bool:
        return self.ctk not in FLOAT_TYPES or self.ctv not in FLOAT_TYPES

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.label()


def _parse_bool(key: str, value: str, text: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise UsageProblem(f"KV config {text!r}: {key}={value!r} must be on or off")


def parse_kv_config(text: str) -> KVConfig:
    """Parse ``key=value`` pairs separated by commas. Unknown keys are errors, not ignored:
    a typo like ``ctv=q4_0,fa=of`` silently measuring something else would be a wrong score."""
    if text is None or not str(text).strip():
        raise UsageProblem("empty KV config: write e.g. ctk=q8_0,ctv=q4_0")
    fields: dict = {}
    for raw in str(text).split(","):
        item = raw.strip()
        if not item:
            continue
        if "=" not in item:
            raise UsageProblem(
                f"KV config {text!r}: {item!r} is not key=value (keys: {_KEYS})"
            )
        key, value = (s.strip() for s in item.split("=", 1))
        canon = _KEY_ALIASES.get(key.lower())
        if canon is None:
            raise UsageProblem(
                f"KV config {text!r}: unknown key {key!r} (keys: {_KEYS})"
            )
        if canon in fields:
            raise UsageProblem(f"KV config {text!r}: {canon} given twice")
        if canon in ("ctk", "ctv"):
            if not value:
                raise UsageProblem(f"KV config {text!r}: {canon} needs a cache type, e.g. {canon}=q8_0")
            fields[canon] = value.lower()
        elif canon == "rot":
            policy = value.lower()
            if policy not in ROTATION_POLICIES:
                raise UsageProblem(
                    f"KV config {text!r}: rot={value!r} is not a rotation policy; choose from {', '.join(ROTATION_POLICIES)}"
                )
            fields[canon] = policy
        else:
            fields[canon] = _parse_bool(canon, value, text)
    if not fields:
        raise UsageProblem("empty KV config: write e.g. ctk=q8_0,ctv=q4_0")
    if "fa" in fields:
        fields["fa_explicit"] = True
    return KVConfig(**fields)


def share_flash_attention(reference: KVConfig, candidate: KVConfig) -> tuple:
    """Make both sides agree on flash attention: an explicit setting on one side is inherited
    by the other; explicit and different on both sides is an error."""
    if reference.fa_explicit and candidate.fa_explicit and reference.fa != candidate.fa:
        raise UsageProblem(
            "reference and candidate must share flash attention (it changes llama.cpp's numerics): "
            f"reference has fa={'on' if reference.fa else 'off'}, candidate fa={'on' if candidate.fa else 'off'}"
        )
    if candidate.fa_explicit and not reference.fa_explicit:
        reference = replace(reference, fa=candidate.fa)
    elif reference.fa_explicit and not candidate.fa_explicit:
        candidate = replace(candidate, fa=reference.fa)
    return reference, candidate


@dataclass(frozen=True)
class CacheType:
    name: str
    ggml_type: int
    block_size: int


def validate_for_model(
    config: KVConfig,
    types: Mapping[str, CacheType],
    head_dim_k: Optional[int],
    head_dim_v: Optional[int],
    role: str,
) -> tuple:
    """Resolve ``config``'s cache types against the ggml build's own type table. Whether a type
    suits the model's heads is llama.cpp's decision, made when the context is created (forks
    pad heads, so a rule of ours would be wrong there); only with flash attention off, where
    llama.cpp does not check K and ggml would abort, is the block size checked here."""
    resolved = []
    for which, name, head_dim in (("ctk", config.ctk, head_dim_k), ("ctv", config.ctv, head_dim_v)):
        cache_type = types.get(name)
        if cache_type is None:
            offered = ", ".join(sorted(types))
            raise UsageProblem(
                f"{role} {which}={name}: this llama.cpp build has no cache type {name!r}; it offers: {offered}"
            )
        if not config.fa and which == "ctk" and head_dim and head_dim % cache_type.block_size:
            raise UsageProblem(
                f"{role} {which}={name}: block size {cache_type.block_size} does not divide the model's "
                f"head dimension {head_dim}; pick a type with a block size dividing {head_dim} (e.g. q8_0, q4_0)"
            )
        resolved.append(cache_type)
    if config.ctv not in FLOAT_TYPES and not config.fa:
        raise UsageProblem(
            f"{role} ctv={config.ctv}: a quantized V cache needs flash attention in llama.cpp; "
            "remove fa=off (flash attention is on by default)"
        )
    return tuple(resolved)
