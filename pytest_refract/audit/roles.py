"""The parts a KV config plays in an audit, and the choice of the sensitivity control.

A role names one llama.cpp context's KV config: the f16 ``reference``; the ``floor`` (a second
context with the reference's config, which checks the engine bit for bit); each candidate
(``cand0``, ``cand1``, ... in the order given); the sensitivity ``control``. Role names are
strings, so they stay plain keys in results, reports and across xdist workers; the runner keeps
one :class:`Role` object per name with everything that role has (config, cache types, label,
what llama.cpp said about it, its contexts)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Optional, Tuple

from ..engines.kvconfig import CacheType, KVConfig


@dataclass(eq=False)
class Role:
    """One role of the audit, and (as class attributes) the role names and what a name says.
    Names are plain strings on purpose: they are dict keys in results and reports and cross to
    xdist workers, whose serializer takes only built-in types."""

    REFERENCE: ClassVar[str] = "reference"
    FLOOR: ClassVar[str] = "floor"
    CONTROL: ClassVar[str] = "control"

    name: str
    config: KVConfig
    types: Tuple[CacheType, CacheType]
    #: The option that gave the config, for messages ("--refract-candidate").
    flag: str
    #: The config as the report names it (``ctk=q8_0,ctv=q4_0``).
    label: str
    #: A candidate's test-id prefix: "" for a single candidate, its cache types in a matrix.
    id_prefix: str = ""
    #: A candidate whose config is the reference's own (then its damage is exactly none).
    self_reference: bool = False
    #: What llama.cpp logged when it created a context for the config before any item ran
    #: (engines.kvlog.CacheLog: rotation, cache sizes), and the LLAMA_*/GGML_* environment
    #: in effect then. The floor shares the reference's.
    probe: Any = None
    env: dict = field(default_factory=dict)
    #: The role's open contexts: one sequence, and several (batched decoding); None when closed.
    context: Any = None
    sequences: Any = None
    #: When each was opened (the runner's counter): token counts list the roles in that order.
    context_opened: int = 0
    sequences_opened: int = 0
    #: The KV cache llama.cpp allocated for the config (engines.allocation), once computed.
    allocation: Optional[dict] = None
    allocation_known: bool = False

    @staticmethod
    def candidate(index: int) -> str:
        return f"cand{index}"

    @staticmethod
    def is_candidate_name(name: str) -> bool:
        return name.startswith("cand")

    @property
    def is_candidate(self) -> bool:
        return self.is_candidate_name(self.name)


# The other 16-bit rounding of each float cache type: a change in rounding only, available in
# every llama.cpp build. Wider or quantized reference types get f16, the nearest 16-bit
# rounding of their values.
_ROUNDING_ONLY = {"f16": "bf16", "bf16": "f16"}


def default_control(reference: KVConfig) -> Tuple[KVConfig, str]:
    """The rounding-only control for a reference, and a sentence saying why it was chosen."""
    ctk, ctv = (_ROUNDING_ONLY.get(t, "f16") for t in (reference.ctk, reference.ctv))
    control = replace(reference, ctk=ctk, ctv=ctv)
    if (reference.ctk, reference.ctv) == ("f16", "f16"):
        why = "bf16 cache: the same 16 bits rounded differently from the f16 reference"
    else:
        why = (f"the reference is {reference.ctk}/{reference.ctv}, not f16: the control is the nearest rounding-only "
               f"change, {ctk}/{ctv}")
    return control, why
