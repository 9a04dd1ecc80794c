"""--refract-sweep: the K x V pairs of some cache types as candidates, each judged by llama.cpp
before any item runs, ordered cheapest cache first.

The types are checked against the loaded ggml build's own table (the engine's cache_types);
``all`` is every type in it. Every pair except the reference's own config is a candidate and
inherits the reference's other settings (flash attention, rotation policy, nkvo, swa_full), as a
candidate given by --refract-candidate shares them. A small context is created for each side
first (the type as K beside the reference's V, as V beside the reference's K): a type llama.cpp
refuses on a side rules out every pair with it there, listed with llama.cpp's reason; every
other pair is then probed itself, and one llama.cpp refuses is listed the same way, never
measured. The pair equal to the sensitivity control is its yardstick, not a candidate."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..engines.base import ContextRefused
from ..engines.kvconfig import CacheType, KVConfig, validate_for_model
from ..errors import UsageProblem

FLAG = "--refract-sweep"


@dataclass
class Probed:
    """A pair llama.cpp accepted: its config, resolved types, what it logged, its environment."""

    config: KVConfig
    types: Tuple[CacheType, CacheType]
    facts: object
    env: dict


@dataclass
class SweepPlan:
    types: List[str]                                   # the types swept, fewest bytes per value first
    pairs: List[str]                                   # every K x V pair but the reference's own, as labels
    accepted: List[Probed] = field(default_factory=list)
    refused: List[dict] = field(default_factory=list)  # {"candidate", "why"}: llama.cpp's reason
    excluded: List[dict] = field(default_factory=list)  # {"candidate", "why"}: not a candidate (the control)

    def as_json(self) -> dict:
        return {"types": list(self.types), "pairs": list(self.pairs), "refused": [dict(r) for r in self.refused],
                "excluded": [dict(r) for r in self.excluded]}


def swept_types(asked: Sequence[str], table: Mapping[str, CacheType], value_bytes: Callable[[CacheType], float]) -> List[str]:
    """The types to sweep, fewest bytes per value first (then by name): ``asked`` as written,
    or every type of the build for ``all``. A type the build lacks is a usage error naming
    what it offers."""
    if tuple(asked) == ("all",):
        names = list(table)
    else:
        unknown = [t for t in asked if t not in table]
        if unknown:
            raise UsageProblem(f"{FLAG}: this llama.cpp build has no cache type {unknown[0]!r}; it offers: "
                               f"{', '.join(sorted(table))} (or all)")
        names = list(asked)
    return sorted(names, key=lambda n: (value_bytes(table[n]), n))


def pair_configs(types: Sequence[str], reference: KVConfig) -> List[KVConfig]:
    """Every K x V pair of ``types`` but the reference's own, K-major, with the reference's
    other settings."""
    return [replace(reference, ctk=k, ctv=v, fa_explicit=False)
            for k in types for v in types if (k, v) != (reference.ctk, reference.ctv)]


def plan_sweep(asked: Sequence[str], reference: KVConfig, control: Optional[KVConfig], table: Mapping[str, CacheType],
               head_dims: Tuple[Optional[int], Optional[int]], value_bytes: Callable[[CacheType], float],
               probe: Callable[[KVConfig, Tuple[CacheType, CacheType]], Tuple[object, dict]],
               check: Callable[[KVConfig, Tuple[CacheType, CacheType], object], Optional[str]],
               screen: Optional[Callable[[List[Tuple[KVConfig, Tuple[CacheType, CacheType]]]], None]] = None
               ) -> SweepPlan:
    """The sweep's pairs, each accepted (with what llama.cpp logged) or refused with its reason.
    ``probe(config, types)``: create and free a small context (raises ContextRefused);
    ``check(config, types, facts)``: a problem with what was created (a substituted type, a
    rotation not honoured), or None; ``screen(configs)``: told every per-side config the
    block check lets through, all at once, before the first is probed (so a type that would
    abort the process is tried in one child process for all of them; engines/isolated.py)."""
    types = swept_types(asked, table, value_bytes)
    configs = pair_configs(types, reference)
    plan = SweepPlan(types, [c.label() for c in configs])

    def judge(config: KVConfig) -> Tuple[Optional[Probed], Optional[str]]:
        try:
            resolved = validate_for_model(config, table, head_dims[0], head_dims[1], FLAG)
        except UsageProblem as exc:
            return None, str(exc).replace(f"{FLAG} ", "", 1)
        try:
            facts, env = probe(config, resolved)
        except ContextRefused as exc:
            text = str(exc)
            return None, text if text.startswith("llama.cpp") else f"llama.cpp refused it: {text}"
        problem = check(config, resolved, facts)
        if problem:
            return None, problem
        return Probed(config, resolved, facts, env), None

    # One context per type and side first: a side llama.cpp refuses rules out its row or column.
    sides = [(t, side, config) for t in types
             for side, config in ((0, replace(reference, ctk=t, fa_explicit=False)),
                                  (1, replace(reference, ctv=t, fa_explicit=False)))
             if (config.ctk, config.ctv) != (reference.ctk, reference.ctv)]
    if screen is not None:
        fitting = []
        for _t, _side, config in sides:
            try:
                fitting.append((config, validate_for_model(config, table, head_dims[0], head_dims[1], FLAG)))
            except UsageProblem:
                continue  # the block check refuses it in judge, with its reason
        screen(fitting)
    side_refused: Dict[Tuple[int, str], str] = {}
    for t, side, config in sides:
        _probed, why = judge(config)
        if why is not None:
            side_refused[(side, t)] = (f"{'K' if side == 0 else 'V'} type {t} refused (probed as {config.label()}): "
                                       f"{why}")
    for config in configs:
        why = side_refused.get((0, config.ctk)) or side_refused.get((1, config.ctv))
        if why is None and control is not None and (config.ctk, config.ctv) == (control.ctk, control.ctv):
            plan.excluded.append({"candidate": config.label(),
                                  "why": "the sensitivity control: every candidate's damage is divided by its damage"})
            continue
        probed = None
        if why is None:
            probed, why = judge(config)
        if probed is None:
            plan.refused.append({"candidate": config.label(), "why": why})
        else:
            plan.accepted.append(probed)
    return plan
