"""Depth: the multiple of the control's KLD by depth bucket (interval whiskers, the margin
drawn), beside the candidate's and the control's mean KLD by depth."""

from __future__ import annotations

from typing import Optional

from markupsafe import Markup

from .. import svg
from ..fmt import as_dict, dicts, is_num


def _labels(buckets) -> list:
    return [f"{b.get('from')}\u2013{b.get('to')}" for b in buckets]


def multiple_chart(section: dict) -> Optional[Markup]:
    buckets = dicts(section.get("buckets"))
    if not buckets or not any(is_num(b.get("multiple")) for b in buckets):
        return None
    margin = as_dict(section.get("verdict")).get("margin")
    cis = [b.get("multiple_ci95") if isinstance(b.get("multiple_ci95"), list) else [None, None] for b in buckets]
    series = [{"name": "multiple", "cls": "line-multiple", "values": [b.get("multiple") for b in buckets],
               "lo": [c[0] if c else None for c in cis], "hi": [c[1] if c and len(c) > 1 else None for c in cis]}]
    return svg.lines(series, _labels(buckets), width=440, height=260, label="Multiple of the control's KLD by depth",
                     y_title="candidate KLD / control KLD", value_fmt=lambda v: format(v, ".3g"),
                     hline=margin if is_num(margin) else None,
                     hline_label=f"margin {margin:g}\u00d7" if is_num(margin) else "")


def kld_chart(section: dict) -> Optional[Markup]:
    buckets = dicts(section.get("buckets"))
    if not buckets or not any(is_num(b.get("mean_kld")) for b in buckets):
        return None
    series = [{"name": "candidate", "cls": "line-cand", "values": [b.get("mean_kld") for b in buckets]},
              {"name": "control", "cls": "line-ctrl", "values": [b.get("control_mean_kld") for b in buckets]}]
    return svg.lines(series, _labels(buckets), width=440, height=260, label="Mean KLD by depth",
                     y_title="mean KLD (nats)", value_fmt=lambda v: format(v, ".3g"))


def view(section: dict, report: dict) -> dict:
    return {"multiple_chart": multiple_chart(section), "kld_chart": kld_chart(section),
            "buckets": dicts(section.get("buckets")), "growth": as_dict(section.get("growth")),
            "where": as_dict(as_dict(section.get("verdict")).get("detail")).get("where")}
