"""R-NIAH: the (haystack length x needle position) grid of cells for the heatmap."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..fmt import dicts, is_num


def cell_na(cell: dict) -> bool:
    """The reference never retrieves here: nothing to score."""
    return cell.get("status") == "n/a" or (is_num(cell.get("ref_hits")) and cell["ref_hits"] == 0)


def degradation(cell: dict) -> Optional[float]:
    d = cell.get("degradation")
    if is_num(d):
        return min(max(float(d), 0.0), 1.0)
    ref, cand, trials = cell.get("ref_hits"), cell.get("cand_hits"), cell.get("trials")
    if is_num(ref) and is_num(cand) and is_num(trials) and trials > 0:
        return min(max((ref - cand) / trials, 0.0), 1.0)
    return None


def heat_rows(cells: List[dict]) -> Tuple[List[float], List[Tuple[Any, List[Optional[dict]]]]]:
    """(positions, [(length, [cell view or None per position])]); empty when the cells give
    no grid. A cell view: the cell, whether it is n/a, and its degradation."""
    lengths = sorted({c["length"] for c in cells if is_num(c.get("length"))})
    positions = sorted({round(c["position"], 6) for c in cells if is_num(c.get("position"))})
    if not lengths or not positions:
        return [], []
    grid: Dict[Tuple[float, float], dict] = {}
    for c in cells:
        if is_num(c.get("length")) and is_num(c.get("position")):
            grid[(c["length"], round(c["position"], 6))] = c
    rows = []
    for length in lengths:
        row: List[Optional[dict]] = []
        for p in positions:
            cell = grid.get((length, p))
            row.append(None if cell is None else {"cell": cell, "na": cell_na(cell), "d": degradation(cell)})
        rows.append((length, row))
    return positions, rows


def view(section: dict, report: dict) -> dict:
    cells = dicts(section.get("cells"))
    positions, rows = heat_rows(cells)
    return {"positions": positions, "rows": rows,
            "answered": [(c, dicts(c.get("answers"))) for c in cells if dicts(c.get("answers"))]}
