"""The parts a KV config plays in an audit, and the choice of the sensitivity control.

A role names one llama.cpp context's KV config: the f16 ``reference``; the ``floor`` (a second
context with the reference's config, which checks the engine bit for bit); each candidate
(``cand0``, ``cand1``, ... in the order given); the sensitivity ``control``. Roles are strings,
so they stay plain keys in results, reports and across xdist workers."""

from __future__ import annotations

from dataclasses import replace
from typing import Tuple

from ..engines.kvconfig import KVConfig


class Role:
    """The role names, and what a name says. Plain strings on purpose: they are dict keys in
    results and reports and cross to xdist workers, whose serializer takes only built-in types."""

    REFERENCE = "reference"
    FLOOR = "floor"
    CONTROL = "control"
    # With a reference pack: this build's own reference config, measured against the pack's.
    DRIFT = "drift"

    @staticmethod
    def candidate(index: int) -> str:
        return f"cand{index}"


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
