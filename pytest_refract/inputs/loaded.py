"""What an audit measures on, checked before any item runs: prompts, corpus, haystack, and the
model's chat template turned into token ids.

Loaded at configure time with a vocabulary-only model (no weights: milliseconds), which also
proves that the engine accepts the file; later the runner's full model takes its place as
the tokenizer (the same vocabulary, so the same ids)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..engines.base import TemplateProblem
from ..errors import MeasurementError, UsageProblem
from . import data, distinct

if TYPE_CHECKING:  # the options' type only: settings.py sits above this layer
    from ..settings import Settings
    from .haystack import Haystack

# The sentinel a chat template renders around, to split it into the tokens before and after
# the user's content.
_SENTINEL = "@@refract-content@@"


class Inputs:
    def __init__(self, settings: Settings, model_path: Path, info, engine_mod, needs=frozenset()):
        """``needs``: what the selected axes read ("prompts", "corpus", "haystack")."""
        self.settings = settings
        self.needs = frozenset(needs)
        self.model_path = model_path
        self.info = info
        self.prompts: List[data.Prompt] = []
        self.corpus: Optional[data.Corpus] = None
        self.corpus_tokens: List[int] = []
        self.n_chunks = 0
        self.chunks: Tuple[int, ...] = ()        # the distinct chunks the KLD-type axes measure
        self.repeated_chunks: Dict[int, int] = {}  # a chunk that repeats an earlier one -> that one
        self.merged_cells: Dict[Tuple[int, float], Tuple[int, float]] = {}  # R-NIAH (length, position) -> first
        # The depth axis: its chunk length (the default capped at the model's context) and chunks.
        self.depth = settings.depth
        self.n_depth_chunks = 0
        self.depth_chunks: Tuple[int, ...] = ()
        self.repeated_depth_chunks: Dict[int, int] = {}
        self.haystack: Optional[Haystack] = None
        self.haystack_source = None
        self.rniah_lengths: tuple = ()
        self.rniah_answer_tokens = settings.rniah_answer_tokens
        self.rniah_thinking = False
        # Set once the vocabulary is loaded: an engine's tokenizer side (see module doc).
        self.tokenizer: Any = None  # duck-typed: the engine module's (llama.cpp's, or a test's fake)
        self._prompt_tokens: Dict[str, List[int]] = {}
        self._render = None
        self._parts = None
        self._question_tokens: Optional[List[int]] = None
        self._load(engine_mod)

    # -- loading ----------------------------------------------------------------------------

    def _load(self, engine_mod) -> None:
        s = self.settings
        n_ctx_train = self.info.n_ctx_train
        if n_ctx_train and s.ctx > n_ctx_train:
            raise UsageProblem(f"--refract-ctx={s.ctx} exceeds the model's training context of {n_ctx_train} tokens")
        if "prompts" in self.needs:
            # In the order a sequential audit measures them (categories interleaved, seeded).
            self.prompts = data.in_measuring_order(data.load_prompts(Path(s.prompts_path) if s.prompts_path else None),
                                                   s.seed)
        if "corpus" in self.needs or ("haystack" in self.needs and not s.haystack_path):
            self.corpus = data.load_corpus(Path(s.corpus_path) if s.corpus_path else None)
        haystack_source = None
        if "haystack" in self.needs:
            haystack_source = (data.load_corpus(Path(s.haystack_path), "haystack", "--refract-haystack")
                               if s.haystack_path else self.corpus)
        listed = self.info.get("tokenizer.ggml.tokens") if self.info is not None else None
        n_listed = len(listed) if isinstance(listed, list) else getattr(listed, "length", None)
        if n_listed is not None and n_listed < 2:
            # Refused from the header, before llama.cpp sees it: loading such a vocabulary
            # crashes some llama.cpp builds outright (0.3.22: a segfault, not always an error).
            raise UsageProblem(self._tiny_vocabulary(n_listed))
        try:
            tok = engine_mod.Engine(self.model_path, vocab_only=True)
        except MeasurementError as exc:
            raise UsageProblem(str(exc)) from None
        try:
            if tok.n_vocab < 2:
                # llama.cpp's tokenizer aborts the process on such a vocabulary; and a model
                # that can say only one token has no distribution to compare.
                raise UsageProblem(self._tiny_vocabulary(tok.n_vocab))
            if tok.is_recurrent:
                # Its state is a fixed-size recurrence per sequence, not a cache of keys and
                # values per token: there is nothing for ctk/ctv to quantize, so no score.
                raise UsageProblem(
                    f"{self.model_path.name} is a recurrent model ({self.info.architecture}): it keeps no KV cache, so "
                    f"a KV-cache quantization audit has nothing to measure"
                )
            self.tokenizer = tok
            self.add_bos, self.bos = tok.add_bos, tok.bos
            if haystack_source is not None:
                self._prepare_rniah(haystack_source)
            if self.corpus is not None and "corpus" in self.needs:
                self.corpus_tokens = tok.tokenize(self.corpus.text, add_special=True)
                available = len(self.corpus_tokens) // s.ctx
                if available < 1:
                    raise UsageProblem(
                        f"corpus {self.corpus.name} holds {len(self.corpus_tokens)} tokens, fewer than one chunk of "
                        f"--refract-ctx={s.ctx}; give a longer --refract-corpus or a smaller --refract-ctx"
                    )
                kept, self.repeated_chunks = distinct.distinct_chunks(self.corpus_tokens, s.ctx, available, s.chunks,
                                                                      first_replaced=bool(tok.add_bos))
                self.chunks = tuple(kept)
                self.n_chunks = len(kept)
                if "depth" in s.axes:
                    self._prepare_depth(n_ctx_train or 0)
            self._check_prompts_fit(n_ctx_train or 0)
        finally:
            tok.close()
            self.tokenizer = None

    def _prepare_depth(self, limit: int) -> None:
        """The depth axis's chunk length and chunk count, refused with the limit and the fix."""
        s = self.settings
        depth = s.depth
        if limit and depth > limit:
            if s.depth_given:
                raise UsageProblem(f"--refract-depth={depth} exceeds the model's training context of {limit} tokens; "
                                   f"use --refract-depth={limit} or less")
            depth = limit
        if depth < 512:
            raise UsageProblem(f"the model's training context of {limit} tokens is below the depth axis's minimum of "
                               "512; drop depth from --refract-axes")
        n = len(self.corpus_tokens) // depth
        if n < 1:
            name = self.corpus.name if self.corpus is not None else "the corpus"
            raise UsageProblem(f"corpus {name} holds {len(self.corpus_tokens)} tokens, fewer than one "
                               f"depth chunk of {depth}; give a longer --refract-corpus or a smaller --refract-depth "
                               f"(at most {len(self.corpus_tokens)})")
        self.depth = depth
        # As for the KLD axis: a depth chunk repeated token for token counts once.
        kept, self.repeated_depth_chunks = distinct.distinct_chunks(self.corpus_tokens, depth, n, s.chunks,
                                                                    first_replaced=bool(self.tokenizer.add_bos))
        self.depth_chunks = tuple(kept)
        self.n_depth_chunks = len(kept)
        self._check_depth_memory()

    def _check_depth_memory(self) -> None:
        """Refuse a depth this machine cannot hold, before any model loads."""
        from . import depth as depth_memory
        from .depth import scored_positions

        s = self.settings
        roles = [s.reference, *s.candidates] + ([s.sensitivity] if s.sensitivity else [])
        types = [t for kv in roles for t in (kv.ctk, kv.ctv)]
        est = depth_memory.estimate(self.info, depth_memory.model_size(self.model_path), self.depth,
                                    len(scored_positions(self.depth, s.depth_stride)), self.tokenizer.n_vocab,
                                    len(roles) + bool(s.floor), types, s.n_batch, s.depth_stride)
        free = depth_memory.available_bytes()
        if est is not None and free is not None and est.total > free:
            raise UsageProblem(f"--refract-depth={self.depth} needs {est.text()}, more than the "
                               f"{free / 1024 ** 3:.1f} GiB this machine has available; use a smaller --refract-depth, "
                               "a larger --refract-depth-stride or fewer candidates, or a machine with more memory")

    def _tiny_vocabulary(self, n: int) -> str:
        return (f"{self.model_path.name} has a vocabulary of {n} token(s): nothing to tokenize with or to compare; "
                "give a real model")

    def _check_prompts_fit(self, limit: int) -> None:
        """Each prompt (in its chat template) plus --refract-n-predict generated tokens must fit
        the model's context; say which of the two is at fault, and what would fit."""
        s = self.settings
        if limit and self.prompts and s.n_predict >= limit:
            raise UsageProblem(
                f"--refract-n-predict={s.n_predict} is not smaller than the model's context of {limit} tokens, "
                f"which must hold the prompt as well as the answer; use a value well below {limit}"
            )
        source = s.prompts_path or "the bundled prompt set"
        rendered: dict = {}  # the tokens a prompt renders to -> the ids rendering to them
        for p in self.prompts:
            rendered.setdefault(tuple(self.chat_tokens(p.prompt)), []).append(p.id)
        plain = {tuple(self.tokenizer.tokenize(p.prompt, add_special=False, parse_special=False)) for p in self.prompts}
        if len(self.prompts) > 1 and len(rendered) == 1 and len(plain) > 1:
            raise UsageProblem(
                f"every prompt of {source} renders to the same tokens in the chat template of {self.model_path.name} "
                "(tokenizer.chat_template): the template drops the user's content; fix it in the file")
        same = next((ids for ids in rendered.values() if len(ids) > 1), None)
        if same:
            # Different texts, one computation (e.g. differing in whitespace the tokenizer drops):
            # one item, which must not count as several.
            raise UsageProblem(f"prompts {', '.join(repr(i) for i in same)} of {source} render to the same tokens in "
                               f"the chat template of {self.model_path.name}: one item counted {len(same)} times; "
                               "remove all but one")
        for p in self.prompts:
            # Tokenized here even without a known limit: the vocabulary-only model is loaded now.
            n = len(self.chat_tokens(p.prompt))
            if not limit:
                continue
            if n >= limit:
                raise UsageProblem(
                    f"prompt {p.id!r} in {source} is {n} tokens in the chat template, longer than the model's "
                    f"context of {limit} tokens; shorten it or leave it out"
                )
            if n + s.n_predict > limit:
                raise UsageProblem(
                    f"prompt {p.id!r} in {source} is {n} tokens; with --refract-n-predict={s.n_predict} it exceeds "
                    f"the model's context of {limit} tokens; use --refract-n-predict={limit - n} or less"
                )

    def _prepare_rniah(self, source) -> None:
        from .haystack import THINK_MARKERS, Haystack

        s = self.settings
        try:
            self.haystack = Haystack.from_text(source.text, self.plain_tokens)
        except ValueError:
            raise UsageProblem(f"haystack {source.name} has no sentences to build a haystack from") from None
        self.haystack_source = source
        template = self.info.chat_template or ""
        thinking = any(marker in template for marker in THINK_MARKERS)
        # Thinking models reason before answering: give them room, then score what follows.
        self.rniah_answer_tokens = max(s.rniah_answer_tokens, 1024) if thinking else s.rniah_answer_tokens
        self.rniah_thinking = thinking
        overhead = len(self.rniah_prompt([])) + self.rniah_answer_tokens
        limit = self.info.n_ctx_train
        if s.rniah_lengths:
            for length in s.rniah_lengths:
                if limit and length + overhead > limit:
                    raise UsageProblem(
                        f"--refract-rniah-lengths: {length} tokens (+{overhead} for template, question and answer) "
                        f"exceed the model's context of {limit} tokens; use at most {limit - overhead}"
                    )
            self.rniah_lengths = tuple(s.rniah_lengths)
        else:
            fitting = tuple(n for n in (1024, 2048, 4096) if not limit or n + overhead <= limit)
            self.rniah_lengths = fitting or (max(64, limit - overhead),)
        self.merged_cells = self._same_placements()

    def _same_placements(self) -> Dict[Tuple[int, float], Tuple[int, float]]:
        """R-NIAH cells whose needles, trial by trial, start where an earlier cell's do at the
        same length (positions that snap to the same sentence boundary): the same haystack and
        the same depth, so one cell's evidence. Cell -> the first cell with its placements."""
        from .haystack import trial_value

        s, haystack = self.settings, self.haystack
        assert haystack is not None
        keys, cells = [], []
        for length in self.rniah_lengths:
            for position in s.rniah_positions:
                offsets = []
                for trial in range(s.rniah_trials):
                    value = trial_value(s.seed, length, position, trial, s.rniah_values)
                    needle = self.plain_tokens(" " + s.rniah_needle.replace("{value}", value))
                    if length <= len(needle):
                        return {}  # the axis reports this length itself; nothing to merge
                    offsets.append(haystack.build(length, position, needle)[1])
                keys.append((length, tuple(offsets)))
                cells.append((length, position))
        _kept, repeats = distinct.first_of_each(keys)
        return {cells[i]: cells[j] for i, j in repeats.items()}

    @property
    def chunks_note(self) -> Optional[str]:
        # Only when the KLD axis reads the corpus: as R-NIAH's haystack it is not cut in chunks.
        if self.corpus is None or "corpus" not in self.needs:
            return None
        parts = []
        if self.repeated_chunks:
            shown = ", ".join(f"chunk-{i:02d} = chunk-{j:02d}" for i, j in list(self.repeated_chunks.items())[:3])
            more = f" and {len(self.repeated_chunks) - 3} more" if len(self.repeated_chunks) > 3 else ""
            parts.append(f"{len(self.repeated_chunks)} chunk(s) of the corpus repeat an earlier chunk token for token "
                         f"and count once ({shown}{more})")
        if self.repeated_depth_chunks:
            parts.append(f"{len(self.repeated_depth_chunks)} depth chunk(s) of {self.depth} tokens repeat an earlier one "
                         "and count once")
        if self.settings.chunks is not None and self.n_chunks < self.settings.chunks:
            parts.append(f"corpus holds {self.n_chunks} distinct chunks of {self.settings.ctx} tokens; "
                         f"{self.settings.chunks} were asked for")
        return "; ".join(parts) or None

    def longest_prompt(self) -> int:
        """The longest chat-rendered prompt tokenized so far (0 for none)."""
        return max((len(t) for t in self._prompt_tokens.values()), default=0)

    # -- token ids ----------------------------------------------------------------------------

    def plain_tokens(self, text: str) -> List[int]:
        return self.tokenizer.tokenize(text, add_special=False, parse_special=False)

    def _renderer(self):
        """The chat template's user-turn renderer, or False for a model without a template."""
        if self._render is None:
            template = self.info.chat_template
            if not template:
                self._render = False
            else:
                self._render = self._guarded(lambda: self.tokenizer.user_turn_renderer(template))
        return self._render

    def _guarded(self, call):
        """Run ``call``; a template that does not compile or render is a one-line usage error."""
        try:
            return call()
        except TemplateProblem as exc:
            raise UsageProblem(
                f"the chat template of {self.model_path.name} (tokenizer.chat_template) does not render a user turn: "
                f"{exc}; fix it in the file, e.g. gguf-new-metadata --chat-template-file") from None

    def chat_parts(self):
        """Token ids the chat template puts before and after the user's content."""
        if self._parts is None:
            tok = self.tokenizer
            render = self._renderer()
            if render:
                rendered = self._guarded(lambda: render(_SENTINEL))
                if _SENTINEL not in rendered:
                    raise UsageProblem(
                        f"the chat template of {self.model_path.name} (tokenizer.chat_template) drops the user's "
                        "content: every prompt would render to the same tokens, so nothing the audit asks reaches "
                        "the model; fix it in the file, e.g. gguf-new-metadata --chat-template-file")
                head, _, tail = rendered.partition(_SENTINEL)
                add_special = tok.add_bos and not head.startswith(tok.token_text(tok.bos))
                self._parts = (
                    tok.tokenize(head, add_special=add_special, parse_special=True) if head else
                    ([tok.bos] if add_special else []),
                    tok.tokenize(tail, add_special=False, parse_special=True) if tail else [],
                )
            else:
                self._parts = ([tok.bos] if tok.add_bos else [], tok.tokenize("\nAnswer:", False, False))
        return self._parts

    def rniah_prompt(self, body: List[int]) -> List[int]:
        """Chat-rendered user turn: haystack tokens (spliced in as ids, so the haystack length is
        exact), then the question."""
        head, tail = self.chat_parts()
        if self._question_tokens is None:
            self._question_tokens = self.plain_tokens("\n\n" + self.settings.rniah_question)
        return list(head) + list(body) + list(self._question_tokens) + list(tail)

    def chat_tokens(self, text: str) -> List[int]:
        """Render a user turn with the model's own chat template (raw text for base models)
        and tokenize it, special tokens parsed. Cached: the same ids on every call."""
        cached = self._prompt_tokens.get(text)
        if cached is not None:
            return cached
        tok = self.tokenizer
        render = self._renderer()
        if render:
            rendered = self._guarded(lambda: render(text))
            add_special = tok.add_bos and not rendered.startswith(tok.token_text(tok.bos))
            tokens = tok.tokenize(rendered, add_special=add_special, parse_special=True)
        else:
            tokens = tok.tokenize(text, add_special=True, parse_special=False)
        self._prompt_tokens[text] = tokens
        return tokens
