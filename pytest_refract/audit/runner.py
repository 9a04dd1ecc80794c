"""Runs the audit's items in one process: checks inputs before any model loads, then (lazily,
on the first item that needs it) one model and its contexts; plans decode batches, keeps their
results until their items have run, times items and counts compute. Created in
pytest_configure of every process (controller and xdist workers alike), so flag problems
surface as usage errors everywhere.

The axes never see the runner: they get its facade (audit/run.py). The reference side lives in
reference/, the inputs in inputs/, the engine behind engines/."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

from ..axes.base import Unit
from ..engines.base import ContextRefused, ContextSettings, CutCounts, padded
from ..engines.gguf import expected_data_end, file_sha256, read_gguf
from ..engines.kvconfig import FLOAT_TYPES, validate_for_model
from ..errors import MeasurementError, UsageProblem
from ..inputs import data
from ..inputs.loaded import Inputs
from ..record import RunRecord
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
        # Each role's contexts live on its Role; this numbers their openings (see token_counts).
        self._openings = itertools.count(1)
        # Batched decoding (--refract-decode-batch): the plan of items this process will run,
        # and per-axis memos of a finished batch.
        self.selected: Dict[tuple, int] = {}
        from .progress import Progress

        # Silent until the plugin gives it a sink (see progress.sink_for).
        self.progress = Progress()
        # Configs tried in a child process (_screen), and those whose context killed it.
        self._screened: set = set()
        self._aborting: Dict[str, str] = {}
        # --refract-sweep: its pairs become candidates here, judged by llama.cpp, before the
        # roles are planned into batches (audit/sweep.py).
        self.sweep = self._plan_sweep() if settings.sweep_types else None
        self.batches = DecodeBatches(self.item_roles, self.control_role, self.control_cached)
        self._axis_now: Optional[str] = None  # the axis of the last item measured
        self._turn_now = 0  # the sweep's place (measuring order) of the last item's candidate
        # Greedy continuations decoded so far: (role, prompt ids, n_predict) -> token ids. PLAD's
        # anchors are the trajectory axis's decodes of the same prompts; R-NIAH's control asks
        # for the reference answers the candidates just had.
        self._greedy: Dict[tuple, List[int]] = {}
        self.kv_bytes_peak = 0
        # Computed once, on first use: the model's facts (each role's KV allocation is its Role's).
        self._model_summary: Optional[dict] = None
        self._probe_contexts()
        # A self-reference is recognised by what computes, not by how the configs are spelled.
        reference_computes = self.computation(Role.REFERENCE)
        for role in self.candidate_roles:
            self.roles[role].self_reference = self.computation(role) == reference_computes
        from ..reference.store import ReferenceSide, ReferenceStore

        identity = ReferenceStore.identity(self.model_path, settings, self.build_info(),
                                           self.roles[Role.REFERENCE].env, self.rotation(Role.REFERENCE), cache_dir)
        side = ReferenceSide(
            greedy=lambda prompts, n_predict, on_row=None: self.greedy(Role.REFERENCE, prompts, n_predict, on_row),
            context=lambda: self.context(Role.REFERENCE), decode_width=self.decode_width,
            n_vocab=lambda: self.n_vocab)
        # What the axes see of this runner (audit/run.py documents it).
        self.run = Run(self)
        # A reference pack to read (the run's reference and control) or to write.
        self.pack = self.pack_writer = None
        if settings.reference_pack or settings.save_reference:
            from ..reference.pack import PackReader, PackWriter

            match = self.pack_match(identity)
            if settings.reference_pack:
                self.pack = PackReader(settings.reference_pack, match, n_vocab=self.n_vocab)
                # The very library that made the pack, run as it was: the drift role repeats its
                # computation, so a damage of 0 there is exact (bit-identical rows), not a count
                # of 0 events that could hide some.
                made = self.pack.manifest["build"]
                where = self.pack.manifest.get("platform") or {}
                self.roles[Role.DRIFT].self_reference = (
                    made.get("library_digest") is not None
                    and made.get("library_digest") == self.build_info().get("library_digest")
                    and where.get("threads") == settings.threads and where.get("gpu_layers") == settings.gpu_layers)
            elif not is_worker:
                self.pack_writer = PackWriter(settings.save_reference, match, n_vocab=self.n_vocab)
        self.reference = ReferenceStore(settings, cache_dir, identity, side,
                                        pack=self.pack.cache if self.pack else None,
                                        record_into=self.pack_writer.cache if self.pack_writer else None)
        self.progress.suffix = self.reference.size_text
        self.control = (SensitivityControl(self.reference, self.roles[Role.CONTROL].label, self.axes, self.run,
                                           self.batches.planned_units) if self.control_role else None)

    def _configure_roles(self) -> None:
        """One role per config: "reference" (and "floor", a second reference context), one
        per candidate ("cand0", "cand1", ...: each gets its own context, all share the
        reference's results) and the sensitivity control."""
        s = self.settings
        types = self.engine_mod.cache_types()
        head_k, head_v = self.info.head_dims

        def role(name: str, config, flag: str, **more) -> Role:
            return Role(name, config, validate_for_model(config, types, head_k, head_v, flag), flag, config.label(),
                        **more)

        reference = role(Role.REFERENCE, s.reference, "--refract-reference")
        # name -> Role, in this order: reference, floor, the candidates, the control.
        self.roles: Dict[str, Role] = {
            Role.REFERENCE: reference,
            Role.FLOOR: replace(reference, name=Role.FLOOR),
        }
        if s.reference_pack:
            # With a reference pack, this build's own reference config is measured against the
            # pack's as one more candidate, first (audit/drift.py). Not a self-reference unless
            # the pack's own library made it (see __init__).
            self.roles[Role.DRIFT] = replace(reference, name=Role.DRIFT, flag="--refract-reference-pack",
                                             id_prefix="drift-", self_reference=False)
        prefixes = _id_prefixes(s.candidates)
        for i, cand in enumerate(s.candidates):
            name = Role.candidate(i)
            self.roles[name] = role(name, cand, "--refract-candidate", id_prefix=prefixes[name],
                                    self_reference=cand == s.reference)
        # The sensitivity control: one more role measured on the same units as the candidates,
        # inside the first selected candidate item of each unit (so item ids, counts and -k
        # selection stay as they are), never ranked or gated itself.
        if s.sensitivity is not None:
            self.roles[Role.CONTROL] = role(Role.CONTROL, s.sensitivity, "--refract-sensitivity")

    # -- the roles, by name ----------------------------------------------------------------

    @property
    def candidate_roles(self) -> List[str]:
        return [name for name, r in self.roles.items() if r.is_candidate]

    @property
    def control_role(self) -> Optional[str]:
        return Role.CONTROL if Role.CONTROL in self.roles else None

    @property
    def drift_role(self) -> Optional[str]:
        """With a reference pack: this build's own reference, measured like a candidate."""
        return Role.DRIFT if Role.DRIFT in self.roles else None

    @property
    def measured_roles(self) -> List[str]:
        """The roles gated on: the build drift first (with a pack), then the candidates."""
        return ([Role.DRIFT] if self.drift_role else []) + self.candidate_roles

    @property
    def item_roles(self) -> List[str]:
        """The roles measured as items: the drift, the candidates, then the control."""
        return self.measured_roles + ([Role.CONTROL] if self.control_role else [])

    @property
    def labels(self) -> Dict[str, str]:
        """Candidate and control role -> its config's label."""
        return {name: self.roles[name].label for name in self.item_roles}

    @property
    def self_reference(self) -> Dict[str, bool]:
        return {name: self.roles[name].self_reference for name in self.measured_roles}

    @property
    def id_prefix(self) -> Dict[str, str]:
        """Test-id prefix per candidate role (see _id_prefixes), and the drift's."""
        return {name: self.roles[name].id_prefix for name in self.measured_roles}

    def _probe_contexts(self) -> None:
        """Let llama.cpp judge every config before any item runs: a small context per config
        is created and freed. A refusal (e.g. a cache type whose block size does not fit the
        model's heads) is a usage error quoting llama.cpp; the rotation it applied and the cache
        sizes it allocated are read back from its log, and a rotation policy it did not honour
        is refused as well."""
        roles = [self.roles[name] for name in [Role.REFERENCE, *self.item_roles]]
        self._screen([(r.config, r.types) for r in roles if r.probe is None])
        for role in roles:
            if role.probe is None:  # a sweep's pairs were probed when it was planned
                self._probe_role(role)
        floor, reference = self.roles[Role.FLOOR], self.roles[Role.REFERENCE]
        floor.probe, floor.env = reference.probe, reference.env

    def _probe_problem(self, kv, types, facts, label: str) -> Optional[str]:
        """What llama.cpp did otherwise than asked when it created a context (a rotation it did
        not honour, a cache type it substituted), or None."""
        from ..engines.kvlog import check_cache_types, check_rotation

        k_type, v_type = types
        quantized = (k_type.name not in FLOAT_TYPES, v_type.name not in FLOAT_TYPES)
        problem = check_rotation(kv.rot, facts.rotation, quantized, label)
        return problem or check_cache_types((k_type.name, v_type.name), facts, label)

    def _screen(self, configs) -> None:
        """Try, in one child process, every (config, types) with a type outside llama.cpp's
        own --cache-type list that is not tried yet: one its backend cannot store aborts the
        process instead of refusing (engines/isolated.py). What killed the child is refused
        by _probe with llama.cpp's last words."""
        from ..engines.kvconfig import CLI_CACHE_TYPES

        in_child = getattr(self.engine_mod, "configs_that_abort", None)
        todo = {kv.label(): (kv.label(), types[0].name, types[1].name) for kv, types in configs
                if kv.label() not in self._screened and not {types[0].name, types[1].name} <= CLI_CACHE_TYPES}
        if in_child is None or not todo:
            return
        listed = list(todo.values())
        dead = in_child(self.model_path, self.settings.gpu_layers, self._context_settings(256), listed)
        self._screened.update(todo)
        self._aborting.update({listed[i][0]: why for i, why in dead.items()})

    def _probe(self, kv, types):
        """llama.cpp's verdict on a config from a small context (raises ContextRefused): in
        this process, unless a child process died creating it (_screen)."""
        if kv.label() in self._aborting:
            raise ContextRefused(self._aborting[kv.label()])
        return self.engine.probe(kv, types, self._context_settings(256))

    def _probe_role(self, role: Role) -> None:
        kv, flag = role.config, role.flag
        self._screen([(kv, role.types)])
        try:
            facts, env = self._probe(kv, role.types)
        except ContextRefused as exc:
            raise UsageProblem(f"{flag} {exc}") from None
        problem = self._probe_problem(kv, role.types, facts, f"{flag} {kv.label()}")
        if problem:
            raise UsageProblem(problem)
        role.probe = facts
        role.env = env

    def _plan_sweep(self):
        """Add the sweep's pairs that llama.cpp accepts as candidates (audit/sweep.py) beside
        those given (and --refract-require's), every candidate ordered by the KV bytes per
        token llama.cpp allocated, smallest first: the order that decides soonest."""
        from .sweep import plan_sweep

        s = self.settings
        table = self.engine_mod.cache_types()
        row_size = self.engine_mod.row_size

        def value_bytes(t) -> float:
            return row_size(t.ggml_type, 256 * t.block_size) / (256 * t.block_size)

        plan = plan_sweep(s.sweep_types or (), s.reference, s.sensitivity, table, self.info.head_dims, value_bytes,
                          self._probe, lambda kv, types, facts: self._probe_problem(kv, types, facts, kv.label()),
                          screen=self._screen)
        given = [self.roles[n] for n in self.candidate_roles]
        configs = [r.config for r in given]
        added = [p for p in plan.accepted if p.config not in configs]
        extra = [s.require] if s.require is not None and s.require not in configs + [p.config for p in added] else []
        head_k, head_v = self.info.head_dims
        new_roles = [Role("sweep", p.config, p.types, "--refract-sweep", p.config.label(), probe=p.facts, env=p.env)
                     for p in added]
        new_roles += [Role("require", c, validate_for_model(c, table, head_k, head_v, "--refract-require"),
                           "--refract-require", c.label()) for c in extra]
        candidates = given + new_roles
        if not candidates:
            raise UsageProblem(f"--refract-sweep={','.join(s.sweep_types or ())}: llama.cpp accepts no pair of these types "
                               "for this model (" + "; ".join(f"{r['candidate']}: {r['why']}" for r in plan.refused[:3])
                               + ")")
        for role in candidates:
            if role.probe is None:
                self._probe_role(role)
        candidates.sort(key=lambda r: (self._probe_bytes(r) is None, self._probe_bytes(r) or 0, r.label))
        prefixes = _id_prefixes([r.config for r in candidates])
        ordered: Dict[str, Role] = {k: v for k, v in self.roles.items() if not v.is_candidate and k != Role.CONTROL}
        for i, role in enumerate(candidates):
            name = Role.candidate(i)
            ordered[name] = replace(role, name=name, id_prefix=prefixes[name],
                                    self_reference=role.config == s.reference, allocation=None, allocation_known=False)
        if Role.CONTROL in self.roles:
            ordered[Role.CONTROL] = self.roles[Role.CONTROL]
        self.roles = ordered
        self.settings = replace(s, candidates=tuple(r.config for r in candidates))
        return plan

    def _probe_bytes(self, role: Role) -> Optional[float]:
        from ..engines.allocation import kv_allocation

        alloc = kv_allocation(self.info, role.probe, role.types, self.engine_mod.row_size)
        return alloc["bytes_per_token"] if alloc else None

    def computation(self, role: str) -> tuple:
        """What decides the role's numbers, as llama.cpp set it up: the cache types it allocated
        (per cache), flash attention, the rotation it applied; host-memory KV (nkvo) only where
        layers run on a GPU, and a full-size window cache only where the model has SWA layers.
        Two configs with the same computation give the same logits whatever their labels say."""
        kv, log = self.roles[role].config, self.roles[role].probe
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
        return self.roles[role].probe.rotation

    def ran(self, role: str) -> dict:
        """What really ran for the role's config, as llama.cpp reported it: the cache types it
        allocated, flash attention, rotation per side, the library (path, sha256, system info)
        and every warning it logged creating or using the config's contexts, known ones named
        (engines.kvlog.KNOWN_WARNINGS)."""
        from ..engines.kvlog import named_warnings

        part = self.roles[role]
        facts = part.probe

        def one(values):
            values = sorted(set(values))
            return None if not values else values[0] if len(values) == 1 else values

        engine = self._engine
        used = (getattr(engine, "logged_warnings", None) or {}).get(part.config.label(), [])
        build = self.build_info()
        record = getattr(self.engine_mod, "library_record", None)
        library = dict(record()) if record is not None else {"path": None, "sha256": None}
        home = str(Path.home())
        library_path = library.get("path")
        if library_path and home not in ("", "/"):
            library["path"] = library_path.replace(home, "~")  # reports are shared: no home folder
        library["system_info"] = build.get("system_info")
        return {"type_k": one(c.k_type for c in facts.caches), "type_v": one(c.v_type for c in facts.caches),
                "flash_attn": getattr(facts, "flash_attn", None), "rotation": facts.rotation, "library": library,
                "warnings": named_warnings([*facts.warnings, *used])}

    def kv_allocation(self, role: str) -> Optional[dict]:
        from ..engines.allocation import kv_allocation

        part = self.roles[role]
        if not part.allocation_known:
            part.allocation = kv_allocation(self.info, part.probe, part.types, self.engine_mod.row_size)
            part.allocation_known = True
        return part.allocation

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
        if inputs.n_depth_chunks:
            need = max(need, inputs.depth)
        # llama.cpp pads the cache to 256 cells; asking for a padded size keeps it explicit.
        return padded(need)

    def context_by_axis(self, axes) -> Dict[str, int]:
        """The longest context each of ``axes`` (the selected ones) measures at, in tokens:
        what its evidence covers."""
        s, inputs = self.settings, self.inputs
        out: Dict[str, int] = {}
        for name in axes:
            if name in ("kld", "decode"):
                out[name] = s.ctx
            elif name in ("trajectory", "plad") and inputs.longest_prompt():
                out[name] = inputs.longest_prompt() + s.n_predict
            elif name == "rniah" and inputs.rniah_lengths:
                out[name] = max(inputs.rniah_lengths) + len(inputs.rniah_prompt([])) + inputs.rniah_answer_tokens
            elif name == "depth" and inputs.n_depth_chunks:
                out[name] = inputs.depth
        return out

    def context(self, role: str, min_ctx: int = 0):
        """The role's one-sequence context; replaced by a larger one when a fixture needs more
        room (context size does not change the numbers: llama.cpp attends over the cells in use)."""
        part = self.roles[role]
        ctx = part.context
        if ctx is None or ctx.n_ctx < min_ctx:
            n_ctx = max(self.context_size(), padded(min_ctx))
            if ctx is not None:
                self.engine.drop_context(role)
            else:
                part.context_opened = next(self._openings)
            ctx = self._stored_form(role, self.engine.context(part.config, part.types, self._context_settings(n_ctx),
                                                              role))
            part.context = ctx
            self._note_kv_bytes()
        return ctx

    def sequences(self, role: str, n_seq: int, n_ctx_seq: int):
        """The role's multi-sequence context (grown when a batch needs more)."""
        part = self.roles[role]
        ctx = self._stored_form(role, self.engine.context(part.config, part.types, self._context_settings(n_ctx_seq),
                                                          f"{role}#seq", n_seq=n_seq, n_ctx_seq=n_ctx_seq))
        if part.sequences is None:
            part.sequences_opened = next(self._openings)
        part.sequences = ctx
        self._note_kv_bytes()
        return ctx

    @staticmethod
    def _stored_form(role: str, ctx):
        """The drift role's rows reach the axes as the reference stores them (audit/drift.py)."""
        if role != Role.DRIFT:
            return ctx
        from .drift import StoredFormContext

        return StoredFormContext(ctx)

    def pack_match(self, identity: dict) -> dict:
        """What a reference pack must agree with to serve this run (reference/pack.py): the
        model's sha256, the reference and control configs, the settings that change numerics,
        the inputs' digests and every selected axis's own settings."""
        from ..engines.gguf import file_sha256
        from ..reference.pack import prompts_digest, run_match

        s, inputs = self.settings, self.inputs
        sha = identity["model"]["sha256"] or file_sha256(self.model_path)
        env = {k: v for k, v in self.roles[Role.REFERENCE].env.items() if k != "LLAMA_CPP_LIB_PATH"}
        numerics = {"n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "flash_attn": s.reference.fa,
                    "decode_batch": s.decode_batch, "context_env": env}
        digests = {
            "prompts": prompts_digest([(p.id, p.category, p.prompt) for p in inputs.prompts]) if inputs.prompts else None,
            "corpus": inputs.corpus.sha256 if inputs.corpus is not None else None,
            "haystack": inputs.haystack_source.sha256 if inputs.haystack_source is not None else None,
        }
        axes = {name: self.axes[name].cache_reads(self.run) for name in s.axes}
        return run_match(model_sha256=sha, model_size=self.info.size_bytes, reference=s.reference.label(),
                         control=s.sensitivity.label() if s.sensitivity is not None else None, numerics=numerics,
                         inputs=digests, axes=axes)

    def pack_build(self) -> dict:
        """The build a saved pack records: llama.cpp's facts, where its library lies (home as ~)."""
        import os

        from ..engines import libload

        build = dict(self.build_info())
        folder = libload.loaded_library_dir()
        home = os.path.expanduser("~")
        build["library_path"] = (str(folder).replace(home, "~", 1) if folder is not None and home not in ("", "/")
                                 else (str(folder) if folder is not None else None))
        return build

    def _open_contexts(self) -> List[Tuple[str, Any]]:
        """(role, context) of every open context: the one-sequence ones, then the
        multi-sequence ones, each in the order they were first opened."""
        single = sorted((r for r in self.roles.values() if r.context is not None), key=lambda r: r.context_opened)
        multi = sorted((r for r in self.roles.values() if r.sequences is not None), key=lambda r: r.sequences_opened)
        return [(r.name, r.context) for r in single] + [(r.name, r.sequences) for r in multi]

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
        for role, ctx in self._open_contexts():
            total += context_kv_bytes(self.kv_allocation(role), ctx)  # sliding-window caches as logged
        self.kv_bytes_peak = max(self.kv_bytes_peak, total)

    def release_sequences(self) -> None:
        """Free the multi-sequence contexts (their KV caches) before axes that do not use them."""
        for part in self.roles.values():
            if part.sequences is not None:
                self.engine.drop_context(f"{part.name}#seq")
                part.sequences = None

    def release_contexts(self) -> None:
        """Free the one-sequence contexts (KV caches and logits buffers); the next item that
        needs one opens it afresh (every measurement starts from a cleared cache anyway)."""
        for part in self.roles.values():
            if part.context is not None:
                self.engine.drop_context(part.name)
                part.context = None

    def token_counts(self) -> dict:
        """Tokens processed so far per role: batched prompt tokens, one-sequence decode steps,
        and tokens decoded in multi-sequence steps (with the number of those steps); and how
        often each path of a cut back to a prefix ran (cut_*, see engines.base.CutCounts)."""
        counts: Dict[str, Dict[str, int]] = {}
        for role, c in self._open_contexts():
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
        return None if any(f is None for f in found) else [list(f) for f in found if f is not None]

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

    def items(self) -> Iterator[Tuple[Unit, str]]:
        """(unit, xdist group) of every item the selected axes have, in run order: unit-major
        with the candidates innermost, so the candidates of one unit run back to back and share
        the reference's result for it (computed once, kept in memory). Each item's unit carries
        its ``axis``, its ``candidate`` role and its decode ``batch`` number (None when unbatched)."""
        s = self.settings
        for name, axis in self.axes.items():
            if name not in s.axes:
                continue
            batched = s.decode_batch > 1 and bool(axis.BATCHED)
            size = s.decode_batch * (axis.BATCHED or 1)
            units = axis.units(self.run)
            wrong = next((u for u in units if not isinstance(u, Unit)), None)
            if wrong is not None:
                raise UsageProblem(f"axis {name!r}: units() must return pytest_refract.axes.Unit objects, not "
                                   f"{type(wrong).__name__} (e.g. Unit(id, keywords=(...), payload={{...}}))")
            if s.max_items is not None:
                # The first N in the axis's measuring order (a balanced sample, see
                # inputs.data.measuring_order); ids stay those of the whole set.
                units = units[: s.max_items]
            for index, unit in enumerate(units):
                # Consecutive units form a decode batch; with `-n N --dist loadgroup` a batch
                # (or, unbatched, a unit) goes to one worker with all its candidates.
                group = f"{name}-batch{index // size}" if batched else f"{name}-{unit.id}"
                for role in self.measured_roles:
                    yield unit.for_item(name, role, index // size if batched else None), group

    def set_plan(self, planned: List[Unit], closed=None, rank: Optional[Dict[str, int]] = None) -> None:
        """The unit of every item this process may run, after -k/-m deselection, in run order.
        ``closed(axis)``: the candidates that need no more of an axis (sequential stopping);
        their decode batches leave them out. ``rank``: a sweep's measuring order (candidate
        role -> place), where the candidates run one after another: a batch decodes only the
        candidate whose turn it is, and a candidate's contexts are freed when its turn ends."""
        self.selected = {}  # (candidate role, axis) -> items selected: an interrupted report says how many ran
        for unit in planned:
            key = (unit.candidate, unit.axis)
            self.selected[key] = self.selected.get(key, 0) + 1
        self.batches.set_plan(planned)
        self.batches.rank = dict(rank or {})
        if closed is not None:
            self.batches.closed = closed

    # -- measuring an item -------------------------------------------------------------------------

    def measure(self, unit: Unit) -> ItemResult:
        """Run one item (``--refract-repeat`` times) and record the tokens it cost, so a
        benchmark can compare wall time with llama.cpp's raw throughput for the same tokens."""
        axis = self.axes[unit.axis]
        assert unit.candidate is not None  # an item's unit names its candidate (Unit.for_item)
        turn = self.batches.rank.get(unit.candidate, 0)
        if turn != self._turn_now:
            # A sweep's next candidate: the last one's contexts are not needed again. Without
            # this, a sweep of every type keeps a KV cache and a logits buffer open for each of
            # 80 pairs (on Gemma 3, 267 MB of logits each on the KLD axis alone).
            self._turn_now = turn
            self._axis_now = None
            self.release_sequences()
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
        self.progress.begin(describe(axis.NAME, unit, self.roles[unit.candidate].label if multi else None,
                                     axis.UNIT_NOUN), planned)
        try:
            item = ItemResult(unit.candidate, axis.NAME, unit.id, self._measure_once(axis, unit))
            if self.control is not None and self.control.due(axis.NAME, unit.id):
                # The first candidate item of a unit measures the control too; its result rides
                # along (also from xdist workers) and the session files it under the control.
                try:
                    item.control = ItemResult(Role.CONTROL, axis.NAME, unit.id,
                                              self.control.measure(axis, unit, self._measure_once))
                except (MeasurementError, UsageProblem) as exc:
                    item.control_error = str(exc)
            for _ in range(self.settings.repeat - 1):
                self.forget()
                item.repeats.append(self._measure_once(axis, unit))
        finally:
            self.progress.end()
        return item

    def control_cached(self, axis_name: str, unit: Unit) -> bool:
        return self.control is not None and self.control.cached(axis_name, unit)

    def forget(self) -> None:
        """Drop everything a repetition could reuse: cached decodes and KV caches."""
        self._greedy.clear()
        self.reference.forget()
        self.batches.forget()
        for part in self.roles.values():
            if part.context is not None:
                part.context.reset()

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

    # -- what the session asks of the runner ------------------------------------------------------

    def show_progress(self, sink) -> None:
        """Where progress lines go from now on (see progress.sink_for; None: nowhere)."""
        self.progress.sink = sink

    def item_starting(self, nodeid: str) -> None:
        """pytest is about to run ``nodeid``: the progress line reopens pytest's line after it."""
        if self.progress.sink is not None:
            self.progress.sink.nodeid = nodeid

    def note(self, line: str) -> None:
        """A line for the progress display (a sequential decision), shown where progress is."""
        if self.progress.sink is not None:
            self.progress.sink.note(line)

    def record(self, baseline: Optional[dict], *, wall_s: Optional[float] = None,
               items_selected: Optional[int] = None, sequential: Optional[Dict[str, Dict[str, dict]]] = None,
               saved_pack: Optional[dict] = None, stopped_early: Optional[str] = None,
               default_axes: Tuple[str, ...] = ()) -> RunRecord:
        """What the report states about this run besides the measurements. ``wall_s`` and
        ``items_selected`` are the session's: its wall time so far, and its items after -k/-m;
        ``sequential``: the stopping designs and where they stopped (stopping.report);
        ``stopped_early``: why the run ended before its selected items did (None: it did not);
        ``default_axes``: the axes a default audit runs (what a selection is a part of)."""
        import copy
        import os
        import platform

        inputs = self.inputs
        # The corpus and the haystack are one input when R-NIAH reads the corpus itself.
        texts = {id(x): x for x in (inputs.corpus, inputs.haystack_source) if x is not None}.values()
        roles = [Role.REFERENCE, *self.candidate_roles]
        selected: Dict[str, Dict[str, int]] = {}
        for (role, axis), count in self.selected.items():
            selected.setdefault(role, {})[axis] = count
        axis_inputs, axis_settings = {}, {}
        for name, axis in self.axes.items():
            section, settings = axis.section_facts(self.run), axis.settings_facts(self.run)
            if section:
                axis_inputs[name] = section
            if settings:
                axis_settings[name] = settings
        return RunRecord(
            context_by_axis=self.context_by_axis({a for per in selected.values() for a in per}),
            settings=self.settings,
            candidate_roles=tuple(self.candidate_roles),
            labels=dict(self.labels),
            self_reference=dict(self.self_reference),
            control_role=self.control_role,
            text_inputs=tuple(x.describe() for x in texts),
            axis_inputs=axis_inputs,
            axis_settings=axis_settings,
            chunks_note=inputs.chunks_note,
            gpu_note=self.gpu_note,
            rotation={r: self.rotation(r) for r in roles},
            kv_allocation={r: self.kv_allocation(r) for r in roles},
            context_env={r: dict(self.roles[r].env) for r in roles},
            ran={r: self.ran(r) for r in roles + ([self.control_role] if self.control_role else [])},
            kv_cache={r: self.kv_memory_summary(r) for r in self.candidate_roles},
            reference_kv_bytes_per_token=self.kv_bytes_per_token(Role.REFERENCE),
            kv_bytes_peak=self.kv_bytes_peak or None,
            model=self.model_summary(),
            host={"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
            reference_cache_enabled=self.reference.local_cache_enabled and not self.reference.from_pack,
            reference_cache_read=self.reference.read,
            cache_spot_check=(self.control.spot_check_facts() if self.control is not None else
                              {"reference_seed": self.reference.spot_seed,
                               "reference_checked": list(self.reference.spot_checks),
                               "tampered": self.reference.tampered}),
            reference_cache_size=(self.reference.size_facts()
                                  if self.reference.local_cache_enabled and not self.reference.from_pack else None),
            binding_version=self.engine_mod.library_version(),
            llama_build=self.build_info(),
            baseline=copy.deepcopy(baseline),
            selected=selected,
            items_selected=items_selected or None,
            wall_s=wall_s,
            sequential=sequential or {},
            drift_role=self.drift_role,
            reference_pack=self.pack.summary() if self.pack is not None else None,
            saved_pack=saved_pack,
            stopped_early=stopped_early,
            sweep=self.sweep.as_json() if self.sweep is not None else None,
            pool=self.pool(),
            default_axes=tuple(default_axes),
        )

    def pool(self) -> Dict[str, Dict[str, int]]:
        """Candidate role -> axis -> the items the axis has before any deselection (the pool a
        selection is a part of)."""
        counts: Dict[str, Dict[str, int]] = {}
        for unit, _group in self.items():
            assert unit.candidate is not None  # items() makes each unit for a candidate
            per_axis = counts.setdefault(unit.candidate, {})
            per_axis[unit.axis] = per_axis.get(unit.axis, 0) + 1
        return counts

    def close(self) -> None:
        if self.pack is not None:
            self.pack.close()
        if self.pack_writer is not None:
            self.pack_writer.discard()  # a finished pack has left the staging folder already
        for part in self.roles.values():
            part.context = part.sequences = None
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
