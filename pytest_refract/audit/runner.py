"""Runs the audit's items in one process: checks inputs before any model loads, then (lazily,
on the first item that needs it) one model and its contexts; plans decode batches, keeps their
results until their items have run, times items and counts compute. Created in
pytest_configure of every process (controller and xdist workers alike), so flag problems
surface as usage errors everywhere.

The axes never see the runner: they get its facade (audit/run.py). The reference side lives in
reference/, the inputs in inputs/, the engine behind engines/."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from ..engines.base import ContextRefused, ContextSettings, CutCounts, padded
from ..engines.gguf import expected_data_end, file_sha256, read_gguf
from ..engines.kvconfig import FLOAT_TYPES, validate_for_model
from ..errors import MeasurementError, UsageProblem
from ..inputs import data
from ..inputs.loaded import Inputs
from .batches import DecodeBatches
from .control import SensitivityControl
from .guard import check_outputs, input_files
from .results import ItemResult
from .roles import Role
from .run import Run

if TYPE_CHECKING:  # the options' type only: settings.py sits above this layer
    from ..settings import Settings

_ZERO_COUNTS = {"batch_tokens": 0, "decode_tokens": 0, "seq_decode_tokens": 0, "seq_decode_steps": 0}
# Beside them, which path each cut back to a prefix took (engines.base.CutCounts).
_ZERO_COUNTS.update(CutCounts().as_counts())


class Runner:
    def __init__(self, settings: Settings, axes: dict, is_worker: bool = False, engine_mod=None):
        """``axes``: name -> axis object of every axis this run may select (see axes.resolve);
        ``engine_mod``: an engine module (default: llama.cpp through llama-cpp-python)."""
        self.settings = settings
        self.axes = axes
        self.model_path = data.resolve_model(settings.model)
        self.info = read_gguf(self.model_path)
        check_outputs({"--refract-json": settings.json_path, "--refract-html": settings.html_path},
                      input_files(settings, self.model_path), settings.cache_dir)
        from ..reference.folder import prepare_cache_dir

        # Only ever a folder this cache marked as its own, cleared of its own entries only;
        # refused (or warned about) before anything loads.
        cache_dir = (prepare_cache_dir(Path(settings.cache_dir), clear=settings.clear_cache and not is_worker)
                     if settings.cache_dir else None)
        self.engine_mod = engine_mod or _load_llamacpp(settings)
        self.gpu_note: Optional[str] = None
        if settings.gpu_layers and not self.engine_mod.supports_gpu_offload():
            # The report records what ran, not what was asked: this build keeps every layer
            # on the CPU whatever -ngl says.
            self.gpu_note = (f"--refract-gpu-layers={settings.gpu_layers}: this llama.cpp build has no GPU offload; "
                             "every layer runs on the CPU (0 offloaded)")
            settings = self.settings = replace(settings, gpu_layers=0)
        self.engine_mod.set_log_echo(settings.verbose > 0)
        need = expected_data_end(self.info, self.engine_mod.row_size)
        if need > self.info.size_bytes:
            raise UsageProblem(f"truncated GGUF file: {self.model_path} is {self.info.size_bytes} bytes, its tensors "
                               f"need {need}; download it again")
        self._configure_roles()
        needs = set()
        for name in settings.axes:
            needs |= set(self.axes[name].NEEDS)
        self.inputs = Inputs(settings, self.model_path, self.info, self.engine_mod, needs)
        self._engine = None
        self._contexts: Dict[str, object] = {}
        # Batched decoding (--refract-decode-batch): one multi-sequence context per role, the
        # plan of items this process will run, and per-axis memos of a finished batch.
        self._seq_contexts: Dict[str, object] = {}
        self.selected: Dict[tuple, int] = {}
        self.batches = DecodeBatches(self.item_roles, self.control_role, self.control_cached)
        self._axis_now: Optional[str] = None  # the axis of the last item measured
        # Greedy continuations decoded so far: (role, prompt ids, n_predict) -> token ids. PLAD's
        # anchors are the trajectory axis's decodes of the same prompts; R-NIAH's control asks
        # for the reference answers the candidates just had.
        self._greedy: Dict[tuple, List[int]] = {}
        self.kv_bytes_peak = 0
        # Computed once, on first use: per role, the KV cache llama.cpp allocated; the model's facts.
        self._allocations: Dict[str, Optional[dict]] = {}
        self._model_summary: Optional[dict] = None
        from .progress import Progress

        # Silent until the plugin gives it a sink (see progress.sink_for).
        self.progress = Progress()
        self._probe_contexts()
        # A self-reference is recognised by what computes, not by how the configs are spelled.
        self.self_reference = {role: self.computation(role) == self.computation(Role.REFERENCE)
                               for role in self.candidate_roles}
        from ..reference.store import ReferenceSide, ReferenceStore

        identity = ReferenceStore.identity(self.model_path, settings, self.build_info(), self.context_env["reference"],
                                           self.rotation("reference"), cache_dir)
        side = ReferenceSide(
            greedy=lambda prompts, n_predict, on_row=None: self.greedy(Role.REFERENCE, prompts, n_predict, on_row),
            context=lambda: self.context(Role.REFERENCE), decode_width=self.decode_width,
            n_vocab=lambda: self.n_vocab)
        self.reference = ReferenceStore(settings, cache_dir, identity, side)
        self.progress.suffix = self.reference.size_text
        # What the axes see of this runner (audit/run.py documents it).
        self.run = Run(self)
        self.control = (SensitivityControl(self.reference, self.labels[Role.CONTROL], self.axes, self.run,
                                           self.batches.planned_units) if self.control_role else None)

    def _configure_roles(self) -> None:
        """One role per config: "reference" (and "floor", a second reference context), one
        per candidate ("cand0", "cand1", ...: each gets its own context, all share the
        reference's results) and the sensitivity control."""
        s = self.settings
        types = self.engine_mod.cache_types()
        head_k, head_v = self.info.head_dims
        ref_types = validate_for_model(s.reference, types, head_k, head_v, "--refract-reference")
        self.types = {Role.REFERENCE: ref_types, Role.FLOOR: ref_types}
        self.configs = {Role.REFERENCE: s.reference, Role.FLOOR: s.reference}
        self.candidate_roles: List[str] = []
        self.labels: Dict[str, str] = {}
        for i, cand in enumerate(s.candidates):
            role = Role.candidate(i)
            self.types[role] = validate_for_model(cand, types, head_k, head_v, "--refract-candidate")
            self.configs[role] = cand
            self.candidate_roles.append(role)
            self.labels[role] = cand.label()
        self.id_prefix = _id_prefixes(s.candidates)
        # The sensitivity control: one more role measured on the same units as the candidates,
        # inside the first selected candidate item of each unit (so item ids, counts and -k
        # selection stay as they are), never ranked or gated itself.
        self.control_role: Optional[str] = None
        if s.sensitivity is not None:
            self.control_role = Role.CONTROL
            self.types[Role.CONTROL] = validate_for_model(s.sensitivity, types, head_k, head_v, "--refract-sensitivity")
            self.configs[Role.CONTROL] = s.sensitivity
            self.labels[Role.CONTROL] = s.sensitivity.label()
        self.item_roles: List[str] = self.candidate_roles + ([Role.CONTROL] if self.control_role else [])
        self.self_reference = {role: self.configs[role] == s.reference for role in self.candidate_roles}

    def _probe_contexts(self) -> None:
        """Let llama.cpp judge every config before any item runs: a small context per config
        is created and freed. A refusal (e.g. a cache type whose block size does not fit the
        model's heads) is a usage error quoting llama.cpp; the rotation it applied and the cache
        sizes it allocated are read back from its log, and a rotation policy it did not honour
        is refused as well."""
        from ..engines.kvlog import check_cache_types, check_rotation

        self.cache_logs: Dict[str, object] = {}
        self.context_env: Dict[str, dict] = {}
        for role in [Role.REFERENCE, *self.item_roles]:
            kv = self.configs[role]
            flag = {Role.REFERENCE: "--refract-reference", Role.CONTROL: "--refract-sensitivity"}.get(role, "--refract-candidate")
            try:
                facts, env = self.engine.probe(kv, self.types[role], self._context_settings(256))
            except ContextRefused as exc:
                raise UsageProblem(f"{flag} {exc}") from None
            quantized = tuple(t.name not in FLOAT_TYPES for t in self.types[role])
            problem = check_rotation(kv.rot, facts.rotation, quantized, f"{flag} {kv.label()}")
            problem = problem or check_cache_types(tuple(t.name for t in self.types[role]), facts, f"{flag} {kv.label()}")
            if problem:
                raise UsageProblem(problem)
            self.cache_logs[role] = facts
            self.context_env[role] = env
        self.cache_logs[Role.FLOOR] = self.cache_logs[Role.REFERENCE]
        self.context_env[Role.FLOOR] = self.context_env[Role.REFERENCE]

    def computation(self, role: str) -> tuple:
        """What decides the role's numbers, as llama.cpp set it up: the cache types it allocated
        (per cache), flash attention, the rotation it applied; host-memory KV (nkvo) only where
        layers run on a GPU, and a full-size window cache only where the model has SWA layers.
        Two configs with the same computation give the same logits whatever their labels say."""
        kv, log = self.configs[role], self.cache_logs.get(role)
        caches = tuple((c.kind, c.k_type, c.v_type) for c in (log.caches if log else ())) or \
            ((None, kv.ctk, kv.ctv),)
        rotation = log.rotation if log is not None and log.rotation is not None else kv.rot
        has_swa = any(c.kind == "swa" for c in (log.caches if log else ()))
        return (caches, kv.fa, repr(rotation), kv.nkvo if self.settings.gpu_layers else None,
                kv.swa_full if has_swa else None)

    # -- facts ------------------------------------------------------------------------------

    def build_info(self) -> dict:
        return self.engine_mod.build_info()

    def rotation(self, role: str) -> Optional[dict]:
        """{"k": bool, "v": bool} as llama.cpp logged it for the role's config; None when the
        build logs no rotation (it has none)."""
        return self.cache_logs[role].rotation

    def kv_allocation(self, role: str) -> Optional[dict]:
        from ..engines.allocation import kv_allocation

        if role not in self._allocations:
            self._allocations[role] = kv_allocation(self.info, self.cache_logs.get(role), self.types[role],
                                                    self.engine_mod.row_size)
        return self._allocations[role]

    def kv_bytes_per_token(self, role: str) -> Optional[int]:
        """Bytes the role's KV cache takes per token over all layers, as llama.cpp allocated it;
        what a quantized cache saves, the other half of "which config should I ship"."""
        alloc = self.kv_allocation(role)
        return alloc["bytes_per_token"] if alloc else None

    def kv_memory_summary(self, role: str) -> Optional[dict]:
        from ..engines.allocation import kv_memory_summary

        return kv_memory_summary(self.kv_allocation(role), self.kv_allocation(Role.REFERENCE))

    def model_summary(self) -> dict:
        from ..engines.allocation import model_summary

        if self._model_summary is None:
            self._model_summary = model_summary(self.info, self.model_path, self.engine.n_params)
            # The whole file's sha256 identifies the model (a baseline is compared by it): the
            # cache's index holds it where there is a cache; without one it is computed here.
            digest = self.reference.cache.identity["model"]["sha256"]
            self._model_summary["sha256"] = digest or file_sha256(self.model_path)
            self._model_summary["n_vocab"] = self.engine.n_vocab
        return dict(self._model_summary)

    def detokenize(self, tokens) -> str:
        return self.engine.detokenize(tokens)

    # -- the engine and its contexts ------------------------------------------------------------

    @property
    def engine(self):
        if self._engine is None:
            try:
                self._engine = self.engine_mod.Engine(self.model_path, n_gpu_layers=self.settings.gpu_layers)
            except MeasurementError as exc:  # the full load is refused though the vocabulary loaded: one line
                raise UsageProblem(f"{exc}; the vocabulary loaded, so its weights or hyperparameters are at fault") from None
            self._engine.on_decoded = self.progress.decoded
            self.inputs.tokenizer = self._engine
        return self._engine

    @property
    def n_vocab(self) -> int:
        return self.engine.n_vocab

    def context_size(self) -> int:
        s = self.settings
        need = s.ctx
        if self.inputs.longest_prompt():
            need = max(need, self.inputs.longest_prompt() + s.n_predict)
        inputs = self.inputs
        if inputs.rniah_lengths:
            need = max(need, max(inputs.rniah_lengths) + len(inputs.rniah_prompt([])) + inputs.rniah_answer_tokens)
        # llama.cpp pads the cache to 256 cells; asking for a padded size keeps it explicit.
        return padded(need)

    def context(self, role: str, min_ctx: int = 0):
        """The role's one-sequence context; replaced by a larger one when a fixture needs more
        room (context size does not change the numbers: llama.cpp attends over the cells in use)."""
        ctx = self._contexts.get(role)
        if ctx is None or ctx.n_ctx < min_ctx:
            n_ctx = max(self.context_size(), padded(min_ctx))
            if ctx is not None:
                self.engine.drop_context(role)
            ctx = self.engine.context(self.configs[role], self.types[role], self._context_settings(n_ctx), role)
            self._contexts[role] = ctx
            self._note_kv_bytes()
        return ctx

    def sequences(self, role: str, n_seq: int, n_ctx_seq: int):
        """The role's multi-sequence context (grown when a batch needs more)."""
        ctx = self.engine.context(self.configs[role], self.types[role], self._context_settings(n_ctx_seq),
                                  f"{role}#seq", n_seq=n_seq, n_ctx_seq=n_ctx_seq)
        self._seq_contexts[role] = ctx
        self._note_kv_bytes()
        return ctx

    def _context_settings(self, n_ctx: int) -> ContextSettings:
        """What every context shares apart from its size: batch sizes and threads change
        llama.cpp's numbers, so reference and candidates must agree on them."""
        s = self.settings
        return ContextSettings(n_ctx=n_ctx, n_batch=s.n_batch, n_ubatch=s.n_ubatch, n_threads=s.threads)

    def _note_kv_bytes(self) -> None:
        """Track the most KV-cache memory held at once (all contexts), for the report: the
        'both KV caches' term of a memory budget, batched-decoding streams included."""
        from ..engines.allocation import context_kv_bytes

        total = 0
        for role, ctx in list(self._contexts.items()) + list(self._seq_contexts.items()):
            total += context_kv_bytes(self.kv_allocation(role), ctx)  # sliding-window caches as logged
        self.kv_bytes_peak = max(self.kv_bytes_peak, total)

    def release_sequences(self) -> None:
        """Free the multi-sequence contexts (their KV caches) before axes that do not use them."""
        for role in list(self._seq_contexts):
            self.engine.drop_context(f"{role}#seq")
        self._seq_contexts.clear()

    def release_contexts(self) -> None:
        """Free the one-sequence contexts (KV caches and logits buffers); the next item that
        needs one opens it afresh (every measurement starts from a cleared cache anyway)."""
        for role in list(self._contexts):
            self.engine.drop_context(role)
        self._contexts.clear()

    def token_counts(self) -> dict:
        """Tokens processed so far per role: batched prompt tokens, one-sequence decode steps,
        and tokens decoded in multi-sequence steps (with the number of those steps); and how
        often each path of a cut back to a prefix ran (cut_*, see engines.base.CutCounts)."""
        counts: Dict[str, Dict[str, int]] = {}
        for role, c in list(self._contexts.items()) + list(self._seq_contexts.items()):
            into = counts.setdefault(role, dict(_ZERO_COUNTS))
            into["batch_tokens"] += c.n_batch_tokens
            into["decode_tokens"] += c.n_decode_tokens
            into["seq_decode_tokens"] += c.n_seq_decode_tokens
            into["seq_decode_steps"] += c.n_seq_decode_steps
            for key, value in c.cuts.as_counts().items():
                into[key] += value
        return counts

    # -- greedy decoding: one path, a single prompt is a batch of one --------------------------

    def decode_width(self, n_prompts: int) -> int:
        """How many sequences step together for ``n_prompts`` prompts."""
        return max(1, min(self.settings.decode_batch, n_prompts))

    def greedy(self, role: str, prompts: List[List[int]], n_predict: int, on_row=None, on_finish=None) -> List[List[int]]:
        """The role's greedy tokens per prompt, up to --refract-decode-batch sequences stepping
        together (see engines.base.Context.greedy for on_row/on_finish; on_finish here gets
        the context too: ``on_finish(ctx, index, slot)``). One prompt at a time runs in the
        role's one-sequence context, where a shared prefix (an R-NIAH haystack) is reused.
        Always decodes; what it decoded is remembered for greedy_tokens."""
        width = self.decode_width(len(prompts))
        if width == 1:
            ctx = self.context(role, max(len(p) for p in prompts) + n_predict)
        else:
            ctx = self.sequences(role, width, max(len(p) for p in prompts) + n_predict)
        tokens = ctx.greedy(prompts, n_predict, on_row, None if on_finish is None else
                            (lambda i, slot: on_finish(ctx, i, slot)))
        self.remember_greedy(role, prompts, n_predict, tokens)
        return tokens

    def remember_greedy(self, role: str, prompts: List[List[int]], n_predict: int, tokens: List[List[int]]) -> None:
        for p, toks in zip(prompts, tokens):
            self._greedy[(role, tuple(p), n_predict)] = list(toks)

    def remembered_greedy(self, role: str, prompts: List[List[int]], n_predict: int) -> Optional[List[List[int]]]:
        """The role's remembered continuations of every prompt, or None unless all are known."""
        found = [self._greedy.get((role, tuple(p), n_predict)) for p in prompts]
        return None if any(f is None for f in found) else [list(f) for f in found]

    def greedy_tokens(self, role: str, prompt_tokens: List[int]) -> List[int]:
        """Greedy continuation (--refract-n-predict), shared between axes: PLAD's anchors are
        the trajectory axis's decodes of the same prompts with the same settings."""
        self.prefetch_greedy(role, [prompt_tokens])
        return list(self._greedy[(role, tuple(prompt_tokens), self.settings.n_predict)])

    def prefetch_greedy(self, role: str, prompts: List[List[int]]) -> None:
        """Decode together every prompt the role has no greedy continuation for yet, so that
        greedy_tokens then finds them all (PLAD anchors and perturbations)."""
        n = self.settings.n_predict
        missing = []
        for p in prompts:
            if (role, tuple(p), n) not in self._greedy and p not in missing:
                missing.append(p)
        if not missing:
            return
        if role == Role.REFERENCE:
            self.remember_greedy(role, missing, n, self.reference.greedy(missing, n))
        else:
            self.greedy(role, missing, n)

    # -- batches ---------------------------------------------------------------------------------

    def items(self):
        """(axis name, unit, xdist group) of every item the selected axes have, in run order:
        unit-major with the candidates innermost, so the candidates of one unit run back to back
        and share the reference's result for it (computed once, kept in memory). Each unit
        carries its ``candidate`` role and its decode ``batch`` number (None when unbatched)."""
        s = self.settings
        for name, axis in self.axes.items():
            if name not in s.axes:
                continue
            batched = s.decode_batch > 1 and bool(axis.BATCHED)
            size = s.decode_batch * (axis.BATCHED or 1)
            units = axis.units(self.run)
            if s.max_items is not None:
                # The first N in the axis's measuring order (a balanced sample, see
                # inputs.data.measuring_order); ids stay those of the whole set.
                units = units[: s.max_items]
            for index, unit in enumerate(units):
                # Consecutive units form a decode batch; with `-n N --dist loadgroup` a batch
                # (or, unbatched, a unit) goes to one worker with all its candidates.
                group = f"{name}-batch{index // size}" if batched else f"{name}-{unit['id']}"
                for role in self.candidate_roles:
                    yield name, dict(unit, candidate=role, batch=index // size if batched else None), group

    def set_plan(self, planned) -> None:
        """(axis, unit) of every item this process may run, after -k/-m deselection."""
        self.selected = {}  # (candidate role, axis) -> items selected: an interrupted report says how many ran
        for axis, unit in planned:
            key = (unit["candidate"], axis)
            self.selected[key] = self.selected.get(key, 0) + 1
        self.batches.set_plan(planned)

    # -- measuring an item -------------------------------------------------------------------------

    def measure(self, axis, unit) -> ItemResult:
        """Run one item (``--refract-repeat`` times) and record the tokens it cost, so a
        benchmark can compare wall time with llama.cpp's raw throughput for the same tokens."""
        if axis.NAME != self._axis_now:
            # A new axis: what the previous one kept for its batches is not needed any more
            # (the KLD axis, where memory peaks, uses none of it).
            self._axis_now = axis.NAME
            self.batches.forget()
            self.reference.forget_batches()
            if not axis.BATCHED:
                self.release_sequences()
            # The one-sequence contexts too: each axis sizes their buffers for itself (KLD keeps
            # 255 rows of vocabulary logits per context, 267 MB on Gemma 3), and with sequential
            # stopping the axes take turns, so they would sit under the next axis's contexts.
            self.release_contexts()
        from .progress import describe

        multi = len(self.candidate_roles) > 1
        planned = axis.planned_tokens(self.run, unit) * self.settings.repeat
        self.progress.begin(describe(axis.NAME, unit, self.labels[unit["candidate"]] if multi else None, axis.UNIT_NOUN),
                            planned)
        try:
            item = ItemResult(unit["candidate"], axis.NAME, unit["id"], self._measure_once(axis, unit))
            if self.control is not None and self.control.due(axis.NAME, unit["id"]):
                # The first candidate item of a unit measures the control too; its result rides
                # along (also from xdist workers) and the session files it under the control.
                try:
                    item.control = ItemResult(Role.CONTROL, axis.NAME, unit["id"],
                                              self.control.measure(axis, unit, self._measure_once))
                except (MeasurementError, UsageProblem) as exc:
                    item.control_error = str(exc)
            for _ in range(self.settings.repeat - 1):
                self.forget()
                item.repeats.append(self._measure_once(axis, unit))
        finally:
            self.progress.end()
        return item

    def control_cached(self, axis_name: str, unit: dict) -> bool:
        return self.control is not None and self.control.cached(axis_name, unit)

    def forget(self) -> None:
        """Drop everything a repetition could reuse: cached decodes and KV caches."""
        self._greedy.clear()
        self.reference.forget()
        self.batches.forget()
        for ctx in self._contexts.values():
            ctx.reset()

    def _measure_once(self, axis, unit) -> dict:
        cache_before = (self.reference.hits, self.reference.misses)
        before = self.token_counts()
        self.batches.time_in_item = 0.0
        started = time.perf_counter()
        result = axis.measure(self.run, unit)
        if not result.get("skipped"):
            # The item's own time, less the batch decodes it ran for others, plus its share.
            result["wall_s"] = (time.perf_counter() - started - self.batches.time_in_item
                                + self.batches.seconds_of(axis.NAME, unit))
        after = self.token_counts()
        result["compute"] = {
            role: {k: counts[k] - before.get(role, _ZERO_COUNTS)[k] for k in counts} for role, counts in after.items()
        }
        result["reference_cache"] = {"hits": self.reference.hits - cache_before[0],
                                     "misses": self.reference.misses - cache_before[1]}
        return result

    def close(self) -> None:
        self._contexts.clear()
        self._seq_contexts.clear()
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _load_llamacpp(settings: Settings):
    """The llama.cpp engine, from --refract-llama-lib's folder when given (it must be in place
    before llama_cpp is first imported)."""
    from ..engines import libload, load

    lib_dir = libload.use_library(settings.llama_lib) if settings.llama_lib else None
    try:
        return load("llamacpp")
    except (OSError, RuntimeError) as exc:  # llama-cpp-python could not load the library
        raise UsageProblem(libload.import_problem(exc, lib_dir)) from None


def _id_prefixes(candidates) -> Dict[str, str]:
    """Test-id prefix per candidate role: none for a single candidate (test_kld[chunk-07]),
    the cache types for a matrix (test_kld[q8_0-q4_0-chunk-07]), more detail if those clash."""
    if len(candidates) == 1:
        return {Role.candidate(0): ""}
    shorts = [c.short() for c in candidates]
    if len(set(shorts)) != len(shorts):
        shorts = [c.label().replace("ctk=", "").replace("ctv=", "").replace("=", "_").replace(",", "-") for c in candidates]
    return {Role.candidate(i): f"{short}-" for i, short in enumerate(shorts)}
