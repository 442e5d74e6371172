"""Generation settings: one frozen dataclass, validated, with named presets.

Defaults follow Meta's chat example for Llama 2 (`example_chat_completion.py`: temperature 0.6, top_p 0.9).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from helpers.errors import UsageError


def _setting(default, label: str, bounds: tuple, step, help: str, *, low_inclusive: bool = True):
    """A field with its description: the label people read, its allowed range, the step of a slider and a
    line of help. `validate`, the chat panel's controls and the command line are all built from it."""
    return field(
        default=default,
        metadata={"label": label, "range": bounds, "low_inclusive": low_inclusive, "step": step, "help": help},
    )


SPECULATIVE = (None, "prompt-lookup")  # None: off


@dataclass(frozen=True)
class GenerationSettings:
    # --- length -------------------------------------------------------------------------------
    max_tokens: int = _setting(
        512, "Max new tokens", (1, 32768), 1, "tokens to generate at most (the context may lower it)"
    )

    # --- sampling -------------------------------------------------------------------------------
    temperature: float = _setting(0.6, "Temperature", (0.0, 2.0), 0.05, "0 = always the most likely token (greedy)")
    top_p: float = _setting(
        0.9,
        "Top p",
        (0.0, 1.0),
        0.05,
        "keep the smallest set of tokens whose probabilities sum to top p",
        low_inclusive=False,
    )
    top_k: int = _setting(40, "Top k", (0, 1000), 1, "keep the k most likely tokens (0 = no limit)")
    min_p: float = _setting(0.05, "Min p", (0.0, 1.0), 0.01, "drop tokens less likely than min p x the most likely")
    repeat_penalty: float = _setting(
        1.1, "Repeat penalty", (1.0, 2.0), 0.05, "> 1 discourages repeating recent tokens (1 = off)"
    )

    # --- reproducibility and stopping ------------------------------------------------------------
    # 2**32-1 is llama.cpp's LLAMA_DEFAULT_SEED, which its sampler reads as "draw a random seed"
    # (llama-sampler.cpp, get_rng_seed): it would not reproduce a text, so it is not a seed here.
    seed: int | None = _setting(None, "Seed", (0, 2**32 - 2), 1, "none: a fresh random seed each time")
    stop: tuple[str, ...] = field(  # generation ends before any of these strings
        default_factory=tuple, metadata={"label": "Stop strings", "help": "generation ends before any of these"}
    )

    # --- speed ------------------------------------------------------------------------------------
    # Reuse the KV cache of the previous prompt and answer (llama.cpp server's name): only the tokens after
    # the longest common prefix are evaluated. Batched and single-token evaluation round differently, so a
    # cached run can diverge from a fresh one after a while; False evaluates every prompt afresh, and the
    # same seed then always gives the same text.
    cache_prompt: bool = field(
        default=True,
        metadata={
            "label": "Prompt cache",
            "help": "reuse what the last prompt left in the KV cache (faster follow-ups)",
        },
    )

    # Speculative decoding: "prompt-lookup" drafts the next tokens from the context (the prompt and the answer
    # so far) and the model checks a whole draft in one batch, keeping the part it would have generated itself,
    # so the text is the same (issue 20; measured in docs/performance.md, "Speculative decoding").
    speculative: str | None = field(
        default=None,
        metadata={
            "label": "Speculative decoding",
            "choices": SPECULATIVE,
            "help": "prompt-lookup: faster answers that repeat the prompt (summaries, rewrites, code fixes)",
        },
    )

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            try:
                object.__setattr__(self, "stop", tuple(self.stop))
            except TypeError:  # None, a number: not a collection of strings
                raise UsageError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}.") from None
        validate(self)

    def replace(self, **changes) -> GenerationSettings:
        return dataclasses.replace(self, **changes)


def setting_info(name: str) -> dict:
    """A setting's metadata: label, help, for numbers range, low_inclusive and step, for a choice its choices."""
    return dict(_FIELDS[name].metadata)


_FIELDS = {f.name: f for f in dataclasses.fields(GenerationSettings)}
# field: (low, high, low_inclusive, integer), from the fields' metadata
_RANGES = {
    f.name: (*f.metadata["range"], f.metadata["low_inclusive"], "int" in str(f.type))
    for f in _FIELDS.values()
    if "range" in f.metadata
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
            raise UsageError(f"{allowed}, got {value!r}.")
        if not math.isfinite(value) or value > high or value < low or (value == low and not low_inclusive):
            raise UsageError(f"{allowed}, got {value!r}.")
    for s in settings.stop:
        if not isinstance(s, str) or not s:
            raise UsageError(f"stop must hold non-empty strings, got {s!r}.")
    if not isinstance(settings.cache_prompt, bool):
        raise UsageError(f"cache_prompt must be True or False, got {settings.cache_prompt!r}.")
    if settings.speculative not in SPECULATIVE:
        raise UsageError(f"speculative must be None (off) or 'prompt-lookup', got {settings.speculative!r}.")


PRESETS = {
    "Precise": GenerationSettings(temperature=0.2, top_p=0.8, top_k=20),
    "Balanced": GenerationSettings(),
    "Creative": GenerationSettings(temperature=1.0, top_p=0.95, top_k=100, repeat_penalty=1.05),
}
