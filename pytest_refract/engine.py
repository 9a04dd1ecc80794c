"""The one place that talks to llama.cpp.

One model is loaded per process (weights resident once); each KV configuration gets its own
context with identical settings apart from the cache types, because batch sizes, flash
attention and thread counts all change llama.cpp's numerics. Every measurement starts from a
cleared KV cache: reusing a cached prefix (as llama-cpp-python's high-level ``generate`` does)
changes logits, which would make reference and candidate incomparable.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import kvlog, libload
from .errors import MeasurementError
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
# Integer and deprecated slots in ggml's enum are not storage formats for a KV cache.
_NOT_CACHE_TYPES = {"i8", "i16", "i32", "i64", "f64", "none", "deprecated", "q8_1", "q8_k"}
_TYPE_NAME_RE = re.compile(r"^[a-z0-9_]{2,16}$")


def _ggml_type_count() -> Optional[int]:
    """GGML_TYPE_COUNT of the build that llama-cpp-python installed: its build installs
    ggml.h beside the package. ggml's type functions do no bounds check, so we must know."""
    site = Path(llama_cpp.__file__).resolve().parent.parent
    headers = [site / "include" / "ggml.h", Path(llama_cpp.__file__).parent / "include" / "ggml.h"]
    folder = libload.loaded_library_dir()
    if folder is not None:  # a build tree (build/bin) next to its sources, or an install prefix (lib)
        headers += [folder.parent / "include" / "ggml.h", folder.parent.parent / "ggml" / "include" / "ggml.h"]
    for header in headers:
        if header.is_file():
            m = re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", header.read_text(errors="replace"))
            if m:
                return int(m.group(1))
    return None


def cache_types() -> Dict[str, CacheType]:
    """Name -> CacheType for every storage type the loaded ggml build names."""
    global _CACHE_TYPES, _ROW_SIZE
    if _CACHE_TYPES is None:
        lib = _ggml_lib()
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        count = _ggml_type_count()
        types: Dict[str, CacheType] = {}
        for type_id in range(count if count is not None else 256):
            traits = lib.ggml_get_type_traits(type_id).contents
            # Without a header to bound the scan, stop at the first slot that does not look
            # like a type: the table is followed by unrelated memory.
            plausible = 0 <= traits.blck_size <= 4096 and 0 <= traits.type_size <= 65536
            if not plausible:
                if count is None:
                    break
                continue
            if traits.blck_size <= 0 or traits.type_size <= 0 or not traits.type_name:
                continue  # removed slots of the enum
            if traits.type_name != b"f32" and (not traits.from_float_ref or not traits.to_float):
                continue  # a type nothing can write into (e.g. needs an importance matrix)
            name = traits.type_name.decode("ascii", errors="replace").strip().lower()
            if not _TYPE_NAME_RE.match(name):
                if count is None:
                    break
                continue
            if name in _NOT_CACHE_TYPES or name.startswith(("q4_0_", "iq4_nl_")):
                continue
            types.setdefault(name, CacheType(name, type_id, int(traits.blck_size)))
        _CACHE_TYPES = types
        _ROW_SIZE = lambda t, n: int(lib.ggml_row_size(t, n))  # noqa: E731
    return _CACHE_TYPES


def ggml_row_size(type_id: int, n: int) -> int:
    cache_types()
    return _ROW_SIZE(type_id, n)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class ContextSettings:
    """Everything shared by reference and candidate contexts."""

    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 2


class Engine:
    """Owns the model (loaded once) and one context per KV configuration."""

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
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self.n_params = int(llama_cpp.llama_model_n_params(self._model))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        # A recurrent model (mamba, rwkv) keeps a fixed-size state per sequence instead of a KV
        # cache; a hybrid (jamba, granite-hybrid) has attention layers with one, so it is not.
        self.is_recurrent = bool(llama_cpp.llama_model_is_recurrent(self._model))
        # Sliding-window attention span (0 without one): see _window_kept.
        self.n_swa = int(llama_cpp.llama_model_n_swa(self._model)) if hasattr(llama_cpp, "llama_model_n_swa") else 0
        self._contexts: Dict[Tuple[str, str], "Context"] = {}
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

    def meta(self, key: str) -> Optional[str]:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode("utf-8"), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    # -- contexts -------------------------------------------------------------------------

    def context(self, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings, role: str) -> "Context":
        """One context per (role, config); ``role`` lets the floor get a second, independent
        context with the reference's configuration."""
        key = (role, kv.label())
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = Context(self, kv, types, settings)
            self._contexts[key] = ctx
        return ctx

    def sequences_context(self, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings,
                          role: str, n_seq: int, n_ctx_seq: int) -> "SequencesContext":
        """A context that decodes up to ``n_seq`` sequences together (see SequencesContext);
        replaced when a larger one is asked for."""
        key = (role, kv.label())
        ctx = self._contexts.get(key)
        if ctx is not None and (ctx.n_seq < n_seq or ctx.n_ctx_seq < n_ctx_seq):
            self._contexts.pop(key).close()
            ctx = None
        if ctx is None:
            ctx = SequencesContext(self, kv, types, settings, n_seq, n_ctx_seq)
            self._contexts[key] = ctx
        return ctx

    def probe(self, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings):
        """Create and free a small context for ``kv``: llama.cpp's verdict on the config (a
        refusal raises ContextRefused with its reason) and the facts it logged (KVFacts), with
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


class ContextRefused(MeasurementError):
    """llama.cpp returned no context; the message quotes its logged reason."""


def _sliding_window(engine: "Engine", kv: KVConfig) -> int:
    """The attention window a context's cache may forget beyond, or 0 when it keeps every
    position (no sliding-window layers, or a full-size window cache: swa_full=on)."""
    return 0 if kv.swa_full else engine.n_swa


def _window_kept(window: int, longest: int) -> bool:
    """Whether a sequence cut back to a prefix still has every cell that prefix needs.

    A sliding-window cache is sized for the window, not the context: once a sequence passed
    ``window`` tokens, llama.cpp may overwrite cells that fell out of the window (masked cells
    count as free). A later cut back to an earlier position then needs cells that may be gone,
    and llama_memory_seq_rm does not say so. Until a sequence outgrew the window, no cell was
    ever masked, so a cut is exact."""
    return not window or longest <= window


def _logits_view(ctx, n_rows: int, n_vocab: int) -> np.ndarray:
    """The last decode's output rows, read-only, in llama.cpp's own buffer (valid until the
    next decode)."""
    view = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n_rows, n_vocab))
    view.flags.writeable = False
    return require_finite(view)


NON_FINITE_LOGITS = ("the model produced non-finite logits (NaN or Infinity); its weights are corrupt or it "
                     "overflows under this configuration, so nothing can be measured")


def require_finite(logits: np.ndarray) -> np.ndarray:
    """Every logit row passes here before anything is computed from it: argmax of a NaN row
    is token 0 on both sides, and a NaN KLD once became a perfect score."""
    # A sum is one pass without a temporary; only a non-finite sum needs the exact test.
    if not np.isfinite(logits.sum(dtype=np.float64)) and not np.isfinite(logits).all():
        raise MeasurementError(NON_FINITE_LOGITS)
    return logits


def _evaluate_in_batches(ctx, n_vocab: int, n_batch: int, tokens: Sequence[int], start_pos: int,
                         logits_from: Optional[int], decode, consume) -> None:
    """Feed ``tokens`` at start_pos.. cut at n_batch (the same cuts in every context, so the
    layout, and with it the numbers, match), asking logits for tokens from index logits_from
    on; ``decode(part, pos, want)`` runs one cut and returns its output row count, and each
    cut's rows go to ``consume(first_row, view)``."""
    first = len(tokens) if logits_from is None else logits_from
    done = 0
    for off in range(0, len(tokens), n_batch):
        part = tokens[off : off + n_batch]
        n_out = decode(part, start_pos + off, [off + i >= first for i in range(len(part))])
        if n_out:
            consume(done, _logits_view(ctx, n_out, n_vocab))
            done += n_out


class Context:
    """A llama.cpp context for one KV configuration, with one sequence."""

    def __init__(self, engine: Engine, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings):
        self.engine = engine
        self.kv = kv
        self.settings = settings
        self._ctx, self.kv_facts, self.env = _new_context(engine, kv, types, settings, settings.n_ctx, 1)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(settings.n_batch, 0, 1)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.n_vocab = engine.n_vocab
        # Tokens this context has processed, split the way llama-bench reports throughput
        # (batched prompt processing vs one-token decode steps), for compute-ratio figures.
        self.n_batch_tokens = 0
        self.n_decode_tokens = 0
        # The token at each cached position, so a prefix can be reused (see prefill), and the
        # longest the sequence grew since it was cleared (see _window_kept).
        self._cached: List[int] = []
        self._longest = 0
        self._window = _sliding_window(engine, kv)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self._cached = []
        self._longest = 0

    def truncate(self, n_keep: int) -> None:
        """Drop cached positions >= n_keep (to re-decode from a divergence point)."""
        if n_keep <= 0:
            self.reset()
            return
        # A cut needs every cell the prefix attends to (see _window_kept), and a model with
        # recurrent layers (a hybrid such as jamba) cannot roll its state back: llama.cpp
        # refuses. Either way the prefix is recomputed from a cleared cache, cut at n_batch as
        # a fresh evaluation would be.
        if _window_kept(self._window, self._longest) and llama_cpp.llama_memory_seq_rm(self._mem, 0, int(n_keep), -1):
            del self._cached[n_keep:]
            return
        kept = self._cached[:n_keep]
        self.reset()
        self.evaluate_each(kept, 0, None, lambda first, view: None)

    def prefill(self, tokens: Sequence[int], logits_from: int) -> np.ndarray:
        """Evaluate ``tokens`` from position 0, reusing whole n_batch-sized batches that are
        already in the cache with identical tokens.

        Why this is exact: a fresh evaluation cuts the sequence into batches at multiples of
        n_batch, and a batch's KV entries depend only on the tokens up to its end. Keeping the
        cached batches that a fresh run would recompute identically, and evaluating the rest
        with the same cuts, gives bit-identical logits (tested) while skipping shared
        haystack prefixes. Anything short of a whole batch is recomputed.
        """
        step = self.settings.n_batch
        common = 0
        for a, b in zip(self._cached, tokens):
            if a != b:
                break
            common += 1
        keep = min(common, len(tokens) - 1, logits_from) // step * step
        if not _window_kept(self._window, self._longest):
            keep = 0  # recomputing the prefix is all a reuse could offer here (see truncate)
        self.truncate(keep)
        rows = self.evaluate(tokens[keep:], keep, logits_from=logits_from - keep)
        return rows

    def _decode(self, tokens: Sequence[int], start_pos: int, want: Sequence[bool]) -> int:
        b = self._batch
        n = len(tokens)
        n_out = 0
        for i, (tok, flag) in enumerate(zip(tokens, want)):
            b.token[i] = tok
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = flag
            n_out += bool(flag)
        b.n_tokens = n
        if start_pos != len(self._cached):
            raise MeasurementError(f"internal: decoding at position {start_pos} with {len(self._cached)} cached")
        if n == 1:
            self.n_decode_tokens += 1
        else:
            self.n_batch_tokens += n
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise MeasurementError(f"llama_decode failed (code {rc}) at position {start_pos}")
        self._cached.extend(int(t) for t in tokens)
        self._longest = max(self._longest, len(self._cached))
        if self.engine.on_decoded is not None:
            self.engine.on_decoded(n)
        return n_out

    def evaluate(self, tokens: Sequence[int], start_pos: int = 0, logits_from: Optional[int] = None) -> np.ndarray:
        """Feed ``tokens`` at positions start_pos..; return the logits of the tokens whose
        index (within ``tokens``) is >= logits_from, one row each. Batches are cut at n_batch
        so the layout is identical for every context with the same settings."""
        rows: List[np.ndarray] = []
        self.evaluate_each(tokens, start_pos, logits_from, lambda first, view: rows.append(view.copy()))
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def evaluate_each(self, tokens: Sequence[int], start_pos: int, logits_from: Optional[int], consume) -> None:
        """As ``evaluate``, but hands each batch's logit rows to ``consume(first_row, view)``
        instead of collecting them: ``view`` is llama.cpp's own output buffer, valid only
        until the next decode, so a caller that reduces rows on the fly (KLD statistics,
        16-bit quantization) never holds a float copy of a whole chunk."""
        if start_pos + len(tokens) > self.n_ctx:
            raise MeasurementError(
                f"{start_pos + len(tokens)} tokens do not fit the context of {self.n_ctx}; raise --refract-ctx"
            )
        _evaluate_in_batches(self._ctx, self.n_vocab, self.settings.n_batch, tokens, start_pos, logits_from,
                             self._decode, consume)

    def last_logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return require_finite(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))

    def greedy(self, prompt: Sequence[int], n_predict: int, keep_logits: bool = False):
        """Greedy decode (from a cleared cache, or an identical reused prefix: see prefill). Returns (token ids, per-step logits or None).
        Token ids are captured at decode time: no detokenize/retokenize round trip."""
        if len(prompt) + n_predict > self.n_ctx:
            raise MeasurementError(
                f"prompt of {len(prompt)} tokens + {n_predict} predicted do not fit the context of {self.n_ctx}"
            )
        self.prefill(prompt, logits_from=len(prompt) - 1)
        out: List[int] = []
        kept: List[np.ndarray] = []
        pos = len(prompt)
        for _ in range(n_predict):
            logits = self.last_logits()
            if keep_logits:
                kept.append(logits.copy())
            tok = int(np.argmax(logits))
            out.append(tok)
            if self.engine.is_eog(tok) or len(out) == n_predict:
                break
            self._decode([tok], pos, [True])
            pos += 1
        return out, (np.stack(kept) if keep_logits and kept else None)


class SequencesContext:
    """A context that decodes several sequences in one llama.cpp batch, one KV stream each.

    Each step feeds one token per unfinished sequence in a single llama_decode, so the weights
    are read once for all of them. Prompts are still evaluated one sequence at a time, cut at
    n_batch exactly as Context does, and every stream is private to its sequence: the logits
    of each sequence are bit-identical to decoding it alone (tested), so batching changes
    speed, never numbers, and reference and candidate need not share a layout to compare."""

    def __init__(self, engine: Engine, kv: KVConfig, types: Tuple[CacheType, CacheType], settings: ContextSettings,
                 n_seq: int, n_ctx_seq: int):
        self.engine = engine
        self.kv = kv
        self.settings = settings
        self.n_seq = n_seq
        self.n_ctx_seq = int(math.ceil(n_ctx_seq / 256.0) * 256)
        self._ctx, self.kv_facts, self.env = _new_context(engine, kv, types, settings, self.n_ctx_seq * n_seq, n_seq)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(max(settings.n_batch, n_seq), 0, 1)
        self.n_vocab = engine.n_vocab
        self.n_batch_tokens = 0
        self.n_decode_tokens = 0
        # Tokens decoded in multi-sequence steps, and those steps: a benchmark prices them at
        # the batched rate, not the one-sequence rate.
        self.n_seq_decode_tokens = 0
        self.n_seq_decode_steps = 0
        self._length = [0] * n_seq
        # Per sequence: its tokens and the longest it grew since cleared (see _window_kept).
        self._tokens: List[List[int]] = [[] for _ in range(n_seq)]
        self._longest = [0] * n_seq
        self._window = _sliding_window(engine, kv)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def _run(self, rows: Sequence[Tuple[int, int, bool]], seq_of: Sequence[int]) -> int:
        """Decode (token, position, wants logits) rows, row i in sequence seq_of[i]."""
        b = self._batch
        n_out = 0
        for i, ((tok, pos, flag), seq) in enumerate(zip(rows, seq_of)):
            if pos != self._length[seq]:
                raise MeasurementError(f"internal: sequence {seq} decoding at {pos} with {self._length[seq]} cached")
            if pos >= self.n_ctx_seq:
                raise MeasurementError(f"{pos + 1} tokens do not fit a sequence of {self.n_ctx_seq}; raise --refract-ctx")
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = flag
            n_out += bool(flag)
            self._length[seq] += 1
            self._tokens[seq].append(int(tok))
            self._longest[seq] = max(self._longest[seq], self._length[seq])
        b.n_tokens = len(rows)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise MeasurementError(f"llama_decode failed (code {rc}) decoding {len(rows)} sequence rows")
        if self.engine.on_decoded is not None:
            self.engine.on_decoded(len(rows))
        return n_out

    def clear(self, seq: int) -> None:
        self.truncate(seq, 0)

    def truncate(self, seq: int, n_keep: int) -> None:
        n_keep = max(0, int(n_keep))
        kept = self._tokens[seq][:n_keep]
        # As Context.truncate: a cut the window or a recurrent state cannot serve is rebuilt.
        rebuild = n_keep > 0 and not (_window_kept(self._window, self._longest[seq])
                                      and llama_cpp.llama_memory_seq_rm(self._mem, seq, n_keep, -1))
        if (n_keep == 0 or rebuild) and not llama_cpp.llama_memory_seq_rm(self._mem, seq, 0, -1):
            raise MeasurementError("llama.cpp could not clear a sequence's KV cache")
        self._length[seq] = 0 if rebuild else min(self._length[seq], n_keep)
        self._tokens[seq] = [] if rebuild else kept
        if n_keep == 0 or rebuild:
            self._longest[seq] = 0
        if rebuild:
            self.evaluate_each(seq, kept, 0, None, lambda first, view: None)

    def evaluate_each(self, seq: int, tokens: Sequence[int], start_pos: int, logits_from: int, consume) -> None:
        """As Context.evaluate_each, for one sequence (cut at n_batch the same way)."""

        def decode(part, pos, want) -> int:
            if len(part) == 1:
                self.n_decode_tokens += 1
            else:
                self.n_batch_tokens += len(part)
            return self._run([(int(t), pos + i, flag) for i, (t, flag) in enumerate(zip(part, want))], [seq] * len(part))

        _evaluate_in_batches(self._ctx, self.n_vocab, self.settings.n_batch, tokens, start_pos, logits_from,
                             decode, consume)

    def greedy_many(self, prompts: Sequence[Sequence[int]], n_predict: int, on_row=None, on_finish=None) -> List[List[int]]:
        """Greedy-decode every prompt, each in a sequence of its own, with continuous
        batching: up to n_seq sequences step together (one token each per llama_decode), and
        when one ends (end-of-generation or n_predict tokens) the next prompt takes its slot,
        so the batch stays full until the queue drains. The schedule depends only on the
        prompts and the tokens, so it is the same on every run.

        ``on_row(index, step, logits_view)`` sees each step's logits (valid only during the
        call); ``on_finish(index, slot)`` runs when prompt ``index`` is done, before its slot
        is reused (its KV cache is still there). Returns the token ids per prompt."""
        out: List[List[int]] = [[] for _ in prompts]
        for prompt in prompts:
            if len(prompt) + n_predict > self.n_ctx_seq:
                raise MeasurementError(
                    f"prompt of {len(prompt)} tokens + {n_predict} predicted do not fit the context of {self.n_ctx_seq}"
                )
        queue = list(range(len(prompts)))[::-1]
        slot_of: Dict[int, int] = {}
        active: List[int] = []

        def start(slot: int) -> None:
            # Prompts are evaluated one sequence at a time; a prompt that ends at once (its
            # first token ends generation) frees the slot for the next one straight away.
            while queue:
                i = queue.pop()
                slot_of[i] = slot
                self.clear(slot)
                last: List[np.ndarray] = []
                self.evaluate_each(slot, prompts[i], 0, len(prompts[i]) - 1, lambda first, view: last.append(view))
                if self._take(i, 0, last[0][-1], out, n_predict, on_row):
                    active.append(i)
                    return
                if on_finish is not None:
                    on_finish(i, slot)

        for slot in range(min(self.n_seq, len(prompts))):
            start(slot)
        while active:
            # Rows in slot order: llama.cpp splits a batch over separate KV streams into
            # ubatches of consecutive sequence ids, and an unordered batch became several
            # ubatches, each a full pass over the weights (measured: half the throughput).
            active.sort(key=lambda i: slot_of[i])
            rows = [(out[i][-1], len(prompts[i]) + len(out[i]) - 1, True) for i in active]
            self.n_seq_decode_tokens += len(rows)
            self.n_seq_decode_steps += 1
            self._run(rows, [slot_of[i] for i in active])
            view = _logits_view(self._ctx, len(active), self.n_vocab)
            finished = [i for j, i in enumerate(active) if not self._take(i, len(out[i]), view[j], out, n_predict, on_row)]
            for i in finished:
                active.remove(i)
                if on_finish is not None:
                    on_finish(i, slot_of[i])
                start(slot_of[i])
        return out

    def _take(self, i, step, row, out, n_predict, on_row) -> bool:
        """Record sequence i's greedy token from ``row``; True while it goes on."""
        if on_row is not None:
            on_row(i, step, row)
        tok = int(np.argmax(row))
        out[i].append(tok)
        return not (self.engine.is_eog(tok) or len(out[i]) == n_predict)
