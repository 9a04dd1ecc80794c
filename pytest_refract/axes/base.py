"""The axis protocol, for axes of your own (see examples/custom_axis/ and the README).

An axis is any object with the attributes below; subclass :class:`Axis` to get the optional
ones with their defaults. Return instances from the ``pytest_refract_axes(config)`` hook and
they run beside the built-in four: their items are ``test_<NAME>[<unit id>]``, their score
joins the composite, the terminal summary, the JSON (``axes.<NAME>``) and the HTML report.

What an axis receives as ``run`` (the runner's facade, pytest_refract.audit.run.Run) and may use:

- ``run.settings`` (the parsed options), ``run.inputs`` (``prompts``, ``chat_tokens(text)``,
  ``plain_tokens(text)``, ``corpus``, ...), ``run.detokenize(tokens)``;
- ``run.greedy(role, prompts, n_predict)``: greedy token ids per prompt under ``role``'s KV
  config, decoded together up to --refract-decode-batch sequences;
- ``run.reference.greedy(prompts, n_predict)``: the same for the reference, from the
  reference cache when it holds them;
- ``run.context(role)``: the role's engine context, for evaluation of your own.

An item's unit is a :class:`Unit`: ``unit.id``, ``unit.keywords``, the axis's own
``unit.payload``, and (set by the runner) ``unit.axis``, ``unit.candidate`` (the role to
measure: a candidate, or the sensitivity control) and ``unit.batch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Unit:
    """One item of an axis, as every layer reads it.

    An axis's ``units(run)`` makes them with ``id``, ``keywords`` and ``payload`` (whatever
    its ``measure`` needs: a prompt, a chunk number; JSON-able values or prompts, since they
    key the sensitivity control's cached results). The runner then fills in the rest for each
    item: the ``axis`` name, the ``candidate`` role the item measures and its decode ``batch``
    number (None when the axis does not decode in batches)."""

    id: str
    keywords: Tuple[str, ...] = ()
    payload: Mapping[str, Any] = field(default_factory=dict, hash=False)
    axis: str = ""
    candidate: Optional[str] = None
    batch: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "keywords", tuple(self.keywords))  # a list given stays immutable

    def for_item(self, axis: str, candidate: str, batch: Optional[int]) -> "Unit":
        """This unit as the item of ``axis`` that measures ``candidate``."""
        return replace(self, axis=axis, candidate=candidate, batch=batch)

    def __getitem__(self, key):
        # Indexing a unit like a mapping is a slip worth a sentence: say what to read instead.
        raise TypeError(f"a unit is a pytest_refract.axes.Unit, not a dict: read unit.id, unit.candidate, "
                        f"unit.batch, unit.keywords, or unit.payload[{key!r}] for the axis's own data")


class Axis:
    #: The axis name: test ids ``test_<NAME>[...]``, ``--refract-axes``, ``axes.<NAME>`` in the JSON.
    NAME: str = ""

    @property
    def TITLE(self) -> str:  # noqa: N802 (a constant in subclasses, like NAME)
        """Its display name; subclasses set it as a class attribute. Default: NAME."""
        return self.NAME

    #: What the axis's inputs are loaded for: any of "prompts", "corpus", "haystack".
    NEEDS: Tuple[str, ...] = ()
    #: What the progress line calls a unit where its id alone does not say (R-NIAH: "cell").
    UNIT_NOUN: str = ""
    #: What the axis's items are called in progress lines and skip reasons ("chunks").
    ITEMS_NOUN: str = "items"
    #: Decode-batch widths of units per batch for axes that decode in batches; 0 for none.
    BATCHED: int = 0
    #: The axis's own random stream for bootstrap draws; None: its name, hashed.
    STREAM: Optional[int] = None
    #: Keys of an item result that only the axis's aggregate reads (they travel from xdist
    #: workers with the result) and the report never shows.
    PRIVATE_KEYS: Tuple[str, ...] = ()
    #: The section key of the per-item list.
    ITEMS_KEY: str = "items"
    #: Item result keys shown in an item's pytest-html extras, when present.
    EXTRA_KEYS: Tuple[str, ...] = ("score", "band")
    #: Rows for ``python -m pytest_refract compare``: (label, dotted key in the section, format,
    #: higher is better); the score row is always there.
    COMPARE_METRICS: Tuple[tuple, ...] = ()

    def units(self, run) -> List[Unit]:
        """The items, decided at collection time: each a :class:`Unit` with a unique ``id``
        (the test id part), optional ``keywords`` (for ``-k``) and the axis's ``payload``."""
        raise NotImplementedError

    def planned_tokens(self, run, unit) -> int:
        """Tokens the item will feed the engine, for the progress line only."""
        return 0

    def measure(self, run, unit: Unit) -> dict:
        """Measure one item for ``unit.candidate``: a JSON-able dict with ``id``, ``score``
        (0-100, or None for "not scored") and ``band``."""
        raise NotImplementedError

    def aggregate(self, results: List[dict]) -> dict:
        """The axis section from its items' results: ``score``, ``band``, the items under
        ITEMS_KEY. Default: the mean item score."""
        from ..scoring.metrics import band_for

        scored = [r["score"] for r in results if r.get("score") is not None]
        score = sum(scored) / len(scored) if scored else None
        return {"score": score, "band": band_for(score), "n_items": len(results), self.ITEMS_KEY: results,
                "wall_s": sum(r.get("wall_s", 0.0) for r in results)}

    def section_items(self, section: dict) -> List[dict]:
        """The per-item list of one of this axis's sections. A section whose items failed to
        measure keeps them under "items" whatever ITEMS_KEY says (the JSON has always done so)."""
        return section.get(self.ITEMS_KEY) or section.get("items") or []

    def cache_reads(self, run) -> dict:
        """Everything besides the unit that an item's result depends on: part of the cache key
        of the sensitivity control's results. Default: every setting."""
        return run.settings.as_dict()

    def diagnose(self, section: dict, axes: dict) -> List[str]:
        """Sentences for the report's diagnosis (called for a scored axis)."""
        return []

    def control_diagnosis(self, section: dict, control_section: dict) -> List[str]:
        return []

    def item_detail(self, item: dict) -> str:
        """The detail beside a worst item in the terminal summary."""
        return ""

    def section_detail(self, section: dict, control: bool = False) -> str:
        """The figures on the axis's terminal summary line."""
        return ""

    def section_facts(self, run) -> dict:
        return {}

    def settings_facts(self, run) -> dict:
        return {}

    def item_table(self, items: Sequence[dict]):
        """(ids, one row per scored item) from which ``statistic`` recomputes the axis score,
        for the raw score's bootstrap intervals. Default: the item scores."""
        scored = [i for i in items if i.get("score") is not None]
        values = np.asarray([float(i["score"]) for i in scored], dtype=np.float64)
        return [str(i["id"]) for i in scored], values.reshape(len(scored), 1)

    def statistic(self, table: np.ndarray) -> np.ndarray:
        """The axis score of a table (n, k), or of stacked tables (..., n, k). Default: the mean."""
        return np.asarray(table, dtype=np.float64)[..., 0].mean(axis=-1)


    # ------------------------------------------------------------------ the verdict (scoring/verdict.py)
    #: What the axis's damage is called in the verdict's headline ("next-token KLD").
    DAMAGE_LABEL: Optional[str] = None
    #: The verdict margin on the multiple of the control's damage (PASS at or below it).
    MARGIN: Optional[float] = None
    #: The damage a candidate may have when no control was measured at all (with a control the
    #: verdict always tests the multiple, however small the control's damage).
    ABSOLUTE_TOLERANCE: Optional[float] = None
    #: Kept for axes written against earlier versions; the verdict no longer reads it.
    DAMAGE_RESOLUTION: Optional[float] = None
    #: A control damage above this is more than a rounding-only change can cause: the yardstick
    #: is broken. None: only a control scoring 0 is.
    CONTROL_MAX_DAMAGE: Optional[float] = None
    #: Whether a damage of 0 on every item is exact (bit-identical) rather than a count of 0
    #: events that a zero-event bound must qualify.
    ZERO_DAMAGE_EXACT: bool = False
    #: Whether column 0 of the damage table counts whole units (flipped tokens, lost
    #: retrievals): a control with few of them then has count noise the paired bound cannot see,
    #: and a FAIL also needs the candidate beyond the margin times the control's Poisson bound.
    DAMAGE_COUNTS: bool = False

    def damage_table(self, items: Sequence[dict]):
        """(ids, (n, 2) table) whose ``damage`` is the axis's damage, 0 for "identical to the
        reference". Default: per scored item (1 - score/100, 1), i.e. the mean lost score share."""
        scored = [i for i in items if i.get("score") is not None]
        rows = [(max(0.0, 1.0 - float(i["score"]) / 100.0), 1.0) for i in scored]
        return [str(i["id"]) for i in scored], np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)

    def item_damage_text(self, row, control_row) -> str:
        """One item's damage beside the control's on the same item, from the two ``damage_table``
        rows (damage numerator, exposure): what a per-item row shows instead of a band. Default:
        the item's damage (numerator over exposure) and the control's, and their ratio where the
        control has any."""
        mine, theirs = _per_item(row), _per_item(control_row)
        label = self.DAMAGE_LABEL or "damage"
        return f"{label} {mine:.3g} vs {theirs:.3g} in the control" + _times(mine, theirs)

    def damage(self, table: np.ndarray) -> np.ndarray:
        """The damage of a table (n, 2) or a stack (..., n, 2). Default: sum of column 0 over
        sum of column 1."""
        from ..scoring.verdict import ratio_of_sums

        return ratio_of_sums(table)


def _per_item(row) -> float:
    """An item's own damage: its numerator over its exposure (0 with nothing exposed)."""
    num, den = float(row[0]), float(row[1])
    return num / den if den > 0 else 0.0


def _times(mine: float, theirs: float) -> str:
    """ " (3.0x)": the item's damage as a multiple of the control's, where the control has any."""
    return f" ({mine / theirs:.1f}\u00d7)" if theirs > 0 else ""
