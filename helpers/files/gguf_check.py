"""Checks a GGUF model's header against llama.cpp's own limits before llama.cpp sees the file.

llama.cpp stops the whole process (GGML_ASSERT, SIGABRT: in a notebook the kernel dies without a word) on some
header values, and allocates from others. Each limit below cites where llama.cpp asserts or allocates; the
sources are those vendored in llama-cpp-python 0.3.35 (vendor/llama.cpp/src/llama-model.cpp `load_hparams`,
llama-model-loader.cpp `create_tensor`, llama-vocab.cpp `load`). The GGUF structure itself (lengths, counts,
tensor shapes, types and offsets, alignment) is checked while `helpers.files.gguf_header.read_header` reads it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from helpers.errors import DamagedModelError, NotAModelError
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
    if meta.get("tokenizer.ggml.model") not in ("none", "no_vocab"):  # llama-vocab.cpp: a model without a vocabulary
        _check_vocabulary(path, meta, tensors, arch)


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


def _check_vocabulary(path, meta: dict, tensors: list[TensorInfo], arch: str) -> None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, GGUFArray) or tokens.items is None or not all(isinstance(t, bytes) for t in tokens.items):
        raise _damaged(path, "its vocabulary (tokenizer.ggml.tokens) is missing or not a list of strings")
    n_vocab = tokens.length
    if n_vocab == 0:
        raise _damaged(path, "its vocabulary is empty")
    # llama-vocab.cpp asserts that no two tokens have the same text (an empty one is renamed [EMPTY_<id>]).
    texts = {text or f"[EMPTY_{i}]".encode() for i, text in enumerate(tokens.items)}
    if len(texts) != n_vocab:
        raise _damaged(path, f"its vocabulary lists {n_vocab - len(texts):,} token(s) twice")
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


def read_checked_info(path: str | os.PathLike) -> ModelInfo:
    """The ModelInfo of a GGUF that llama.cpp can load without asserting or allocating from a damaged header:
    FileNotFoundError, NotGGUFError, DamagedModelError, NotAModelError or UnsupportedModelError otherwise."""
    path = check_gguf(path)
    meta, tensors = read_header(path)
    check_model_header(Path(path), meta, tensors)
    return model_info(path, meta, tensors)
