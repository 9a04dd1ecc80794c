"""Per-process audit state: inputs checked before any model loads, then (lazily, on the first
item that needs it) one engine and its contexts. Created in pytest_configure of every process
(controller and xdist workers alike), so flag problems surface as usage errors everywhere."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import data
from .errors import MeasurementError, UsageProblem
from .gguf_meta import expected_data_end, head_sha256, read_gguf
from .guard import check_outputs
from .kvconfig import FLOAT_TYPES, validate_for_model
from .kvlog import side_bytes_per_token
from .settings import Settings


class Audit:
    def __init__(self, settings: Settings, is_worker: bool = False):
        self.settings = settings
        self.model_path = data.resolve_model(settings.model)
        self.info = read_gguf(self.model_path)
        check_outputs({"--refract-json": settings.json_path, "--refract-html": settings.html_path},
                      _input_files(settings, self.model_path))
        from .refcache import prepare_cache_dir

        # Only ever a folder this cache marked as its own, cleared of its own entries only;
        # refused (or warned about) before anything loads.
        self._cache_dir = (prepare_cache_dir(Path(settings.cache_dir), clear=settings.clear_cache and not is_worker)
                           if settings.cache_dir else None)

        from . import libload

        # --refract-llama-lib must be in place before llama_cpp is first imported.
        lib_dir = libload.use_library(settings.llama_lib) if settings.llama_lib else None
        try:
            from . import engine as engine_mod  # llama_cpp is imported only when an audit exists
        except (OSError, RuntimeError) as exc:  # llama-cpp-python could not load the library
            raise UsageProblem(libload.import_problem(exc, lib_dir)) from None

        self._engine_mod = engine_mod
        self.gpu_note: Optional[str] = None
        if settings.gpu_layers and not engine_mod.llama_cpp.llama_supports_gpu_offload():
            # The report records what ran, not what was asked: this build keeps every layer
            # on the CPU whatever -ngl says.
            self.gpu_note = (f"--refract-gpu-layers={settings.gpu_layers}: this llama.cpp build has no GPU offload; "
                             "every layer runs on the CPU (0 offloaded)")
            settings = self.settings = replace(settings, gpu_layers=0)
        engine_mod.set_log_echo(settings.verbose > 0)
        if expected_data_end(self.info, engine_mod.ggml_row_size) > self.info.size_bytes:
            raise UsageProblem(
                f"truncated GGUF file: {self.model_path} is {self.info.size_bytes} bytes, its tensors need "
                f"{expected_data_end(self.info, engine_mod.ggml_row_size)}; download it again"
            )
        types = engine_mod.cache_types()
        head_k, head_v = self.info.head_dims
        ref_types = validate_for_model(settings.reference, types, head_k, head_v, "--refract-reference")
        self.types = {"reference": ref_types, "floor": ref_types}
        self.configs = {"reference": settings.reference, "floor": settings.reference}
        # One role per candidate ("cand0", "cand1", ...): each gets its own context, all share the
        # reference's results.
        self.candidate_roles: List[str] = []
        self.labels: Dict[str, str] = {}
        for i, cand in enumerate(settings.candidates):
            role = f"cand{i}"
            self.types[role] = validate_for_model(cand, types, head_k, head_v, "--refract-candidate")
            self.configs[role] = cand
            self.candidate_roles.append(role)
            self.labels[role] = cand.label()
        self.id_prefix = _id_prefixes(settings.candidates)
        # The sensitivity control: one more role measured on the same units as the candidates,
        # inside the first selected candidate item of each unit (so item ids, counts and -k
        # selection stay as they are), never ranked or gated itself.
        self.control_role: Optional[str] = None
        if settings.sensitivity is not None:
            self.control_role = CONTROL
            self.types[CONTROL] = validate_for_model(settings.sensitivity, types, head_k, head_v, "--refract-sensitivity")
            self.configs[CONTROL] = settings.sensitivity
            self.labels[CONTROL] = settings.sensitivity.label()
        self._control_done: set = set()
        self.item_roles: List[str] = self.candidate_roles + ([CONTROL] if self.control_role else [])
        self.self_reference = {role: self.configs[role] == settings.reference for role in self.candidate_roles}

        self.prompts: List[data.Prompt] = []
        self.corpus: Optional[data.Corpus] = None
        self.corpus_tokens: List[int] = []
        self.n_chunks = 0
        self._prompt_tokens: Dict[str, List[int]] = {}
        self._engine = None
        self._contexts: Dict[str, object] = {}
        # Batched decoding (--refract-decode-batch): one multi-sequence context per role, the
        # plan of items this process will run, and the finished batch's per-item results.
        self._seq_contexts: Dict[str, object] = {}
        self._plan: Dict[tuple, Dict[str, tuple]] = {}
        self.batch_results: Dict[tuple, dict] = {}
        self.batch_seconds: Dict[tuple, float] = {}
        self._axis_now: Optional[str] = None  # the axis of the last item measured
        self._tokenizer = None
        self._chat = None
        self._parts = None
        self._question_tokens = None
        self._greedy: Dict[tuple, List[int]] = {}
        self.haystack = None
        self.haystack_source = None
        self.rniah_lengths: tuple = ()
        self.rniah_answer_tokens = settings.rniah_answer_tokens
        self.rniah_thinking = False
        from .progress import Progress

        # Silent until the plugin gives it a sink (see progress.sink_for).
        self.progress = Progress()
        self._load_inputs()
        self._probe_contexts()
        self._init_reference_cache()
        self.baseline = None
        if settings.baseline_path:
            from .baseline import load_baseline

            self.baseline = load_baseline(settings.baseline_path, self.model_facts(), settings.reference.label())

    # -- inputs -------------------------------------------------------------------------

    def _load_inputs(self) -> None:
        s = self.settings
        n_ctx_train = self.info.n_ctx_train
        if n_ctx_train and s.ctx > n_ctx_train:
            raise UsageProblem(f"--refract-ctx={s.ctx} exceeds the model's training context of {n_ctx_train} tokens")
        if "trajectory" in s.axes or "plad" in s.axes:
            self.prompts = data.load_prompts(Path(s.prompts_path) if s.prompts_path else None)
        if "kld" in s.axes or ("rniah" in s.axes and not s.haystack_path):
            self.corpus = data.load_corpus(Path(s.corpus_path) if s.corpus_path else None)
        haystack_source = None
        if "rniah" in s.axes:
            haystack_source = (data.load_corpus(Path(s.haystack_path), "haystack", "--refract-haystack")
                               if s.haystack_path else self.corpus)
        # The vocabulary alone (no weights) is enough to count tokens at collection time, and
        # loading it proves llama.cpp accepts the file (architecture, tokenizer) before any
        # item runs.
        try:
            tok = self._engine_mod.Engine(self.model_path, vocab_only=True)
        except MeasurementError as exc:
            raise UsageProblem(str(exc)) from None
        try:
            if tok.is_recurrent:
                # Its state is a fixed-size recurrence per sequence, not a cache of keys and
                # values per token: there is nothing for ctk/ctv to quantize, so no score.
                raise UsageProblem(
                    f"{self.model_path.name} is a recurrent model ({self.info.architecture}): it keeps no KV cache, so "
                    f"a KV-cache quantization audit has nothing to measure"
                )
            self._tokenizer = tok
            self.add_bos, self.bos = tok.add_bos, tok.bos
            if haystack_source is not None:
                self._prepare_rniah(haystack_source)
            if self.corpus is not None and "kld" in s.axes:
                self.corpus_tokens = tok.tokenize(self.corpus.text, add_special=True)
                available = len(self.corpus_tokens) // s.ctx
                if available < 1:
                    raise UsageProblem(
                        f"corpus {self.corpus.name} holds {len(self.corpus_tokens)} tokens, fewer than one chunk of "
                        f"--refract-ctx={s.ctx}; give a longer --refract-corpus or a smaller --refract-ctx"
                    )
                self.n_chunks = min(s.chunks, available)
            self._check_prompts_fit(n_ctx_train or 0)
        finally:
            tok.close()
            self._tokenizer = None

    def _check_prompts_fit(self, limit: int) -> None:
        """Each prompt (in its chat template) plus --refract-n-predict generated tokens must fit
        the model's context; say which of the two is at fault, and what would fit."""
        s = self.settings
        if limit and self.prompts and s.n_predict >= limit:
            raise UsageProblem(
                f"--refract-n-predict={s.n_predict} is not smaller than the model's context of {limit} tokens, "
                f"which must hold the prompt as well as the answer; use a value well below {limit}"
            )
        source = s.prompts_path or "the bundled prompt set"
        for p in self.prompts:
            # Tokenized here even without a known limit: the vocabulary-only model is loaded now.
            n = len(self.chat_tokens(p.prompt))
            if not limit:
                continue
            if n >= limit:
                raise UsageProblem(
                    f"prompt {p.id!r} in {source} is {n} tokens in the chat template, longer than the model's "
                    f"context of {limit} tokens; shorten it or leave it out"
                )
            if n + s.n_predict > limit:
                raise UsageProblem(
                    f"prompt {p.id!r} in {source} is {n} tokens; with --refract-n-predict={s.n_predict} it exceeds "
                    f"the model's context of {limit} tokens; use --refract-n-predict={limit - n} or less"
                )

    def _probe_contexts(self) -> None:
        """Let llama.cpp judge every config before any item runs: a small context per config
        is created and freed. A refusal (e.g. a cache type whose block size does not fit the
        model's heads) is a usage error quoting llama.cpp; the rotation it applied and the cache
        sizes it allocated are read back from its log, and a rotation policy it did not honour
        is refused as well."""
        from .kvlog import check_rotation

        self.kv_facts: Dict[str, object] = {}
        self.context_env: Dict[str, dict] = {}
        probe_settings = self._context_settings(256)
        # The control is a config like any other: llama.cpp judges it and reports its cache too.
        for role in ["reference", *self.item_roles]:
            kv = self.configs[role]
            flag = {"reference": "--refract-reference", CONTROL: "--refract-sensitivity"}.get(role, "--refract-candidate")
            try:
                facts, env = self.engine.probe(kv, self.types[role], probe_settings)
            except self._engine_mod.ContextRefused as exc:
                raise UsageProblem(f"{flag} {exc}") from None
            quantized = tuple(t.name not in FLOAT_TYPES for t in self.types[role])
            problem = check_rotation(kv.rot, facts.rotation, quantized, f"{flag} {kv.label()}")
            if problem:
                raise UsageProblem(problem)
            self.kv_facts[role] = facts
            self.context_env[role] = env
        self.kv_facts["floor"] = self.kv_facts["reference"]
        self.context_env["floor"] = self.context_env["reference"]

    def rotation(self, role: str) -> Optional[dict]:
        """{"k": bool, "v": bool} as llama.cpp logged it for the role's config; None when the
        build logs no rotation (it has none)."""
        return self.kv_facts[role].rotation

    def _prepare_rniah(self, source) -> None:
        from .haystack import THINK_MARKERS, Haystack

        s = self.settings
        try:
            self.haystack = Haystack.from_text(source.text, self.plain_tokens)
        except ValueError:
            raise UsageProblem(f"haystack {source.name} has no sentences to build a haystack from") from None
        self.haystack_source = source
        template = self.info.chat_template or ""
        thinking = any(marker in template for marker in THINK_MARKERS)
        # Thinking models reason before answering: give them room, then score what follows.
        self.rniah_answer_tokens = max(s.rniah_answer_tokens, 1024) if thinking else s.rniah_answer_tokens
        self.rniah_thinking = thinking
        overhead = len(self.rniah_prompt([])) + self.rniah_answer_tokens
        limit = self.info.n_ctx_train
        if s.rniah_lengths:
            for length in s.rniah_lengths:
                if limit and length + overhead > limit:
                    raise UsageProblem(
                        f"--refract-rniah-lengths: {length} tokens (+{overhead} for template, question and answer) "
                        f"exceed the model's context of {limit} tokens; use at most {limit - overhead}"
                    )
            self.rniah_lengths = tuple(s.rniah_lengths)
        else:
            fitting = tuple(n for n in (1024, 2048, 4096) if not limit or n + overhead <= limit)
            self.rniah_lengths = fitting or (max(64, limit - overhead),)

    # -- reference side (cached on disk, shared across candidates in memory) -------------

    def _init_reference_cache(self) -> None:
        from .refcache import ReferenceCache, model_identity

        s = self.settings
        directory = self._cache_dir
        build = self._engine_mod.build_info()
        identity = {
            "model": model_identity(self.model_path),
            "reference": s.reference.label(),
            # Everything that changes llama.cpp's numbers (context size does not: attention
            # runs over the cells in use).
            "numerics": {"n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "threads": s.threads,
                         "gpu_layers": s.gpu_layers, "flash_attn": s.reference.fa},
            "build": {k: v for k, v in build.items() if k != "library_folder"},
            # Variables llama.cpp reads (rotation among them) and the rotation it then applied.
            # (not where the library lies: its digest, in "build", says which bytes ran)
            "context_env": {k: v for k, v in self.context_env["reference"].items() if k != "LLAMA_CPP_LIB_PATH"},
            "rotation": self.rotation("reference"),
        }
        self.refcache = ReferenceCache(directory, identity)
        # The floor compares the reference with itself bit for bit: it needs the live reference.
        # --refract-repeat must re-measure the reference too, so it does not read either.
        self._read_cache = self.refcache.enabled and not s.floor and s.repeat == 1
        self._ref_memory: Dict[str, tuple] = {}

    def _remember(self, kind: str, key: str, value):
        # One entry per kind: candidates of a matrix measure the same unit one after another.
        self._ref_memory[kind] = (key, value)
        return value

    def _recall(self, kind: str, key: str):
        hit = self._ref_memory.get(kind)
        if hit and hit[0] == key:
            return hit[1]
        # Forget the previous unit before the next one is computed, not after: a KLD entry is
        # tens of MB, and holding two at once would raise the audit's peak memory.
        self._ref_memory.pop(kind, None)
        return None

    def reference_trajectory(self, prompt_tokens: List[int]):
        """(greedy tokens, 16-bit log-probs, exact logits or None) of the reference.

        Candidates are always compared with the 16-bit log-probs, live or cached, exactly as
        llama-perplexity compares with its stored base: so a cold run, a warm (cached) run and
        an xdist run give the same numbers. The exact logits serve the floor, which checks the
        engine bit for bit (and never reads the cache)."""
        from .refcache import LogprobRows, quantize_logprobs

        key = self.refcache.key("trajectory", prompt_tokens, self.settings.n_predict)
        value = self._recall("trajectory", key)
        if value is not None:
            return value
        if self._read_cache:
            entry = self.refcache.load("trajectory", key)
            if entry is not None:
                tokens = [int(t) for t in entry["arrays"]["tokens"]]
                return self._remember("trajectory", key, (tokens, LogprobRows(entry["arrays"]), None))
        tokens, logits = self.context("reference").greedy(prompt_tokens, self.settings.n_predict, keep_logits=True)
        stored = quantize_logprobs(logits)
        self.refcache.store("trajectory", key, dict(stored, tokens=np.asarray(tokens)))
        exact = logits if self.settings.floor else None  # only the floor needs the exact logits
        return self._remember("trajectory", key, (tokens, LogprobRows(stored), exact))

    def reference_chunk(self, tokens: List[int], evaluate_fn):
        """(16-bit log-probs as LogprobRows, exact logits or None) of the reference for one
        KLD chunk. ``evaluate_fn(ctx, consume)`` runs the chunk and hands over logit rows
        batch by batch; they are quantized as they come, so only the 16-bit form is held
        (the exact rows are kept only for the floor)."""
        from .refcache import LogprobRows, concat_quantized, quantize_logprobs

        key = self.refcache.key("kld", tokens)
        value = self._recall("kld", key)
        if value is not None:
            return value
        if self._read_cache:
            entry = self.refcache.load("kld", key)
            if entry is not None:
                return self._remember("kld", key, (LogprobRows(entry["arrays"]), None))
        parts: List[dict] = []
        exact: List[np.ndarray] = []

        def take(first_row, view):
            parts.append(quantize_logprobs(view))
            if self.settings.floor:
                exact.append(view.copy())

        evaluate_fn(self.context("reference"), take)
        if not parts:
            raise MeasurementError("internal: the reference produced no logit rows for a KLD chunk")
        stored = concat_quantized(parts)
        self.refcache.store("kld", key, stored)
        return self._remember("kld", key, (LogprobRows(stored), np.concatenate(exact) if exact else None))

    def reference_greedy(self, prompt_tokens: List[int], n_predict: int) -> List[int]:
        """Reference greedy tokens only (PLAD anchors and perturbations, R-NIAH answers)."""
        key = self.refcache.key("greedy", prompt_tokens, n_predict)
        # The control asks for the same reference answers right after the candidates: kept
        # in memory (token ids only), so a cold run neither recomputes nor re-reads them.
        memo = self.__dict__.setdefault("_ref_greedy_memo", {})
        if key in memo:
            return list(memo[key])
        if len(memo) > 256:
            memo.clear()
        tokens = self._reference_greedy(key, prompt_tokens, n_predict)
        memo[key] = list(tokens)
        return tokens

    def _reference_greedy(self, key: str, prompt_tokens: List[int], n_predict: int) -> List[int]:
        if self._read_cache:
            entry = self.refcache.load("greedy", key)
            if entry is not None:
                return [int(t) for t in entry["arrays"]["tokens"]]
        tokens, _ = self.context("reference").greedy(prompt_tokens, n_predict)
        self.refcache.store("greedy", key, {"tokens": np.asarray(tokens, dtype=np.int64)})
        return tokens

    def plain_tokens(self, text: str) -> List[int]:
        tok = self._tokenizer or self.engine
        return tok.tokenize(text, add_special=False, parse_special=False)

    def _chat_parts(self):
        """Token ids the chat template puts before and after the user's content."""
        if getattr(self, "_parts", None) is None:
            tok = self._tokenizer or self.engine
            formatter = self._chat_formatter()
            if formatter:
                sentinel = "@@refract-content@@"
                rendered = self._render_chat(formatter, sentinel)
                head, _, tail = rendered.partition(sentinel)
                add_special = tok.add_bos and not head.startswith(tok.token_text(tok.bos))
                self._parts = (
                    tok.tokenize(head, add_special=add_special, parse_special=True) if head else
                    ([tok.bos] if add_special else []),
                    tok.tokenize(tail, add_special=False, parse_special=True) if tail else [],
                )
            else:
                self._parts = ([tok.bos] if tok.add_bos else [], tok.tokenize("\nAnswer:", False, False))
        return self._parts

    def rniah_prompt(self, body: List[int]) -> List[int]:
        """Chat-rendered user turn: haystack tokens (spliced in as ids, so the haystack length is
        exact), then the question."""
        head, tail = self._chat_parts()
        if getattr(self, "_question_tokens", None) is None:
            self._question_tokens = self.plain_tokens("\n\n" + self.settings.rniah_question)
        return list(head) + list(body) + list(self._question_tokens) + list(tail)

    def greedy_tokens(self, role: str, prompt_tokens: List[int]) -> List[int]:
        """Greedy continuation, shared between axes: PLAD's anchors are the trajectory axis's
        decodes of the same prompts with the same settings."""
        key = (role, tuple(prompt_tokens))
        cached = self._greedy.get(key)
        if cached is None:
            if role == "reference":
                cached = self.reference_greedy(prompt_tokens, self.settings.n_predict)
            else:
                cached, _ = self.context(role).greedy(prompt_tokens, self.settings.n_predict)
            self._greedy[key] = cached
        return list(cached)

    def remember_greedy(self, role: str, prompt_tokens: List[int], tokens: List[int]) -> None:
        self._greedy[(role, tuple(prompt_tokens))] = list(tokens)

    # -- batched decoding ---------------------------------------------------------------

    def set_plan(self, planned) -> None:
        """(axis, unit) of every item this process may run, after -k/-m deselection. A batch is
        the planned units of an axis that share a batch number (given at collection); under
        xdist's loadgroup a batch is one group, so it runs on one worker."""
        self._plan = {}
        self.selected = {}  # (candidate role, axis) -> items selected: an interrupted report says how many ran
        for axis, unit in planned:
            key = (unit["candidate"], axis)
            self.selected[key] = self.selected.get(key, 0) + 1
            if unit.get("batch") is None:
                continue
            units = self._plan.setdefault((axis, unit["batch"]), {})
            entry = units.setdefault(unit["id"], (unit, set()))
            entry[1].add(unit["candidate"])

    def batch_of(self, axis: str, unit: dict):
        """(units, candidate roles) decoded together with ``unit``, in plan order."""
        planned = self._plan.get((axis, unit.get("batch")))
        if not planned or unit["id"] not in planned:
            return [unit], [unit["candidate"]]
        roles = set().union(*(r for _, r in planned.values()))
        units = self._planned_units(axis, unit)
        # The control decodes in the candidates' batches, unless the cache holds its results.
        if self.control_role and not all(self.control_cached(axis, u) for u in units):
            roles.add(CONTROL)
        return units, [r for r in self.item_roles if r in roles]

    def _planned_units(self, axis: str, unit: dict) -> List[dict]:
        planned = self._plan.get((axis, unit.get("batch")))
        if not planned or unit["id"] not in planned:
            return [unit]
        return [u for u, _ in planned.values()]

    def share_batch_time(self, axis: str, units: List[dict], role_seconds: Dict[str, float]) -> None:
        """Spread a batch's measured time over its items: each candidate's items carry that
        candidate's decode time plus an equal part of the shared work (reference, floor), so
        per-item and per-candidate wall times stay true although one item ran the batch."""
        cands = [r for r in role_seconds if r in self.item_roles]
        if not cands or not units:
            return
        shared = sum(sec for r, sec in role_seconds.items() if r not in cands) / len(cands)
        for role in cands:
            for u in units:
                self.batch_seconds[(axis, role, u["id"])] = (role_seconds[role] + shared) / len(units)

    def sequences(self, role: str, n_seq: int, n_ctx_seq: int):
        """The role's multi-sequence context (grown when a batch needs more)."""
        shared = self._context_settings(n_ctx_seq)
        ctx = self.engine.sequences_context(self.configs[role], self.types[role], shared, f"{role}#seq", n_seq, n_ctx_seq)
        self._seq_contexts[role] = ctx
        self._note_kv_bytes()
        return ctx

    def _note_kv_bytes(self) -> None:
        """Track the most KV-cache memory held at once (all contexts), for the report: the
        'both KV caches' term of a memory budget, batched-decoding streams included."""
        total = 0
        for role, ctx in self._contexts.items():
            total += (self.kv_bytes_per_token(role) or 0) * ctx.n_ctx
        for role, ctx in self._seq_contexts.items():
            total += (self.kv_bytes_per_token(role) or 0) * ctx.n_ctx_seq * ctx.n_seq
        self.kv_bytes_peak = max(getattr(self, "kv_bytes_peak", 0), total)

    def release_sequences(self) -> None:
        """Free the multi-sequence contexts (their KV caches) before axes that do not use them."""
        for role in list(self._seq_contexts):
            self.engine.drop_context(f"{role}#seq")
        self._seq_contexts.clear()

    def _greedy_batches(self, role: str, prompts: List[List[int]], n_predict: int, on_row=None,
                        on_finish=None) -> List[List[int]]:
        """Greedy tokens for the prompts, up to decode_batch sequences stepping together."""
        n_seq = max(1, min(self.settings.decode_batch, len(prompts)))
        ctx = self.sequences(role, n_seq, max(len(p) for p in prompts) + n_predict)
        return ctx.greedy_many(prompts, n_predict, on_row, None if on_finish is None else
                               (lambda i, slot: on_finish(ctx, i, slot)))

    def _load_batch(self, kind: str, keys: List[str]) -> Optional[list]:
        """A decode batch's cache entries, or None unless every one is there: a batch is
        recomputed whole, so each entry keeps the layout its key names."""
        if not self._read_cache:
            return None
        entries = []
        for key in keys:
            entry = self.refcache.load(kind, key)
            if entry is None:
                return None
            entries.append(entry)
        return entries

    def reference_trajectories(self, prompts: List[List[int]]) -> list:
        """Batched reference_trajectory: (tokens, 16-bit log-probs, exact logits or None) per
        prompt, the prompts decoded together. A batch's layout can change a model's rounding
        (see SequencesContext), so entries are keyed by the whole batch as well, and a batch
        is read from the cache only when every entry is there."""
        from .refcache import CompressedRows, LogprobRows

        n = self.settings.n_predict
        batch = _batch_signature(prompts)
        keys = [self.refcache.key("trajectory", p, n, batch) for p in prompts]
        value = self._recall("trajectory-batch", tuple(keys))
        if value is not None:
            return value
        entries = self._load_batch("trajectory", keys)
        if entries is not None:
            value = [([int(t) for t in e["arrays"]["tokens"]], LogprobRows(e["arrays"]), None) for e in entries]
            return self._remember("trajectory-batch", tuple(keys), value)
        floor = self.settings.floor
        # A batch holds every prompt's continuation until the candidates have run: kept
        # compressed, since 16 prompts x 128 steps x a 49k vocabulary is 200 MB at 16 bits.
        rows = [CompressedRows(self.engine.n_vocab) for _ in prompts]
        exact: List[list] = [[] for _ in prompts]

        def keep(i, step, row):
            rows[i].append_logits(row)
            if floor:  # only the floor needs the exact logits
                exact[i].append(row.copy())

        tokens = self._greedy_batches("reference", prompts, n, keep)
        value = []
        for i, key in enumerate(keys):
            if self.refcache.enabled:
                self.refcache.store("trajectory", key, dict(rows[i].stored(), tokens=np.asarray(tokens[i])))
            value.append((tokens[i], rows[i], np.stack(exact[i]) if floor else None))
        return self._remember("trajectory-batch", tuple(keys), value)

    def prefetch_greedy(self, role: str, prompts: List[List[int]]) -> None:
        """Decode together every prompt the role has no greedy continuation for yet, so that
        greedy_tokens then finds them all (PLAD anchors and perturbations)."""
        missing = []
        for p in prompts:
            if (role, tuple(p)) not in self._greedy and p not in missing:
                missing.append(p)
        if not missing:
            return
        n = self.settings.n_predict
        if role == "reference":
            batch = _batch_signature(missing)
            keys = [self.refcache.key("greedy", p, n, batch) for p in missing]
            entries = self._load_batch("greedy", keys)
            if entries is not None:
                for p, e in zip(missing, entries):
                    self._greedy[("reference", tuple(p))] = [int(t) for t in e["arrays"]["tokens"]]
                return
            tokens = self._greedy_batches(role, missing, n)
            for key, toks in zip(keys, tokens):
                self.refcache.store("greedy", key, {"tokens": np.asarray(toks, dtype=np.int64)})
        else:
            tokens = self._greedy_batches(role, missing, n)
        for p, toks in zip(missing, tokens):
            self._greedy[(role, tuple(p))] = toks

    @property
    def chunks_note(self) -> Optional[str]:
        if self.corpus is not None and self.n_chunks < self.settings.chunks:
            return (
                f"corpus holds {self.n_chunks} chunks of {self.settings.ctx} tokens; "
                f"{self.settings.chunks} were asked for"
            )
        return None

    def _chat_formatter(self):
        if self._chat is None:
            template = self.info.chat_template
            if template:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                tok = self._tokenizer or self.engine
                try:
                    self._chat = Jinja2ChatFormatter(
                        template, eos_token=tok.token_text(tok.eos), bos_token=tok.token_text(tok.bos)
                    )
                except Exception as exc:  # jinja2 raises its own syntax errors, and a template may raise anything
                    raise UsageProblem(self._template_problem(exc)) from None
            else:
                self._chat = False
        return self._chat

    def _render_chat(self, formatter, content: str) -> str:
        """One user turn through the model's chat template, as text."""
        try:
            return formatter(messages=[{"role": "user", "content": content}]).prompt
        except Exception as exc:  # see _chat_formatter
            raise UsageProblem(self._template_problem(exc)) from None

    def _template_problem(self, exc: Exception) -> str:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return (f"the chat template of {self.model_path.name} (tokenizer.chat_template) does not render a user turn: "
                f"{type(exc).__name__}: {detail}; fix it in the file, e.g. gguf-new-metadata --chat-template-file")

    def chat_tokens(self, text: str) -> List[int]:
        """Render a user turn with the model's own chat template (raw text for base models)
        and tokenize it, special tokens parsed. Cached: the same ids on every call."""
        cached = self._prompt_tokens.get(text)
        if cached is not None:
            return cached
        tok = self._tokenizer or self.engine
        formatter = self._chat_formatter()
        if formatter:
            rendered = self._render_chat(formatter, text)
            bos_text = tok.token_text(tok.bos)
            add_special = tok.add_bos and not rendered.startswith(bos_text)
            tokens = tok.tokenize(rendered, add_special=add_special, parse_special=True)
        else:
            tokens = tok.tokenize(text, add_special=True, parse_special=False)
        self._prompt_tokens[text] = tokens
        return tokens

    # -- llama.cpp ----------------------------------------------------------------------

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self._engine_mod.Engine(self.model_path, n_gpu_layers=self.settings.gpu_layers)
            self._engine.on_decoded = self.progress.decoded
        return self._engine

    def context_size(self) -> int:
        s = self.settings
        need = s.ctx
        if self._prompt_tokens:
            need = max(need, max(len(t) for t in self._prompt_tokens.values()) + s.n_predict)
        if self.rniah_lengths:
            need = max(need, max(self.rniah_lengths) + len(self.rniah_prompt([])) + self.rniah_answer_tokens)
        # llama.cpp pads the cache to 256 cells; asking for a padded size keeps it explicit.
        return int(math.ceil(need / 256.0) * 256)

    def context(self, role: str, min_ctx: int = 0):
        """The role's context; replaced by a larger one when a fixture needs more room (context
        size does not change the numbers: llama.cpp attends over the cells in use)."""
        ctx = self._contexts.get(role)
        if ctx is None or ctx.n_ctx < min_ctx:
            n_ctx = max(self.context_size(), int(math.ceil(min_ctx / 256.0) * 256))
            shared = self._context_settings(n_ctx)
            if ctx is not None:
                self.engine.drop_context(role)
            ctx = self.engine.context(self.configs[role], self.types[role], shared, role)
            self._contexts[role] = ctx
            self._note_kv_bytes()
        return ctx

    def _context_settings(self, n_ctx: int):
        """What every context shares apart from its size: batch sizes and threads change
        llama.cpp's numbers, so reference and candidates must agree on them."""
        s = self.settings
        return self._engine_mod.ContextSettings(n_ctx=n_ctx, n_batch=s.n_batch, n_ubatch=s.n_ubatch, n_threads=s.threads)

    def token_counts(self) -> dict:
        """Tokens processed so far per role: batched prompt tokens, one-sequence decode steps,
        and tokens decoded in multi-sequence steps (with the number of those steps)."""
        counts: Dict[str, Dict[str, int]] = {}
        for role, c in list(self._contexts.items()) + list(self._seq_contexts.items()):
            into = counts.setdefault(role, dict(_ZERO_COUNTS))
            into["batch_tokens"] += c.n_batch_tokens
            into["decode_tokens"] += c.n_decode_tokens
            into["seq_decode_tokens"] += getattr(c, "n_seq_decode_tokens", 0)
            into["seq_decode_steps"] += getattr(c, "n_seq_decode_steps", 0)
        return counts

    def measure(self, axis_module, unit) -> dict:
        """Run one item (``--refract-repeat`` times) and record the tokens it cost, so a
        benchmark can compare wall time with llama.cpp's raw throughput for the same tokens."""
        if axis_module.NAME != self._axis_now:
            # A new axis: what the previous one kept for its batches is not needed any more
            # (the KLD axis, where memory peaks, uses none of it).
            self._axis_now = axis_module.NAME
            self.batch_results.clear()
            self.batch_seconds.clear()
            self._ref_memory.pop("trajectory-batch", None)
            if axis_module.NAME not in BATCHED_AXES:
                self.release_sequences()
        from .progress import describe

        multi = len(self.candidate_roles) > 1
        planned = axis_module.planned_tokens(self, unit) * self.settings.repeat
        self.progress.begin(describe(axis_module.NAME, unit, self.labels[unit["candidate"]] if multi else None), planned)
        try:
            result = self._measure_once(axis_module, unit)
            done = (axis_module.NAME, unit["id"])
            if self.control_role and done not in self._control_done:
                # The first candidate item of a unit measures the control too; its result rides
                # along (also from xdist workers) and the session files it under the control.
                self._control_done.add(done)
                try:
                    result["_control"] = self._measure_control(axis_module, dict(unit, candidate=CONTROL))
                except (MeasurementError, UsageProblem) as exc:
                    result["_control_error"] = str(exc)
            repeats = []
            for _ in range(self.settings.repeat - 1):
                self.forget()
                repeats.append(self._measure_once(axis_module, unit))
        finally:
            self.progress.end()
        if repeats:
            result["_repeats"] = repeats
        return result

    # -- the sensitivity control (cached like the reference) ------------------------------

    def _control_key(self, axis: str, unit: dict) -> str:
        """Cache key of one control item: everything its result depends on beyond the cache's
        namespace (model, reference, numerics, build): the control config, the item's own
        inputs, the settings the axis reads and, for batched decoding, the batch's layout."""
        import json

        s = self.settings
        own = {k: (v.prompt if isinstance(v, data.Prompt) else v) for k, v in unit.items()
               if k not in ("candidate", "batch", "keywords")}
        batch = [u["id"] for u in self._planned_units(axis, unit)] if unit.get("batch") is not None else None
        reads = {"trajectory": {"n_predict": s.n_predict, "decode_batch": s.decode_batch},
                 "plad": {"n_predict": s.n_predict, "decode_batch": s.decode_batch, "seed": s.seed},
                 "kld": {"ctx": s.ctx, "corpus": self.corpus.sha256 if self.corpus else None},
                 "rniah": {"seed": s.seed, "trials": s.rniah_trials, "needle": s.rniah_needle,
                           "question": s.rniah_question, "answer": s.rniah_answer, "values": s.rniah_values,
                           "answer_tokens": self.rniah_answer_tokens,
                           "haystack": self.haystack_source.sha256 if self.haystack_source else None}}[axis]
        text = json.dumps({"unit": own, "batch": batch, "reads": reads}, sort_keys=True, default=str)
        return self.refcache.key("control-" + axis, self.labels[CONTROL], text)

    def control_cached(self, axis: str, unit: dict) -> bool:
        if not self._read_cache:
            return False
        return self.refcache.has("control-" + axis, self._control_key(axis, unit))

    def _measure_control(self, axis_module, unit) -> dict:
        """The control's item: read from the reference cache when there, else measured like a
        candidate's and stored (its result depends only on what the key holds)."""
        key = self._control_key(axis_module.NAME, unit)
        if self._read_cache:
            entry = self.refcache.load("control-" + axis_module.NAME, key)
            if entry is not None and entry["meta"].get("result") is not None:
                result = entry["meta"]["result"]
                result["compute"] = {}
                result["reference_cache"] = {"hits": 1, "misses": 0}
                result["wall_s"] = 0.0  # read, not measured: this run paid nothing for it
                result["control_cached"] = True
                return result
        result = self._measure_once(axis_module, unit)
        stored = {k: v for k, v in result.items() if k not in ("compute", "reference_cache")}
        self.refcache.store("control-" + axis_module.NAME, key, {}, meta={"result": stored})
        result["control_cached"] = False
        return result

    def forget(self) -> None:
        """Drop everything a repetition could reuse: cached decodes and KV caches."""
        self._greedy.clear()
        self._ref_memory.clear()
        self.__dict__.pop("_ref_greedy_memo", None)
        self.batch_results.clear()
        self.batch_seconds.clear()
        for ctx in self._contexts.values():
            ctx.reset()

    def _measure_once(self, axis_module, unit) -> dict:
        cache_before = (self.refcache.hits, self.refcache.misses)
        before = self.token_counts()
        result = axis_module.measure(self, unit)
        after = self.token_counts()
        result["compute"] = {
            role: {k: counts[k] - before.get(role, _ZERO_COUNTS)[k] for k in counts} for role, counts in after.items()
        }
        result["reference_cache"] = {"hits": self.refcache.hits - cache_before[0],
                                     "misses": self.refcache.misses - cache_before[1]}
        return result

    def close(self) -> None:
        self._contexts.clear()
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # -- report facts -------------------------------------------------------------------

    def kv_bytes_per_token(self, role: str) -> Optional[int]:
        """Bytes the role's KV cache takes per token over all layers, as llama.cpp allocated it
        (see kv_allocation); None where llama.cpp logged no cache size. This is what a
        quantized cache saves, the other half of "which config should I ship"."""
        alloc = self.kv_allocation(role)
        return alloc["bytes_per_token"] if alloc else None

    def _row_bytes(self, role: str, side: int, pad: int) -> Optional[int]:
        """ggml row arithmetic for one cache side per token, heads padded to ``pad``."""
        n_layer = self.info.arch_key("block_count")
        n_head_kv = self.info.arch_key("attention.head_count_kv", self.info.arch_key("attention.head_count"))
        head = self.info.head_dims[side]
        if not (n_layer and n_head_kv and head):
            return None
        per_layer = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * int(n_layer)
        padded = -(-int(head) // pad) * pad
        cache_type = self.types[role][side]
        if any(int(h) * padded % cache_type.block_size for h in per_layer if h):
            return None  # not a layout ggml can hold
        return sum(self._engine_mod.ggml_row_size(cache_type.ggml_type, int(h) * padded) for h in per_layer if h)

    def kv_allocation(self, role: str) -> Optional[dict]:
        """The role's KV cache as llama.cpp allocated it, per token. llama.cpp prints each
        side's size in MiB with two decimals; where ggml's row arithmetic (over the model's
        heads, or heads zero-padded as forks such as TurboQuant do) reproduces a printed size,
        that exact figure is the allocation, otherwise the printed size over the cells is."""
        cached = getattr(self, "_alloc", {}).get(role)
        if cached is not None:
            return cached
        facts = self.kv_facts.get(role)
        if facts is None or not facts.caches:
            return None
        per_side = []
        exact_all = True
        for side in (0, 1):
            total = 0
            for cache in facts.caches:
                mib = cache.k_mib if side == 0 else cache.v_mib
                options = []
                if len(facts.caches) == 1:  # several caches (e.g. sliding-window layers) split the layers
                    options = [b for b in (self._row_bytes(role, side, p) for p in (1, 32, 64, 128, 256)) if b]
                value, exact = side_bytes_per_token(mib, cache.cells, options)
                total += value
                exact_all = exact_all and exact
            per_side.append(total)
        first = facts.caches[0]
        alloc = {
            "bytes_per_token": per_side[0] + per_side[1],
            "k_bytes_per_token": per_side[0],
            "v_bytes_per_token": per_side[1],
            "k_type": first.k_type,
            "v_type": first.v_type,
            "logged": [{"cells": c.cells, "k_mib": c.k_mib, "v_mib": c.v_mib} for c in facts.caches],
            "exact": exact_all,
            "source": "llama.cpp's log of the cache it allocated" + ("" if exact_all else " (MiB with two decimals)"),
        }
        self._alloc = getattr(self, "_alloc", {})
        self._alloc[role] = alloc
        return alloc

    def kv_cache_facts(self, role: str) -> Optional[dict]:
        own, ref = self.kv_bytes_per_token(role), self.kv_bytes_per_token("reference")
        if own is None or not ref:
            return None
        return {"bytes_per_token": own, "vs_reference": own / ref}

    def model_facts(self) -> dict:
        if getattr(self, "_model_facts", None) is not None:
            return dict(self._model_facts)
        n_params = 0
        for _name, dims, _t, _o in self.info.tensors:
            count = 1
            for d in dims:
                count *= d
            n_params += count
        facts = {
            "name": self.info.name,
            "path": self.model_path.name,
            "size_bytes": self.info.size_bytes,
            "architecture": self.info.architecture,
            "n_params": n_params,
            "n_ctx_train": self.info.n_ctx_train,
            "sha256_first_mib": head_sha256(self.model_path),
        }
        self._model_facts = facts
        return dict(facts)

    def report_facts(self, *, wall_s: Optional[float] = None, items_selected: Optional[int] = None):
        """Everything the report states about this run besides its measurements, as plain
        data (report.build_report reads nothing else from the audit). ``wall_s`` and
        ``items_selected`` are the session's: its wall time so far, and its items after -k/-m."""
        import copy
        import os
        import platform

        from .facts import ReportFacts

        def source(text_file) -> dict:
            return {"name": text_file.name, "sha256": text_file.sha256, "bytes": text_file.bytes,
                    "replaced_invalid_utf8": text_file.replaced_invalid_utf8}

        # The corpus and the haystack are one input when R-NIAH reads the corpus itself.
        texts = {id(x): x for x in (self.corpus, self.haystack_source) if x is not None}.values()
        roles = ["reference", *self.candidate_roles]
        probed = hasattr(self, "kv_facts")  # llama.cpp judged every config (see _probe_contexts)
        selected: Dict[str, Dict[str, int]] = {}
        for (role, axis), count in (getattr(self, "selected", None) or {}).items():
            selected.setdefault(role, {})[axis] = count
        return ReportFacts(
            settings=self.settings,
            candidate_roles=tuple(self.candidate_roles),
            labels=dict(self.labels),
            self_reference=dict(self.self_reference),
            control_role=self.control_role,
            text_inputs=tuple(source(x) for x in texts),
            axis_inputs={"kld": {"corpus": source(self.corpus)}} if self.corpus is not None else {},
            axis_settings=({"rniah": {"lengths": list(self.rniah_lengths),
                                      "effective_answer_tokens": self.rniah_answer_tokens,
                                      "thinking_template": self.rniah_thinking}} if self.rniah_lengths else {}),
            chunks_note=self.chunks_note,
            gpu_note=getattr(self, "gpu_note", None),
            rotation={r: self.rotation(r) for r in roles} if probed else None,
            kv_allocation={r: self.kv_allocation(r) for r in roles} if probed else None,
            context_env={r: dict(self.context_env.get(r, {})) for r in roles} if probed else None,
            kv_cache={r: self.kv_cache_facts(r) for r in self.candidate_roles},
            reference_kv_bytes_per_token=self.kv_bytes_per_token("reference"),
            kv_bytes_peak=getattr(self, "kv_bytes_peak", 0) or None,
            model=self.model_facts(),
            host={"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
            reference_cache_enabled=self.refcache.enabled,
            reference_cache_read=self._read_cache,
            binding_version=self._engine_mod.library_version(),
            llama_build=self._engine_mod.build_info(),
            baseline=copy.deepcopy(self.baseline),
            selected=selected,
            items_selected=items_selected or None,
            wall_s=wall_s,
        )


CONTROL = "control"

# Axes whose greedy decodes run in multi-sequence batches with --refract-decode-batch > 1,
# and how many decode-batch widths of units a batch (one xdist group) holds. A trajectory batch
# keeps its reference's log-probs until the candidates have run, so it holds one width; PLAD
# keeps only token ids, so a longer queue keeps its batch full for longer.
BATCHED_AXES = {"trajectory": 1, "plad": 4}
_ZERO_COUNTS = {"batch_tokens": 0, "decode_tokens": 0, "seq_decode_tokens": 0, "seq_decode_steps": 0}


def _input_files(settings: Settings, model_path: Path) -> List[tuple]:
    """(what, path) of every file the run reads: none of them may be a report path."""
    inputs = [("model (--refract-model)", model_path),
              ("prompt set (--refract-prompts)", settings.prompts_path),
              ("corpus (--refract-corpus)", settings.corpus_path),
              ("haystack (--refract-haystack)", settings.haystack_path),
              ("baseline report (--refract-baseline)", settings.baseline_path)]
    try:
        bundled = data.data_dir()
        inputs += [("bundled prompt set", bundled / data.DEFAULT_PROMPTS), ("bundled corpus", bundled / data.DEFAULT_CORPUS)]
    except UsageProblem:
        pass  # reported where the bundled files are needed
    return inputs


def _batch_signature(prompts: List[List[int]]) -> List[int]:
    """Every prompt of a decode batch, in order, as one id list (for cache keys)."""
    flat: List[int] = [len(prompts)]
    for p in prompts:
        flat.append(len(p))
        flat.extend(p)
    return flat


def _id_prefixes(candidates) -> Dict[str, str]:
    """Test-id prefix per candidate role: none for a single candidate (test_kld[chunk-07]),
    the cache types for a matrix (test_kld[q8_0-q4_0-chunk-07]), more detail if those clash."""
    if len(candidates) == 1:
        return {"cand0": ""}
    shorts = [c.short() for c in candidates]
    if len(set(shorts)) != len(shorts):
        shorts = [c.label().replace("ctk=", "").replace("ctv=", "").replace("=", "_").replace(",", "-") for c in candidates]
    return {f"cand{i}": f"{short}-" for i, short in enumerate(shorts)}
