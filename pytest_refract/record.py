"""What the report states about the run besides the measurements: plain data, made once by the
live runner (audit.runner.Runner.record) and handed to ``report.build.build_report``, which then
needs nothing else that lives in a process (no llama.cpp, no clock but the timestamp).

It sits at the package's base, beside errors.py and files.py, because it is the one type the
audit layer hands to the report layer, and neither of those may import the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:  # a type hint only: settings.py sits above this base layer
    from .settings import Settings


@dataclass(frozen=True)
class RunRecord:
    settings: Settings  # the options (a frozen dataclass)
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
    # Per role (reference, candidates, control): what really ran (audit.runner.Runner.ran).
    ran: Dict[str, dict] = field(default_factory=dict)
    kv_cache: Dict[str, Optional[dict]] = field(default_factory=dict)  # per candidate: bytes/token, vs reference
    reference_kv_bytes_per_token: Optional[int] = None
    kv_bytes_peak: Optional[int] = None  # the most KV-cache memory this process held at once
    model: dict = field(default_factory=dict)  # name, path, size, architecture, parameters, fingerprint
    host: dict = field(default_factory=dict)  # machine, system, cpus
    reference_cache_enabled: bool = False
    reference_cache_read: bool = False  # whether this run read reference results from the cache
    # bytes_written / bytes_read this run, folder_bytes: the whole folder's entries (None: no cache)
    reference_cache_size: Optional[Dict[str, Optional[int]]] = None
    binding_version: Optional[str] = None  # llama-cpp-python's version
    llama_build: dict = field(default_factory=dict)  # the llama.cpp library that ran
    baseline: Optional[dict] = None  # the --refract-baseline report, loaded
    # Items selected after -k/-m: candidate role -> axis -> count (an interrupted run says how
    # many of them ran), and their total (None where this process collected none, e.g. the
    # xdist controller).
    selected: Dict[str, Dict[str, int]] = field(default_factory=dict)
    items_selected: Optional[int] = None
    wall_s: Optional[float] = None  # the session's wall time up to the report
    # Sequential stopping: candidate role -> axis -> the design fixed before the first item
    # (looks, each look's level) and where it stopped (stopping.AxisProgress.as_json).
    sequential: Dict[str, Dict[str, dict]] = field(default_factory=dict)
    # With a reference pack: the role measuring this build's own reference against the pack's
    # (audit/drift.py), and the pack as the report names it (path, checksum, the build that
    # made it, size). ``saved_pack``: the pack this run wrote (--refract-save-reference).
    drift_role: Optional[str] = None
    reference_pack: Optional[dict] = None
    saved_pack: Optional[dict] = None
    # Why the run ended before every selected item ran (-x / --maxfail, an interruption, a
    # plugin stopping the session); None when it did not. Such a report is incomplete.
    stopped_early: Optional[str] = None
    # Items each axis has before -k/-m/--deselect: candidate role -> axis -> count (the pool a
    # selection is a part of; the default audit runs all of it).
    pool: Dict[str, Dict[str, int]] = field(default_factory=dict)
    default_axes: Tuple[str, ...] = ("trajectory", "kld")  # the axes a default audit runs
    # The reference cache's spot check (audit/control.py): its seed, the items re-measured and
    # whether they matched; and why the cache was distrusted this run (None: it was not).
    cache_spot_check: Optional[dict] = None
    cache_tampered: Optional[str] = None
    # --refract-sweep: the types, the pairs, those llama.cpp refused and those that are no
    # candidate (audit/sweep.py SweepPlan.as_json); None without a sweep.
    sweep: Optional[dict] = None
    # The longest context each selected axis measured at, in tokens (report/context.py says
    # what a verdict covers from it): axis -> tokens.
    context_by_axis: Dict[str, int] = field(default_factory=dict)
