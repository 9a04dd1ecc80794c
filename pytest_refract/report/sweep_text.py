"""The sweep in the terminal: a compact K x V grid of verdicts (rows K, columns V) with each
pair's KV bytes per token, and the one line that answers "which cache should I ship"."""

from __future__ import annotations

from typing import List, Optional

from .sweep import drawn_types, reasons

_COLOURS = {"PASS": "green", "UNDECIDED": "yellow", "FAIL": "red"}
WIDTH = 16


def cell_text(cell: Optional[dict], recommended: Optional[str], reference_pair: bool) -> str:
    """``PASS 272``: the pair's own verdict and bytes per token; ``*`` marks the recommendation;
    skipped, refused and the control are named; ``ref`` is the reference's own pair."""
    if reference_pair:
        return "reference"
    if cell is None:
        return "-"
    if cell.get("refused"):
        return "refused"
    if cell.get("excluded"):
        return "control"
    kv = cell.get("kv_bytes_per_token")
    size = "" if kv is None else f" {kv:.0f}"
    if cell.get("skipped"):
        return f"skipped{size}"
    mark = "*" if cell["candidate"] == recommended else ""
    return f"{mark}{cell.get('verdict') or 'n/a'}{size}"


def grid_lines(sweep: dict, reference: Optional[str]) -> List[List[tuple]]:
    """(text, verdict) pieces of each grid line, the header first."""
    grid = sweep["grid"]
    recommended = (sweep.get("recommendation") or {}).get("config")
    ref = dict(p.split("=", 1) for p in (reference or "").split(",") if "=" in p)
    rows, columns = drawn_types(grid)
    lines = [[("K \\ V".ljust(10), None)] + [(c.ljust(WIDTH), None) for c in columns]]
    for k in rows:
        row = [(k.ljust(10), None)]
        for v in columns:
            cell = grid["cells"].get(k, {}).get(v)
            text = cell_text(cell, recommended, (ref.get("ctk"), ref.get("ctv")) == (k, v))
            verdict = None if cell is None or cell.get("skipped") else cell.get("verdict")
            row.append((text.ljust(WIDTH), verdict))
        lines.append(row)
    return lines


def reason_lines(word: str, entries: List[dict], most: int = 3) -> List[str]:
    """``skipped: 125 pairs, for 4 reasons`` then the first reasons with their counts: a sweep of
    every type skips or refuses a hundred pairs for a handful of reasons (all in the JSON)."""
    if not entries:
        return []
    grouped = reasons(entries)
    lines = [f"  {word}: {len(entries)} pair{'s' if len(entries) > 1 else ''}"
             + (f", for {len(grouped)} reasons" if len(grouped) > 1 else "")]
    for why, labels in grouped[:most]:
        lines.append(f"    {len(labels)} ({labels[0]}{', ...' if len(labels) > 1 else ''}): {why}")
    if len(grouped) > most:
        lines.append(f"    {len(grouped) - most} more reasons: see the JSON report's sweep.{word}")
    return lines


def render_sweep(tr, sweep: dict, reference: Optional[str]) -> None:
    tr.write_line("")
    tr.write_line("sweep: each pair's verdict and KV bytes per token (rows: K type, columns: V type; * recommended)",
                  bold=True)
    for row in grid_lines(sweep, reference):
        tr.write("  ")
        for text, verdict in row:
            tr.write(text, **({_COLOURS[verdict]: True} if verdict in _COLOURS else {}))
        tr.write_line("")
    # The JSON lists the control's pair among the skipped; it is no candidate (the grid says "control").
    cells = sweep["grid"]["cells"]
    control = {c.get("candidate") for row in cells.values() for c in row.values() if c and c.get("excluded")}
    skipped = [e for e in sweep["skipped"] if e.get("candidate") not in control]
    for word, entries in (("skipped", skipped), ("refused", sweep["refused"])):
        for line in reason_lines(word, entries):
            tr.write_line(line)
    rec = sweep.get("recommendation")
    if rec:
        tr.write_line(rec["line"], green=True, bold=True)
    else:
        tr.write_line("recommended: none; no candidate PASSes on every axis at the family's error", red=True, bold=True)
    if sweep.get("budget"):
        tr.write_line(sweep["budget"]["line"], bold=True)
