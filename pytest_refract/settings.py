"""Every option in one place: registered here, read here, validated here (as pytest-randomly
and pytest-timeout do), so the plugin hooks stay thin."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

from .engines.kvconfig import FLOAT_TYPES, KVConfig, parse_kv_config, share_flash_attention
from .errors import UsageProblem
from .scoring.metrics import parse_threshold

DEFAULT_AXES = ("trajectory", "kld")

# (name, ini type, default, help). The command-line flag is --refract-<name with dashes>; the
# ini key is refract_<name with underscores>.
OPTIONS = (
    ("model", "string", None, "GGUF model to audit, or 'smollm2' for the embedded SmolLM2-135M-Instruct"),
    ("reference", "string", "ctk=f16,ctv=f16", "reference KV config (default: ctk=f16,ctv=f16)"),
    ("candidate", "string", None, "candidate KV config, e.g. ctk=q8_0,ctv=q4_0"),
    ("axes", "string", ",".join(DEFAULT_AXES), "comma-separated axes to run (default trajectory,kld; also rniah, plad, "
                                               "decode, depth), or 'none' for fixtures only"),
    ("fail-under", "string", "FAIL", "fail the session when the composite is below this band (FAIL, DEGRADED, PASS, EXCELLENT) or number"),
    ("item-fail-under", "string", None, "opt-in: also fail each item whose own score is below this band or number"),
    ("json", "string", None, "write the JSON report to this path"),
    ("prompts", "string", None, "prompt set (JSONL: id, category, prompt) for the trajectory axis"),
    ("corpus", "string", None, "UTF-8 text corpus for the KLD axis"),
    ("n-predict", "string", "128", "greedy tokens per trajectory prompt"),
    ("ctx", "string", "512", "KLD chunk size in tokens (llama-perplexity's -c)"),
    ("chunks", "string", "all", "KLD chunks the axis may score: a number, or all (every chunk the corpus holds)"),
    ("seed", "string", "0", "seed for anything random in the audit (greedy decoding itself is deterministic)"),
    ("threads", "string", None, "llama.cpp threads (default: all cores)"),
    ("decode-batch", "string", "16", "prompts greedy-decoded together, one sequence each, in one llama.cpp batch "
                                     "(trajectory and PLAD); 1 decodes one at a time"),
    ("gpu-layers", "string", "0", "layers to offload to a GPU (llama.cpp -ngl)"),
    ("rniah-lengths", "string", None, "R-NIAH haystack lengths in tokens (default 1024,2048,4096, capped at the model's context)"),
    ("rniah-positions", "string", "0.1,0.5,0.9", "R-NIAH needle positions as fractions of the haystack"),
    ("rniah-trials", "string", "3", "R-NIAH trials per cell, each with a different seeded value"),
    ("rniah-needle", "string", "The magic number is {value}.", "R-NIAH needle sentence; {value} is replaced per trial"),
    ("rniah-question", "string", "What is the magic number?", "R-NIAH question asked after the haystack"),
    ("rniah-answer", "string", "{value}", "R-NIAH answer pattern (regex; {value} is the escaped trial value)"),
    ("rniah-values", "string", "numbers", "R-NIAH trial values: numbers (4 digits) or words"),
    ("rniah-answer-tokens", "string", "32", "R-NIAH answer budget in tokens (1024 for thinking models)"),
    ("haystack", "string", None, "R-NIAH haystack text file (default: the KLD corpus)"),
    ("cache-dir", "string", None, "reference cache folder (default: refract-reference in pytest's cache dir)"),
    ("repeat", "string", "1", "measure every item N times and report per-axis mean, stdev and range"),
    ("html", "string", None, "write the self-contained HTML report to this path"),
    ("baseline", "string", None, "gate against a previous JSON report: fail when the composite or an axis dropped"),
    ("max-drop", "string", "2.0", "with --refract-baseline: the largest allowed drop in points (default 2.0)"),
    ("llama-lib", "string", None, "folder holding another llama.cpp build's shared libllama/libggml (e.g. a fork such as "
                                  "TurboQuant) for llama-cpp-python to load instead of its own"),
    ("sensitivity", "string", None, "control config measured on the same items to tell the model's rounding "
                                    "sensitivity from cache damage (default: ctk=bf16,ctv=bf16 for an f16 reference)"),
    ("gate", "string", "verdict", "what the gate reads: verdict (damage as a multiple of the control's, PASS/FAIL/"
                                  "UNDECIDED, default) or raw (the seed-defined composite against "
                                  "--refract-fail-under)"),
    ("max-items", "string", None, "measure at most N items per axis (per candidate), the first N in the axis's "
                                  "measuring order; default: all the axis has (the whole prompt pool, every chunk)"),
    ("save-reference", "string", None, "write this run's f16 reference and its sensitivity control as a portable "
                                       "reference pack into this folder (new, empty, or a pack to replace)"),
    ("reference-pack", "string", None, "use a reference pack (from --refract-save-reference) as the run's reference "
                                       "and control, and measure this build's own reference against it (build drift)"),
    ("decode-window", "string", "32", "decode axis: positions per KLD chunk fed one token per llama_decode (from the "
                                      "chunk's middle on)"),
    ("decode-chunks", "string", "16", "decode axis: KLD chunks it measures (the first N in the KLD axis's order)"),
    ("sweep", "string", None, "measure every K x V pair of these cache types (comma list, or all: every type this "
                              "llama.cpp build offers and accepts for the model) and recommend the smallest that PASSes"),
    ("kv-budget", "string", None, "with --refract-sweep: the largest KV cache to recommend, in bytes per token or as a "
                                  "fraction of the f16 cache's (e.g. 0.5)"),
    ("require", "string", None, "fail the session unless this KV config PASSes (e.g. ctk=q8_0,ctv=q8_0; measured as a "
                                "candidate if it is not one)"),
    ("depth", "string", "4096", "depth axis: chunk length in tokens, positions scored in depth buckets from 256 up to "
                                "it (default 4096, capped at the model's training context)"),
    ("depth-stride", "string", "16", "depth axis: score every Nth position of a chunk (1: every position); logits "
                                     "are computed at scored positions only"),
    ("undecided", "string", "fail", "what the gate does with an UNDECIDED verdict: fail (default: the evidence is not "
                                    "there yet) or pass"),
)
# The ini default of options without one: tells a key that is absent from one set blank.
_UNSET = "\x00unset"
# OPTIONS is the one place a default is written: the flag's, the ini key's (register) and the
# Settings field's (option_default) all come from it; tests/test_option_defaults.py checks so.
OPTION_DEFAULTS = {name: default for name, _type, default, _help in OPTIONS}


def _default_text(name: str) -> str:
    """The default of an option that has one, as text."""
    text = OPTION_DEFAULTS[name]
    assert text is not None, f"--refract-{name} has no default"  # asked only for options with one
    return text


def _number_tuple(cast):
    return lambda text: tuple(dict.fromkeys(cast(part.strip()) for part in text.split(",") if part.strip()))


# How an option's default text becomes its Settings field's value (as read_settings reads a
# value given on the command line); the rest are kept as text.
_DEFAULT_PARSERS = {
    "reference": parse_kv_config,
    "axes": lambda text: tuple(a.strip() for a in text.split(",") if a.strip()),
    "fail-under": parse_threshold,
    "n-predict": int, "ctx": int, "seed": int, "decode-batch": int, "gpu-layers": int, "repeat": int,
    "chunks": lambda text: None if text.lower() == "all" else int(text),
    "rniah-positions": _number_tuple(float),
    "rniah-trials": int, "rniah-answer-tokens": int,
    "max-drop": float,
    "depth": int, "depth-stride": int,
}
# Option -> the Settings field it sets, for every option whose field a default command line
# sets to the option's default (model and candidate are required; threads, cache-dir and
# sensitivity are derived from the machine, pytest's cache and the reference).
OPTION_FIELDS = {
    "reference": "reference", "axes": "axes", "fail-under": "fail_under", "item-fail-under": "item_fail_under",
    "json": "json_path", "prompts": "prompts_path", "corpus": "corpus_path", "n-predict": "n_predict",
    "ctx": "ctx", "chunks": "chunks", "seed": "seed", "decode-batch": "decode_batch", "gpu-layers": "gpu_layers",
    "rniah-lengths": "rniah_lengths", "rniah-positions": "rniah_positions", "rniah-trials": "rniah_trials",
    "rniah-needle": "rniah_needle", "rniah-question": "rniah_question", "rniah-answer": "rniah_answer",
    "rniah-values": "rniah_values", "rniah-answer-tokens": "rniah_answer_tokens", "haystack": "haystack_path",
    "repeat": "repeat", "html": "html_path", "baseline": "baseline_path", "max-drop": "max_drop",
    "llama-lib": "llama_lib", "gate": "gate_basis", "max-items": "max_items", "undecided": "undecided",
    "depth": "depth", "depth-stride": "depth_stride",
}


def option_default(name: str):
    """The default of option ``name`` as its Settings field holds it (None: it has none)."""
    text = OPTION_DEFAULTS[name]
    return None if text is None else _DEFAULT_PARSERS.get(name, str)(text)

FLAGS = (("floor", "also measure reference vs reference (a second context) to show the noise floor"),
         ("no-cache", "do not read or write the reference cache"),
         ("clear-cache", "empty the reference cache before the run"),
         ("full", "run every axis (trajectory, kld, rniah, plad, decode, depth)"),
         ("no-progress", "do not show the progress of long items (a live line on a terminal, a line every few seconds in logs)"),
         ("no-sensitivity", "skip the sensitivity control (the gate then uses the raw composite)"),
         ("exhaustive", "measure every selected item: no sequential stopping once a verdict is decided "
                        "(one fixed-sample look at the end)"),
         ("require-complete", "fail the gate unless the whole default audit ran: every default axis, no item "
                              "deselected (-k, -m, --deselect) or capped (--refract-max-items)"),
         ("sweep-exhaustive", "with --refract-sweep: measure every pair, none skipped because the recommendation "
                              "can no longer be it"))


def register(parser) -> None:
    group = parser.getgroup("refract", "pytest-refract: KV-cache quantization audit")
    for name, ini_type, default, help_text in OPTIONS:
        dest = "refract_" + name.replace("-", "_")
        if name == "candidate":
            # Several candidates make a matrix sharing one reference: repeat the flag, or list
            # one per line in the ini file.
            group.addoption(f"--refract-{name}", dest=dest, action="append", default=None,
                            help=help_text + " (repeat for a candidate matrix)")
            parser.addini(dest, help_text, type="linelist", default=[])
            continue
        group.addoption(f"--refract-{name}", dest=dest, default=None, help=help_text)
        parser.addini(dest, help_text, type=ini_type, default=_UNSET if default is None else default)
    for name, help_text in FLAGS:
        dest = "refract_" + name.replace("-", "_")
        group.addoption(f"--refract-{name}", dest=dest, action="store_true", default=None, help=help_text)
        parser.addini(dest, help_text, type="bool", default=False)


def _get(config, name: str):
    dest = "refract_" + name.replace("-", "_")
    value = config.getoption(dest)
    if isinstance(value, str) and not value.strip():
        # `--refract-model=` (an unset shell variable, a templating slip) must not quietly
        # mean "use the default" or "do nothing".
        raise UsageProblem(f"--refract-{name} is empty; give a value or leave the option out")
    if value is None:
        try:
            value = config.getini(dest)
        except (ValueError, pytest.UsageError) as exc:  # a bool ini key whose value is no truth value
            raise UsageProblem(f"ini option {dest}: {exc}; use true or false") from None
        if value == _UNSET:
            return None  # the key is not in the ini file
        if isinstance(value, str) and not value.strip() and name in OPTION_DEFAULTS:
            # `refract_model =` must not quietly mean "no audit" (or a default) when
            # `--refract-model=` is an error.
            raise UsageProblem(f"ini option {dest} is empty; give a value or remove the line")
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _path(config, name: str, names=()) -> Optional[str]:
    """A path option: from the command line as given (relative to the current folder, as any
    shell path), from the ini file relative to the ini file's folder (the ini may sit in
    another folder than the one pytest runs in). ``names``: values that are no path (an
    embedded model's name), kept as they are."""
    value = _get(config, name)
    if not value or config.getoption("refract_" + name.replace("-", "_")) is not None:
        return value
    inipath = getattr(config, "inipath", None)
    expanded = os.path.expanduser(value)
    if inipath is None or os.path.isabs(expanded) or value.strip().lower() in names:
        return value
    return str(Path(inipath).parent / expanded)


def _embedded_model_names() -> tuple:
    from .inputs.data import EMBEDDED_MODELS  # here: reading options must not load the inputs layer early
    from .inputs.models import CHUNKED_MODELS

    return tuple(EMBEDDED_MODELS) + tuple(CHUNKED_MODELS)


def wants_audit(config) -> bool:
    """Whether the run audits at all: --refract-model (or its ini key) is given."""
    return bool(_get(config, "model"))


def show_progress(config) -> bool:
    """False with --refract-no-progress (or the refract_no_progress ini key); -qq and xdist
    are decided where the output is (progress.sink_for)."""
    return not _get(config, "no-progress")


def _int(config, name: str, minimum: int) -> int:
    raw = _get(config, name)
    try:
        value = int(str(raw))
    except ValueError:
        raise UsageProblem(f"--refract-{name}={raw!r} must be a whole number") from None
    if value < minimum:
        raise UsageProblem(f"--refract-{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    model: str
    reference: KVConfig
    candidates: Tuple[KVConfig, ...]
    axes: Tuple[str, ...]
    fail_under: float
    fail_under_text: str
    item_fail_under: Optional[float]
    json_path: Optional[str]
    prompts_path: Optional[str]
    corpus_path: Optional[str]
    n_predict: int
    ctx: int
    chunks: Optional[int]  # None: every chunk the corpus holds
    seed: int
    threads: int
    gpu_layers: int
    floor: bool
    # Defaults: the options' own (OPTIONS), so a Settings made in code runs as a default
    # command line does.
    rniah_lengths: Optional[Tuple[int, ...]] = option_default("rniah-lengths")
    rniah_positions: Tuple[float, ...] = option_default("rniah-positions")
    rniah_trials: int = option_default("rniah-trials")
    rniah_needle: str = option_default("rniah-needle")
    rniah_question: str = option_default("rniah-question")
    rniah_answer: str = option_default("rniah-answer")
    rniah_values: str = option_default("rniah-values")
    rniah_answer_tokens: int = option_default("rniah-answer-tokens")
    haystack_path: Optional[str] = option_default("haystack")
    html_path: Optional[str] = option_default("html")
    repeat: int = option_default("repeat")
    cache_dir: Optional[str] = None
    clear_cache: bool = False
    baseline_path: Optional[str] = option_default("baseline")
    max_drop: float = option_default("max-drop")
    n_batch: int = 512
    n_ubatch: int = 512
    decode_batch: int = option_default("decode-batch")
    decode_batch_note: Optional[str] = None
    # The sensitivity control (None with --refract-no-sensitivity), why it was chosen, and
    # which composite the gate reads.
    sensitivity: Optional[KVConfig] = None
    sensitivity_note: Optional[str] = None
    gate_basis: str = option_default("gate")
    # What the verdict gate does with UNDECIDED: "fail" or "pass".
    undecided: str = option_default("undecided")
    llama_lib: Optional[str] = option_default("llama-lib")
    # Reference packs (reference/pack.py): the folder to save one into, the one to read.
    save_reference: Optional[str] = option_default("save-reference")
    reference_pack: Optional[str] = option_default("reference-pack")
    verbose: int = 0
    # The axes that decode in multi-sequence batches when selected (see the axes' BATCHED).
    batched_axes: Tuple[str, ...] = ()
    # Sequential measurement: stop an axis once its verdict is decided (False with
    # --refract-exhaustive), and the cap on items per axis (--refract-max-items).
    sequential: bool = True
    max_items: Optional[int] = option_default("max-items")
    sequential_note: Optional[str] = None  # why stopping is off where it was not asked off
    # The decode axis: positions per chunk fed one token per llama_decode, and chunks measured.
    decode_window: int = int(_default_text("decode-window"))
    decode_chunks: int = int(_default_text("decode-chunks"))
    # --refract-require-complete: the gate fails unless the whole default audit ran.
    require_complete: bool = False
    # --refract-sweep: the cache types asked for (("all",) for every type), None without a
    # sweep; the runner turns them into candidates once the build's type table is read.
    sweep_types: Optional[Tuple[str, ...]] = None
    sweep_exhaustive: bool = False
    # --refract-kv-budget: bytes per token, or a fraction of the f16 cache's (kv_budget_fraction).
    kv_budget: Optional[float] = None
    kv_budget_fraction: bool = False
    # --refract-require: the config that must PASS (also a candidate).
    require: Optional[KVConfig] = None
    # The depth axis: chunk length (given on the command line, or the default, which the
    # inputs cap at the model's training context) and the stride of its scored positions.
    depth: int = option_default("depth")
    depth_stride: int = option_default("depth-stride")
    depth_given: bool = False

    @property
    def candidate(self) -> KVConfig:
        """The first candidate (the only one outside a matrix)."""
        return self.candidates[0]

    def decode_layout(self) -> dict:
        """Which decode layout produced the numbers (in the report's settings)."""
        layout = {
            "sequences_per_batch": self.decode_batch,
            "axes": list(self.batched_axes) if self.decode_batch > 1 else [],
            "prompt_evaluation": "one sequence at a time, cut at n_batch",
            "decode_step": ("one token for each unfinished sequence of a batch in one llama_decode, one KV stream per "
                            "sequence; batches are consecutive selected prompts of an axis, the same for the "
                            "reference, the floor and every candidate" if self.decode_batch > 1 else
                            "one token of one sequence per llama_decode"),
        }
        if self.decode_batch_note:
            layout["note"] = self.decode_batch_note
        return layout

    def as_dict(self) -> dict:
        return {
            "axes": list(self.axes),
            "fail_under": self.fail_under,
            "item_fail_under": self.item_fail_under,
            "n_predict": self.n_predict,
            "ctx": self.ctx,
            "chunks": self.chunks,
            "seed": self.seed,
            "threads": self.threads,
            "gpu_layers": self.gpu_layers,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "flash_attn": self.reference.fa,
            "floor": self.floor,
            "repeat": self.repeat,
            "decode_layout": self.decode_layout(),
            "sensitivity": self.sensitivity.label() if self.sensitivity else None,
            "gate_basis": self.gate_basis,
            "undecided": self.undecided,
            "require_complete": self.require_complete,
            **({"sweep": {"types": list(self.sweep_types), "exhaustive": self.sweep_exhaustive,
                          "kv_budget": self.kv_budget, "kv_budget_is_fraction_of_reference": self.kv_budget_fraction}}
               if self.sweep_types else {}),
            **({"require": self.require.label()} if self.require else {}),
            "sequential": {"stopping": self.sequential, "max_items": self.max_items,
                           **({"note": self.sequential_note} if self.sequential_note else {})},
            "decode": {"window": self.decode_window, "chunks": self.decode_chunks},
            "depth": {"depth": self.depth, "stride": self.depth_stride},
            "rniah": {
                "lengths": list(self.rniah_lengths) if self.rniah_lengths else None,
                "positions": list(self.rniah_positions),
                "trials": self.rniah_trials,
                "values": self.rniah_values,
                "answer_tokens": self.rniah_answer_tokens,
            },
        }


def read_settings(config, known_axes: Optional[dict] = None) -> Optional[Settings]:
    """None when --refract-model is absent: the plugin then does nothing at all.
    ``known_axes``: name -> axis of every axis a run may select (default: the built-ins)."""
    if known_axes is None:
        from .axes import resolve

        known_axes = resolve()
    known = tuple(known_axes)
    model = _get(config, "model")
    if not model:
        return None
    model = _path(config, "model", _embedded_model_names())
    assert model is not None  # given: checked just above
    given = config.getoption("refract_candidate")
    if given and any(not (t or "").strip() for t in given):
        raise UsageProblem("--refract-candidate is empty; give a KV config, e.g. --refract-candidate=ctk=q8_0,ctv=q4_0")
    candidate_texts = given or config.getini("refract_candidate") or []
    candidate_texts = [t.strip() for t in candidate_texts if t and t.strip()]
    sweep_types = _sweep_types(config)
    require = parse_kv_config(_get(config, "require")) if _get(config, "require") else None
    if not candidate_texts and not sweep_types:
        raise UsageProblem("--refract-candidate is required with --refract-model, e.g. --refract-candidate=ctk=q8_0,ctv=q4_0 "
                           "(or --refract-sweep=f16,q8_0,q4_0 for every pair of some cache types)")
    reference = parse_kv_config(_get(config, "reference"))
    candidates = [parse_kv_config(t) for t in candidate_texts]
    # Every candidate shares flash attention with the reference (and so with each other).
    for cand in candidates:
        share_flash_attention(reference, cand)  # raises on reference/candidate conflict
    explicit = {c.fa for c in [reference, *candidates] if c.fa_explicit}
    if len(explicit) > 1:
        raise UsageProblem("all candidates must share flash attention with the reference: fa=on and fa=off both given")
    if explicit:
        fa = explicit.pop()
        reference = replace(reference, fa=fa)
        candidates = [replace(c, fa=fa) for c in candidates]
    # Compared as configs, not as their text: fa=on spelled out is the default it names.
    duplicate = next((c for i, c in enumerate(candidates) if c in candidates[:i]), None)
    if duplicate:
        raise UsageProblem(f"--refract-candidate {duplicate.label()} is given twice (as "
                           f"{' and '.join(t for t, c in zip(candidate_texts, candidates) if c == duplicate)})")

    if _get(config, "full"):
        axes = known
    else:
        raw_axes = _get(config, "axes") or ""
        axes = tuple(a.strip().lower() for a in raw_axes.split(",") if a.strip())
        if axes == ("none",):
            axes = ()
        unknown = [a for a in axes if a not in known]
        if unknown:
            raise UsageProblem(f"--refract-axes: unknown axis {unknown[0]!r}; choose from {', '.join(known)} or none")
    fail_text = _get(config, "fail-under") or _default_text("fail-under")
    try:
        fail_under = parse_threshold(fail_text)
    except ValueError as exc:
        raise UsageProblem(f"--refract-fail-under: {exc}") from None
    item_text = _get(config, "item-fail-under")
    try:
        item_fail_under = parse_threshold(item_text) if item_text else None
    except ValueError as exc:
        raise UsageProblem(f"--refract-item-fail-under: {exc}") from None

    threads_raw = _get(config, "threads")
    if threads_raw:
        threads = _int(config, "threads", 1)
        cpus = os.cpu_count() or 1
        if threads > cpus:
            # Refused, not capped: threads change llama.cpp's numbers (they key the reference
            # cache), so a run must use what was asked or nothing; and threads beyond the
            # logical CPUs only spin against each other (10000 brought a machine to a halt).
            raise UsageProblem(f"--refract-threads={threads} exceeds this machine's {cpus} logical CPUs; "
                               f"use at most {cpus}")
    else:
        # Under xdist each worker gets its share of the cores: oversubscribed llama.cpp threads
        # spin against each other and run several times slower.
        workers = int(getattr(config, "workerinput", {}).get("workercount", 1) or 1)
        threads = max(1, (os.cpu_count() or 1) // workers)
    json_path = _output_path(config, "json")
    html_path = _output_path(config, "html")
    max_drop_raw = _get(config, "max-drop") or _default_text("max-drop")
    try:
        max_drop = float(max_drop_raw)
    except ValueError:
        raise UsageProblem(f"--refract-max-drop={max_drop_raw!r} must be a number of points") from None
    if not (0 <= max_drop <= 100):
        raise UsageProblem(f"--refract-max-drop={max_drop_raw} must be between 0 and 100")
    rniah = _rniah_settings(config, axes)
    repeat = _int(config, "repeat", 1)
    decode_batch, decode_batch_note = _decode_batch(config, repeat)
    sensitivity, sensitivity_note, gate_basis = _sensitivity(config, reference, candidates)
    if require is not None:
        require = _required(require, reference, candidates, sweep_types)
    if sweep_types and (sensitivity is None or gate_basis != "verdict"):
        raise UsageProblem("--refract-sweep recommends by the verdict, whose yardstick is the sensitivity control: drop "
                           + ("--refract-no-sensitivity" if sensitivity is None else f"--refract-gate={gate_basis}"))
    kv_budget, kv_budget_fraction = _kv_budget(config, sweep_types)
    sequential, sequential_note = _sequential(config, gate_basis)
    save_reference, reference_pack = _packs(config, repeat)
    return Settings(
        save_reference=save_reference,
        reference_pack=reference_pack,
        sequential=sequential,
        sequential_note=sequential_note,
        decode_window=_int(config, "decode-window", 1),
        decode_chunks=_int(config, "decode-chunks", 1),
        **_depth_settings(config),
        max_items=_int(config, "max-items", 1) if _get(config, "max-items") is not None else None,
        sensitivity=sensitivity,
        sensitivity_note=sensitivity_note,
        gate_basis=gate_basis,
        undecided=_undecided(config),
        require_complete=bool(_get(config, "require-complete")),
        sweep_types=sweep_types,
        sweep_exhaustive=bool(_get(config, "sweep-exhaustive")),
        kv_budget=kv_budget,
        kv_budget_fraction=kv_budget_fraction,
        require=require,
        decode_batch=decode_batch,
        decode_batch_note=decode_batch_note,
        **rniah,
        model=model,
        reference=reference,
        candidates=tuple(candidates),
        axes=axes,
        fail_under=fail_under,
        fail_under_text=fail_text,
        item_fail_under=item_fail_under,
        json_path=json_path,
        html_path=html_path,
        repeat=repeat,
        cache_dir=_cache_dir(config),
        clear_cache=bool(_get(config, "clear-cache")),
        baseline_path=_path(config, "baseline"),
        max_drop=max_drop,
        prompts_path=_path(config, "prompts"),
        corpus_path=_path(config, "corpus"),
        n_predict=_int(config, "n-predict", 1),
        ctx=_int(config, "ctx", 8),
        chunks=_chunks(config),
        seed=_int(config, "seed", 0),
        threads=threads,
        gpu_layers=_int(config, "gpu-layers", 0),
        floor=bool(_get(config, "floor")),
        llama_lib=_path(config, "llama-lib"),
        verbose=int(getattr(config.option, "verbose", 0) or 0),
        batched_axes=tuple(name for name, axis in known_axes.items() if getattr(axis, "BATCHED", 0)),
    )


def _sweep_types(config) -> Optional[Tuple[str, ...]]:
    """--refract-sweep's types as written (lower case, each once); ("all",) for every type.
    Whether the build has them is checked by the runner, against the build's own table."""
    text = _get(config, "sweep")
    if text is None:
        if _get(config, "sweep-exhaustive"):
            raise UsageProblem("--refract-sweep-exhaustive needs --refract-sweep=TYPES")
        return None
    names = tuple(dict.fromkeys(t.strip().lower() for t in str(text).split(",") if t.strip()))
    if not names:
        raise UsageProblem("--refract-sweep is empty: give cache types, e.g. --refract-sweep=f16,q8_0,q4_0, or all")
    if "all" in names and len(names) > 1:
        raise UsageProblem("--refract-sweep=all already names every type; give all or a list, not both")
    return names


def _kv_budget(config, sweep_types) -> Tuple[Optional[float], bool]:
    """--refract-kv-budget: bytes per token (a number above 1), or a fraction of the f16 cache's
    (a number in (0, 1])."""
    raw = _get(config, "kv-budget")
    if raw is None:
        return None, False
    if not sweep_types:
        raise UsageProblem("--refract-kv-budget chooses among a sweep's configs; give --refract-sweep=TYPES too")
    try:
        value = float(str(raw))
    except ValueError:
        raise UsageProblem(f"--refract-kv-budget={raw!r} must be bytes per token (e.g. 9216) or a fraction of the "
                           "f16 cache's (e.g. 0.5)") from None
    if not (value > 0) or value != value or value == float("inf"):
        raise UsageProblem(f"--refract-kv-budget={raw} must be a positive number")
    return value, value <= 1.0


def _required(require: KVConfig, reference: KVConfig, candidates: list, sweep_types) -> KVConfig:
    """--refract-require's config, sharing flash attention with the reference; added to the
    candidates unless it is one (a sweep adds it itself when its pairs hold it)."""
    _reference, require = share_flash_attention(reference, require)
    require = replace(require, fa=reference.fa)
    if require == reference:
        raise UsageProblem(f"--refract-require={require.label()} is the reference: its damage is none by construction")
    if require not in candidates and not sweep_types:
        candidates.append(require)
    return require


def _depth_settings(config) -> dict:
    """--refract-depth and --refract-depth-stride, checked before anything loads (the model's
    own limit is checked with its header, inputs/loaded.py)."""
    from .inputs.depth import FIRST_BUCKET

    raw = _get(config, "depth") or _default_text("depth")
    try:
        depth = int(str(raw))
    except ValueError:
        raise UsageProblem(f"--refract-depth={raw!r} must be a whole number of tokens, e.g. 4096") from None
    if depth < 2 * FIRST_BUCKET:
        raise UsageProblem(f"--refract-depth={depth} is below {2 * FIRST_BUCKET}, twice the first depth bucket "
                           f"({FIRST_BUCKET} tokens); use --refract-depth={2 * FIRST_BUCKET} or more")
    raw_stride = _get(config, "depth-stride") or _default_text("depth-stride")
    try:
        stride = int(str(raw_stride))
    except ValueError:
        raise UsageProblem(f"--refract-depth-stride={raw_stride!r} must be a whole number, e.g. 16") from None
    if stride < 1:
        raise UsageProblem(f"--refract-depth-stride={stride} must be at least 1 (1 scores every position)")
    if stride > FIRST_BUCKET // 4:
        raise UsageProblem(f"--refract-depth-stride={stride} leaves the first depth bucket ({FIRST_BUCKET} tokens) "
                           f"with at most one position; use at most {FIRST_BUCKET // 4}")
    return {"depth": depth, "depth_stride": stride, "depth_given": config.getoption("refract_depth") is not None}


def _packs(config, repeat: int) -> Tuple[Optional[str], Optional[str]]:
    """--refract-save-reference and --refract-reference-pack, checked against what they
    cannot be combined with (the folders themselves are checked by reference/pack.py)."""
    save, use = _get(config, "save-reference"), _get(config, "reference-pack")
    if use and save:
        raise UsageProblem("--refract-save-reference and --refract-reference-pack exclude each other: a pack is saved "
                           "from a run that computes its own reference")
    if use and _get(config, "floor"):
        raise UsageProblem("--refract-floor compares the live reference with itself; it cannot run with "
                           "--refract-reference-pack")
    if use and repeat > 1:
        raise UsageProblem("--refract-repeat re-measures the reference; it cannot run with --refract-reference-pack")
    if (use or save) and _get(config, "no-sensitivity"):
        raise UsageProblem("a reference pack holds the sensitivity control as its yardstick; drop --refract-no-sensitivity")
    dist = getattr(config.option, "dist", "no") or "no"
    if save and (dist != "no" or getattr(config.option, "numprocesses", None)):
        raise UsageProblem("--refract-save-reference collects every entry in one process; run it without xdist (-n)")
    return save, use


def _chunks(config) -> Optional[int]:
    raw = _get(config, "chunks") or _default_text("chunks")
    if str(raw).lower() == "all":
        return None
    return _int(config, "chunks", 1)


def _sequential(config, gate_basis: str) -> Tuple[bool, Optional[str]]:
    """Whether axes stop once decided, and why not where that was not asked for."""
    if _get(config, "exhaustive"):
        return False, None
    if _get(config, "save-reference"):
        # A pack must hold every selected item, so no axis may stop once decided.
        return False, "--refract-save-reference saves the reference of every selected item"
    if gate_basis != "verdict":
        # The raw gate reads every selected item; a stop decided on the verdict
        # would change what they read.
        return False, f"the gate reads the {gate_basis} composite over every selected item"
    dist = getattr(config.option, "dist", "no") or "no"
    if dist != "no" or getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        # A worker sees only its own items' results, so no process could tell an axis is decided.
        return False, "under xdist no process sees every result, so no axis can be seen to be decided"
    return True, None


def _undecided(config) -> str:
    text = (_get(config, "undecided") or _default_text("undecided")).lower()
    if text not in ("fail", "pass"):
        raise UsageProblem(f"--refract-undecided={text!r} must be fail or pass")
    return text


def _sensitivity(config, reference: KVConfig, candidates=()) -> Tuple[Optional[KVConfig], Optional[str], str]:
    gate_text = (_get(config, "gate") or _default_text("gate")).lower()
    if gate_text == "calibrated":
        # The retention bound it read was the upper end of its own interval by construction.
        raise UsageProblem("--refract-gate=calibrated was retired; use the verdict gate (the default: drop "
                           "--refract-gate, or give --refract-gate=verdict)")
    if gate_text not in ("verdict", "raw"):
        raise UsageProblem(f"--refract-gate={gate_text!r} must be verdict or raw")
    explicit_gate = config.getoption("refract_gate") is not None
    if _get(config, "no-sensitivity"):
        if _get(config, "sensitivity"):
            raise UsageProblem("--refract-sensitivity and --refract-no-sensitivity contradict each other; give one")
        if gate_text == "verdict" and explicit_gate:
            raise UsageProblem(f"--refract-gate={gate_text} needs the sensitivity control; drop --refract-no-sensitivity "
                               "or use --refract-gate=raw")
        return None, "skipped (--refract-no-sensitivity): the gate uses the raw composite", "raw"
    text = _get(config, "sensitivity")
    if text:
        control = parse_kv_config(text)
        reference_fa, control = share_flash_attention(reference, control)
        if control.fa != reference.fa:
            raise UsageProblem("--refract-sensitivity must share flash attention with the reference")
        control = replace(control, fa=reference.fa, fa_explicit=reference.fa_explicit)
        _check_rounding_only(control, reference, candidates)
        why = "given by --refract-sensitivity"
    else:
        from .audit.roles import default_control  # here: reading options must not load the audit layer

        control, why = default_control(reference)
    if (control.ctk, control.ctv) == (reference.ctk, reference.ctv):
        raise UsageProblem(f"--refract-sensitivity={control.label()} equals the reference: a control must differ from it "
                           "by rounding only (e.g. ctk=bf16,ctv=bf16 for an f16 reference)")
    return control, why, gate_text


def _check_rounding_only(control: KVConfig, reference: KVConfig, candidates) -> None:
    """A control is the yardstick every candidate's damage is divided by: only a rounding-only
    change of the reference (float cache types, every other setting the reference's) measures
    the model's rounding sensitivity. A quantized control, or a candidate's own config, would
    make any damage look small."""
    flag = f"--refract-sensitivity={control.label()}"
    quantized = [f"{side}={t}" for side, t in (("ctk", control.ctk), ("ctv", control.ctv)) if t not in FLOAT_TYPES]
    if quantized:
        raise UsageProblem(f"--refract-sensitivity {', '.join(quantized)}: not a float cache type; a control must be "
                           "a rounding-only change of the reference (f16, bf16 or f32 cache types), or quantization "
                           "damage would be the yardstick")
    for key in ("nkvo", "swa_full", "rot"):
        if getattr(control, key) != getattr(reference, key):
            raise UsageProblem(f"{flag}: {key} differs from the reference's ({reference.label()}); a control may "
                               "change the cache types' rounding only")
    same = next((c for c in candidates if (c.ctk, c.ctv, c.nkvo, c.swa_full, c.rot)
                 == (control.ctk, control.ctv, control.nkvo, control.swa_full, control.rot)), None)
    if same is not None:
        raise UsageProblem(f"{flag} is also a candidate ({same.label()}): its damage would be divided by its own, "
                           "1x by construction; choose a control that no candidate uses")


def _decode_batch(config, repeat: int) -> Tuple[int, Optional[str]]:
    """Sequences per decode batch, and why it was lowered to 1 when it was."""
    wanted = _int(config, "decode-batch", 1)
    if wanted > 1 and repeat > 1:
        # A repetition re-measures one item; in a batch it would redo the whole batch.
        return 1, "--refract-repeat decodes one sequence at a time"
    dist = getattr(config.option, "dist", "no") or "no"
    if wanted > 1 and dist not in ("no", "loadgroup"):
        # Only loadgroup keeps a batch's items on one worker; elsewhere each worker would
        # decode prompts that another worker's items need.
        return 1, f"--dist {dist} spreads a batch over workers; use --dist loadgroup to decode in batches"
    return wanted, None


def _cache_dir(config) -> Optional[str]:
    """Explicit folder, else pytest's own cache dir; None (no cache) with --refract-no-cache or
    when pytest's cache provider is disabled and no folder was given."""
    if _get(config, "no-cache"):
        return None
    explicit = _path(config, "cache-dir")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    try:
        base = config.getini("cache_dir")
    except ValueError:  # -p no:cacheprovider
        return None
    if not base or not config.pluginmanager.has_plugin("cacheprovider"):
        return None
    root = config.rootpath
    return str((root / os.path.expanduser(os.path.expandvars(str(base))) / "d" / "refract-reference").resolve())


def _output_path(config, name: str) -> Optional[str]:
    """A report path must be writable where it is asked for: checked before any model runs."""
    path = _path(config, name)
    if path:
        full = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(full):
            raise UsageProblem(f"--refract-{name}={path} is a directory; give a file path")
        if not os.path.isdir(os.path.dirname(full)):
            raise UsageProblem(f"--refract-{name}={path}: folder {os.path.dirname(full)} does not exist")
    return path


def _number_list(config, name: str, cast, lo, hi) -> tuple:
    raw = _get(config, name)
    values = []
    for part in str(raw).split(","):
        if not part.strip():
            continue
        try:
            value = cast(part.strip())
        except ValueError:
            raise UsageProblem(f"--refract-{name}: {part.strip()!r} is not a number") from None
        if not (lo <= value <= hi):
            raise UsageProblem(f"--refract-{name}: {value} must be between {lo} and {hi}")
        values.append(value)
    if not values:
        raise UsageProblem(f"--refract-{name} is empty")
    return tuple(dict.fromkeys(values))


def _rniah_settings(config, axes: Tuple[str, ...] = ("rniah",)) -> dict:
    lengths = _number_list(config, "rniah-lengths", int, 64, 10_000_000) if _get(config, "rniah-lengths") else None
    needle = _get(config, "rniah-needle") or ""
    answer = _get(config, "rniah-answer") or ""
    if "{value}" not in needle:
        raise UsageProblem("--refract-rniah-needle must contain {value}, e.g. 'The magic number is {value}.'")
    if "{value}" not in answer:
        raise UsageProblem("--refract-rniah-answer must contain {value}, e.g. '{value}'")
    from .inputs import answer as answer_mod

    if len(answer) > answer_mod.MAX_PATTERN_CHARS:
        raise UsageProblem(f"--refract-rniah-answer is {len(answer)} characters long; an answer pattern has at most "
                           f"{answer_mod.MAX_PATTERN_CHARS}")
    try:
        import re

        regex = answer_mod.answer_regex(answer, "4817")
        re.compile(regex, re.IGNORECASE)
    except re.error as exc:
        raise UsageProblem(f"--refract-rniah-answer is not a valid regex: {exc}") from None
    # A pattern that matches a reply without the value (the empty reply, a refusal) scores
    # every trial found: the axis would measure nothing. Searched only when the axis runs, and
    # with a time bound: the pattern is the user's, and a backtracking one never ends.
    for reply in (("", " ", "I do not know the magic number.", "The answer is 1234.") if "rniah" in axes else ()):
        try:
            found = answer_mod.search(regex, reply)
        except answer_mod.PatternTimeout:
            raise UsageProblem(f"--refract-rniah-answer={answer!r} takes longer than {answer_mod.MATCH_TIMEOUT_S:g} s "
                               f"on a {len(reply)}-character reply (it backtracks without end); simplify it, "
                               "e.g. '{value}'") from None
        if found:
            raise UsageProblem(f"--refract-rniah-answer={answer!r} matches a reply that lacks the value "
                               f"({reply!r}), so every trial would count as found; make {{value}} required")
    for name, text in (("rniah-needle", needle), ("rniah-answer", answer),
                       ("rniah-question", _get(config, "rniah-question") or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Bytes that are not UTF-8 on the command line arrive as lone surrogates.
            raise UsageProblem(f"--refract-{name} holds bytes that are not UTF-8 text; give UTF-8") from None
    values = (_get(config, "rniah-values") or _default_text("rniah-values")).lower()
    if values not in ("numbers", "words"):
        raise UsageProblem("--refract-rniah-values must be numbers or words")
    positions = _number_list(config, "rniah-positions", float, 0.0, 1.0)
    # A cell is named by its position to two decimals (its test id and report key).
    named: Dict[str, float] = {}
    for position in positions:
        if f"{position:.2f}" in named:
            raise UsageProblem(f"--refract-rniah-positions: {named[f'{position:.2f}']} and {position} are one cell "
                               f"({position:.2f}); give positions at least 0.01 apart")
        named[f"{position:.2f}"] = position
    return {
        "rniah_lengths": lengths,
        "rniah_positions": positions,
        "rniah_trials": _int(config, "rniah-trials", 1),
        "rniah_needle": needle,
        "rniah_question": _get(config, "rniah-question") or _default_text("rniah-question"),
        "rniah_answer": answer,
        "rniah_values": values,
        "rniah_answer_tokens": _int(config, "rniah-answer-tokens", 1),
        "haystack_path": _path(config, "haystack"),
    }
