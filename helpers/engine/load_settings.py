"""The settings `load_model` passes to `llama_cpp.Llama`, checked before anything is loaded or unloaded: each
with the type and range llama-cpp-python 0.3.35's `Llama.__init__` and llama.cpp (llama-context.cpp, ggml.h,
common/arg.cpp) give it, so that a value llama.cpp would crash on or silently misuse is a `UsageError` naming
the setting and what it accepts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from helpers.errors import UsageError
from helpers.files.gguf_header import ModelInfo

MAX_DEFAULT_CTX = 4096
GGML_MAX_N_THREADS = 512  # ggml.h: a thread pool has at most this many threads (its CPU masks have this size)
_FLOAT32_MAX = 3.4028234663852886e38  # the Llama's float settings are C floats: a larger value becomes inf
_INT32_MAX, _UINT32_MAX = 2**31 - 1, 2**32 - 1
# common/arg.cpp `kv_cache_types`: the types llama.cpp's own tools allow for the KV cache (ggml.h numbers).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}


def usable_cpus() -> int:
    """The logical CPUs this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def max_threads() -> int:
    """More compute threads than CPUs only makes them wait on each other; past ggml's pool size llama.cpp
    writes outside its arrays (`n_threads=10**6` crashed the next generation)."""
    return min(usable_cpus(), GGML_MAX_N_THREADS)


# --- one checker per kind of value: None when `value` is acceptable, else what is accepted -----------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flag(none_ok: bool = False) -> Callable:
    def check(value):
        if isinstance(value, bool) or (none_ok and value is None):
            return None
        return "True or False" + (" (or None: llama.cpp's default)" if none_ok else "")

    return check


def _integer(low: int, high: int, *, none_ok: bool = False, extra: tuple[int, ...] = (), meaning: str = "") -> Callable:
    def check(value):
        if (none_ok and value is None) or (_is_int(value) and (low <= value <= high or value in extra)):
            return None
        also = "".join(f" or {e}" for e in extra)
        return f"an integer from {low} to {high}{also}{meaning}" + (" or None" if none_ok else "")

    return check


def _choice(names: dict[int, str], *, none_ok: bool = False) -> Callable:
    def check(value):
        if (none_ok and value is None) or (_is_int(value) and value in names):
            return None
        return "one of " + ", ".join(f"{k} ({v})" for k, v in names.items()) + (" or None" if none_ok else "")

    return check


def _real(accepts: Callable[[float], bool], allowed: str) -> Callable:
    def check(value):
        if _is_number(value) and abs(value) <= _FLOAT32_MAX and accepts(value):
            return None
        return allowed

    return check


def _instance(kinds: Callable[[], tuple], allowed: str) -> Callable:
    def check(value):
        return None if value is None or isinstance(value, kinds()) else allowed

    return check


def _text(value):
    return None if value is None or isinstance(value, str) else "a string or None"


def _file(value):
    if value is None or (isinstance(value, (str, os.PathLike)) and os.path.isfile(value)):
        return None
    return "the path of an existing file, or None"


def _callable(value):
    return None if value is None or callable(value) else "a chat handler (a callable) or None"


def _tensor_split(value):
    import llama_cpp

    devices = llama_cpp.LLAMA_MAX_DEVICES
    allowed = f"None or a list of at most {devices} proportions (finite numbers >= 0, not all 0), one per GPU"
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= devices:
        return allowed
    if not all(_is_number(v) and 0 <= v <= _FLOAT32_MAX for v in value) or not any(value):
        return allowed
    return None


def _kv_overrides(value):
    allowed = (
        "None or a dict from GGUF keys (strings of at most 127 UTF-8 bytes) to True/False, integers, finite "
        "numbers or strings of at most 127 UTF-8 bytes"
    )
    if value is None:
        return None
    if not isinstance(value, dict):
        return allowed
    for key, item in value.items():
        if not _short_text(key) or not key:
            return allowed
        if isinstance(item, str) and not _short_text(item):
            return allowed
        if not isinstance(item, (bool, int, float, str)) or (isinstance(item, float) and not math.isfinite(item)):
            return allowed
        if _is_int(item) and not -(2**63) <= item < 2**63:  # stored as int64
            return allowed
    return None


def _short_text(text) -> bool:
    """A string llama-cpp-python can copy into llama.cpp's 128-byte, NUL-terminated key and value fields."""
    try:
        return isinstance(text, str) and len(text.encode("utf-8")) <= 127 and "\0" not in text
    except UnicodeEncodeError:
        return False


def _thread_count(value):
    limit = max_threads()
    if value is None or (_is_int(value) and 1 <= value <= limit):
        return None
    return f"an integer from 1 to {limit} (the CPUs this process may use) or None for the default"


def _draft_models() -> tuple:
    from llama_cpp.llama_speculative import LlamaDraftModel

    return (LlamaDraftModel,)


def _tokenizers() -> tuple:
    from llama_cpp.llama_tokenizer import BaseLlamaTokenizer

    return (BaseLlamaTokenizer,)


def _checks() -> dict[str, Callable]:
    import llama_cpp as L

    return {
        # model parameters
        "split_mode": _choice({0: "none", 1: "layer", 2: "row", 3: "tensor"}),
        "main_gpu": _integer(0, max(L.LLAMA_MAX_DEVICES - 1, 0)),
        "tensor_split": _tensor_split,
        "vocab_only": _flag(),
        "use_mmap": _flag(),
        "use_mlock": _flag(),
        "kv_overrides": _kv_overrides,
        # context parameters
        # llama-cpp-python's own methods only: helpers draw from GenerationSettings(seed=...) each time
        "seed": _integer(0, _UINT32_MAX, extra=(-1,), meaning=" (-1 and 4294967295: random)"),
        "n_batch": _integer(1, _INT32_MAX),
        "n_ubatch": _integer(1, _INT32_MAX),
        "n_threads_batch": _thread_count,
        "rope_scaling_type": _choice(
            {-1: "from the model", 0: "none", 1: "linear", 2: "yarn", 3: "longrope"}, none_ok=True
        ),
        "pooling_type": _choice({-1: "from the model", 0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}),
        "attention_type": _choice({-1: "from the model", 0: "causal", 1: "non-causal"}),
        # llama-context.cpp: 0 takes the model's own value. RoPE's frequencies base**(-2i/d) must fall from one
        # dimension to the next, so a base must be above 1; a negative one made every answer "....".
        "rope_freq_base": _real(lambda v: v == 0 or v > 1, "0 (the model's own) or a finite number above 1"),
        "rope_freq_scale": _real(lambda v: v >= 0, "0 (the model's own) or a finite number above 0"),
        # llama-context.cpp: a negative yarn value takes the model's own; the extrapolation factor is a mix in
        # [0, 1]; an attention factor of 0 would scale every rotated query and key to nothing.
        "yarn_ext_factor": _real(lambda v: v <= 1, "a negative number (the model's own) or a number in [0, 1]"),
        "yarn_attn_factor": _real(lambda v: v != 0, "a negative number (the model's own) or a finite number above 0"),
        "yarn_beta_fast": _real(lambda v: True, "a negative number (the model's own) or a finite number >= 0"),
        "yarn_beta_slow": _real(lambda v: True, "a negative number (the model's own) or a finite number >= 0"),
        "yarn_orig_ctx": _integer(0, _UINT32_MAX, meaning=" (0: the model's own)"),
        "logits_all": _flag(),
        "embedding": _flag(),
        "offload_kqv": _flag(),
        "flash_attn": _flag(),
        "op_offload": _flag(none_ok=True),
        "swa_full": _flag(none_ok=True),
        "type_k": _choice({v: k for k, v in KV_CACHE_TYPES.items()}, none_ok=True),
        "type_v": _choice({v: k for k, v in KV_CACHE_TYPES.items()}, none_ok=True),
        # llama-cpp-python's own
        "no_perf": _flag(),
        "last_n_tokens_size": _integer(0, _INT32_MAX),
        "lora_base": _file,
        "lora_path": _file,
        "lora_scale": _real(lambda v: True, "a finite number"),
        "numa": lambda v: (
            None
            if isinstance(v, bool) or (_is_int(v) and 0 <= v < L.GGML_NUMA_STRATEGY_COUNT)
            else f"True, False or a NUMA strategy from 0 to {L.GGML_NUMA_STRATEGY_COUNT - 1}"
        ),
        "chat_format": _text,
        "chat_handler": _callable,
        "draft_model": _instance(_draft_models, "a llama_cpp.llama_speculative.LlamaDraftModel or None"),
        "tokenizer": _instance(_tokenizers, "a llama_cpp.llama_tokenizer.BaseLlamaTokenizer or None"),
        "spm_infill": _flag(),
    }


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def known_settings() -> list[str]:
    """The keyword arguments `load_model` passes on to `llama_cpp.Llama` (besides its own)."""
    return sorted(_checks())


def check_load_settings(n_gpu_layers, n_ctx, n_threads, info: ModelInfo, kwargs: dict | None = None, verbose=False):
    """Raise UsageError for settings llama.cpp would reject, crash on or silently misuse, before anything is
    unloaded."""
    checks = _checks()
    kwargs = kwargs or {}
    unknown = sorted(set(kwargs) - set(checks))
    if unknown:
        raise UsageError(
            f"Unknown load_model setting(s): {', '.join(unknown)}. Known llama_cpp.Llama settings: "
            f"{', '.join(sorted(checks))} (and load_model's own n_gpu_layers, n_ctx, n_threads, verbose)."
        )
    for name, value in kwargs.items():
        if (allowed := checks[name](value)) is not None:
            raise UsageError(f"{name} must be {allowed}; got {_shown(value)}.")
    if n_gpu_layers != "auto" and (not _is_int(n_gpu_layers) or not -1 <= n_gpu_layers <= _INT32_MAX):
        raise UsageError(
            f'n_gpu_layers must be "auto", -1 (all layers) or a number of layers (0 or more), got {n_gpu_layers!r}.'
        )
    limit = max(info.ctx_train, MAX_DEFAULT_CTX) * 8
    if n_ctx is not None and (not _is_int(n_ctx) or not 16 <= n_ctx <= limit):
        raise UsageError(
            f"n_ctx must be an integer from 16 to {limit} (8x the model's training context of {info.ctx_train}), "
            f"or None for the default; got {n_ctx!r}."
        )
    if (allowed := _thread_count(n_threads)) is not None:
        raise UsageError(f"n_threads must be {allowed}; got {n_threads!r}.")
    if not isinstance(verbose, bool):
        raise UsageError(f"verbose must be True or False, got {verbose!r}.")
