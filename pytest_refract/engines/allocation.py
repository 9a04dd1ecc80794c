"""Facts about the model and each config's KV cache, for the report: what llama.cpp allocated
(read back from its log, see kvlog.py) rather than what we would compute."""

from __future__ import annotations

from typing import Callable, Optional

from .gguf import head_sha256
from .kvlog import side_bytes_per_token


def _row_bytes(info, cache_type, side: int, pad: int, row_size: Callable[[int, int], int]) -> Optional[int]:
    """ggml row arithmetic for one cache side per token, heads padded to ``pad``."""
    n_layer = info.arch_key("block_count")
    n_head_kv = info.arch_key("attention.head_count_kv", info.arch_key("attention.head_count"))
    head = info.head_dims[side]
    if not (n_layer and n_head_kv and head):
        return None
    per_layer = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * int(n_layer)
    padded = -(-int(head) // pad) * pad
    if any(int(h) * padded % cache_type.block_size for h in per_layer if h):
        return None  # not a layout ggml can hold
    return sum(row_size(cache_type.ggml_type, int(h) * padded) for h in per_layer if h)


def kv_allocation(info, facts, types, row_size) -> Optional[dict]:
    """A config's KV cache as llama.cpp allocated it, per token. llama.cpp prints each side's
    size in MiB with two decimals; where ggml's row arithmetic (over the model's heads, or
    heads zero-padded as forks such as TurboQuant do) reproduces a printed size, that exact
    figure is the allocation, otherwise the printed size over the cells is. None where
    llama.cpp logged no cache size."""
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
                options = [b for b in (_row_bytes(info, types[side], side, p, row_size) for p in (1, 32, 64, 128, 256)) if b]
            value, exact = side_bytes_per_token(mib, cache.cells, options)
            total += value
            exact_all = exact_all and exact
        per_side.append(total)
    first = facts.caches[0]
    return {
        "bytes_per_token": per_side[0] + per_side[1],
        "k_bytes_per_token": per_side[0],
        "v_bytes_per_token": per_side[1],
        "k_type": first.k_type,
        "v_type": first.v_type,
        "logged": [{"cells": c.cells, "k_mib": c.k_mib, "v_mib": c.v_mib} for c in facts.caches],
        "exact": exact_all,
        "source": "llama.cpp's log of the cache it allocated" + ("" if exact_all else " (MiB with two decimals)"),
    }


def model_facts(info, model_path, n_params: int) -> dict:
    return {
        "name": info.name,
        "path": model_path.name,
        "size_bytes": info.size_bytes,
        "architecture": info.architecture,
        "n_params": n_params,
        "n_ctx_train": info.n_ctx_train,
        "sha256_first_mib": head_sha256(model_path),
    }

