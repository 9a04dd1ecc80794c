"""The terminal summary: what a user reads when CI goes red. It reads only the report dict;
each axis's own figures come from its axis object (``section_detail``, ``item_detail``)."""

from __future__ import annotations

from typing import Optional

from ..axes import BUILTIN, known
from ..axes.depth import bucket_lines as depth_lines
from ..scoring.metrics import band_for
from ..scoring.verdict import miss_text

_COLOURS = {"EXCELLENT": "green", "PASS": "green", "DEGRADED": "yellow", "FAIL": "red", None: "red"}


def _fmt(score) -> str:
    return "n/a" if score is None else f"{score:6.2f}"


def _ci(interval) -> str:
    return "" if not interval else f" [{interval[0]:.2f}, {interval[1]:.2f}]"


def _worst(name: str, axis, section: dict, n: int = 3):
    """The items that lost the most: beside the control's same item where the report paired
    them (a verdict report), else by raw score and band."""
    paired = [i for i in axis.section_items(section) if (i.get("vs_control") or {}).get("text")]
    if paired:
        paired.sort(key=lambda i: -i["vs_control"]["damage"])
        return [f"{name}[{i['id']}] {i['vs_control']['text']}" for i in paired[:n] if i["vs_control"]["damage"] > 0]
    items = [i for i in axis.section_items(section) if i.get("score") is not None]
    items.sort(key=lambda i: i["score"])
    out = []
    for i in items[:n]:
        if i["score"] >= 100.0:
            break
        out.append(f"{name}[{i['id']}] {i['score']:.2f} {i['band']} ({axis.item_detail(i)})")
    return out


def render(tr, report: dict, json_path, registry=None) -> None:
    """``registry``: name -> axis object (axes.resolve); the built-ins when not given."""
    registry = BUILTIN if registry is None else registry
    tr.write_sep("=", "refract KV-cache audit")
    model = report["model"]
    tr.write_line(f"model      {model['name']} ({model['path']}, {model['size_bytes'] / 1e6:.1f} MB, {model['architecture']})")
    tr.write_line(f"reference  {report['reference']}")
    if report.get("reference_ran"):
        _render_ran(tr, report["reference_ran"])
    if report.get("context_evidence"):
        tr.write_line(f"context    {report['context_evidence']['text']}",
                      yellow=not report["context_evidence"]["depth_axis"])
    if report["settings"].get("chunks_note"):
        tr.write_line(f"note       {report['settings']['chunks_note']}")
    merged = ((report["settings"].get("rniah") or {}).get("merged_cells")) or []
    if merged:
        pairs = ", ".join(f"{m['cell']} = {m['same_as']}" for m in merged[:3]) + (" ..." if len(merged) > 3 else "")
        tr.write_line(f"note       {len(merged)} R-NIAH cell(s) put their needles where another cell does and count "
                      f"once ({pairs})")
    cache = report.get("reference_cache") or {}
    if cache.get("folder_bytes") is not None:
        mb = {k: (cache.get(k) or 0) / 1e6 for k in ("bytes_written", "bytes_read", "folder_bytes")}
        tr.write_line(f"ref cache  {mb['bytes_written']:.1f} MB written, {mb['bytes_read']:.1f} MB read this run; "
                      f"{mb['folder_bytes']:.1f} MB in its folder")
    if cache.get("tampered"):
        tr.write_line(f"ref cache  DISTRUSTED: {cache['tampered']}", red=True, bold=True)
    sections = report.get("candidates") or [dict(report, custom_gates=(report.get("custom") or {}).get("gates", {}))]
    control = report.get("sensitivity") or {}
    _render_pack(tr, report)
    # What the gate read first: each candidate's verdict (or raw composite), then the yardstick.
    sweep = report.get("sweep")
    for section in sections:
        if sweep is None or section["candidate"] == (sweep.get("recommendation") or {}).get("config"):
            _render_candidate(tr, section, registry)  # a sweep's other pairs: in its grid, the JSON and HTML
    _render_control(tr, control, registry, from_pack=bool(report.get("reference_pack")))
    if len(sections) > 1:
        _render_ranking(tr, report["ranking"], registry, report.get("gate", {}).get("basis"))
        _render_recommendation(tr, report.get("recommendation"))
    if sweep is not None:
        from .sweep_text import render_sweep

        render_sweep(tr, sweep, report.get("reference"))
    gate = report.get("gate", {})
    tr.write_line("")
    basis = {"raw": "composite"}.get(gate.get("basis"))
    subset = [sec for sec in sections if (sec.get("selection") or {}).get("subset")]
    if gate.get("passed") and sweep is not None:
        rec = sweep.get("recommendation") or {}
        tr.write_line(f"gate: passed (the sweep recommends {rec.get('config')}"
                      + (f"; {sweep['budget']['line']}" if sweep.get("budget") else "") + ")", green=True)
    elif gate.get("passed") and basis is None:
        tr.write_line("gate: passed (verdict PASS on every " + ("selected " if subset else "") + "axis"
                      + (", UNDECIDED accepted by --refract-undecided=pass" if gate.get("undecided") == "pass" else "")
                      + ")" + ("; a subset verdict: " + "; ".join(sec["selection"]["text"].split(": ", 1)[-1] for sec in subset)
                               + " (--refract-require-complete fails a subset)" if subset else ""), green=True)
    elif gate.get("passed"):
        tr.write_line(f"gate: passed ({basis} ≥ {gate['threshold']:g})", green=True)
    else:
        for reason in gate.get("reasons", []):
            tr.write_line(f"gate FAILED: {reason}", red=True, bold=True)
    if gate.get("note"):
        tr.write_line(f"gate note: {gate['note']}", yellow=True, bold=True)
    if json_path:
        tr.write_line(f"JSON report: {json_path}")


_VERDICT_COLOURS = {"PASS": "green", "UNDECIDED": "yellow", "FAIL": "red", None: "red"}


def _render_pack(tr, report: dict) -> None:
    """The reference pack this run measured against, and this build's drift from it: first,
    so that a candidate's numbers below are read against it (a build change, not cache damage)."""
    saved = report.get("saved_reference_pack")
    if saved:
        tr.write_line(f"saved pack {saved['path']} ({saved['files']} entries, {saved['bytes'] / 1e6:.2f} MB)")
    pack = report.get("reference_pack")
    if not pack:
        return
    build = pack.get("build") or {}
    tr.write_line(f"ref pack   {pack['path']} (made by llama-cpp-python {build.get('llama_cpp_python')}, library "
                  f"{str(build.get('library_digest'))[:12]}; this run: llama-cpp-python "
                  f"{report.get('llama_cpp_python_version')}, {str((report.get('llama_cpp_build') or {}).get('library_digest'))[:12]})")
    drift = report.get("build_drift") or {}
    verdict = drift.get("verdict")
    tr.write("build drift ", bold=True)
    tr.write(f"{verdict or 'NO VERDICT':<9}", **{_VERDICT_COLOURS.get(verdict, "red"): True, "bold": True})
    parts = [f"{name} {_multiple_text(a)}" for name, a in (drift.get("axes") or {}).items()]
    tr.write_line(f" this build's {drift.get('config')} against the pack's: " + ("; ".join(parts) or "not measured")
                  + "  (x = multiples of a rounding-only change; 0 = the pack's very bits)")


def _multiple_text(m: dict, prefix: str = "D ") -> str:
    """ "2.5x [2.4, 2.6]" or, without a usable control, the damage itself ("D 0.05 [0, 0.1]" in
    the ranking's narrow cells; after the damage's own label, ``prefix=""``)."""
    if m.get("basis") == "multiple" and m.get("multiple") is not None:
        ci = m.get("multiple_ci95")
        hi = "inf" if ci and ci[1] is None else (f"{ci[1]:.2f}" if ci else "")
        return f"{m['multiple']:.2f}x" + (f" [{ci[0]:.2f}, {hi}]" if ci else "")
    if m.get("basis") == "absolute" and m.get("damage") is not None:
        ci = m.get("damage_ci95")
        return f"{prefix}{m['damage']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
    return "n/a"


def _sequential_text(section: dict) -> str:
    """Where the axis's sequential design stopped, after its verdict line."""
    seq = section.get("sequential")
    if not seq or not seq.get("looks"):
        return ""
    n_max, level, n_looks = seq["looks"][-1], 100 * seq["look_level"], len(seq["looks"])
    at = f"look {seq['look_read']} of {n_looks}, its interval at {level:.4g} %" if seq.get("look_read") else ""
    if seq.get("stopped_by"):
        return f"; stopped after {seq['measured']} of {n_max}, {len(seq['skipped'])} skipped"
    if seq.get("decided") and seq.get("skipped"):
        return f"; decided after {seq['decided_after']} of {n_max} ({at}), {len(seq['skipped'])} skipped"
    if seq.get("stopping") and n_looks > 1:
        return f"; {seq['measured']} of {n_max} measured" + (f" ({at})" if at else "")
    return ""


def _render_verdict(tr, report: dict, registry=BUILTIN) -> None:
    """The candidate's headline: what the gate reads."""
    v = report.get("verdict")
    if not v:
        return
    tr.write("verdict    ", bold=True)
    tr.write(f"{v['verdict']:<10}", bold=True, **{_VERDICT_COLOURS.get(v["verdict"], "red"): True})
    if v.get("subset"):
        tr.write("(subset verdict) ", yellow=True)
    score = v.get("score")
    tr.write_line(f"score {score:.2f} (damage as a multiple of the control's)" if score is not None else "")
    for name, a in v["axes"].items():
        if a["basis"] == "multiple" and a.get("multiple") is not None:
            what = f"{a['label']} {_multiple_text(a)} the control's (margin {a['margin']:g}x)"
        elif a["basis"] == "absolute" and a.get("damage") is not None:
            what = f"{a['label']} {_multiple_text(a, prefix='')}, tolerance {a['margin']:g} ({a['reason']})"
        else:
            what = a.get("reason") or ""
        tr.write(f"  {name:<11}")
        tr.write(f"{a['verdict']:<10}", **{_VERDICT_COLOURS.get(a["verdict"], "red"): True})
        tr.write_line(what + _sequential_text((report.get("axes") or {}).get(name) or {}))
        where = (a.get("detail") or {}).get("where")
        if where:
            tr.write_line(f"             by depth: {where}")
        if a["verdict"] == "PASS" and a.get("could_miss"):
            noun = getattr(registry.get(name), "ITEMS_NOUN", None) or "items"
            tr.write_line(f"             what this PASS could miss: {miss_text(a['could_miss'], noun)}")
    for line in v.get("control_problems", []):
        tr.write_line(f"  yardstick broken: {line}", red=True)
    for line in v.get("advice", []):
        tr.write_line(f"  to decide: {line}", yellow=True)


def _render_ranking(tr, ranking, registry, basis=None) -> None:
    if basis == "verdict":
        _render_verdict_ranking(tr, ranking)
        return
    tr.write_line("")
    tr.write_line("candidates ranked by composite (raw, which the gate reads; which config to ship; the control is "
                  "never ranked):", bold=True)
    axes = [n for n, _ in known({n: None for r in ranking for n in r["axes"]}, registry)]
    tr.write_line("  #  " + "candidate".ljust(28) + "composite band      " + "[95% CI]".ljust(18)
                  + "".join(a.ljust(11) for a in axes) + "KV memory")
    for i, r in enumerate(ranking, start=1):
        cells = "".join(_fmt(r["axes"].get(a)).strip().ljust(11) for a in axes)
        kv = r.get("kv_vs_reference")
        tr.write(f"  {i}  {r['candidate'][:27]:<28}{_fmt(r['composite'])}    ")
        tr.write(f"{(r['band'] or 'NO SCORE'):<10}", **{_COLOURS.get(r["band"], "red"): True})
        tr.write(f"{_ci(r.get('composite_ci95')).strip():<18}")
        tr.write_line(cells + ("?" if kv is None else f"{100 * kv:.0f}% of reference"))


def _render_recommendation(tr, rec: Optional[dict]) -> None:
    """The family-wise choice of config (scoring/family.py), under the ranking."""
    if not rec:
        return
    chosen = rec.get("recommended")
    text = (f"config to ship: {chosen}" if chosen else "config to ship: none (no candidate PASSes as a family)")
    tr.write_line(f"{text}; {rec.get('guarantee', '')} ({rec.get('method', '')})", bold=bool(chosen))


def _render_verdict_ranking(tr, ranking) -> None:
    tr.write_line("")
    tr.write_line("which config to ship: the smallest KV cache that PASSes first, then the rest by damage "
                  "(the control is never ranked):", bold=True)
    axes = list(dict.fromkeys(n for r in ranking for n in (r.get("multiples") or {})))
    tr.write_line("  #  " + "candidate".ljust(28) + "verdict    " + "".join(a.ljust(24) for a in axes)
                  + "KV bytes/token  pareto  raw composite (REFRACT-comparable, not the verdict)")
    for i, r in enumerate(ranking, start=1):
        tr.write(f"  {i}  {r['candidate'][:27]:<28}")
        tr.write(f"{(r.get('verdict') or 'n/a'):<11}", **{_VERDICT_COLOURS.get(r.get("verdict"), "red"): True})
        cells = "".join(_multiple_text((r.get("multiples") or {}).get(a) or {}).ljust(24) for a in axes)
        kv = r.get("kv_bytes_per_token")
        raw = r.get("composite")
        tr.write_line(cells + ("?" if kv is None else f"{kv:.0f}").ljust(16) + ("yes" if r.get("pareto") else "no").ljust(8)
                      + ("n/a" if raw is None else f"{raw:.2f}"))


def _render_ran(tr, ran: dict) -> None:
    """What really ran for a config, and every warning llama.cpp logged for it."""
    from .ran import ran_text, warning_lines

    tr.write_line(f"  ran      {ran_text(ran)}")
    for line in warning_lines(ran):
        tr.write_line(f"  warning  {line}", yellow=True)


def _rotation_text(rotation: dict) -> str:
    """Rotation as llama.cpp logged it for the config's context."""
    on = [side.upper() for side in ("k", "v") if rotation.get(side)]
    return f"rotated {'+'.join(on)}" if on else "no rotation"


def _render_control(tr, control: dict, registry, from_pack: bool = False) -> None:
    """The sensitivity control, shown like a candidate but labelled as the yardstick."""
    tr.write_line("")
    if not control.get("config"):
        tr.write_line(f"control    none: {control.get('note') or 'no sensitivity control'}")
        return
    cached = ("  (read from the reference pack: the pack's build measured it)" if from_pack
              else "  (read from the reference cache)" if control.get("cached") else "")
    tr.write_line(f"control    {control['config']}  (sensitivity: {control.get('note')}; never ranked){cached}")
    if control.get("ran"):
        _render_ran(tr, control["ran"])
    # Its raw scores are reference figures (no band: the yardstick is not graded).
    tr.write_line("  raw scores (REFRACT-comparable, not a verdict):")
    axes = control.get("axes") or {}
    for name, axis in known(axes, registry):
        a = axes[name]
        extra = axis.section_detail(a, control=True)
        score = _fmt(a.get("score")) if a.get("score") is not None else "  no score"
        tr.write_line(f"  {name:<11}{score}{_ci(a.get('ci95'))}{extra}")
    tr.write_line(f"  composite  {_fmt(control.get('composite'))}{_ci(control.get('composite_ci95'))}")


def _render_candidate(tr, report: dict, registry) -> None:
    tr.write_line("")
    tr.write_line(f"candidate  {report['candidate']}" + ("   (self-reference)" if report.get("self_reference") else "")
                  + (f"   (llama.cpp: {_rotation_text(report['rotation'])})" if report.get("rotation") else ""))
    if report.get("ran"):
        _render_ran(tr, report["ran"])
    if report.get("no_op"):
        tr.write_line(f"NO-OP      {report['no_op']}", red=True, bold=True)
    tr.write_line("")
    # The verdict leads where the gate reads it; under --refract-gate=raw the composite does.
    verdict_led = bool(report.get("verdict")) and (report.get("gate") or {}).get("basis", "verdict") == "verdict"
    selection = report.get("selection")
    if verdict_led:
        _render_verdict(tr, report, registry)
        if selection:
            # What the verdict rests on: every axis's selected items out of its pool.
            tr.write_line(f"selected   {selection['text']}", yellow=bool(selection.get("subset")))
        # The verdict's own sentences, then the raw figures as plain reference numbers.
        tr.write_line("")
        for line in report.get("diagnosis", []):
            tr.write_line(f"- {line}")
        tr.write_line("")
        tr.write_line("raw scores (REFRACT-comparable, not the verdict; no band: the gate reads the verdict above):")
    for name, axis in known(report["axes"], registry):
        section = report["axes"][name]
        band = section.get("band")
        extra = axis.section_detail(section, control=False)
        wall = section.get("wall_s")
        wall_text = f"  [{wall:.1f}s]" if wall is not None else ""
        if verdict_led:
            score = _fmt(section.get("score")) if section.get("score") is not None else "  no score"
            tr.write_line(f"{name:<11}{score}{_ci(section.get('ci95'))}{extra}{wall_text}")
        else:
            tr.write(f"{name:<11}{_fmt(section.get('score'))} ", bold=True)
            tr.write(f"{band or 'NO SCORE':<9}", **{_COLOURS.get(band, 'red'): True})
            tr.write_line(f"{extra}{wall_text}")
            if section.get("ci95"):
                tr.write_line(f"           95% CI{_ci(section.get('ci95'))}")
        rep = section.get("repeat")
        if rep and rep.get("stdev") is not None:
            tr.write_line(f"           repeat x{rep['n']}: mean {rep['mean']:.2f}, stdev {rep['stdev']:.2f}, "
                          f"range {rep['range']:.2f} -> {rep['verdict']}")
        for line in depth_lines(section) if name == "depth" else ():
            tr.write_line(line)
        if section.get("error"):
            tr.write_line(f"           {section['error']}", red=True)
        if section.get("not_measured"):
            tr.write_line(f"           {section['not_measured']}")
    for name, score in (report.get("custom_gates") or {}).items():
        tr.write(f"custom {name}: {_fmt(score).strip()} ", bold=True)
        tr.write_line(band_for(score) or "", **{_COLOURS.get(band_for(score), "red"): True})
    composite = report.get("composite")
    band = report.get("band")
    if verdict_led:
        tr.write_line(f"{'composite':<11}{_fmt(composite)}{_ci(report.get('composite_ci95'))}")
    else:
        tr.write_line("")
        tr.write("composite  " + _fmt(composite) + " ", bold=True)
        tr.write(band or "NO SCORE", **{_COLOURS.get(band, "red"): True, "bold": True})
        tr.write_line(f"  95% CI{_ci(report.get('composite_ci95'))}" if report.get("composite_ci95") else "")
    if report.get("floor") is not None:
        tr.write_line(f"floor      {report['floor']:.2f} (reference vs reference)")
    if report.get("verdict") and not verdict_led:
        tr.write_line("")
        tr.write_line("beside it, the verdict (not what this gate reads: --refract-gate=raw):")
        _render_verdict(tr, report, registry)
    if not verdict_led:
        tr.write_line("")
        for line in report.get("diagnosis", []):
            tr.write_line(f"- {line}")
    worst = []
    for name, axis in known(report["axes"], registry):
        worst += _worst(name, axis, report["axes"][name])
    if worst:
        tr.write_line("")
        paired = any((i.get("vs_control") or {}).get("text") for a in report["axes"].values()
                     for i in (a.get("items") or a.get("cells") or []))
        tr.write_line("most damaged items (beside the control's same item):" if paired else "worst items:")
        for line in worst:
            tr.write_line(f"  {line}")
