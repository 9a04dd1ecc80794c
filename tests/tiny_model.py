"""Tiny random-weight llama GGUF model for tests.

Real models are gigabytes and slow to load; the tests only need something
llama.cpp accepts and can run a forward pass on, so we synthesise one with the
`gguf` package in a few milliseconds.  The weights are random, so the output
text is garbage -- tests must not assert on generated content.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

# SentencePiece marks "a space precedes this piece" with U+2581.
_SP = "\u2581"

# A few common English words.  Every prefix of each word is added too: the
# llama.cpp SPM tokenizer only merges two adjacent symbols when their
# concatenation is itself a vocab entry, so "▁the" is reachable only via
# intermediate pieces like "▁t" / "▁th".
_WORDS = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for",
          "hello", "world", "end"]
# Single characters so ordinary text mostly avoids the byte fallback.
_CHARS = list("etaoinshrdlucmwfgypbvkjxqz") + list(".,!?'0123456789")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token_types) for a small SPM vocabulary."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    # Byte-fallback tokens: llama.cpp maps any character not in the vocab to
    # these, and it looks up "<0x0A>" as the newline token, so all 256 are needed.
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256

    pieces: list[str] = [_SP]
    for w in _WORDS:
        word = _SP + w
        pieces += [word[:i] for i in range(2, len(word) + 1)]
    pieces += _CHARS
    pieces = list(dict.fromkeys(pieces))  # dedupe, keep order
    tokens += pieces
    types += [T.NORMAL] * len(pieces)

    # SentencePiece-style log-prob scores: special/byte tokens get 0, normal
    # pieces get negative scores.  Longer pieces score higher so the tokenizer
    # prefers whole words when several merges are possible.
    n_special = len(tokens) - len(pieces)
    scores = [0.0] * n_special + [-100.0 + len(p) for p in pieces]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(path, *, n_ctx_train=2048, n_embd=64, n_head=2, n_head_kv=2,
                     n_layer=2, n_ff=128, seed=0, chat_template=None,
                     architecture="llama", nan_output=False) -> pathlib.Path:
    """Write a tiny llama GGUF to `path` (a file, or a directory to put
    "tiny-llama.gguf" in) and return the file path.

    `architecture` goes into general.architecture and prefixes the hyper-
    parameter keys; an unknown name yields a file llama.cpp refuses to load.
    `nan_output` fills the output projection with NaN: every logit is NaN,
    as with a GGUF whose weights are corrupt.
    """
    assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
    head_dim = n_embd // n_head
    # Quantized KV caches (q8_0, used with flash attention) store K/V rows in
    # 32-element blocks, so the head size must be a multiple of 32.
    assert head_dim % 32 == 0, f"head_dim={head_dim} must be a multiple of 32"
    assert n_head % n_head_kv == 0, "n_head must be a multiple of n_head_kv"

    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "tiny-llama.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)

    tokens, scores, types = _vocab()
    n_vocab = len(tokens)

    # The writer prefixes arch-specific keys ("<arch>.context_length", ...)
    # with `arch` and writes general.architecture itself.
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)

    w.add_tokenizer_model("llama")  # SentencePiece (SPM) tokenizer
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    rng = np.random.RandomState(seed)
    T = gguf.MODEL_TENSOR

    # TENSOR_NAMES holds base names ("blk.{bid}.attn_q"); llama.cpp looks up
    # the parameter under "<base>.weight".
    def name(kind, bid=None):
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"

    # numpy shapes are (rows, cols) = reversed ggml ne; e.g. attn_q has
    # ne = {n_embd, n_head*head_dim}, i.e. numpy (n_head*head_dim, n_embd).
    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    w.add_tensor(name(T.TOKEN_EMBD), rand(n_vocab, n_embd))
    w.add_tensor(name(T.OUTPUT_NORM), ones(n_embd))
    output = rand(n_vocab, n_embd)
    if nan_output:
        output[:] = np.nan
    w.add_tensor(name(T.OUTPUT), output)
    for i in range(n_layer):
        blk = {
            T.ATTN_NORM: ones(n_embd),
            T.ATTN_Q: rand(n_head * head_dim, n_embd),
            T.ATTN_K: rand(n_head_kv * head_dim, n_embd),
            T.ATTN_V: rand(n_head_kv * head_dim, n_embd),
            T.ATTN_OUT: rand(n_embd, n_head * head_dim),
            T.FFN_NORM: ones(n_embd),
            T.FFN_GATE: rand(n_ff, n_embd),
            T.FFN_UP: rand(n_ff, n_embd),
            T.FFN_DOWN: rand(n_embd, n_ff),
        }
        for kind, arr in blk.items():
            w.add_tensor(name(kind, i), arr)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
