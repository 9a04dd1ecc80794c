"""PLAD's floor score: the mean of the items' floor scores, or None when an item's floor excess
is no finite number (item_score gives None there, never a number standing in for it)."""

from __future__ import annotations

import math

import pytest

from pytest_refract.axes.plad import PLADAxis, item_score
from pytest_refract.inputs.perturb import PERTURBATIONS


def _item(floor_excess):
    return {"perturbation": PERTURBATIONS[0], "score": 90.0, "floor_excess": floor_excess, "wall_s": 0.0}


def test_floor_score_is_the_mean_of_the_items_floor_scores():
    section = PLADAxis().aggregate([_item(0.0), _item(0.5)])
    assert section["floor_score"] == pytest.approx((item_score(0.0) + item_score(0.5)) / 2)


@pytest.mark.parametrize("excess", [math.inf, math.nan, None])
def test_a_floor_excess_that_is_no_number_leaves_the_floor_score_unmeasured(excess):
    section = PLADAxis().aggregate([_item(0.0), _item(excess)])
    assert section["floor_score"] is None
    assert section["score"] == pytest.approx(90.0)  # the axis's own score is untouched
