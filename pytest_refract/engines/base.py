"""The engine seam: what the runner and the axes need from an inference engine, and the decode
logic every engine shares.

An engine module (``pytest_refract.engines.llamacpp`` is the one that ships; the tests add a
fake) provides:

- ``Engine(model_path, n_gpu_layers=0, vocab_only=False)``: one loaded model with
  ``tokenize``, ``detokenize``, ``token_text``, ``is_eog``, ``bos``/``eos``/``add_bos``,
  ``n_vocab``, ``n_params``, ``is_recurrent``, ``user_turn_renderer(template)``,
  ``context(kv, types, settings, role, n_seq=1, n_ctx_seq=None)``, ``probe(kv, types,
  settings)``, ``drop_context(role)``, ``close()`` and an ``on_decoded`` callback slot;
- ``cache_types()`` (name -> KV cache type the build has), ``row_size(type_id, n)``,
  ``build_info()``, ``library_version()``, ``set_log_echo(on)``, ``supports_gpu_offload()``;
  optionally ``library_record()`` ({"path", "sha256"} of the library that ran) and, on the
  engine, ``logged_warnings`` (KV config label -> warnings logged creating or using its
  contexts), which the report's "ran" records read where they exist.

Its contexts subclass :class:`Context` below and implement four primitives; greedy decoding,
prefix reuse, cutting a sequence back and the token bookkeeping are written once, here, so a
fake engine exercises the same code the real one runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MeasurementError

# consume(first_row, view): a batch's logit rows, ``view`` valid only until the next decode.
Consume = Callable[[int, np.ndarray], None]


@dataclass(frozen=True)
class ContextSettings:
    """Everything shared by reference and candidate contexts apart from their size: batch
    sizes and threads change an engine's numbers, so all sides must agree on them."""

    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 2


class ContextRefused(MeasurementError):
    """The engine returned no context; the message quotes its reason."""


class TemplateProblem(Exception):
    """A chat template that does not compile or render; str() is the reason."""

    def __init__(self, exc: Exception):
        detail = " ".join(str(exc).split()) or type(exc).__name__
        super().__init__(f"{type(exc).__name__}: {detail}")


NON_FINITE_LOGITS = ("the model produced non-finite logits (NaN or Infinity); its weights are corrupt or it "
                     "overflows under this configuration, so nothing can be measured")


def require_finite(logits: np.ndarray) -> np.ndarray:
    """Every logit row passes here before anything is computed from it: argmax of a NaN row
    is token 0 on both sides, and a NaN KLD once became a perfect score."""
    # Two float32 passes without a temporary (a float64 sum, as before, widens every value:
    # slower on a 262k vocabulary); NaN and both infinities reach the min or the max.
    if logits.size and not (np.isfinite(logits.min()) and np.isfinite(logits.max())):
        raise MeasurementError(NON_FINITE_LOGITS)
    return logits


def window_kept(window: int, longest: int) -> bool:
    """Whether a sequence cut back to a prefix still has every cell that prefix needs.

    A sliding-window cache is sized for the window, not the context: once a sequence passed
    ``window`` tokens, llama.cpp may overwrite cells that fell out of the window (masked cells
    count as free). A later cut back to an earlier position then needs cells that may be gone,
    and the engine does not say so. Until a sequence outgrew the window, no cell was ever
    masked, so a cut is exact."""
    return not window or longest <= window


def padded(n: int, to: int = 256) -> int:
    return int(math.ceil(n / float(to)) * to)


def context_for(pool: dict, key, n_seq: int, n_ctx_seq: int, create):
    """The context ``pool[key]``, or a new one from ``create(n_ctx_seq)`` where there is none
    or it is too small (fewer sequences or cells than asked); a replaced one is closed first."""
    ctx = pool.get(key)
    if ctx is not None and (ctx.n_seq < n_seq or ctx.n_ctx_seq < n_ctx_seq):
        pool.pop(key).close()
        ctx = None
    if ctx is None:
        ctx = pool[key] = create(n_ctx_seq)
    return ctx


@dataclass
class CutCounts:
    """How a context's cuts back to a prefix went, per path (Context.truncate, Context.prefill):

    - ``kept``: cut back to a prefix with its cached cells kept (the cheap path);
    - ``rebuilt_window``: the sequence had outgrown the sliding window, so the prefix was
      recomputed from a cleared sequence (its cells may be gone; see window_kept);
    - ``rebuilt_engine``: the engine refused the cut (recurrent layers cannot roll back), so
      the prefix was recomputed;
    - ``reuse_refused_window``: a prefill that could have reused whole cached batches
      recomputed them, the sequence having outgrown the sliding window.

    A clear (a cut to position 0) is none of these. Counting changes no number: each count is
    a decision the code made anyway."""

    kept: int = 0
    rebuilt_window: int = 0
    rebuilt_engine: int = 0
    reuse_refused_window: int = 0

    def as_counts(self) -> Dict[str, int]:
        """The report's compute keys, additive like the token counts beside them."""
        return {"cut_kept": self.kept, "cut_rebuilt_window": self.rebuilt_window,
                "cut_rebuilt_engine": self.rebuilt_engine, "cut_reuse_refused_window": self.reuse_refused_window}


class Context:
    """A KV cache with ``n_seq`` independent sequences of ``n_ctx_seq`` cells each.

    One sequence is a batch of one: serial and batched decoding are the same code. Every
    sequence has a private KV stream, so its logits are those of decoding it alone (tested for
    llama.cpp): batching changes speed, never numbers.

    Subclasses implement the primitives ``_decode(rows, seqs)`` (one engine step over
    (token, position, wants logits) rows, row i in sequence seqs[i]; returns nothing),
    ``_view(n_rows)`` (the last step's output rows, read-only, valid until the next step),
    ``_drop(seq, from_pos)`` (forget a sequence's cells from a position on; False when the
    engine cannot), ``_clear_all()`` and ``_free()``; and set ``self.window`` (the
    sliding-window span the cache may forget beyond, 0 for none).
    """

    window = 0

    def __init__(self, engine, kv, settings: ContextSettings, n_seq: int, n_ctx_seq: int):
        self.engine = engine
        self.kv = kv
        self.settings = settings
        self.n_seq = int(n_seq)
        self.n_ctx_seq = padded(n_ctx_seq)
        self.n_ctx = self.n_ctx_seq
        self.n_vocab = engine.n_vocab
        # Tokens processed, split the way llama-bench reports throughput: prompt batches,
        # one-sequence decode steps, and rows of multi-sequence steps (with their count).
        self.n_batch_tokens = 0
        self.n_decode_tokens = 0
        self.n_seq_decode_tokens = 0
        self.n_seq_decode_steps = 0
        # Which path each cut back to a prefix took (truncate, prefill), for the report.
        self.cuts = CutCounts()
        # Per sequence: the token at each cached position (for prefix reuse and rebuilding a
        # cut) and the longest it grew since cleared (see window_kept).
        self._tokens: List[List[int]] = [[] for _ in range(self.n_seq)]
        self._longest = [0] * self.n_seq

    # -- primitives (engine-specific) ------------------------------------------------------

    def _decode(self, rows: Sequence[Tuple[int, int, bool]], seqs: Sequence[int]) -> None:
        raise NotImplementedError

    def _view(self, n_rows: int) -> np.ndarray:
        raise NotImplementedError

    def _drop(self, seq: int, from_pos: int) -> bool:
        raise NotImplementedError

    def _clear_all(self) -> None:
        raise NotImplementedError

    def _free(self) -> None:
        raise NotImplementedError

    # -- the shared logic ------------------------------------------------------------------

    def close(self) -> None:
        self._free()

    def _step(self, rows: Sequence[Tuple[int, int, bool]], seqs: Sequence[int]) -> int:
        """Decode rows after checking each continues its sequence; returns the output rows."""
        expected: Dict[int, int] = {}
        for (_tok, pos, _), seq in zip(rows, seqs):
            cached = expected.get(seq, len(self._tokens[seq]))
            if pos != cached:
                raise MeasurementError(f"internal: sequence {seq} decoding at {pos} with {cached} cached")
            expected[seq] = cached + 1
            if pos >= self.n_ctx_seq:
                raise MeasurementError(f"{pos + 1} tokens do not fit the context of {self.n_ctx_seq}; raise --refract-ctx")
        self._decode(rows, seqs)
        for (tok, _, _), seq in zip(rows, seqs):
            self._tokens[seq].append(int(tok))
            self._longest[seq] = max(self._longest[seq], len(self._tokens[seq]))
        if self.engine.on_decoded is not None:
            self.engine.on_decoded(len(rows))
        return sum(1 for _, _, want in rows if want)

    def reset(self) -> None:
        """Clear every sequence."""
        self._clear_all()
        self._tokens = [[] for _ in range(self.n_seq)]
        self._longest = [0] * self.n_seq

    def clear(self, seq: int = 0) -> None:
        self.truncate(seq, 0)

    def truncate(self, seq: int, n_keep: int) -> None:
        """Drop the sequence's cached positions >= n_keep (to re-decode from a divergence).

        A cut needs every cell the prefix attends to (see window_kept), and a model with
        recurrent layers (a hybrid such as jamba) cannot roll its state back: the engine
        refuses. Either way the prefix is recomputed from a cleared sequence, cut at n_batch
        as a fresh evaluation would be."""
        n_keep = max(0, int(n_keep))
        kept = self._tokens[seq][:n_keep]
        if n_keep > 0:
            if not window_kept(self.window, self._longest[seq]):
                self.cuts.rebuilt_window += 1
            elif self._drop(seq, n_keep):
                self.cuts.kept += 1
                del self._tokens[seq][n_keep:]
                return
            else:
                self.cuts.rebuilt_engine += 1
        if not self._drop(seq, 0):
            raise MeasurementError("the engine could not clear a sequence's KV cache")
        self._tokens[seq] = []
        self._longest[seq] = 0
        if kept:
            self.evaluate_each(seq, kept, 0, None, lambda first, view: None)

    def evaluate_each(self, seq: int, tokens: Sequence[int], start_pos: int, logits_from: Optional[int],
                      consume: Consume) -> None:
        """Feed ``tokens`` to sequence ``seq`` at start_pos.., cut at n_batch (the same cuts in
        every context with the same settings, so the layout, and with it the numbers, match),
        asking logits for tokens from index ``logits_from`` on (None: none). Each cut's rows
        go to ``consume(first_row, view)``: ``view`` is the engine's own output buffer, so a
        caller that reduces rows on the fly never holds a float copy of a whole chunk."""
        first = len(tokens) if logits_from is None else logits_from
        self._evaluate_rows(seq, tokens, start_pos, lambda i: i >= first, consume)

    def evaluate_at(self, seq: int, tokens: Sequence[int], start_pos: int, wanted: Sequence[int],
                    consume: Consume) -> None:
        """As evaluate_each, with logits only for the token indices in ``wanted`` (ascending):
        llama.cpp then runs the output layer (hidden state x vocabulary) for those rows alone,
        and its output buffer holds only them. The batch cuts are evaluate_each's, so the KV
        cache, and every row asked for, are the same as with logits for every row."""
        want = set(int(i) for i in wanted)
        self._evaluate_rows(seq, tokens, start_pos, want.__contains__, consume)

    def _evaluate_rows(self, seq: int, tokens: Sequence[int], start_pos: int, logits_for, consume: Consume) -> None:
        """The one batch loop of evaluate_each and evaluate_at: cuts at n_batch, logits for the
        token indices ``logits_for(index)`` is true of."""
        if start_pos + len(tokens) > self.n_ctx_seq:
            raise MeasurementError(
                f"{start_pos + len(tokens)} tokens do not fit the context of {self.n_ctx_seq}; raise --refract-ctx"
            )
        step = self.settings.n_batch
        done = 0
        for off in range(0, len(tokens), step):
            part = tokens[off : off + step]
            if len(part) == 1:
                self.n_decode_tokens += 1
            else:
                self.n_batch_tokens += len(part)
            rows = [(int(t), start_pos + off + i, logits_for(off + i)) for i, t in enumerate(part)]
            n_out = self._step(rows, [seq] * len(rows))
            if n_out:
                consume(done, require_finite(self._view(n_out)))
                done += n_out

    def evaluate(self, seq: int, tokens: Sequence[int], start_pos: int = 0,
                 logits_from: Optional[int] = None) -> np.ndarray:
        """As evaluate_each, the rows collected into one array."""
        rows: List[np.ndarray] = []
        self.evaluate_each(seq, tokens, start_pos, logits_from, lambda first, view: rows.append(view.copy()))
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def prefill(self, seq: int, tokens: Sequence[int], logits_from: int, consume: Consume) -> None:
        """Evaluate ``tokens`` from position 0 in ``seq``, reusing whole n_batch-sized batches
        already cached there with identical tokens.

        Why this is exact: a fresh evaluation cuts the sequence into batches at multiples of
        n_batch, and a batch's KV entries depend only on the tokens up to its end. Keeping the
        cached batches that a fresh run would recompute identically, and evaluating the rest
        with the same cuts, gives bit-identical logits (tested) while skipping shared
        haystack prefixes. Anything short of a whole batch is recomputed."""
        step = self.settings.n_batch
        common = 0
        for a, b in zip(self._tokens[seq], tokens):
            if a != b:
                break
            common += 1
        keep = min(common, len(tokens) - 1, logits_from) // step * step
        if keep and not window_kept(self.window, self._longest[seq]):
            keep = 0  # recomputing the prefix is all a reuse could offer here (see truncate)
            self.cuts.reuse_refused_window += 1
        self.truncate(seq, keep)
        self.evaluate_each(seq, tokens[keep:], keep, logits_from - keep,
                           lambda first, view: consume(first + logits_from - keep, view))

    def greedy(self, prompts: Sequence[Sequence[int]], n_predict: int, on_row=None, on_finish=None) -> List[List[int]]:
        """Greedy-decode every prompt, each in a sequence of its own, with continuous batching:
        up to n_seq sequences step together (one token each per engine step), and when one ends
        (end-of-generation or n_predict tokens) the next prompt takes its slot, so the batch
        stays full until the queue drains. The schedule depends only on the prompts and the
        tokens, so it is the same on every run. Token ids are captured at decode time: no
        detokenize/retokenize round trip.

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
                last: List[np.ndarray] = []

                def keep_last(first, view, last: List[np.ndarray] = last) -> None:
                    last.append(view)

                self.prefill(slot, prompts[i], len(prompts[i]) - 1, keep_last)
                if self._take(i, 0, last[-1][-1], out, n_predict, on_row):
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
            if self.n_seq > 1:
                self.n_seq_decode_tokens += len(rows)
                self.n_seq_decode_steps += 1
            else:
                self.n_decode_tokens += 1
            self._step(rows, [slot_of[i] for i in active])
            view = require_finite(self._view(len(active)))
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
