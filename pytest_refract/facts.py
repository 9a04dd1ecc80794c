"""What the report states about the run besides the measurements: plain data, gathered once
from the live runner (``gather``) and handed to ``report.build_report``, which then needs
nothing else that lives in a process (no llama.cpp, no clock but the timestamp)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class ReportFacts:
    settings: object  # settings.Settings (a frozen dataclass of the options)
    # Candidates in the order given; role -> label for the candidates and the control.
    candidate_roles: Tuple[str, ...] = ("cand0",)
    labels: Dict[str, str] = field(default_factory=dict)
    self_reference: Dict[str, bool] = field(default_factory=dict)  # per candidate role
    control_role: Optional[str] = None  # the sensitivity control's role, None without one
    # Every text file the run tokenized (corpus, haystack; each once): {"name", "sha256",
    # "bytes", "replaced_invalid_utf8"}; undecodable bytes there get a diagnosis line.
    text_inputs: Tuple[dict, ...] = ()
    # Axis name -> keys added to that axis's section, e.g. {"kld": {"corpus": {...}}}.
    axis_inputs: Dict[str, dict] = field(default_factory=dict)
    # Axis name -> what it ran with beyond its options, merged into settings[<name>], e.g.
    # {"rniah": {"lengths": [...], "effective_answer_tokens": 32, "thinking_template": False}}.
    axis_settings: Dict[str, dict] = field(default_factory=dict)
    chunks_note: Optional[str] = None  # the corpus held fewer KLD chunks than asked for
    gpu_note: Optional[str] = None  # GPU layers asked for on a build without offload
    # What llama.cpp logged per role ("reference" and each candidate) when it created the
    # role's context; None when no context was probed (then the report leaves these out).
    rotation: Optional[Dict[str, Optional[dict]]] = None
    kv_allocation: Optional[Dict[str, Optional[dict]]] = None
    context_env: Optional[Dict[str, dict]] = None
    kv_cache: Dict[str, Optional[dict]] = field(default_factory=dict)  # per candidate: bytes/token, vs reference
    reference_kv_bytes_per_token: Optional[int] = None
    kv_bytes_peak: Optional[int] = None  # the most KV-cache memory this process held at once
    model: dict = field(default_factory=dict)  # name, path, size, architecture, parameters, fingerprint
    host: dict = field(default_factory=dict)  # machine, system, cpus
    reference_cache_enabled: bool = False
    reference_cache_read: bool = False  # whether this run read reference results from the cache
    binding_version: Optional[str] = None  # llama-cpp-python's version
    llama_build: dict = field(default_factory=dict)  # the llama.cpp library that ran
    baseline: Optional[dict] = None  # the --refract-baseline report, loaded
    # Items selected after -k/-m: candidate role -> axis -> count (an interrupted run says how
    # many of them ran), and their total (None where this process collected none, e.g. the
    # xdist controller).
    selected: Dict[str, Dict[str, int]] = field(default_factory=dict)
    items_selected: Optional[int] = None
    wall_s: Optional[float] = None  # the session's wall time up to the report


def gather(runner, *, wall_s: Optional[float] = None, items_selected: Optional[int] = None) -> ReportFacts:
    """The facts of ``runner`` (a runner.Runner): only its public members. ``wall_s`` and
    ``items_selected`` are the session's: its wall time so far, and its items after -k/-m."""
    import copy
    import os
    import platform

    inputs = runner.inputs
    # The corpus and the haystack are one input when R-NIAH reads the corpus itself.
    texts = {id(x): x for x in (inputs.corpus, inputs.haystack_source) if x is not None}.values()
    roles = ["reference", *runner.candidate_roles]
    selected: Dict[str, Dict[str, int]] = {}
    for (role, axis), count in runner.selected.items():
        selected.setdefault(role, {})[axis] = count
    axis_inputs, axis_settings = {}, {}
    for name, axis in runner.axes.items():
        section, settings = axis.section_facts(runner), axis.settings_facts(runner)
        if section:
            axis_inputs[name] = section
        if settings:
            axis_settings[name] = settings
    return ReportFacts(
        settings=runner.settings,
        candidate_roles=tuple(runner.candidate_roles),
        labels=dict(runner.labels),
        self_reference=dict(runner.self_reference),
        control_role=runner.control_role,
        text_inputs=tuple(text_source(x) for x in texts),
        axis_inputs=axis_inputs,
        axis_settings=axis_settings,
        chunks_note=inputs.chunks_note,
        gpu_note=runner.gpu_note,
        rotation={r: runner.rotation(r) for r in roles},
        kv_allocation={r: runner.kv_allocation(r) for r in roles},
        context_env={r: dict(runner.context_env.get(r, {})) for r in roles},
        kv_cache={r: runner.kv_cache_facts(r) for r in runner.candidate_roles},
        reference_kv_bytes_per_token=runner.kv_bytes_per_token("reference"),
        kv_bytes_peak=runner.kv_bytes_peak or None,
        model=runner.model_facts(),
        host={"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
        reference_cache_enabled=runner.reference.cache.enabled,
        reference_cache_read=runner.reference.read,
        binding_version=runner.engine_mod.library_version(),
        llama_build=runner.build_info(),
        baseline=copy.deepcopy(runner.baseline),
        selected=selected,
        items_selected=items_selected or None,
        wall_s=wall_s,
    )


def text_source(text_file) -> dict:
    """A text input as the report names it."""
    return {"name": text_file.name, "sha256": text_file.sha256, "bytes": text_file.bytes,
            "replaced_invalid_utf8": text_file.replaced_invalid_utf8}
