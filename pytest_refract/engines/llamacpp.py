"""The llama.cpp engine (through llama-cpp-python). It, and the modules it draws on that talk to
the library (llama_log.py, ggml_types.py), are the only ones that import ``llama_cpp``.

One model is loaded per process (weights resident once); each KV configuration gets its own
context with identical settings apart from the cache types, because batch sizes, flash
attention and thread counts all change llama.cpp's numerics. Every measurement starts from a
cleared KV cache: reusing a cached prefix (as llama-cpp-python's high-level ``generate`` does)
changes logits, which would make reference and candidate incomparable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MeasurementError, UsageProblem
from . import kvlog, libload
from .base import (
    Context,
    ContextRefused,
    ContextSettings,
    TemplateProblem,
    context_for,
    padded,
)
from .kvconfig import CacheType, KVConfig

try:  # imported lazily by the plugin: only modules that need llama.cpp import this one
    import llama_cpp
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "pytest-refract needs llama-cpp-python; see the README for the build flags this machine needs"
    ) from exc

# After the import above, so that a missing llama-cpp-python is reported as such. cache_types,
# row_size and set_log_echo are this module's interface to the audit (see base.py).
from . import llama_log  # noqa: E402
from .chat_template import (  # noqa: E402
    TEMPLATE_MAX_CHARS,
    TEMPLATE_MAX_LOOP_ITEMS,
    _bound_template_loops,
    _bounded_render,
)
from .ggml_types import _ggml_lib, cache_types, row_size  # noqa: E402,F401
from .llama_log import _capture_log, _last_error, _quiet_log, set_log_echo  # noqa: E402,F401


@contextlib.contextmanager
def _environment(changes: Dict[str, Optional[str]]):
    """Set (or, for None, unset) variables while llama.cpp reads them, then restore them."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        _set_environment(changes)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: Dict[str, Optional[str]]) -> None:
    """Set each variable to its value; None means unset."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


_backend_ready = False


def _pin_malloc_mmap_threshold() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap, returned to the
    OS when freed. By default glibc raises that threshold (up to 32 MiB) each time such a block
    is freed, after which the per-chunk numpy arrays of the KLD axis (a few to tens of MB)
    land on the heap, fragment it and are never given back: measured on the default audit,
    peak RSS then varied between 460 and 540 MiB from run to run; pinned, it is 460 every time.
    Only the threshold changes; elsewhere (musl, macOS, Windows) this does nothing."""
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: its mallopt takes M_MMAP_THRESHOLD = -3
            return
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(-3, 1 << 20)
    except (AttributeError, OSError):
        pass


def check_context_params() -> None:
    """Refuse, in one line, bindings whose llama_context_params layout is not the library's
    (libload.context_params_problem): they would set the wrong cache type silently."""
    problem = libload.context_params_problem(llama_cpp.llama_context_default_params(), library_version())
    if problem:
        raise UsageProblem(problem)


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        check_context_params()
        _pin_malloc_mmap_threshold()
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def library_version() -> str:
    return getattr(llama_cpp, "__version__", "unknown")


def build_info() -> dict:
    """What produced the numbers: the Python binding and the ggml library it loaded."""
    info: Dict[str, Any] = {"llama_cpp_python": library_version(), "ggml_version": None, "ggml_commit": None}
    lib = _ggml_lib()
    for key, fn in (("ggml_version", "ggml_version"), ("ggml_commit", "ggml_commit")):
        func = getattr(lib, fn, None)
        if func is not None:
            func.restype = ctypes.c_char_p
            func.argtypes = []
            raw = func()
            info[key] = raw.decode("ascii", errors="replace") if raw else None
    folder = libload.loaded_library_dir()
    files = libload.loaded_library_files()
    # Which library folder (a fork's build, or llama-cpp-python's own) and exactly which
    # bytes: the digest is part of the reference cache's key.
    info["library_folder"] = folder.name if folder is not None else None
    info["libraries"] = [f.name for f in files]
    info["library_digest"] = libload.library_digest(files)
    info["system_info"] = system_info()
    return info


def library_record() -> dict:
    """The llama library this process mapped: its path and the sha256 of its bytes (not part
    of build_info, which keys the reference cache: a path must not change a key)."""
    llama = next((f for f in libload.loaded_library_files() if f.name.split(".")[0] in ("libllama", "llama")), None)
    return {"path": str(llama) if llama else None,
            "sha256": libload.library_digest([llama], names=False) if llama else None}


def system_info() -> str:
    try:
        return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    except Exception:  # pragma: no cover - informational only
        return ""


def configs_that_abort(model_path: Path, gpu_layers: int, context: ContextSettings,
                       configs: Sequence[Tuple[str, str, str]]) -> Dict[int, str]:
    """index -> why, for each (label, K type, V type) whose context would abort this process
    (tried in a child process: engines/isolated.py)."""
    from dataclasses import asdict

    from .isolated import configs_that_abort as in_child

    return in_child(model_path, gpu_layers, asdict(context), configs)


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


class Engine:
    """Owns the model (loaded once) and one context per (role, KV configuration)."""

    def __init__(self, model_path: Path, n_gpu_layers: int = 0, vocab_only: bool = False):
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.vocab_only = vocab_only
        params.use_mmap = True
        self.model_path = Path(model_path)
        # fsencode: the path's own bytes (one that is not UTF-8 arrives as surrogates).
        self._model = llama_cpp.llama_model_load_from_file(os.fsencode(str(model_path)), params)
        if not self._model:
            why = _last_error() or "see llama.cpp's log"
            raise MeasurementError(f"llama.cpp could not load {self.model_path.name}: {why}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_params = int(llama_cpp.llama_model_n_params(self._model))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        # A recurrent model (mamba, rwkv) keeps a fixed-size state per sequence instead of a KV
        # cache; a hybrid (jamba, granite-hybrid) has attention layers with one, so it is not.
        self.is_recurrent = bool(llama_cpp.llama_model_is_recurrent(self._model))
        # Sliding-window attention span (0 without one): see base.window_kept.
        self.n_swa = int(llama_cpp.llama_model_n_swa(self._model)) if hasattr(llama_cpp, "llama_model_n_swa") else 0
        self._contexts: Dict[Tuple[str, str], "LlamaContext"] = {}
        # KV config label -> every warning llama.cpp logged creating or using its contexts.
        self.logged_warnings: Dict[str, List[str]] = {}
        # Told the token count of every llama_decode (progress display; see progress.py).
        self.on_decoded = None

    # -- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> List[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise MeasurementError("llama.cpp failed to tokenize the text")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, -n, 0, False)
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        raw = llama_cpp.llama_vocab_get_text(self._vocab, int(token))
        return raw.decode("utf-8", errors="replace") if raw else ""

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, int(token)))

    def user_turn_renderer(self, template: str):
        """``render(content) -> str``: one user turn through the model's chat template, as
        llama-cpp-python renders it (Jinja2's sandbox, with the model's BOS/EOS texts). A
        template that does not compile or render, or exceeds the bounds (TEMPLATE_* in chat_template.py:
        loop items, seconds, characters), raises TemplateProblem with the reason."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            formatter = Jinja2ChatFormatter(template, eos_token=self.token_text(self.eos),
                                            bos_token=self.token_text(self.bos))
        except Exception as exc:  # jinja2 raises its own syntax errors, and a template may raise anything
            raise TemplateProblem(exc) from None
        budget = _bound_template_loops(formatter)

        def render(content: str) -> str:
            budget[0] = TEMPLATE_MAX_LOOP_ITEMS
            text = _bounded_render(lambda: formatter(messages=[{"role": "user", "content": content}]).prompt)
            if len(text) > TEMPLATE_MAX_CHARS:
                raise TemplateProblem(ValueError(f"one user turn renders to {len(text)} characters, more than "
                                                 f"{TEMPLATE_MAX_CHARS}"))
            return text

        return render

    # -- contexts -------------------------------------------------------------------------

    def context(self, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings, role: str,
                n_seq: int = 1, n_ctx_seq: Optional[int] = None) -> "LlamaContext":
        """The context of ``role`` (the floor gets its own, with the reference's config): up
        to ``n_seq`` sequences of ``n_ctx_seq`` cells (default: settings.n_ctx). A context too
        small for what is asked is replaced."""
        return context_for(self._contexts, (role, kv.label()), n_seq, padded(n_ctx_seq or settings.n_ctx),
                           lambda n_ctx: LlamaContext(self, kv, types, settings, n_seq, n_ctx))

    def probe(self, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings):
        """Create and free a small context for ``kv``: llama.cpp's verdict on the config (a
        refusal raises ContextRefused with its reason) and what it logged (CacheLog), with
        the LLAMA_*/GGML_* environment in effect, before any item runs."""
        ctx, facts, env = _new_context(self, kv, types, settings, settings.n_ctx, 1)
        llama_cpp.llama_free(ctx)
        return facts, env

    def note_warnings(self, label: str, messages: Sequence[str]) -> None:
        """Remember what llama.cpp warned about under KV config ``label`` (each message once)."""
        kept = self.logged_warnings.setdefault(label, [])
        for message in messages:
            if message not in kept and len(kept) < 64:
                kept.append(message)

    def drop_context(self, role: str) -> None:
        for key in [k for k in self._contexts if k[0] == role]:
            self._contexts.pop(key).close()

    def close(self) -> None:
        for ctx in self._contexts.values():
            ctx.close()
        self._contexts.clear()
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):  # pragma: no cover - safety net; close() is the normal path
        try:
            self.close()
        except Exception:
            pass


def _new_context(engine: "Engine", kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings,
                 n_ctx: int, n_seq: int):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = settings.n_batch
    params.n_ubatch = settings.n_ubatch
    params.n_seq_max = n_seq
    # One KV stream per sequence: each sequence attends over its own cells only, so its
    # logits are bit-identical to decoding it alone (tested); a unified cache is not (f16 V
    # with flash attention differs by up to ~1 logit) and is slower.
    params.kv_unified = n_seq == 1
    params.n_threads = settings.n_threads
    params.n_threads_batch = settings.n_threads
    params.type_k = types[0].ggml_type
    params.type_v = types[1].ggml_type
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if kv.fa else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.offload_kqv = not kv.nkvo
    params.swa_full = kv.swa_full
    params.no_perf = True
    # The rotation policy reaches llama.cpp through its environment, read when the KV cache is
    # created; what it then did is read back from its log of this creation.
    with _environment(kvlog.rotation_env(kv.rot)), _capture_log() as records:
        env = kvlog.recorded_env()
        ctx = llama_cpp.llama_init_from_model(engine._model, params)
    facts = kvlog.parse_log(records)
    if not ctx:
        why = kvlog.refusal_reason(facts.errors) or _last_error() or "see llama.cpp's log (-v)"
        raise ContextRefused(f"llama.cpp refused a context for {kv.label()}: {why}")
    return ctx, facts, env


class LlamaContext(Context):
    """A llama.cpp context: the four primitives of base.Context over llama_decode."""

    def __init__(self, engine: Engine, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings,
                 n_seq: int, n_ctx_seq: int):
        super().__init__(engine, kv, settings, n_seq, n_ctx_seq)
        self._ctx, self.cache_logs, self.env = _new_context(engine, kv, types, settings, self.n_ctx_seq * self.n_seq,
                                                          self.n_seq)
        engine.note_warnings(kv.label(), self.cache_logs.warnings)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(max(settings.n_batch, self.n_seq), 0, 1)
        # The attention window the cache may forget beyond, or 0 when it keeps every position
        # (no sliding-window layers, or a full-size window cache: swa_full=on).
        self.window = 0 if kv.swa_full else engine.n_swa

    def _decode(self, rows, seqs) -> None:
        b = self._batch
        for i, ((tok, pos, want), seq) in enumerate(zip(rows, seqs)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(rows)
        seen = llama_log.notable_count()
        rc = llama_cpp.llama_decode(self._ctx, b)
        if llama_log.notable_count() != seen:  # ggml warns at first use (e.g. a kernel it lacks)
            self.engine.note_warnings(self.kv.label(), llama_log.notable_since(seen))
        if rc != 0:
            raise MeasurementError(f"llama_decode failed (code {rc}) decoding {len(rows)} row(s) from position {rows[0][1]}")

    def _view(self, n_rows: int) -> np.ndarray:
        view = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(n_rows, self.n_vocab))
        view.flags.writeable = False
        return view

    def _drop(self, seq: int, from_pos: int) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._mem, seq, int(from_pos), -1))

    def _clear_all(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    def _free(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
