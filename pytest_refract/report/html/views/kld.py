"""KLD: the percentile chart and the per-chunk chart."""

from __future__ import annotations

import math
from typing import Optional

from markupsafe import Markup

from .. import svg
from ..fmt import as_dict, dicts, is_num, num

# (key in kld_percentiles, label on the chart), in the order drawn
PERCENTILES = (("median", "median"), ("90", "p90"), ("95", "p95"), ("99", "p99"), ("99.9", "p99.9"), ("max", "max"))


def percentile_chart(section: dict) -> Optional[Markup]:
    pcts = as_dict(section.get("kld_percentiles"))
    bars = [{"label": label, "value": pcts.get(key), "cls": "bar-kld",
             "title": f"{label}: {num(pcts.get(key), '.5f')} nats"} for key, label in PERCENTILES]
    if not any(is_num(b["value"]) for b in bars):
        return None
    return svg.bars(bars, width=440, height=260, label="KLD percentiles", y_title="KLD (nats)",
                    value_fmt=lambda v: format(v, ".3g"))


def chunk_chart(section: dict) -> Optional[Markup]:
    chunks = dicts(section.get("items"))
    if not chunks:
        return None
    bars = []
    for k, c in enumerate(chunks):
        index = c.get("chunk") if is_num(c.get("chunk")) else k
        bars.append({"label": format(index, "g"), "value": c.get("mean_kld"), "err": c.get("mean_kld_unc"),
                     "cls": "bar-chunk",
                     "title": f"chunk {index:g}: mean KLD {num(c.get('mean_kld'), '.5f')}"
                              f" ± {num(c.get('mean_kld_unc'), '.5f')}"})
    return svg.bars(bars, width=680, height=260, label="Mean KLD per chunk", y_title="mean KLD (nats)",
                    value_fmt=lambda v: format(v, ".3g"), show_values=False,
                    label_every=max(1, math.ceil(len(bars) / 32)), hline=section.get("mean_kld"))


def view(section: dict, report: dict) -> dict:
    return {"percentile_chart": percentile_chart(section), "chunk_chart": chunk_chart(section),
            "chunks": dicts(section.get("items")),
            "paired": any(isinstance(c.get("vs_control"), dict) for c in dicts(section.get("items")))}
