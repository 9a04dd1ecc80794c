"""Items that would measure the same thing twice, found before any item runs.

A chunk of the corpus that repeats an earlier one token for token, or an R-NIAH cell whose
needles land where another cell's do in the same haystack, adds no evidence: counted as a
second item it narrows every interval as if it were independent. Such items are merged into
the first one (measured once, counted once) and the report names each merge. Pure functions.
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple


def chunk_key(tokens: Sequence[int], index: int, n_ctx: int, first_replaced: bool) -> Tuple[int, ...]:
    """What chunk ``index`` feeds llama.cpp, less the first token where BOS replaces it."""
    piece = tokens[index * n_ctx : (index + 1) * n_ctx]
    return tuple(piece[1:] if first_replaced else piece)


def first_of_each(keys: Iterable[Hashable], wanted: Optional[int] = None) -> Tuple[List[int], Dict[int, int]]:
    """(indices of the first item of each distinct key, in order, at most ``wanted`` of them;
    repeat index -> the index of the first item with its key). ``keys`` is read lazily, and
    reading stops once ``wanted`` items are kept."""
    first: Dict[Hashable, int] = {}
    kept: List[int] = []
    repeats: Dict[int, int] = {}
    for i, key in enumerate(keys):
        if wanted is not None and len(kept) >= wanted:
            break
        if key in first:
            repeats[i] = first[key]
        else:
            first[key] = i
            kept.append(i)
    return kept, repeats


def distinct_chunks(tokens: Sequence[int], n_ctx: int, available: int, wanted: Optional[int],
                    first_replaced: bool) -> Tuple[List[int], Dict[int, int]]:
    """The first ``wanted`` (all where None) distinct chunks among the ``available`` ones, and
    every repeat met on the way (repeat -> first). Chunks past the last kept one are not read."""
    return first_of_each((chunk_key(tokens, i, n_ctx, first_replaced) for i in range(available)), wanted)
