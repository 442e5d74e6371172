"""Prompt-lookup drafting for speculative decoding: the next tokens are guessed by finding the last few tokens
earlier in the context (the prompt and the answer so far) and proposing what followed them there, as many of
them as pay for their verification on this model and machine.

The idea is apoorvumang's prompt-lookup decoding (llama-cpp-python's `LlamaPromptLookupDecoding`, llama.cpp's
`ngram-simple`). Here the n-grams are kept in a dictionary updated as tokens arrive (no scan of the context
per token) and the latest earlier occurrence wins. How long a draft is comes from two measurements made while
the model generates (docs/performance.md, "Speculative decoding"):

- `StepCosts`: the seconds a step takes by the number of tokens it evaluates (the batch and the sampling of
  each drafted position), so a draft is sized to what a batch really costs here: on the project's 2-core
  CPUs a 135M model pays 0.1 to 0.6 of a token for each drafted one, a GPU almost nothing.
- The chance that a drafted token is kept, by how long the match behind it is: every draft the lookup
  proposes, verified or not, is compared with the tokens the model then produces, so the estimate keeps
  learning while drafting pays nothing. When drafts keep failing the estimate falls until no draft is worth
  its cost and drafting stops; it starts again when the lookup would have been right.

A draft of k tokens is worth E(k) / cost(k+1), E(k) = 1 + P(first kept) + P(first two kept) + ...: the tokens
a step yields on average over what the step costs, against 1 for a step without a draft.
"""

from __future__ import annotations

from collections.abc import Iterable

NGRAM_SIZES = (3, 2)  # the longest match first; a 1-gram match drafted wrong too often to pay on a CPU
MAX_DRAFT = 16  # tokens proposed at most per verification batch (the costs choose how many of them)
LONGEST_MATCH = 8  # matches this long or longer share one estimate of the chance a token is kept
# The chance that the next drafted token is kept after a match of m tokens, before this generation has shown
# its own: measured with SmolLM2-135M-Instruct at temperature 0.6 over bench/speculative.py's seven tasks
# (476 drafts after a 2-token match kept their first token 49 % of the time, 507 after 8 or more 90 %).
PRIOR_KEPT = {2: 0.5, 3: 0.6, 4: 0.65, 5: 0.75, 6: 0.75, 7: 0.85, 8: 0.9}
PRIOR_WEIGHT = 4.0  # the prior counts as this many observed tokens
PRIOR_SLOPE = 0.5  # each drafted token costs this much of a 1-token step until a batch has been timed
# After this many steps in a row without a draft, a draft worth making at PRIOR_SLOPE is made anyway, so that
# batches timed while the machine was busy (which can make every draft look too dear) are timed again.
PROBE_AFTER = 64


class StepCosts:
    """What a generation step costs on one loaded model, by the number of tokens it evaluates (1: no draft),
    as a moving average of the measured seconds. Sizes not measured yet are read off a line through 1 and
    the measured ones (PRIOR_SLOPE before any)."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self.since_batch = 0  # steps of one token timed since the last batch

    def observe(self, tokens: int, seconds: float) -> None:
        self.since_batch = self.since_batch + 1 if tokens == 1 else 0
        count = self._count.get(tokens, 0) + 1
        weight = max(0.1, 1 / count)  # the mean of the first ten, then a moving average
        self._seconds[tokens] = (1 - weight) * self._seconds.get(tokens, seconds) + weight * seconds
        self._count[tokens] = count

    def relative(self, tokens: int) -> float:
        """The cost of a step of `tokens` tokens over the cost of a 1-token step (at least 1)."""
        if tokens <= 1:
            return 1.0
        one = self._seconds.get(1)
        if one and self._count.get(tokens, 0) >= 2:
            return max(1.0, self._seconds[tokens] / one)
        return 1.0 + self.slope() * (tokens - 1)

    def slope(self) -> float:
        """Cost per drafted token, relative to a 1-token step, over the sizes measured (count-weighted)."""
        one = self._seconds.get(1)
        sizes = [n for n in self._seconds if n > 1] if one else []
        if not sizes:
            return PRIOR_SLOPE
        weights = {n: min(self._count[n], 20) for n in sizes}
        per_token = sum(weights[n] * max(0.0, self._seconds[n] / one - 1) / (n - 1) for n in sizes)
        return per_token / sum(weights.values())


class PromptLookup:
    """Drafts for one generation. `add` the tokens as they are generated; `draft` proposes a continuation of
    everything added so far, as long as it pays; `candidate` is the lookup alone."""

    def __init__(
        self,
        context: Iterable[int],
        *,
        costs: StepCosts | None = None,
        ngram_sizes: tuple[int, ...] | None = None,
        max_draft: int | None = None,
    ):
        """None: the module's values (read when the drafter is made, so a benchmark can try others)."""
        self.costs = costs or StepCosts()
        self.sizes = tuple(sorted(ngram_sizes or NGRAM_SIZES, reverse=True))
        self.max_draft = max_draft or MAX_DRAFT
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self._kept = {m: PRIOR_KEPT[m] * PRIOR_WEIGHT for m in PRIOR_KEPT}  # per match length: tokens kept ...
        self._seen = {m: PRIOR_WEIGHT for m in PRIOR_KEPT}  # ... of tokens drafted (prior included)
        self._watch: tuple[int, list[int], int] | None = None  # (where it starts, a draft, its match length)
        self.add(context)

    def add(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams that end just before the new token now have a continuation
            for n in self.sizes:
                if end >= n:
                    self._after[tuple(self.tokens[end - n : end])] = end
            if self._watch is not None:
                self._check_watched(token, end)

    def candidate(self, limit: int) -> tuple[list[int], int]:
        """(up to min(limit, max_draft) tokens that followed the latest earlier occurrence of the longest
        n-gram the context ends with, the length of that match); ([], 0) when nothing matches."""
        limit = min(limit, self.max_draft)
        if limit < 1:
            return [], 0
        for n in self.sizes:
            if len(self.tokens) > n and (start := self._after.get(tuple(self.tokens[-n:]))):
                match = n
                while (
                    match < LONGEST_MATCH
                    and start > match
                    and self.tokens[start - match - 1] == self.tokens[-match - 1]
                ):
                    match += 1
                return self.tokens[start : start + limit], match
        return [], 0

    def draft(self, limit: int) -> list[int]:
        """The candidate cut to the length worth verifying (see the module's docstring); [] when no draft is."""
        proposal, match = self.candidate(self.max_draft)
        if not proposal:
            return []
        if self._watch is None:  # every proposal teaches the estimate, verified or not
            self._watch = (len(self.tokens), proposal, match)
        limit = min(limit, len(proposal))
        k = self.worth(match, limit)
        if not k and self.costs.since_batch >= PROBE_AFTER:  # time a batch again (see PROBE_AFTER)
            k = self.worth(match, limit, lambda n: 1 + PRIOR_SLOPE * (n - 1))
        return proposal[:k]

    def worth(self, match: int, limit: int, relative=None) -> int:
        """The draft length k <= limit that makes the most tokens per cost, 0 if no draft beats a plain step.
        `relative(n)`: what a step of n tokens costs against one (default: the measured `StepCosts`)."""
        relative = relative or self.costs.relative
        best, best_k, chance, tokens = 1.0, 0, 1.0, 1.0
        for k in range(1, limit + 1):
            chance *= self.kept_chance(match + k - 1)
            tokens += chance
            value = tokens / relative(k + 1)
            if value > best:
                best, best_k = value, k
        return best_k

    def kept_chance(self, match: int) -> float:
        """The estimated chance that a drafted token is kept after a match of `match` tokens."""
        m = _estimate_for(match)
        return self._kept[m] / self._seen[m]

    def _check_watched(self, token: int, at: int) -> None:
        start, proposal, match = self._watch
        i = at - start
        m = _estimate_for(match + i)
        self._seen[m] += 1
        if token == proposal[i]:
            self._kept[m] += 1
            if i + 1 < len(proposal):
                return
        self._watch = None


def _estimate_for(match: int) -> int:
    """The match length whose estimate a match of `match` tokens shares (2 to LONGEST_MATCH)."""
    return min(max(match, min(PRIOR_KEPT)), LONGEST_MATCH)
