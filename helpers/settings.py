"""Generation settings: one frozen dataclass, validated, with named presets.

Defaults follow Meta's chat example for Llama 2 (`example_chat_completion.py`: temperature 0.6, top_p 0.9).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerationSettings:
    # --- length -------------------------------------------------------------------------------
    max_tokens: int = 512  # 1..32768: tokens to generate at most (the context may lower it)

    # --- sampling -------------------------------------------------------------------------------
    temperature: float = 0.6  # 0..2: 0 = always the most likely token (greedy)
    top_p: float = 0.9  # (0, 1]: keep the smallest set of tokens whose probabilities sum to top_p
    top_k: int = 40  # 0..1000: keep the k most likely tokens (0 = no limit)
    min_p: float = 0.05  # 0..1: drop tokens less likely than min_p x the most likely one
    repeat_penalty: float = 1.1  # 1..2: > 1 discourages repeating recent tokens (1 = off)

    # --- reproducibility and stopping ------------------------------------------------------------
    seed: int | None = None  # 0..2**32-2, or None for a fresh random seed each time (see _RANGES)
    stop: tuple[str, ...] = field(default_factory=tuple)  # generation ends before any of these strings

    # --- speed ------------------------------------------------------------------------------------
    # Reuse the KV cache of the previous prompt and answer (llama.cpp server's name): only the tokens after
    # the longest common prefix are evaluated. Batched and single-token evaluation round differently, so a
    # cached run can diverge from a fresh one after a while; False evaluates every prompt afresh, and the
    # same seed then always gives the same text.
    cache_prompt: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            try:
                object.__setattr__(self, "stop", tuple(self.stop))
            except TypeError:  # None, a number: not a collection of strings
                raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}.") from None
        validate(self)

    def replace(self, **changes) -> GenerationSettings:
        return dataclasses.replace(self, **changes)


_RANGES = {
    # field: (low, high, low_inclusive, integer)
    "max_tokens": (1, 32768, True, True),
    "temperature": (0.0, 2.0, True, False),
    "top_p": (0.0, 1.0, False, False),
    "top_k": (0, 1000, True, True),
    "min_p": (0.0, 1.0, True, False),
    "repeat_penalty": (1.0, 2.0, True, False),
    # 2**32-1 is llama.cpp's LLAMA_DEFAULT_SEED, which its sampler reads as "draw a random seed"
    # (llama-sampler.cpp, get_rng_seed): it would not reproduce a text, so it is not a seed here.
    "seed": (0, 2**32 - 2, True, True),
}


def validate(settings: GenerationSettings) -> None:
    """Raise ValueError naming the first field outside its range."""
    for name, (low, high, low_inclusive, integer) in _RANGES.items():
        value = getattr(settings, name)
        if name == "seed" and value is None:
            continue
        kind = "an integer" if integer else "a number"
        bracket = "[" if low_inclusive else "("
        allowed = f"{name} must be {kind} in {bracket}{low}, {high}]"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ValueError(f"{allowed}, got {value!r}.")
        if not math.isfinite(value) or value > high or value < low or (value == low and not low_inclusive):
            raise ValueError(f"{allowed}, got {value!r}.")
    for s in settings.stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must hold non-empty strings, got {s!r}.")
    if not isinstance(settings.cache_prompt, bool):
        raise ValueError(f"cache_prompt must be True or False, got {settings.cache_prompt!r}.")


PRESETS = {
    "Precise": GenerationSettings(temperature=0.2, top_p=0.8, top_k=20),
    "Balanced": GenerationSettings(),
    "Creative": GenerationSettings(temperature=1.0, top_p=0.95, top_k=100, repeat_penalty=1.05),
}
