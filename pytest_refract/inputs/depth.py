"""The depth axis's chunk layout (which positions are scored, in which depth bucket), and what
a depth run will hold in memory, estimated from the model's header before any model loads, so
that a depth this machine cannot hold is refused with the estimate instead of swapping or being
killed halfway through an audit.

A chunk of N tokens is scored from position FIRST_BUCKET (256) to N - 2 (each position predicts
the next token), every ``stride``-th position. Bucket edges double from 256 while they stay
below N / 2, then N / 2 and N: the last bucket is the chunk's second half, exactly the positions
``llama-perplexity -c N --kl-divergence`` scores (all of them at stride 1)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

FIRST_BUCKET = 256


def bucket_edges(depth: int, first: int = FIRST_BUCKET) -> List[int]:
    """Edges from ``first`` doubling below depth/2, then depth/2 and depth: [256, 512, ..., N]."""
    half = depth // 2
    edges = [first]
    while edges[-1] * 2 < half:
        edges.append(edges[-1] * 2)
    if half > edges[-1]:
        edges.append(half)
    edges.append(depth)
    return edges


def scored_positions(depth: int, stride: int, first: int = FIRST_BUCKET) -> List[int]:
    """Positions scored in a chunk of ``depth`` tokens: every ``stride``-th from ``first`` in each
    bucket, up to depth - 2 (the last token predicts nothing inside the chunk). Each bucket's
    grid starts at its own edge, so the second half starts at depth/2 whatever the stride."""
    edges = bucket_edges(depth, first)
    out: List[int] = []
    for a, b in zip(edges, edges[1:]):
        out.extend(range(a, min(b, depth - 1), stride))
    return out


def bucket_of(positions: Sequence[int], edges: Sequence[int]) -> np.ndarray:
    """The bucket index of each position."""
    return np.searchsorted(np.asarray(edges[1:]), np.asarray(positions), side="right")


# Bytes per cache element of the widest cache a depth run holds (f16/bf16 reference and control;
# quantized candidates are smaller, f32 doubles it).
_ELEMENT_BYTES = {"f32": 4}


@dataclass(frozen=True)
class DepthMemory:
    """Peak bytes of a depth run, by part (each context holds its own KV cache, attention
    scratch and logit rows)."""

    weights: int
    kv_per_context: int
    scratch_per_context: int
    logits_per_context: int
    n_contexts: int
    reference_rows: int      # one chunk's reference rows (dense 16-bit: the sparse form is smaller)
    scoring: int             # one batch's float64 temporaries while its KLD is computed

    @property
    def total(self) -> int:
        per = self.kv_per_context + self.scratch_per_context + self.logits_per_context
        return self.weights + self.n_contexts * per + self.reference_rows + self.scoring

    def text(self) -> str:
        gib = 1024 ** 3
        return (f"about {self.total / gib:.1f} GiB ({self.n_contexts} contexts x "
                f"{(self.kv_per_context + self.scratch_per_context + self.logits_per_context) / gib:.2f} GiB "
                f"[KV {self.kv_per_context / gib:.2f}], weights {self.weights / gib:.2f}, reference rows "
                f"{self.reference_rows / gib:.2f} GiB)")


def estimate(info, model_bytes: int, depth: int, n_scored: int, n_vocab: int, n_contexts: int,
             cache_types=("f16",), n_batch: int = 512, stride: int = 1) -> Optional[DepthMemory]:
    """The estimate, or None where the header lacks the layer or head counts."""
    n_layer = info.arch_key("block_count")
    n_head = info.arch_key("attention.head_count")
    n_head_kv = info.arch_key("attention.head_count_kv", n_head)
    head_k, head_v = info.head_dims
    if not (n_layer and n_head and head_k and head_v):
        return None
    kv_heads = sum(int(h) for h in n_head_kv) if isinstance(n_head_kv, list) else int(n_head_kv) * int(n_layer)
    heads = max(int(h) for h in n_head) if isinstance(n_head, list) else int(n_head)
    element = max(_ELEMENT_BYTES.get(t, 2) for t in cache_types)
    kv = kv_heads * (int(head_k) + int(head_v)) * element * depth
    # One layer's attention scores at a time (without flash attention): ubatch x cells x heads, f32.
    scratch = n_batch * depth * heads * 4
    rows_per_batch = min(n_batch, math.ceil(n_batch / max(1, stride)) + 1)
    logits = rows_per_batch * n_vocab * 4
    return DepthMemory(weights=int(model_bytes), kv_per_context=kv, scratch_per_context=scratch,
                       logits_per_context=logits, n_contexts=n_contexts, reference_rows=n_scored * n_vocab * 2,
                       scoring=min(rows_per_batch, 32) * n_vocab * 8 * 3)  # kld_positions: 32-row blocks


def available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
