"""The llama.cpp engine (through llama-cpp-python): the only module that imports ``llama_cpp``.

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
import re
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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

_LOG_LOCK = threading.Lock()
_recent_errors: List[str] = []
# While a context is created, every log record goes here too (see _capture_log): llama.cpp
# reports there what it did (rotation, cache sizes) and why it refused.
_captured: Optional[List[Tuple[int, str]]] = None
_echo_log = False  # -v: print the captured creation log to stderr


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):  # pragma: no cover - called from C
    # llama.cpp prints hundreds of lines per model load; keep only errors, to quote them in
    # our own one-line messages (e.g. "unknown model architecture").
    msg = text.decode("utf-8", errors="replace")
    with _LOG_LOCK:
        if _captured is not None:
            _captured.append((int(level), msg))
    if level == 4:  # GGML_LOG_LEVEL_ERROR
        msg = msg.strip()
        if msg:
            with _LOG_LOCK:
                _recent_errors.append(msg)
                del _recent_errors[:-5]


def set_log_echo(on: bool) -> None:
    global _echo_log
    _echo_log = bool(on)


@contextlib.contextmanager
def _capture_log():
    """Collect llama.cpp's log records for the duration (a context's creation); the records
    are printed only with -v. Capturing ends, and the previous state returns, on exit."""
    global _captured
    records: List[Tuple[int, str]] = []
    with _LOG_LOCK:
        previous, _captured = _captured, records
    try:
        yield records
    finally:
        with _LOG_LOCK:
            _captured = previous
        if _echo_log and records:
            sys.stderr.write("".join(text for _, text in records))


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
        libc.gnu_get_libc_version  # glibc only: its mallopt takes M_MMAP_THRESHOLD = -3
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(-3, 1 << 20)
    except (AttributeError, OSError):
        pass


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        _pin_malloc_mmap_threshold()
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _last_error() -> str:
    """The most telling recent llama.cpp error: the loader's reason (e.g. "unknown model
    architecture: 'x'") rather than the generic "failed to load model" that follows it."""
    with _LOG_LOCK:
        for msg in reversed(_recent_errors):
            if "error loading model" in msg:
                return msg.split("error loading model", 1)[1].lstrip(": ").strip() or msg
        return _recent_errors[-1] if _recent_errors else ""


def library_version() -> str:
    return getattr(llama_cpp, "__version__", "unknown")


def build_info() -> dict:
    """What produced the numbers: the Python binding and the ggml library it loaded."""
    info = {"llama_cpp_python": library_version(), "ggml_version": None, "ggml_commit": None}
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


def system_info() -> str:
    try:
        return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    except Exception:  # pragma: no cover - informational only
        return ""


# --------------------------------------------------------------------------- chat templates

# Bounds on rendering a chat template (a file's own code): items its range() loops may produce
# per render, seconds per render, characters of the rendered turn. A real template renders a
# user turn in milliseconds, to a few hundred characters plus the content.
TEMPLATE_MAX_LOOP_ITEMS = 100_000
TEMPLATE_SECONDS = 10.0
TEMPLATE_MAX_CHARS = 1 << 20


class _TemplateBudget(Exception):
    pass


def _bound_template_loops(formatter) -> list:
    """Give the template a range() that counts what all its loops draw from it in one render
    (Jinja2's sandbox only caps each range at 100k items: nested, 100k x 100k never ends).
    Returns the budget cell render() resets."""
    budget = [TEMPLATE_MAX_LOOP_ITEMS]
    env = getattr(getattr(formatter, "_environment", None), "environment", None)
    if env is None:
        return budget  # another llama-cpp-python layout: the time bound still holds
    inner = env.globals.get("range", range)

    def counted(*args):
        items = inner(*args)
        budget[0] -= len(items)
        if budget[0] < 0:
            raise _TemplateBudget(f"its loops draw more than {TEMPLATE_MAX_LOOP_ITEMS} range() items for one turn")
        return items

    env.globals["range"] = counted
    return budget


def _bounded_render(call):
    """``call()`` in a daemon thread, waited for TEMPLATE_SECONDS: a template that does not
    finish is a TemplateProblem (its thread is abandoned; the run then stops at configure)."""
    out: dict = {}

    def work():
        try:
            out["text"] = call()
        except BaseException as exc:  # reported below, in the caller's thread
            out["error"] = exc

    worker = threading.Thread(target=work, name="refract-template", daemon=True)
    worker.start()
    worker.join(TEMPLATE_SECONDS)
    if worker.is_alive():
        raise TemplateProblem(TimeoutError(f"rendering one user turn took over {TEMPLATE_SECONDS:g} s"))
    if "error" in out:
        raise TemplateProblem(out["error"]) from None
    return out["text"]


# --------------------------------------------------------------------------- ggml type table


def _ggml_lib():
    """The ggml library that llama-cpp-python actually loaded (not a table of ours), so that a
    fork's cache types (e.g. TurboQuant's turbo4) are found where the build has them."""
    for path in libload.loaded_library_files():
        if path.name.startswith(("libggml-base.", "ggml-base.")):
            return ctypes.CDLL(str(path))
    lib_dir = libload.loaded_library_dir() or Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so", "libggml.dylib", "ggml.dll"):
        candidate = lib_dir / name
        if candidate.exists():
            return ctypes.CDLL(str(candidate))
    # Fall back to the llama library itself: older builds link ggml statically into it.
    return llama_cpp.llama_cpp._lib


class _TypeTraits(ctypes.Structure):
    # Leading fields of ggml.h's struct ggml_type_traits (stable since ggml 0.1).
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_CACHE_TYPES: Optional[Dict[str, CacheType]] = None
_ROW_SIZE = None
# type id -> block size of every type the loaded ggml build has a layout for (tensors too).
_BLOCK_SIZES: Dict[int, int] = {}
# Integer and deprecated slots in ggml's enum are not storage formats for a KV cache.
_NOT_CACHE_TYPES = {"i8", "i16", "i32", "i64", "f64", "none", "deprecated", "q8_1", "q8_k"}
_TYPE_NAME_RE = re.compile(r"^[a-z0-9_]{2,16}$")


def _header_candidates() -> List[Path]:
    """Where the loaded build's ggml.h may be: installed beside llama-cpp-python, or, for a
    library folder of one's own (--refract-llama-lib), in its install prefix or the source
    tree its build folder's CMakeCache.txt names."""
    site = Path(llama_cpp.__file__).resolve().parent.parent
    headers = [site / "include" / "ggml.h", Path(llama_cpp.__file__).parent / "include" / "ggml.h"]
    folder = libload.loaded_library_dir()
    if folder is not None:
        headers += [folder.parent / "include" / "ggml.h", folder.parent.parent / "ggml" / "include" / "ggml.h"]
        for cache in (folder.parent / "CMakeCache.txt", folder / "CMakeCache.txt"):
            if cache.is_file():
                m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache.read_text(errors="replace"), re.M)
                if m:
                    headers.append(Path(m.group(1).strip()) / "ggml" / "include" / "ggml.h")
    return headers


def _ggml_type_count() -> int:
    """GGML_TYPE_COUNT of the loaded build, from its ggml.h. ggml's type functions do no
    bounds check, so the table is read only up to a count the build itself declares: without
    one, the scan fails closed with a one-line error rather than guess where the table ends."""
    headers = _header_candidates()
    for header in headers:
        if header.is_file():
            m = re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", header.read_text(errors="replace"))
            if m:
                return int(m.group(1))
    raise UsageProblem(
        "cannot tell which KV cache types this llama.cpp build has: no ggml.h declaring GGML_TYPE_COUNT at "
        + ", ".join(str(h) for h in dict.fromkeys(headers))
        + "; reinstall llama-cpp-python, or give --refract-llama-lib a build folder inside its build tree"
    )


def cache_types() -> Dict[str, CacheType]:
    """Name -> CacheType for every storage type the loaded ggml build names."""
    global _CACHE_TYPES, _ROW_SIZE
    if _CACHE_TYPES is None:
        lib = _ggml_lib()
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        types: Dict[str, CacheType] = {}
        for type_id in range(_ggml_type_count()):
            traits = lib.ggml_get_type_traits(type_id).contents
            if traits.blck_size <= 0 or traits.type_size <= 0 or not traits.type_name:
                continue  # removed slots of the enum
            _BLOCK_SIZES[type_id] = int(traits.blck_size)
            if traits.type_name != b"f32" and (not traits.from_float_ref or not traits.to_float):
                continue  # a type nothing can write into (e.g. needs an importance matrix)
            name = traits.type_name.decode("ascii", errors="replace").strip().lower()
            if not _TYPE_NAME_RE.match(name) or name in _NOT_CACHE_TYPES or name.startswith(("q4_0_", "iq4_nl_")):
                continue
            types.setdefault(name, CacheType(name, type_id, int(traits.blck_size)))
        _CACHE_TYPES = types
        _ROW_SIZE = lambda t, n: int(lib.ggml_row_size(t, n))  # noqa: E731
    return _CACHE_TYPES


def row_size(type_id: int, n: int) -> int:
    """Bytes of one row of ``n`` values stored as ggml type ``type_id``. ValueError for a type
    this build's table does not have, or a row its blocks cannot tile: ggml_row_size itself
    checks neither (a removed type has block size 0: SIGFPE; 2**31-1 reads past the table)."""
    cache_types()
    block = _BLOCK_SIZES.get(type_id)
    if block is None:
        raise ValueError(f"ggml type {type_id} is not a type this llama.cpp build knows")
    if n < 0 or n >= 1 << 62 or n % block:
        raise ValueError(f"a row of {n} values cannot be stored as ggml type {type_id} (blocks of {block})")
    return _ROW_SIZE(type_id, n)


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


# --------------------------------------------------------------------------- engine


class Engine:
    """Owns the model (loaded once) and one context per (role, KV configuration)."""

    def __init__(self, model_path: Path, n_gpu_layers: int = 0, vocab_only: bool = False):
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.vocab_only = vocab_only
        params.use_mmap = True
        self.model_path = Path(model_path)
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode("utf-8"), params)
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
        template that does not compile or render, or exceeds the bounds (TEMPLATE_* below:
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
        rc = llama_cpp.llama_decode(self._ctx, b)
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
