"""Which config to ship, with the chance of recommending one at or beyond the margin held at the
PASS side's error however many candidates compete. Pure functions, numpy only.

Every candidate's own PASS is wrong at most 2.5 % of the time; with eight candidates at the
margin sharing one control, *some* PASS is wrong far more often, and a ranking that offers the
smallest PASSing cache offers exactly that one. ``recommend`` tests the candidates as a family
instead, by serial gatekeeping over cache size, fixed before any item is read:

- The candidates are grouped by KV-cache bytes per token, largest first (a larger cache stores
  more bits and is expected to lose less; candidates of unknown size come last, as one group).
- Group by group, Holm's step-down decides which members PASS at the family's error: with r of
  the group's g members passed so far, the rest are tested at error / (g - r), repeatedly, until
  no more pass. A member PASSes when every axis PASSes at that error (scoring/verdict.margin_test,
  with the axis's own PASS error scaled by the same factor).
- The next, smaller group is tested only when every member of this one PASSed.

Serial gatekeeping with a family-wise procedure inside each gate controls the family-wise error
strongly, so the chance that *any* candidate at or beyond the margin is declared PASS here, and
so the chance that the recommendation (the smallest-cache candidate declared PASS) is one, is
at most the error: 2.5 %, whatever the number of candidates. The price: a candidate behind a
larger cache that did not PASS is not tested at all ("not tested").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import verdict as V

NOT_TESTED = "not tested"
NOT_PASS = "not PASS"


@dataclass(frozen=True)
class Contender:
    """One candidate: its label, KV-cache bytes per token (None: unknown), per axis the paired
    tables (candidate, control) whose rows are the same items, and per axis the PASS error its
    own verdict was read at (a sequential look's; default the fixed-sample 2.5 %)."""

    label: str
    kv_bytes_per_token: Optional[float]
    tables: Mapping[str, Tuple[np.ndarray, np.ndarray]]
    pass_errors: Mapping[str, float] = field(default_factory=dict)
    exact: bool = False     # the reference's own config: a zero damage is exact
    score: Optional[float] = None   # its verdict score: breaks a tie between equal caches


@dataclass
class Recommendation:
    recommended: Optional[str]
    decisions: Dict[str, str]            # label -> PASS / not PASS / not tested
    factors: Dict[str, float]            # label -> the factor its PASS errors were divided by
    order: List[List[str]]               # the gates, largest cache first (one gate: Holm over all)
    error: float
    method: str = "serial gatekeeping by KV bytes per token (largest first), Holm within a gate"

    def as_json(self) -> dict:
        return {"recommended": self.recommended, "decisions": dict(self.decisions),
                "error_factors": dict(self.factors), "gates": [list(g) for g in self.order],
                "family_error": self.error,
                "method": self.method,
                "guarantee": (f"the chance of recommending a config at or beyond the margin is at most "
                              f"{100 * self.error:.1f} %, however many candidates compete")}


def _passes(contender: Contender, axes: Mapping[str, Any], factor: float, min_pass_items: int) -> bool:
    """Whether every axis of the contender PASSes with its PASS errors divided by ``factor``."""
    if not contender.tables:
        return False
    for name, (cand, ctrl) in contender.tables.items():
        axis = axes[name]
        err = contender.pass_errors.get(name, (1.0 - V.LEVEL) / 2) / factor
        test = V.margin_test(np.asarray(cand, float), np.asarray(ctrl, float), float(V.member(axis, "MARGIN", V.DEFAULT_MARGIN)),
                             err, err, V._as_ratio_of_sums(axis.damage),
                             contender.exact or bool(V.member(axis, "ZERO_DAMAGE_EXACT", False)),
                             bool(V.member(axis, "DAMAGE_COUNTS", False)), 0 if contender.exact else min_pass_items)
        if str(test.verdict) != V.PASS:
            return False
    return True


def gates(contenders: Sequence[Contender]) -> List[List[Contender]]:
    """The contenders grouped by KV bytes per token, largest first; unknown sizes last."""
    sizes = sorted({c.kv_bytes_per_token for c in contenders if c.kv_bytes_per_token is not None}, reverse=True)
    out = [[c for c in contenders if c.kv_bytes_per_token == s] for s in sizes]
    unknown = [c for c in contenders if c.kv_bytes_per_token is None]
    return out + ([unknown] if unknown else [])


def recommend(contenders: Sequence[Contender], axes: Mapping[str, Any], error: float = (1.0 - V.LEVEL) / 2,
              min_pass_items: int = V.MIN_ITEMS_FOR_PASS, by_rows: bool = False) -> Recommendation:
    """The family-wise decision over ``contenders`` (see the module docstring). ``axes``: axis
    name -> an object with the verdict members (MARGIN, damage, ZERO_DAMAGE_EXACT,
    DAMAGE_COUNTS). ``error`` scales each contender's own PASS errors (the default 2.5 % leaves
    them as read)."""
    scale = error / ((1.0 - V.LEVEL) / 2)
    decisions = {c.label: NOT_TESTED for c in contenders}
    factors: Dict[str, float] = {}
    recommended: Optional[str] = None
    if by_rows:
        return _holm_over_rows(contenders, axes, scale, error, min_pass_items)
    order = gates(contenders)
    for group in order:
        passed: List[Contender] = []
        left = list(group)
        while left:
            factor = len(left) / scale
            now = [c for c in left if _passes(c, axes, factor, min_pass_items)]
            for c in left:
                factors[c.label] = factor
            if not now:
                break
            passed += now
            left = [c for c in left if c not in now]
        for c in group:
            decisions[c.label] = V.PASS if c in passed else NOT_PASS
        if passed:
            recommended = passed[0].label  # equal caches: the first passed at the strictest error
        if left:
            break
    return Recommendation(recommended, decisions, factors, [[c.label for c in g] for g in order], error)


HOLM_OVER_ROWS = ("Holm over rows (one row per K type and its other settings), each row tested in a fixed "
                  "sequence from its largest cache down; the recommendation is the smallest cache that PASSes")


def row_key(label: str) -> str:
    """The row a config belongs to: its label without the V type (its K type and the rest)."""
    return ",".join(p for p in label.split(",") if not p.startswith("ctv="))


def rows(contenders: Sequence[Contender]) -> List[List[Contender]]:
    """The contenders grouped by row (row_key), each row largest cache first (unknown sizes
    last, then by label); rows in order of first appearance."""
    out: Dict[str, List[Contender]] = {}
    for c in contenders:
        out.setdefault(row_key(c.label), []).append(c)
    return [sorted(r, key=lambda c: (c.kv_bytes_per_token is None, -(c.kv_bytes_per_token or 0.0), c.label))
            for r in out.values()]


def _holm_over_rows(contenders: Sequence[Contender], axes: Mapping[str, Any], scale: float, error: float,
                    min_pass_items: int) -> Recommendation:
    """A sweep's procedure, declared before its first item: every row (one K type) is a fixed
    sequence from its largest cache down, and Holm runs over the rows. With u rows not yet
    wholly PASSed, each row's next config is tested at error / u; a PASS moves that row on to
    its next config, a row stops at its first config that does not PASS, and the rounds repeat
    until nothing more PASSes.

    Why it holds the family's error: it is a sequential rejection procedure (Goeman and Solari,
    2010) whose levels only grow as configs PASS (u shrinks), and when exactly the configs truly
    within the margin have PASSed, the configs at or beyond it that can be tested are at most
    one per unfinished row, each at error / u, together at most the error. So the chance that
    any config at or beyond the margin PASSes, and so that the recommendation is one, is at most
    the error, under any dependence (the candidates share one control). Against Holm over every
    pair, no test runs at error / 60 (where a test's own level is least reliable) and a
    K-sensitive pair stops only its own row, not every smaller cache."""
    ordered = rows(contenders)
    decisions = {c.label: NOT_TESTED for c in contenders}
    factors: Dict[str, float] = {}
    at = [0] * len(ordered)
    while True:
        unfinished = [i for i, r in enumerate(ordered) if at[i] < len(r)]
        if not unfinished:
            break
        factor = len(unfinished) / scale
        moved = False
        for i in unfinished:
            c = ordered[i][at[i]]
            factors[c.label] = factor
            if _passes(c, axes, factor, min_pass_items):
                decisions[c.label] = V.PASS
                at[i] += 1
                moved = True
        if not moved:
            break
    for i, r in enumerate(ordered):
        if at[i] < len(r):
            decisions[r[at[i]].label] = NOT_PASS
    passed = [c for c in contenders if decisions[c.label] == V.PASS]
    best = smallest(passed)
    return Recommendation(best.label if best else None, decisions, factors, [[c.label for c in r] for r in ordered],
                          error, method=HOLM_OVER_ROWS)


def smallest(contenders: Sequence[Contender]) -> Optional[Contender]:
    """The contender with the smallest known KV cache, ties by the higher score, then label."""
    known_size = [c for c in contenders if c.kv_bytes_per_token is not None]
    if not known_size:
        return None
    return min(known_size, key=lambda c: (c.kv_bytes_per_token, -(c.score if c.score is not None else float("-inf")),
                                          c.label))


def passes_at(contender: Contender, axes: Mapping[str, Any], factor: float, error: float = (1.0 - V.LEVEL) / 2,
              min_pass_items: int = V.MIN_ITEMS_FOR_PASS) -> bool:
    """Whether ``contender`` PASSes with its PASS errors divided by ``factor`` (at a family
    error ``error``): factor 1 is the loosest level a sweep's procedure ever uses, the number
    of rows the strictest."""
    return _passes(contender, axes, factor / (error / ((1.0 - V.LEVEL) / 2)), min_pass_items)
