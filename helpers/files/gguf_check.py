"""Checks a GGUF model's header against llama.cpp's own limits before llama.cpp sees the file.

llama.cpp stops the whole process (GGML_ASSERT, SIGABRT: in a notebook the kernel dies without a word) on some
header values, and allocates from others. Each limit below cites where llama.cpp asserts or allocates; the
sources are those vendored in llama-cpp-python 0.3.35 (vendor/llama.cpp/src/llama-model.cpp `load_hparams`,
llama-model-loader.cpp `create_tensor`, llama-vocab.cpp `load`; line numbers are those files'). The tokenizer's
metadata is held against what its tokenizer needs to spell text without aborting. Header values llama.cpp takes
without a word but cannot use (a rope base of 0, a norm epsilon of 0) are refused too. The GGUF structure itself
(lengths, counts, tensor shapes, types and offsets, alignment) is checked while `gguf_header.read_header` reads it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from helpers.errors import DamagedModelError, NotAModelError, UnsupportedModelError
from helpers.files.gguf_header import GGUFArray, ModelInfo, TensorInfo, check_gguf, model_info, read_header

# llama-hparams.h: `#define LLAMA_MAX_LAYERS 512`, `#define LLAMA_MAX_EXPERTS 1024`; load_hparams asserts
# 0 < block_count <= LLAMA_MAX_LAYERS and expert_count <= LLAMA_MAX_EXPERTS.
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
# Not a llama.cpp limit: llama-cpp-python's tokenize allocates a buffer of context_length tokens (4 bytes each)
# on every call (_internals.py, `LlamaModel.tokenize`), and reads the value as an int32. 2^24 tokens is above
# every published model's context (Llama 4 Scout: 10M) and keeps that buffer at 64 MiB.
MAX_CONTEXT_LENGTH = 1 << 24
# ggml-cpu/ops.cpp (rms_norm, norm): GGML_ASSERT(eps >= 0.0f), reached at the first generated token.
# llama-model.cpp `llama_rope_scaling_type_from_string`: any other name is asserted against.
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# llama-vocab.cpp `load` (1933-2125): the tokenizer models llama.cpp knows, and the vocabulary type of each.
TOKENIZER_TYPES = {"llama": "SPM", "bert": "WPM", "gpt2": "BPE", "hybriddna": "BPE", "whitespace": "BPE",
                   "t5": "UGM", "rwkv": "RWKV", "plamo2": "PLaMo2", "gemma4": "BPE"}  # fmt: skip
NO_VOCABULARY = ("none", "no_vocab")  # a model without a tokenizer (1933)
TOKEN_TYPE_BYTE = 6  # llama.h LLAMA_TOKEN_TYPE_BYTE
# BPE pre-tokenizers that work on raw UTF-8 with spaces escaped as U+2581, not GPT-2's byte encoding (2201-2210).
_RAW_UTF8_BPE_PRE = ("gemma4", "granite-embed-multi-311m", "sarvam-moe")
_ESCAPED_SPACE = "\u2581".encode()
_HEX_BYTE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
_PRINTABLE = (0x0A, *range(0x20, 0x7F))


def _gpt2_byte_characters() -> dict[int, bytes]:
    """GPT-2's byte-to-unicode table, as unicode.cpp `unicode_byte_to_utf8_map` builds it: printable bytes map to
    themselves, the others to U+0100 and up in order (the space is U+0120 "Ġ", the newline U+010A "Ċ")."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in kept} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {b: c.encode() for b, c in table.items()}


_BYTE_LEVEL = _gpt2_byte_characters()
# How a vocabulary looks, to name it in a mismatch's message.
_LOOKS = {
    "SentencePiece ('llama')": lambda known: b"<0x0A>" in known and "\u2581the".encode() in known,
    "byte-level BPE ('gpt2')": lambda known: _BYTE_LEVEL[0x20] + b"the" in known and _BYTE_LEVEL[0x0A] in known,
}
# Not llama.cpp limits (it takes any float here, and generates nonsense): published models use a rope base from
# 10,000 to tens of millions (Qwen2.5-7B-Instruct-1M: 1e7) and a norm epsilon of 1e-12 to 1e-5. A base above 1e10, or an epsilon of 0 (a
# zero row divides 0 by 0) or of 1 and more (it drowns the activations' variance), is a damaged header.
MAX_ROPE_FREQ_BASE = 1e10
MAX_NORM_EPSILON = 1.0
# The architectures whose tensor shapes are built from embedding_length / head_count alone (llama-model.cpp:
# `n_embd_head_k = n_embd / n_head`, tensors of n_head * head size). A zero there is a zero-sized tensor,
# asserted against in create_tensor.
_ATTENTION_ARCHS = ("llama",)


def _damaged(path, what: str) -> DamagedModelError:
    return DamagedModelError(f"{path} is damaged: {what}. Delete it and download it again.")


def _integer(meta: dict, key: str, path, *, low: int, high: int | None = None, required: bool = True):
    """meta[key] as an int in [low, high], or None when absent and not required."""
    value = meta.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise _damaged(path, f"it has no {key}, which llama.cpp needs")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _damaged(path, f"{key} is {_show(value)}, not an integer")
    if value < low or (high is not None and value > high):
        allowed = f"{low} to {high:,}" if high is not None else f"at least {low}"
        raise _damaged(path, f"{key} is {value:,}; llama.cpp accepts {allowed}")
    return value


def _per_layer(meta: dict, key: str, path, n_layers: int, *, low: int) -> list[int] | None:
    """A value that may be one integer or one per layer (llama.cpp's get_key_or_arr), as a list per layer."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, GGUFArray):
        if value.length != n_layers or value.items is None or not all(isinstance(v, int) for v in value.items):
            raise _damaged(path, f"{key} is an array of {value.length:,} items; llama.cpp needs one integer per layer")
        values = list(value.items)
    else:
        values = [_integer(meta, key, path, low=low)]
    if min(values) < low:
        raise _damaged(path, f"{key} is {min(values)} for a layer; llama.cpp needs at least {low}")
    return values


def _number(meta: dict, key: str, path) -> float | None:
    """meta[key] as a number (llama.cpp reads these as float32), or None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _damaged(path, f"{key} is {_show(value)}, not a number")
    return value


def _show(value) -> str:
    return f"an array of {value.length:,} items" if isinstance(value, GGUFArray) else repr(value)[:60]


def check_model_header(path, meta: dict, tensors: list[TensorInfo]) -> None:
    """Raise NotAModelError, DamagedModelError (saying which value is wrong) for a header llama.cpp would crash on,
    allocate too much from, or reject."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tensors:
        what = "a vocabulary-only GGUF (a tokenizer without weights)" if tokens is not None else "no model"
        raise NotAModelError(
            f"{path} holds no weights: it is {what}, not a model to generate with. Load a full model file "
            "(see available_models()); to tokenize only, use llama_cpp.Llama(model_path=..., vocab_only=True)."
        )
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _damaged(path, f"general.architecture is {_show(arch)}, not an architecture name")
    if not any(key.startswith(f"{arch}.") for key in meta):
        others = sorted({key.split(".")[0] for key in meta if key.endswith(".block_count")})
        raise _damaged(
            path,
            f"general.architecture is {arch!r} but no metadata is for it"
            + (f" (the hyper-parameters are for {', '.join(map(repr, others))})" if others else ""),
        )
    _check_hyper_parameters(path, meta, arch)
    _check_tokenizer_model(path, meta)
    _check_vocabulary(path, meta, tensors, arch)
    _check_token_spelling(path, meta)


def _check_hyper_parameters(path, meta: dict, arch: str) -> None:
    n_layers = _integer(meta, f"{arch}.block_count", path, low=1, high=LLAMA_MAX_LAYERS)
    _integer(meta, f"{arch}.context_length", path, low=1, high=MAX_CONTEXT_LENGTH)
    n_embd = _integer(meta, f"{arch}.embedding_length", path, low=1)
    _integer(meta, f"{arch}.nextn_predict_layers", path, low=0, high=n_layers, required=False)
    n_expert = _integer(meta, f"{arch}.expert_count", path, low=0, high=LLAMA_MAX_EXPERTS, required=False) or 0
    used = _per_layer(meta, f"{arch}.expert_used_count", path, n_layers, low=0) or [0]
    groups = _integer(meta, f"{arch}.expert_group_count", path, low=0, required=False) or 0
    group_used = _integer(meta, f"{arch}.expert_group_used_count", path, low=0, required=False) or 0
    if (
        max(used) > n_expert
        or (n_expert and not 0 < max(used))
        or (not n_expert and groups)
        or (n_expert and (groups >= n_expert or (groups > 1 and (n_expert % groups or not 0 < group_used < groups))))
    ):
        raise _damaged(
            path,
            f"its expert counts do not fit together ({n_expert} experts, {max(used)} used per token, "
            f"{groups} groups, {group_used} groups used)",
        )
    for key, value in meta.items():  # no real model has these; a norm's NaN or negative epsilon is asserted against
        if key.startswith(f"{arch}.") and isinstance(value, float) and not math.isfinite(value):
            raise _damaged(path, f"{key} is {value}, not a finite number")
        if key.startswith(f"{arch}.attention.layer_norm") and isinstance(value, float) and value < 0:
            raise _damaged(path, f"{key} is {value}; llama.cpp's normalisation asserts it is not negative")
    for key in (f"{arch}.rope.freq_base", f"{arch}.rope.freq_base_swa"):
        base = _number(meta, key, path)
        if base is not None and not 0 < base <= MAX_ROPE_FREQ_BASE:
            raise _damaged(path, f"{key} is {base:g}; a rope base is positive and at most {MAX_ROPE_FREQ_BASE:g}")
    for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"):
        factor = _number(meta, key, path)  # llama-model.cpp: rope_freq_scale = factor == 0 ? 1 : 1 / factor
        if factor is not None and factor < 0:
            raise _damaged(path, f"{key} is {factor:g}; a rope scaling factor is positive (or 0 for none)")
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        eps = _number(meta, key, path)
        if eps is not None and not 0 < eps < MAX_NORM_EPSILON:
            raise _damaged(path, f"{key} is {eps:g}; a normalisation epsilon is above 0 and below {MAX_NORM_EPSILON:g}")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise _damaged(
            path, f"{arch}.rope.scaling.type is {_show(scaling)}, not one of {', '.join(ROPE_SCALING_TYPES)}"
        )
    if arch not in _ATTENTION_ARCHS:
        return
    heads = _per_layer(meta, f"{arch}.attention.head_count", path, n_layers, low=1)
    if heads is None:
        raise _damaged(path, f"it has no {arch}.attention.head_count, which llama.cpp needs")
    heads_kv = _per_layer(meta, f"{arch}.attention.head_count_kv", path, n_layers, low=1) or heads
    _per_layer(meta, f"{arch}.feed_forward_length", path, n_layers, low=1)
    head_size = _integer(meta, f"{arch}.attention.key_length", path, low=1, required=False)
    for n_head, n_head_kv in zip(
        heads * (n_layers if len(heads) == 1 else 1), heads_kv * (n_layers if len(heads_kv) == 1 else 1)
    ):
        if n_head % n_head_kv:
            raise _damaged(path, f"{n_head} attention heads do not share evenly among {n_head_kv} key/value heads")
        if head_size is None and n_embd % n_head:
            raise _damaged(path, f"the embedding size {n_embd} does not divide into {n_head} attention heads")
    rope = _integer(meta, f"{arch}.rope.dimension_count", path, low=1, required=False)
    if rope is not None and rope != (head_size or n_embd // heads[0]):
        raise _damaged(
            path, f"{arch}.rope.dimension_count is {rope}, not the head size {head_size or n_embd // heads[0]}"
        )


def _check_tokenizer_model(path, meta: dict) -> None:
    """tokenizer.ggml.model names a tokenizer this llama.cpp has, one that can tokenize text."""
    name = meta.get("tokenizer.ggml.model")
    if name is None:
        raise _damaged(path, "it has no tokenizer.ggml.model, which llama.cpp needs")
    if not isinstance(name, str):
        raise _damaged(path, f"tokenizer.ggml.model is {_show(name)}, not the name of a tokenizer")
    if name in NO_VOCABULARY:  # llama-vocab.cpp:3362 GGML_ASSERT(tokenizer && ...) at the first tokenize
        raise UnsupportedModelError(
            f"{path} has no tokenizer (tokenizer.ggml.model is {name!r}): it cannot turn text into tokens, and "
            "llama.cpp stops the process when asked to. Load a model with its vocabulary (see available_models())."
        )
    if name not in TOKENIZER_TYPES:  # llama-vocab.cpp:2125 "unknown tokenizer"
        raise UnsupportedModelError(
            f"{path} uses the tokenizer {name[:60]!r}, which this llama-cpp-python does not know "
            f"(it knows {', '.join(TOKENIZER_TYPES)}). Upgrade llama-cpp-python, or the file is damaged."
        )


def _check_vocabulary(path, meta: dict, tensors: list[TensorInfo], arch: str) -> None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, GGUFArray) or tokens.items is None or not all(isinstance(t, bytes) for t in tokens.items):
        raise _damaged(path, "its vocabulary (tokenizer.ggml.tokens) is missing or not a list of strings")
    n_vocab = tokens.length
    if n_vocab == 0:
        raise _damaged(path, "its vocabulary is empty")
    _check_strings(path, "tokenizer.ggml.tokens", "token", tokens.items)
    if not any(tokens.items):  # each is renamed [EMPTY_<id>] (below): nothing tokenizes, every prompt becomes []
        raise _damaged(path, f"all {n_vocab:,} token strings of its vocabulary are empty")
    # llama-vocab.cpp:2474-2488: an empty token is renamed [EMPTY_<id>], then GGML_ASSERT that no two tokens have
    # the same text (id_to_token.size() == token_to_id.size()).
    texts = {text or f"[EMPTY_{i}]".encode() for i, text in enumerate(tokens.items)}
    if len(texts) != n_vocab:
        raise _damaged(path, f"its vocabulary lists {n_vocab - len(texts):,} token(s) twice")
    size = meta.get(f"{arch}.vocab_size")
    if size is not None and size != n_vocab:
        shown = f"{size:,}" if isinstance(size, int) else _show(size)
        raise _damaged(path, f"{arch}.vocab_size is {shown}, but its vocabulary lists {n_vocab:,} tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, GGUFArray) and merges.items and all(isinstance(m, bytes) for m in merges.items):
        _check_strings(path, "tokenizer.ggml.merges", "merge", merges.items)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, GGUFArray) or value.length < n_vocab):
            raise _damaged(path, f"{key} is {_show(value)}, for a vocabulary of {n_vocab:,} tokens")
    for key, value in meta.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and isinstance(value, int):
            if not 0 <= value < n_vocab:
                raise _damaged(path, f"{key} is {value:,}, outside the vocabulary of {n_vocab:,} tokens")
    if arch not in _ATTENTION_ARCHS:  # other architectures may lay out (or pad) these tensors differently
        return
    shapes = {tensor.name: tensor.shape for tensor in tensors}
    for name in ("token_embd.weight", "output.weight"):
        shape = shapes.get(name)
        if shape is not None and (len(shape) != 2 or shape[1] != n_vocab):
            raise _damaged(path, f"{name} has shape {shape}, which does not match the {n_vocab:,}-token vocabulary")


def _check_strings(path, key: str, what: str, items: tuple[bytes, ...]) -> None:
    """GGUF strings are UTF-8 (ggml/docs/gguf.md), and llama.cpp reads these through gguf_get_arr_str as C strings
    (gguf.cpp), so a NUL byte cuts one short: "ab\\0cd" becomes "ab", a second token "ab", and the duplicate check
    at llama-vocab.cpp:2488 aborts. Checked on the joined strings (fast), then located."""
    joined = b"\n".join(items)
    if b"\0" not in joined:
        try:
            joined.decode("utf-8")
            return
        except UnicodeDecodeError:
            pass
    for i, text in enumerate(items):
        if b"\0" in text:
            raise _damaged(path, f"{what} {i:,} of {key} ({text[:40]!r}) holds a NUL byte, which llama.cpp cuts it at")
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            raise _damaged(path, f"{what} {i:,} of {key} ({text[:40]!r}) is not valid UTF-8") from None


def _check_token_spelling(path, meta: dict) -> None:
    """The vocabulary fits the tokenizer named: it has the byte tokens that tokenizer falls back to (SentencePiece
    aborts without them), its BYTE-typed tokens are <0xXX>, and it has the escaped space where the tokenizer
    writes spaces as U+2581. This is what refuses "llama" on a BPE vocabulary, "bert" on a SentencePiece one, and
    a vocabulary of empty or unreadable strings (nothing to spell text with)."""
    name, tokens = meta["tokenizer.ggml.model"], meta["tokenizer.ggml.tokens"].items
    kind, pre, known = TOKENIZER_TYPES[name], meta.get("tokenizer.ggml.pre"), set(tokens)
    raw_utf8 = kind == "BPE" and (name == "gemma4" or pre in _RAW_UTF8_BPE_PRE)

    def mismatch(what: str) -> DamagedModelError:
        guess = next((guess for guess, looks in _LOOKS.items() if looks(known)), None)
        told = f"tokenizer.ggml.model is {name!r} ({kind})"
        hint = f"; its tokens look like a {guess} vocabulary" if guess and not guess.endswith(f"({name!r})") else ""
        return _damaged(path, f"{told}, but its vocabulary {what}{hint}")

    types = meta.get("tokenizer.ggml.token_type")
    if isinstance(types, GGUFArray) and types.items is not None and kind in ("SPM", "UGM", "BPE", "WPM"):
        for i in (i for i, t in enumerate(types.items[: len(tokens)]) if t == TOKEN_TYPE_BYTE):
            # token_to_piece, run on every token at load (llama-vocab.cpp:3001), reads a BYTE token's value with
            # token_to_byte: WPM has no byte tokens at all, GGML_ABORT (3150) ends the process; the others read
            # text.substr(3, 2) (3142): a load error "basic_string::substr" under 3 bytes, a wrong byte above.
            if kind == "WPM":
                raise mismatch(f"marks token {i:,} ({tokens[i][:20]!r}) as a byte token, which {kind} has none of")
            if not _HEX_BYTE.fullmatch(tokens[i]):
                raise mismatch(f"marks token {i:,} ({tokens[i][:20]!r}) as a byte token, which is not <0xXX>")
    if kind == "SPM":
        # llm_tokenizer_spm_session::resegment (llama-vocab.cpp:192) spells an unknown piece byte by byte with
        # byte_to_token (3904-3913): the token <0xXX>, else the byte itself, else token_to_id.at() throws
        # std::out_of_range through the C API: std::terminate, SIGABRT at the first such character.
        missing = [b for b in range(256) if b"<0x%02X>" % b not in known and not (0 < b < 0x80 and bytes([b]) in known)]
        if missing:
            raise mismatch(
                f"has no token for {len(missing)} of the 256 bytes SentencePiece falls back to "
                f"(<0x{missing[0]:02X}> first); llama.cpp would abort on the first such character"
            )
    elif kind == "BPE" and pre != "whitespace":
        # llm_tokenizer_bpe_session::tokenize (llama-vocab.cpp:699-717) falls back to one token per byte: GPT-2's
        # byte-to-unicode character (unicode.cpp:148-170), or <0xXX> for SPM-style BPE; a byte with neither is
        # dropped without a word. Printable ASCII and the newline must be spelled.
        missing = [
            b
            for b in _PRINTABLE
            if not ({bytes([b]), b"<0x%02X>" % b} & known if raw_utf8 else _BYTE_LEVEL[b] in known)
        ]
        if missing:
            raise mismatch(
                f"has no token for {len(missing)} of the printable ASCII characters and the newline "
                f"({bytes([missing[0]])!r} first): text with them would lose them"
            )
    if (kind in ("SPM", "UGM", "WPM") or raw_utf8) and not any(t.startswith(_ESCAPED_SPACE) for t in tokens):
        # These write a space (WPM: the start of each word) as U+2581 before looking tokens up (llama-vocab.cpp:932,
        # 784): without such tokens every space, or every word, is lost.
        raise mismatch("has no token starting with the escaped space U+2581 that this tokenizer writes spaces as")


def read_checked_info(path: str | os.PathLike) -> ModelInfo:
    """The ModelInfo of a GGUF that llama.cpp can load without asserting or allocating from a damaged header:
    FileNotFoundError, NotGGUFError, DamagedModelError, NotAModelError or UnsupportedModelError otherwise."""
    path = check_gguf(path)
    meta, tensors = read_header(path)
    check_model_header(Path(path), meta, tensors)
    return model_info(path, meta, tensors)
