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
                     architecture="llama", nan_output=False, missing_tensor=None, head_count=None,
                     n_vocab_kept=None, uniform_output=False) -> pathlib.Path:
    """Write a tiny llama GGUF to `path` (a file, or a directory to put
    "tiny-llama.gguf" in) and return the file path.

    `architecture` goes into general.architecture and prefixes the hyper-
    parameter keys; an unknown name yields a file llama.cpp refuses to load.
    `nan_output` fills the output projection with NaN: every logit is NaN,
    as with a GGUF whose weights are corrupt. `missing_tensor` (a tensor
    name, e.g. "blk.1.ffn_up.weight") is left out and `head_count` replaces
    the written head count: files whose vocabulary loads but whose full load
    llama.cpp refuses. `n_vocab_kept` keeps only the first tokens.
    `uniform_output` zeroes the output projection: every logit is 0, every
    next token equally likely, whatever the cache holds.
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
    if n_vocab_kept is not None:
        tokens, scores, types = tokens[:n_vocab_kept], scores[:n_vocab_kept], types[:n_vocab_kept]
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
    w.add_head_count(n_head if head_count is None else head_count)
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
    if uniform_output:
        output[:] = 0.0
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
            if name(kind, i) != missing_tensor:
                w.add_tensor(name(kind, i), arr)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- other families
#
# Users bring gemma, qwen and mixture-of-experts models; these write the same tiny vocabulary
# (plus each family's chat control tokens) into the tensor layout and metadata that
# llama.cpp's loader asks of each architecture (src/models/<arch>.cpp, load_arch_hparams and
# load_arch_tensors). Chat templates are short Jinja renderings of each family's turn format.

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# A qwen3-style thinking template: the assistant turn opens with a reasoning block.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
_FAMILY_TOKENS = {
    "gemma3": ["<start_of_turn>", "<end_of_turn>"],
    "qwen3": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "qwen3moe": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "mamba": [],
    "jamba": [],
}
FAMILIES = tuple(_FAMILY_TOKENS)
# Rendered as text (not control tokens), as in qwen3's own vocabulary, so a reply's reasoning
# block can be recognised and stripped.
_TEXT_TOKENS = {"<think>", "</think>"}


def _byte_chars() -> list:
    """GPT-2 byte-level BPE's printable stand-in for each byte value 0..255: printable
    Latin-1 bytes stand for themselves, the rest are moved to code points from 256 up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _bpe_vocab() -> tuple:
    """(tokens, merges) of a small byte-level BPE vocabulary: every byte, then each of _WORDS
    with a leading space built up one merge at a time."""
    byte = _byte_chars()
    tokens = list(byte)
    merges = []
    for w in _WORDS:
        symbols = [byte[b] for b in (" " + w).encode("utf-8")]
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            if merged not in tokens:
                merges.append(f"{current} {nxt}")
                tokens.append(merged)
            current = merged
    return tokens, merges


def write_tiny_family(path, family: str, *, n_ctx_train=2048, n_embd=64, n_head=2, n_head_kv=1, n_layer=2,
                      n_ff=128, seed=0, chat_template="default", sliding_window=64, n_expert=4,
                      n_expert_used=2, tokenizer=None) -> pathlib.Path:
    """Write a tiny random-weight GGUF of ``family``: "gemma3" (sliding-window attention on
    every other layer, q/k norms, post-norms, gemma's turn template), "qwen3" (q/k norms, no
    BOS, a thinking template), "qwen3moe" (qwen3 with ``n_expert`` experts, ``n_expert_used``
    per token), "mamba" (a recurrent model: no attention, no KV cache) or "jamba" (a hybrid: a
    mamba layer, then an attention layer with a KV cache). ``tokenizer`` is "spm" (the llama
    vocabulary) or "bpe" (byte-level BPE with qwen2's pre-tokenizer); qwen families default to
    "bpe", as their real models are."""
    assert family in _FAMILY_TOKENS, family
    head_dim = n_embd // n_head
    assert head_dim % 32 == 0, f"head_dim={head_dim} must be a multiple of 32"
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / f"tiny-{family}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    if chat_template == "default":
        chat_template = {"gemma3": GEMMA_TEMPLATE, "qwen3": QWEN3_TEMPLATE, "qwen3moe": QWEN3_TEMPLATE}.get(family)

    if tokenizer is None:
        tokenizer = "bpe" if family.startswith("qwen") else "spm"
    if tokenizer == "bpe":
        tokens, merges = _bpe_vocab()
        tokens = tokens + ["<|endoftext|>"]
        scores = [0.0] * len(tokens)
        types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - 1) + [int(gguf.TokenType.CONTROL)]
    else:
        tokens, scores, types = _vocab()
    for text in _FAMILY_TOKENS[family]:
        tokens.append(text)
        scores.append(0.0)
        types.append(int(gguf.TokenType.USER_DEFINED if text in _TEXT_TOKENS else gguf.TokenType.CONTROL))
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), family)
    w.add_name(f"tiny-{family}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_layer_norm_rms_eps(1e-6)
    if family in ("mamba", "jamba"):
        w.add_ssm_conv_kernel(4)
        w.add_ssm_inner_size(2 * n_embd)
        w.add_ssm_state_size(16)
        w.add_ssm_time_step_rank(4)
    if family == "mamba":
        w.add_feed_forward_length(0)
        w.add_head_count(0)
    elif family == "jamba":
        # Layer 0 is recurrent (no KV heads), layer 1 attends; no RoPE in jamba.
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv([0, n_head_kv] * (n_layer // 2) + [0] * (n_layer % 2))
    else:
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(10000.0)
    if family == "gemma3":
        w.add_sliding_window(sliding_window)
        w.add_uint32(f"{family}.attention.sliding_window_pattern", 2)  # layer 0 local, layer 1 global
    if family == "qwen3moe":
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff // n_expert_used)

    if tokenizer == "bpe":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|endoftext|>"))
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
    w.add_eos_token_id(tokens.index("<|im_end|>") if family.startswith("qwen3") else 2)
    w.add_add_bos_token(not family.startswith("qwen3"))  # qwen models add no BOS
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    rng = np.random.RandomState(seed)
    T = gguf.MODEL_TENSOR

    def name(kind, bid=None, suffix=".weight"):
        return gguf.TENSOR_NAMES[kind].format(bid=bid) + suffix

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(*shape):
        return np.ones(shape, dtype=np.float32)

    w.add_tensor(name(T.TOKEN_EMBD), rand(n_vocab, n_embd))
    w.add_tensor(name(T.OUTPUT_NORM), ones(n_embd))
    w.add_tensor(name(T.OUTPUT), rand(n_vocab, n_embd))
    for i in range(n_layer):
        blk = {name(T.ATTN_NORM, i): ones(n_embd)}
        recurrent = family == "mamba" or (family == "jamba" and i % 2 == 0)
        if recurrent:
            d_inner, d_conv, d_state, dt_rank = 2 * n_embd, 4, 16, 4
            if family == "jamba":
                blk.update({name(T.SSM_DT_NORM, i): ones(dt_rank), name(T.SSM_B_NORM, i): ones(d_state),
                            name(T.SSM_C_NORM, i): ones(d_state)})
            blk.update({
                name(T.SSM_IN, i): rand(2 * d_inner, n_embd),
                name(T.SSM_CONV1D, i): rand(d_inner, d_conv),
                name(T.SSM_CONV1D, i, ".bias"): rand(d_inner),
                name(T.SSM_X, i): rand(dt_rank + 2 * d_state, d_inner),
                name(T.SSM_DT, i): rand(d_inner, dt_rank),
                name(T.SSM_DT, i, ".bias"): rand(d_inner),
                # A must be negative for a stable scan (the converter stores -exp(A_log)).
                name(T.SSM_A, i, ""): -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)),
                name(T.SSM_D, i, ""): ones(d_inner),
                name(T.SSM_OUT, i): rand(n_embd, d_inner),
            })
        else:
            blk.update({
                name(T.ATTN_Q, i): rand(n_head * head_dim, n_embd),
                name(T.ATTN_K, i): rand(n_head_kv * head_dim, n_embd),
                name(T.ATTN_V, i): rand(n_head_kv * head_dim, n_embd),
                name(T.ATTN_OUT, i): rand(n_embd, n_head * head_dim),
            })
        if family == "jamba":
            blk.update({
                name(T.FFN_NORM, i): ones(n_embd),
                name(T.FFN_GATE, i): rand(n_ff, n_embd),
                name(T.FFN_UP, i): rand(n_ff, n_embd),
                name(T.FFN_DOWN, i): rand(n_embd, n_ff),
            })
        elif not recurrent:
            blk.update({
                name(T.ATTN_Q_NORM, i): ones(head_dim),
                name(T.ATTN_K_NORM, i): ones(head_dim),
                name(T.FFN_NORM, i): ones(n_embd),
            })
            if family == "gemma3":
                blk.update({name(T.ATTN_POST_NORM, i): ones(n_embd), name(T.FFN_POST_NORM, i): ones(n_embd)})
            if family == "qwen3moe":
                n_ff_exp = n_ff // n_expert_used
                blk.update({
                    name(T.FFN_GATE_INP, i): rand(n_expert, n_embd),
                    name(T.FFN_GATE_EXP, i): rand(n_expert, n_ff_exp, n_embd),
                    name(T.FFN_UP_EXP, i): rand(n_expert, n_ff_exp, n_embd),
                    name(T.FFN_DOWN_EXP, i): rand(n_expert, n_embd, n_ff_exp),
                })
            else:
                blk.update({
                    name(T.FFN_GATE, i): rand(n_ff, n_embd),
                    name(T.FFN_UP, i): rand(n_ff, n_embd),
                    name(T.FFN_DOWN, i): rand(n_embd, n_ff),
                })
        for tensor_name, arr in blk.items():
            w.add_tensor(tensor_name, arr)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
