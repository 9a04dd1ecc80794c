"""A fake engine: deterministic logits from token ids, no model weights, no llama.cpp.

It implements the engine seam (pytest_refract/engines/base.py) in one module, which is all a
new engine needs. Its contexts inherit base.Context, so the runner, the axes, the reference
store and the decode loop they drive are the real code; only the four primitives are fake.

The logit row of a position is a pseudo-random function of every token up to it (a language
model's shape); a quantized cache type adds noise of its own size, seeded the same way, so a
candidate drifts from the reference by an amount its cache type decides, reproducibly."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from pytest_refract.engines.base import Context, ContextRefused, ContextSettings, context_for, padded
from pytest_refract.engines.kvconfig import CacheType
from pytest_refract.engines.kvlog import CacheAllocation, CacheLog

N_VOCAB = 96
BOS, EOS = 1, 2
# Bytes per value and logit noise per cache type: f16 is the reference's exact rounding.
TYPES = {"f32": (0, 32, 1, 4.0, 0.0), "f16": (1, 16, 1, 2.0, 0.0), "bf16": (30, 16, 1, 2.0, 0.002),
         "q8_0": (8, 8, 32, 34 / 32, 0.01), "q4_0": (2, 4, 32, 18 / 32, 0.6)}
N_LAYER, N_HEAD_KV, HEAD = 2, 2, 32
# Requested K type -> (the K type the fake "llama.cpp" creates instead, the warning it logs):
# a build that substitutes a cache type, as the TurboQuant fork does on a GQA >= 6 model.
SUBSTITUTE: Dict[str, Tuple[str, str]] = {}
# Cache type -> extra logit noise on rows of one-token decode steps only: a build whose
# one-token decode kernel for that type is broken while its batched path is right.
DECODE_NOISE: Dict[str, float] = {}
# Cache types whose contexts compute exactly what the reference's does (a build that ignores
# the requested type, e.g. one that silently falls back to f16).
NO_OP_TYPES: set = set()


def cache_types() -> Dict[str, CacheType]:
    return {name: CacheType(name, spec[0], spec[2]) for name, spec in TYPES.items()}


def _spec(type_id: int):
    spec = next((spec for spec in TYPES.values() if spec[0] == type_id), None)
    if spec is None:  # as the llama.cpp engine says of a type outside its table
        raise ValueError(f"ggml type {type_id} is not a type this llama.cpp build knows")
    return spec


def row_size(type_id: int, n: int) -> int:
    return int(n * _spec(type_id)[3])


def build_info() -> dict:
    return {"llama_cpp_python": "fake", "ggml_version": "fake", "ggml_commit": None, "library_folder": None,
            "libraries": [], "library_digest": None, "system_info": "fake engine"}


def library_record() -> dict:
    """Where a real engine's library would be: under the home folder, as a user's venv is."""
    return {"path": str(Path.home() / "venv" / "lib" / "libllama.so"), "sha256": "ab" * 32}


def library_version() -> str:
    return "fake"


def set_log_echo(on: bool) -> None:
    pass


def supports_gpu_offload() -> bool:
    return False


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class Engine:
    def __init__(self, model_path: Path, n_gpu_layers: int = 0, vocab_only: bool = False):
        self.model_path = Path(model_path)
        self.n_vocab = N_VOCAB
        self.n_params = 12345
        self.add_bos, self.bos, self.eos = True, BOS, EOS
        self.is_recurrent = False
        self.on_decoded = None
        self._contexts: Dict[tuple, "FakeContext"] = {}

    # Words become ids by a hash (stable across runs); text comes back as "<id>" pieces.
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> List[int]:
        ids = [3 + _seed(word) % (N_VOCAB - 3) for word in text.split()]
        return ([BOS] if add_special else []) + ids

    def detokenize(self, tokens) -> str:
        return "".join(f"<{int(t)}>" for t in tokens)

    def token_text(self, token: int) -> str:
        return {BOS: "<s>", EOS: "</s>"}.get(int(token), f"<{int(token)}>")

    def is_eog(self, token: int) -> bool:
        return int(token) == EOS

    def user_turn_renderer(self, template: str):
        return lambda content: f"user: {content} assistant:"

    def context(self, kv, types, settings: ContextSettings, role: str, n_seq: int = 1, n_ctx_seq: Optional[int] = None):
        return context_for(self._contexts, (role, kv.label()), n_seq, padded(n_ctx_seq or settings.n_ctx),
                           lambda n_ctx: FakeContext(self, kv, types, settings, n_seq, n_ctx))

    def probe(self, kv, types, settings: ContextSettings):
        if kv.rot not in ("default", "off"):
            raise ContextRefused(f"fake engine refused a context for {kv.label()}: no per-side rotation")
        cells = settings.n_ctx
        per_side = [row_size(t.ggml_type, N_HEAD_KV * HEAD) * N_LAYER * cells / 2**20 for t in types]
        k_type, warning = SUBSTITUTE.get(types[0].name, (types[0].name, None))
        facts = CacheLog(rotation_k=False, rotation_v=False,
                        caches=[CacheAllocation(cells, k_type, per_side[0], types[1].name, per_side[1])],
                        warnings=[warning] if warning else [])
        return facts, {}

    def drop_context(self, role: str) -> None:
        for key in [k for k in self._contexts if k[0] == role]:
            self._contexts.pop(key).close()

    def close(self) -> None:
        self._contexts.clear()


class FakeContext(Context):
    def __init__(self, engine, kv, types, settings, n_seq, n_ctx_seq):
        super().__init__(engine, kv, settings, n_seq, n_ctx_seq)
        self.noise = 0.0 if all(t.name in NO_OP_TYPES for t in types) else max(TYPES[t.name][4] for t in types)
        self.decode_noise = max(DECODE_NOISE.get(t.name, 0.0) for t in types)
        self._out = np.empty((0, N_VOCAB), dtype=np.float32)

    def _row(self, history: Tuple[int, ...]) -> np.ndarray:
        row = np.random.RandomState(_seed(history) % 2**32).standard_normal(N_VOCAB).astype(np.float32) * 3
        if self.noise:
            row += np.random.RandomState(_seed("noise", history) % 2**32).standard_normal(N_VOCAB).astype(np.float32) * self.noise
        return row

    def _decode(self, rows, seqs) -> None:
        out = []
        grown: Dict[int, List[int]] = {}
        for (tok, pos, want), seq in zip(rows, seqs):
            history = grown.setdefault(seq, list(self._tokens[seq]))
            history.append(int(tok))
            if want:
                row = self._row(tuple(history))
                if self.decode_noise and len(rows) == 1:
                    row = row + np.random.RandomState(_seed("decode", tuple(history)) % 2**32).standard_normal(
                        N_VOCAB).astype(np.float32) * self.decode_noise
                out.append(row)
        self._out = np.stack(out) if out else np.empty((0, N_VOCAB), dtype=np.float32)

    def _view(self, n_rows: int) -> np.ndarray:
        view = self._out[:n_rows]
        view.flags.writeable = False
        return view

    def _drop(self, seq: int, from_pos: int) -> bool:
        return True

    def _clear_all(self) -> None:
        pass

    def _free(self) -> None:
        pass
