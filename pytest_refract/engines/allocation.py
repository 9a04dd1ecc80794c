"""Facts about the model and each config's KV cache, for the report: what llama.cpp allocated
(read back from its log, see kvlog.py) rather than what we would compute."""

from __future__ import annotations

from typing import Callable, Optional

from .gguf import head_sha256
from .kvlog import side_bytes_per_token


def _row_bytes(info, cache_type, side: int, pad: int, row_size: Callable[[int, int], int],
               n_layers: Optional[int] = None) -> Optional[int]:
    """ggml row arithmetic for one cache side per token, heads padded to ``pad``: over all
    layers, or over ``n_layers`` of them (one of a model's several caches) when every layer
    has the same KV heads, so that any subset costs the same per layer."""
    n_layer = info.arch_key("block_count")
    n_head_kv = info.arch_key("attention.head_count_kv", info.arch_key("attention.head_count"))
    head = info.head_dims[side]
    if not (n_layer and n_head_kv and head):
        return None
    per_layer = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * int(n_layer)
    if n_layers is not None:
        kv_layers = {int(h) for h in per_layer if h}
        if len(kv_layers) != 1:
            return None  # which layers a cache holds is not in the log
        per_layer = [kv_layers.pop()] * int(n_layers)
    padded = -(-int(head) // pad) * pad
    if any(int(h) * padded % cache_type.block_size for h in per_layer if h):
        return None  # not a layout ggml can hold
    return sum(row_size(cache_type.ggml_type, int(h) * padded) for h in per_layer if h)


def kv_allocation(info, facts, types, row_size) -> Optional[dict]:
    """A config's KV cache as llama.cpp allocated it, per token. llama.cpp prints each side's
    size in MiB with two decimals; where ggml's row arithmetic (over the model's heads, or
    heads zero-padded as forks such as TurboQuant do) reproduces a printed size, that exact
    figure is the allocation, otherwise the printed size over the cells is. None where
    llama.cpp logged no cache size.

    A sliding-window model has two caches (llama.cpp logs both): its full-attention layers
    cache every position of the context, its SWA layers only a window's worth of cells. So
    ``bytes_per_token`` is what each token of context costs, the full cache's bytes per cell,
    and the SWA cache's bytes per cell are given apart (``swa_bytes_per_cell``): a context's
    total is the full cache's cells plus the SWA cache's (as logged for that context, see
    context_kv_bytes), never every layer times the context."""
    if facts is None or not facts.caches:
        return None
    caches = []
    exact_all = True
    for cache in facts.caches:
        sides = []
        for side in (0, 1):
            mib = cache.k_mib if side == 0 else cache.v_mib
            layers = cache.layers if len(facts.caches) > 1 else None
            options = [b for b in (_row_bytes(info, types[side], side, p, row_size, layers)
                                   for p in (1, 32, 64, 128, 256)) if b]
            if len(facts.caches) > 1 and layers is None:
                options = []  # several caches split the layers, and the log did not say how
            value, exact = side_bytes_per_token(mib, cache.cells * max(1, cache.streams), options)
            sides.append(value)
            exact_all = exact_all and exact
        caches.append({"kind": cache.kind, "cells": cache.cells, "layers": cache.layers, "streams": cache.streams,
                       "k_bytes_per_cell": sides[0], "v_bytes_per_cell": sides[1],
                       "bytes_per_cell": sides[0] + sides[1]})
    swa = [c for c in caches if c["kind"] == "swa"]
    full = [c for c in caches if c["kind"] != "swa"]
    first = facts.caches[0]
    return {
        "bytes_per_token": sum(c["bytes_per_cell"] for c in full),
        "k_bytes_per_token": sum(c["k_bytes_per_cell"] for c in full),
        "v_bytes_per_token": sum(c["v_bytes_per_cell"] for c in full),
        # None: no sliding-window cache (every layer caches the whole context).
        "swa_bytes_per_cell": sum(c["bytes_per_cell"] for c in swa) if swa else None,
        "swa_layers": sum(c["layers"] or 0 for c in swa) if swa else None,
        "full_layers": sum(c["layers"] or 0 for c in full) if swa else None,
        "k_type": first.k_type,
        "v_type": first.v_type,
        "logged": [{"cells": c.cells, "k_mib": c.k_mib, "v_mib": c.v_mib, "layers": c.layers, "streams": c.streams,
                    "kind": c.kind} for c in facts.caches],
        "exact": exact_all,
        "source": "llama.cpp's log of the cache it allocated" + ("" if exact_all else " (MiB with two decimals)"),
    }


def context_kv_bytes(alloc: Optional[dict], ctx) -> int:
    """Bytes of KV cache a live context holds. With a sliding-window cache, its own log says
    how many cells each of its caches got (the SWA one a window plus a micro-batch, the full
    one the context), per stream; without one, every token of context costs bytes_per_token."""
    if not alloc:
        return 0
    facts = getattr(ctx, "cache_logs", None)
    if alloc.get("swa_bytes_per_cell") is not None and facts is not None and facts.caches:
        per_cell = {"swa": alloc["swa_bytes_per_cell"], "full": alloc["bytes_per_token"]}
        kinds = {c.kind for c in facts.caches}
        if kinds == {"swa", "full"}:
            return sum(per_cell[c.kind] * c.cells * max(1, c.streams) for c in facts.caches)
    return alloc["bytes_per_token"] * ctx.n_ctx_seq * ctx.n_seq


def kv_memory_summary(own: Optional[dict], ref: Optional[dict]) -> Optional[dict]:
    """A config's cache against the reference's, like with like: the full-attention cache's
    bytes per token with the reference's, and the SWA cache's bytes per cell with the
    reference's (the same layers and cells on both sides)."""
    if not own or not ref or not ref["bytes_per_token"]:
        return None
    out = {"bytes_per_token": own["bytes_per_token"], "vs_reference": own["bytes_per_token"] / ref["bytes_per_token"]}
    if own.get("swa_bytes_per_cell") is not None and ref.get("swa_bytes_per_cell"):
        out["swa_bytes_per_cell"] = own["swa_bytes_per_cell"]
        out["swa_vs_reference"] = own["swa_bytes_per_cell"] / ref["swa_bytes_per_cell"]
    return out


def model_summary(info, model_path, n_params: int) -> dict:
    return {
        "name": info.name,
        "path": model_path.name,
        "size_bytes": info.size_bytes,
        "architecture": info.architecture,
        "n_params": n_params,
        "n_ctx_train": info.n_ctx_train,
        "sha256_first_mib": head_sha256(model_path),
    }

