"""The small interface generation needs from an engine, so that more than one can drive the same helpers.

`helpers.engine.llama_backend.LlamaCppBackend` implements it over an in-process `llama_cpp.Llama`; a remote
OpenAI-compatible server can implement the same methods (tokenize locally or through the server, and turn
`complete` into one streamed `/v1/completions` request with the prompt as token ids).

Everything here is called by `helpers.engine.model.Model`, which owns the backend, runs `complete` on its one
engine thread and makes sure nothing is called after `close`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from helpers.settings import GenerationSettings


@dataclass(frozen=True)
class PromptProgress:
    """`done` of `total` prompt tokens are in the KV cache; `cached` of them were reused from earlier."""

    done: int
    total: int
    cached: int


@dataclass(frozen=True)
class SampledToken:
    """One generated token: its id, its bytes (empty for an end-of-generation token), and whether it ends
    the answer (end of turn / end of sequence)."""

    id: int
    piece: bytes
    end_of_generation: bool


@dataclass(frozen=True)
class DraftCheck:
    """Speculative decoding: `proposed` drafted tokens were checked in one batch and the model kept the first
    `accepted` of them (they follow as `SampledToken`s)."""

    proposed: int
    accepted: int


class Backend(Protocol):
    """What `Model` needs. Tokenizer methods may be called from any thread; `complete` runs on the model's
    engine thread, one at a time; `interrupt` may be called from any thread while `complete` runs."""

    metadata: dict[str, str]
    add_bos: bool  # the tokenizer puts a BOS token before a prompt

    def n_ctx(self) -> int: ...
    def n_vocab(self) -> int: ...
    def token_bos(self) -> int: ...
    def token_eos(self) -> int: ...
    def is_control(self, token: int) -> bool: ...

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text` without a BOS; `special=True` turns control-token spellings into control tokens."""

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes: ...

    def complete(
        self,
        prompt: Sequence[int],
        settings: GenerationSettings,
        seed: int,
        cancel: threading.Event,
    ) -> Iterator[PromptProgress | SampledToken | DraftCheck]:
        """Evaluate `prompt` (reusing the KV cache of the longest common prefix when
        `settings.cache_prompt`), reporting `PromptProgress`, then sample up to `settings.max_tokens` tokens
        (with `settings.speculative`, a `DraftCheck` before the tokens of each verified draft).
        Ends early, leaving the cache consistent, once `cancel` is set or `interrupt()` was called."""

    def interrupt(self) -> None:
        """Make a running `complete` stop as soon as it can, even inside one long prompt computation."""

    def cached_tokens(self) -> list[int]:
        """The token ids whose keys and values the KV cache holds, in order."""

    def close(self) -> None:
        """Free the engine's memory; called once, with no `complete` running."""
