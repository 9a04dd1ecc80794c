"""The reference side's results, computed once and shared: by the candidates of a matrix (in
memory) and by later runs (the on-disk reference cache: entries.py, in a folder.py folder). Every reference result
goes through one get-or-compute here; so do the sensitivity control's item results, which
depend only on what their key holds.

The store knows nothing of the runner: what it needs of the engine side (the reference role's
decodes and context) comes in as a ReferenceSide."""

from __future__ import annotations

import hashlib
import json
import random
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Union

import numpy as np

from ..errors import MeasurementError
from ..inputs import data
from .codec import CompressedRows, LogprobRows, compact, concat_quantized, sparse_logprobs
from .entries import ReferenceCache
from .model_index import model_identity

# Each spot check recomputes one of the first SPOT_WINDOW cached reads of its kind, at random.
SPOT_WINDOW = 8

if TYPE_CHECKING:  # a type hint only: pack is imported where a pack is recorded
    from .pack import RecordingCache


def spot_due(seed: int, kind: str, chosen: Dict[str, int], reads: Dict[str, int], window: Optional[int] = None) -> bool:
    """Whether this read of ``kind`` is the one its spot check takes: the read whose number
    (0, 1, ...) was drawn, with ``seed``, from the first ``window`` reads."""
    if kind not in chosen:
        chosen[kind] = random.Random(f"{seed}:{kind}").randrange(window or SPOT_WINDOW)
    n = reads.get(kind, 0)
    reads[kind] = n + 1
    return n == chosen[kind]


def batch_signature(prompts: List[List[int]]) -> List[int]:
    """Every prompt of a decode batch, in order, as one id list (for cache keys)."""
    flat: List[int] = [len(prompts)]
    for p in prompts:
        flat.append(len(p))
        flat.extend(p)
    return flat


@dataclass(frozen=True)
class ReferenceSide:
    """The reference role on the engine side: ``greedy(prompts, n_predict, on_row=None)``
    decodes prompts together (see Runner.greedy), ``context()`` is its one-sequence context,
    ``decode_width(n)`` how many of n prompts step together, ``n_vocab()`` the vocabulary size."""

    greedy: Callable
    context: Callable
    decode_width: Callable[[int], int]
    n_vocab: Callable[[], int]


class ReferenceStore:
    def __init__(self, settings, directory, identity: dict, side: ReferenceSide, pack=None, record_into=None):
        """``pack``: a reference pack's cache (reference/pack.py), read instead of computing
        anything; ``record_into``: a pack being written, which gets every entry this run
        computes or reads from its own cache."""
        self.settings = settings
        self.side = side
        # The vocabulary size checks every entry's rows on load (the model is loaded by now).
        local = ReferenceCache(directory, identity, n_vocab=side.n_vocab())
        self.local_cache_enabled = local.enabled
        self.local_cache = local
        self.cache: Union[ReferenceCache, RecordingCache] = local
        # The floor compares the reference with itself bit for bit: it needs the live reference.
        # --refract-repeat must re-measure the reference too, so it does not read either.
        s = self.settings
        self.read = local.enabled and not s.floor and s.repeat == 1
        self.from_pack = pack is not None
        if pack is not None:
            self.cache, self.read = pack, True
        elif record_into is not None:
            from .pack import RecordingCache

            self.cache = RecordingCache(local, record_into)
        # Why the cache stopped being trusted this run (a spot check failed), None while it is.
        self.tampered: Optional[str] = None
        # The reference's spot check: one of the first SPOT_WINDOW cached reads of each kind is
        # computed again and compared bit for bit; the seed is fresh every run.
        self.spot_seed = secrets.randbits(32)
        self._spot_at: Dict[str, int] = {}
        self._cached_reads: Dict[str, int] = {}
        self.spot_checks: List[dict] = []
        self._memory: Dict[str, tuple] = {}
        # KLD chunk key -> sha256 of the reference's exact logits there (a few bytes per chunk):
        # a candidate whose logits hash the same computed exactly what the reference did.
        self._fingerprints: Dict[str, Optional[str]] = {}

    @staticmethod
    def identity(model_path, settings, build: dict, context_env: dict, rotation, directory=None) -> dict:
        """Everything that determines a reference result besides the item's own inputs.
        ``directory``: the cache folder (the model's whole-file hash is remembered there)."""
        return {
            "model": model_identity(model_path, directory),
            "reference": settings.reference.label(),
            # Everything that changes llama.cpp's numbers (context size does not: attention
            # runs over the cells in use).
            "numerics": {"n_batch": settings.n_batch, "n_ubatch": settings.n_ubatch, "threads": settings.threads,
                         "gpu_layers": settings.gpu_layers, "flash_attn": settings.reference.fa},
            "build": {k: v for k, v in build.items() if k != "library_folder"},
            # Variables llama.cpp reads (rotation among them) and the rotation it then applied
            # (not where the library lies: its digest, in "build", says which bytes ran).
            "context_env": {k: v for k, v in context_env.items() if k != "LLAMA_CPP_LIB_PATH"},
            "rotation": rotation,
        }

    def size_facts(self) -> dict:
        """The reference cache's cost: bytes this run wrote and read, and the folder's total."""
        from .folder import folder_bytes

        return {"bytes_written": self.cache.bytes_written, "bytes_read": self.cache.bytes_read,
                "folder_bytes": folder_bytes(self.cache.directory)}

    def size_text(self) -> str:
        """For the progress line: what this run wrote and read (the folder's total is walked
        once, at the end, for the report)."""
        from .folder import describe_size

        if not self.cache.enabled:
            return ""
        return (f"ref cache {describe_size(self.cache.bytes_written)} written, "
                f"{describe_size(self.cache.bytes_read)} read")

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def misses(self) -> int:
        return self.cache.misses

    def forget(self) -> None:
        """Drop what a repetition could reuse (--refract-repeat)."""
        self._memory.clear()

    def forget_batches(self) -> None:
        """A new axis begins: what the last one kept in memory is not asked for again."""
        self._memory.clear()

    # -- memory: one entry per kind (the candidates of a matrix measure a unit back to back) --

    def _remember(self, kind: str, key, value):
        self._memory[kind] = (key, value)
        return value

    def _recall(self, kind: str, key):
        hit = self._memory.get(kind)
        if hit and hit[0] == key:
            return hit[1]
        # Forget the previous unit before the next one is computed, not after: a KLD entry is
        # tens of MB, and holding two at once would raise the audit's peak memory.
        self._memory.pop(kind, None)
        return None

    def _load_all(self, kind: str, keys: List[str]) -> Optional[list]:
        """Every entry of a decode batch, or None unless all are there: a batch is recomputed
        whole, so each entry keeps the layout its key names."""
        if not self.read:
            return None
        entries = []
        for key in keys:
            entry = self.cache.load(kind, key)
            if entry is None:
                return None
            entries.append(entry)
        return entries

    def _keys(self, kind: str, prompts: List[List[int]], n_predict: int) -> List[str]:
        # A batch's layout can change a model's rounding (see engines.base.Context), so where
        # prompts step together their entries are keyed by the whole batch as well; a prompt
        # decoded alone is keyed by itself.
        if self.side.decode_width(len(prompts)) > 1:
            batch = batch_signature(prompts)
            return [self.cache.key(kind, p, n_predict, batch) for p in prompts]
        return [self.cache.key(kind, p, n_predict) for p in prompts]

    # -- the reference's results ------------------------------------------------------------

    def trajectories(self, prompts: List[List[int]]) -> list:
        """(greedy tokens, 16-bit log-probs, exact logits or None) of the reference per prompt,
        the prompts decoded together.

        Candidates are always compared with the 16-bit log-probs, live or cached, exactly as
        llama-perplexity compares with its stored base: so a cold run, a warm (cached) run and
        an xdist run give the same numbers. The exact logits serve the floor, which checks the
        engine bit for bit (and never reads the cache)."""
        n = self.settings.n_predict
        keys = self._keys("trajectory", prompts, n)
        value = self._recall("trajectory-batch", tuple(keys))
        if value is not None:
            return value
        entries = self._load_all("trajectory", keys)
        check = entries is not None and self._spot_due("trajectory")
        if entries is not None and not check:
            value = [([int(t) for t in e["arrays"]["tokens"]], LogprobRows(e["arrays"]), None) for e in entries]
            return self._remember("trajectory-batch", tuple(keys), value)
        floor = self.settings.floor
        # A batch holds every prompt's continuation until the candidates have run: kept
        # compressed, since 16 prompts x 128 steps x a 49k vocabulary is 200 MB at 16 bits.
        rows = [CompressedRows(self.side.n_vocab()) for _ in prompts]
        exact: List[list] = [[] for _ in prompts]

        def keep(i, step, row):
            rows[i].append_logits(row)
            if floor:  # only the floor needs the exact logits
                exact[i].append(row.copy())

        tokens = self.side.greedy(prompts, n, keep)
        # A spot check that matched leaves the entries as they are (nothing to write).
        rewrite = self.cache.enabled
        if check:
            live = [dict(rows[i].stored(), tokens=np.asarray(tokens[i])) for i in range(len(prompts))]
            assert entries is not None  # a spot check is due only on entries read
            rewrite = not self._spot_compare("trajectory", [e["arrays"] for e in entries], live)
        value = []
        for i, key in enumerate(keys):
            if rewrite:
                self.cache.store("trajectory", key, dict(rows[i].stored(), tokens=np.asarray(tokens[i])))
            value.append((tokens[i], rows[i], np.stack(exact[i]) if floor else None))
        return self._remember("trajectory-batch", tuple(keys), value)

    def chunk(self, tokens: List[int], evaluate_fn, variant: tuple = ()):
        """(16-bit log-probs as LogprobRows, exact logits or None) of the reference for one
        KLD chunk. ``evaluate_fn(ctx, consume)`` runs the chunk and hands over logit rows
        batch by batch; they are quantized as they come, so only the 16-bit form is held
        (the exact rows are kept only for the floor). ``variant``: which rows the evaluation
        asks for where it is not the KLD axis's second half (the depth axis's strided
        positions), part of the key; such a chunk keeps no exact rows (no floor)."""
        key = self.cache.key("kld", tokens, *variant)
        value = self._recall("kld", key)
        if value is not None:
            return value
        entry = self.cache.load("kld", key) if self.read else None
        check = entry is not None and self._spot_due("kld")
        if entry is not None and not check:
            self._fingerprints[key] = (entry.get("meta") or {}).get("logits_sha256")
            return self._remember("kld", key, (LogprobRows(entry["arrays"]), None))
        parts: List[dict] = []
        exact: List[np.ndarray] = []
        digest = hashlib.sha256()

        def take(first_row, view):
            parts.append(sparse_logprobs(view))
            digest.update(np.ascontiguousarray(view).data)
            if self.settings.floor and not variant:
                exact.append(view.copy())

        evaluate_fn(self.side.context(), take)
        if not parts:
            raise MeasurementError("internal: the reference produced no logit rows for a KLD chunk")
        stored = compact(concat_quantized(parts))
        self._fingerprints[key] = digest.hexdigest()
        if not (check and entry is not None and self._spot_compare("kld", [entry["arrays"]], [stored])):  # check: entry read
            self.cache.store("kld", key, stored, meta={"logits_sha256": self._fingerprints[key]})
        return self._remember("kld", key, (LogprobRows(stored), np.concatenate(exact) if exact else None))

    def chunk_fingerprint(self, tokens: List[int]) -> Optional[str]:
        """sha256 of the reference's exact float32 logit rows of a KLD chunk's scored positions
        (after ``chunk`` for it), or None where a cache entry written without it was read."""
        return self._fingerprints.get(self.cache.key("kld", tokens))

    def greedy(self, prompts: List[List[int]], n_predict: int) -> List[List[int]]:
        """The reference's greedy tokens per prompt (PLAD anchors and perturbations, R-NIAH
        answers). Prompts that step together are read or computed as a whole batch (each
        entry keeps the layout its key names); a prompt decoded alone is keyed by itself."""
        keys = self._keys("greedy", prompts, n_predict)
        if self.side.decode_width(len(prompts)) > 1:
            entries = self._load_all("greedy", keys)
            if entries is not None:
                return [[int(t) for t in e["arrays"]["tokens"]] for e in entries]
            tokens = self.side.greedy(prompts, n_predict)
            for key, toks in zip(keys, tokens):
                self.cache.store("greedy", key, {"tokens": np.asarray(toks, dtype=np.int64)})
            return tokens
        return [self._greedy_one(key, p, n_predict) for key, p in zip(keys, prompts)]

    def _greedy_one(self, key: str, prompt: List[int], n_predict: int) -> List[int]:
        if self.read:
            entry = self.cache.load("greedy", key)
            if entry is not None:
                return [int(t) for t in entry["arrays"]["tokens"]]
        tokens = self.side.greedy([prompt], n_predict)[0]
        self.cache.store("greedy", key, {"tokens": np.asarray(tokens, dtype=np.int64)})
        return tokens

    # -- the sensitivity control's item results ----------------------------------------------

    def control_key(self, axis_name: str, unit, batch: Optional[List[str]], label: str, reads: dict) -> str:
        """Cache key of one control item: everything its result depends on beyond the cache's
        namespace (model, reference, numerics, build): the control config, the item's own
        inputs, the settings the axis reads (``reads``, its cache_reads) and, for batched
        decoding, the batch's layout. ``unit``: an axes.Unit (its id and payload are its own
        inputs; its candidate, batch and keywords are not)."""
        own = {k: (v.prompt if isinstance(v, data.Prompt) else v) for k, v in {"id": unit.id, **unit.payload}.items()}
        text = json.dumps({"unit": own, "batch": batch, "reads": reads}, sort_keys=True, default=str)
        return self.cache.key("control-" + axis_name, label, text)

    def has_control(self, axis_name: str, key: str) -> bool:
        return self.read and self.cache.has("control-" + axis_name, key)

    def load_control(self, axis_name: str, key: str) -> Optional[dict]:
        if not self.read:
            return None
        entry = self.cache.load("control-" + axis_name, key)
        if entry is not None and entry["meta"].get("result") is not None:
            return entry["meta"]["result"]
        return None

    def _spot_due(self, kind: str) -> bool:
        """Whether this cached read of ``kind`` is the one the spot check computes again. Never
        from a reference pack: it was verified whole, and it is another build's by design (what
        this build computes differently is the build drift, not a forgery)."""
        return not self.from_pack and spot_due(self.spot_seed, kind, self._spot_at, self._cached_reads)

    def _spot_compare(self, kind: str, cached: List[dict], live: List[dict]) -> bool:
        """Compare cached entries with the same results computed again, array by array; a
        difference distrusts and clears the cache (the live results are used either way).
        Returns whether they matched."""
        same = all(c.keys() == v.keys() and all(np.array_equal(np.asarray(c[k]), np.asarray(v[k])) for k in c)
                   for c, v in zip(cached, live)) and len(cached) == len(live)
        self.spot_checks.append({"kind": kind, "match": same})
        if not same and self.tampered is None:
            removed = self.invalidate("pending")
            self.tampered = (f"the cached reference {kind} result differs from its re-computation: the cache was "
                             f"altered; its {removed} entries were deleted, and results read before may be forged")
        return same

    def invalidate(self, why: str) -> int:
        """A cached result did not match its re-measurement: every entry this cache wrote is
        deleted, nothing more is read from it this run, and ``tampered`` says why. Returns how
        many entries were deleted."""
        from .folder import clear_entries

        self.read = False
        self._memory.clear()
        self.tampered = why
        directory = self.local_cache.directory
        return clear_entries(directory) if directory is not None else 0

    def store_control(self, axis_name: str, key: str, result: dict) -> None:
        self.cache.store("control-" + axis_name, key, {}, meta={"result": result})
