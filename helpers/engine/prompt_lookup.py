"""Prompt-lookup drafting for speculative decoding: the next tokens are guessed by finding the last few tokens
earlier in the context (the prompt and the answer so far) and proposing what followed them there.

The idea is apoorvumang's prompt-lookup decoding (llama-cpp-python's `LlamaPromptLookupDecoding`, llama.cpp's
`ngram-simple`). Here the n-grams are kept in a dictionary updated as tokens arrive (no scan of the context
per token), the latest earlier occurrence wins (it is the likeliest to continue the same way), and drafting
pauses when drafts keep failing, so a free-form answer that repeats nothing pays almost nothing for it. The
sizes below were chosen with `bench/speculative.py` (docs/performance.md, "Speculative decoding").
"""

from __future__ import annotations

from collections.abc import Iterable

NGRAM_SIZES = (3, 2)  # the longest match first; a 1-gram match drafted wrong too often to pay on a CPU
MAX_DRAFT = 10  # tokens proposed at most per verification batch
MISSES_BEFORE_PAUSE = 2  # drafts in a row with nothing kept ...
FIRST_PAUSE, LONGEST_PAUSE = 4, 64  # ... pause drafting for this many tokens, doubling while it keeps failing


class PromptLookup:
    """Drafts for one generation. `add` the tokens as they are generated; `draft` proposes a continuation of
    everything added so far; `record` what the model kept, which drives the pause rule."""

    def __init__(
        self,
        context: Iterable[int],
        *,
        ngram_sizes: tuple[int, ...] | None = None,
        max_draft: int | None = None,
        misses_before_pause: int | None = None,
    ):
        """None: the module's values (read when the drafter is made, so a benchmark can try others)."""
        self.sizes = tuple(sorted(ngram_sizes or NGRAM_SIZES, reverse=True))
        self.max_draft = max_draft or MAX_DRAFT
        self.misses_before_pause = misses_before_pause or MISSES_BEFORE_PAUSE
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self._misses = 0
        self._pause = 0  # tokens to generate before the next draft
        self._next_pause = FIRST_PAUSE
        self.add(context)

    def add(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams that end just before the new token now have a continuation
            for n in self.sizes:
                if end >= n:
                    self._after[tuple(self.tokens[end - n : end])] = end
            self._pause = max(0, self._pause - 1)

    def draft(self, limit: int) -> list[int]:
        """Up to min(limit, max_draft) tokens that followed the latest earlier occurrence of the longest
        n-gram the context ends with; [] while paused or when nothing matches."""
        limit = min(limit, self.max_draft)
        if limit < 1 or self._pause:
            return []
        for n in self.sizes:
            if len(self.tokens) > n and (start := self._after.get(tuple(self.tokens[-n:]))) is not None:
                return self.tokens[start : start + limit]
        return []

    def record(self, proposed: int, kept: int) -> None:
        """The outcome of one verified draft: after `misses_before_pause` drafts in a row with nothing kept,
        drafting pauses, for twice as long each time it fails again, until a draft is kept."""
        if kept:
            self._misses, self._next_pause = 0, FIRST_PAUSE
            return
        self._misses += 1
        if self._misses >= self.misses_before_pause:
            self._pause, self._misses = self._next_pause, 0
            self._next_pause = min(2 * self._next_pause, LONGEST_PAUSE)
