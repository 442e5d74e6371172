"""Generation: stream text from a chat or a prompt, stop at any moment (mid-prompt too), reuse the KV cache of
the previous prompt, and report honest statistics.

Tokens come from the model's engine (`Model.complete`) on the exact token ids of `encode_chat`, so what the
model sees is what the template says. Sampling is llama-cpp-python's own (same sampler chain and seed
handling as `create_completion`); this module adds stop strings, UTF-8-safe streaming, context fitting,
progress and timing.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from helpers.context_window import fit_to_context
from helpers.engine.backend import DraftCheck, PromptProgress
from helpers.engine.model import State, as_model, check_text
from helpers.errors import ContextOverflowError, ModelUnloadedError, PromptError, UsageError
from helpers.settings import GenerationSettings


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache of the previous generation (0 when fresh)
    prompt_read: int = 0  # prompt tokens in the KV cache so far (cached ones included)
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    tokens_per_second: float = 0.0  # generation only: tokens after the first / time after the first
    finish_reason: str = ""  # "stop" | "length" | "cancelled"
    dropped_turns: int = 0  # user/assistant pairs left out so the prompt fits the context
    seed: int = 0
    draft_proposed: int = 0  # speculative decoding: drafted tokens the model checked
    draft_accepted: int = 0  # ... and the ones it kept (they count in completion_tokens too)

    def line(self) -> str:
        cached = f" ({self.cached_tokens} from cache)" if self.cached_tokens else ""
        dropped = f" | {self.dropped_turns} oldest turns dropped" if self.dropped_turns else ""
        if self.completion_tokens == 0 and self.finish_reason == "cancelled":
            if not self.prompt_tokens:
                return "stopped before the prompt was made | finish: cancelled"
            return (
                f"{self.prompt_tokens:,} prompt tokens{cached} | stopped while reading the prompt "
                f"({self.prompt_read:,} of {self.prompt_tokens:,} in the KV cache) | finish: cancelled{dropped}"
            )
        speed = f"{self.tokens_per_second:.1f} tokens/s | " if self.completion_tokens > 1 else ""
        drafts = ""
        if self.draft_proposed:
            kept = round(100 * self.draft_accepted / self.draft_proposed)
            drafts = f"{kept} % of {self.draft_proposed} drafted tokens kept | "
        return (
            f"{self.prompt_tokens} prompt tokens{cached} | {self.completion_tokens} generated | {speed}{drafts}"
            f"first token after {self.time_to_first_token_s:.2f} s | finish: {self.finish_reason}{dropped}"
        )


@dataclass
class Generation:
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)


def as_settings(settings) -> GenerationSettings:
    """`settings` as a `GenerationSettings`: None gives the defaults, a dict its fields (checked as the
    dataclass checks them)."""
    if settings is None:
        return GenerationSettings()
    if isinstance(settings, GenerationSettings):
        return settings
    if isinstance(settings, Mapping):
        known = [f.name for f in dataclasses.fields(GenerationSettings)]
        unknown = sorted(str(k) for k in settings if k not in known)
        if unknown:
            raise UsageError(f"Unknown setting(s): {', '.join(unknown)}; the settings are: {', '.join(known)}.")
        return GenerationSettings(**settings)
    raise UsageError(
        f"settings must be a GenerationSettings (or a dict of its fields, or None), got {type(settings).__name__}: "
        "GenerationSettings(max_tokens=200) or {'max_tokens': 200}."
    )


def as_messages(messages_or_prompt) -> list[dict]:
    if isinstance(messages_or_prompt, str):
        return [{"role": "user", "content": messages_or_prompt}]
    return list(messages_or_prompt)


class StopStrings:
    """Text pieces in, text out: UTF-8 decoded across token boundaries, cut before the first stop string,
    and holding back any end that could still become one."""

    def __init__(self, stops: Sequence[str], *, continuing: bool = False):
        self.stops = _StopSet(stops)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.started = continuing  # a continuation keeps its leading space

    def add(self, piece: bytes) -> tuple[str, bool]:
        """(text that is final now, whether a stop string was reached)."""
        held = len(self.pending)  # no stop string lies wholly in what was held back
        self.pending += self.decoder.decode(piece)
        if not self.started:  # Meta's decode drops the space SentencePiece puts before the answer
            self.pending = self.pending.lstrip()
            self.started, held = bool(self.pending), 0
        cut = self.stops.first(self.pending, held)
        if cut >= 0:
            ready, self.pending = self.pending[:cut], ""
            self.decoder.reset()  # what follows a stop string is dropped, incomplete characters included
            return ready, True
        keep = self.stops.held_back(self.pending)
        ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return ready, False

    def flush(self) -> str:
        rest, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return rest


class _StopSet:
    """Stop strings looked up by hashing and binary search, so that each new character costs time that grows with
    the stop strings' lengths, not with their number: with 100,000 of them, checking each one in turn took
    45-97 s for 512 tokens on a busy 2-core machine, this about 1,000 times less (bench/stop_strings.py)."""

    def __init__(self, stops: Sequence[str]):
        self.whole = frozenset(stops)
        self.ordered = sorted(self.whole)  # the stop strings starting with a text follow it here
        self.lengths = sorted({len(s) for s in self.whole})

    def first(self, text: str, new: int) -> int:
        """Where the earliest-starting stop string in `text` starts (-1: none), knowing that none lies wholly in
        `text[:new]`."""
        best = -1
        for end in range(new + 1, len(text) + 1):
            for n in self.lengths:
                if n > end:
                    break
                if (best < 0 or end - n < best) and text[end - n : end] in self.whole:
                    best = end - n
        return best

    def held_back(self, text: str) -> int:
        """Length of the longest end of `text` that could be the start of a stop string."""
        for n in range(min(self.lengths[-1] - 1 if self.lengths else 0, len(text)), 0, -1):
            end = text[-n:]
            i = bisect.bisect_left(self.ordered, end)
            if i < len(self.ordered) and self.ordered[i].startswith(end):
                return n
        return 0


def stream(
    llm,
    messages_or_prompt,
    settings: GenerationSettings | None = None,
    *,
    stop_event: threading.Event | None = None,
    template: str | None = None,
    stats: GenerationStats | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    allow_special_tags: bool = False,
    answer_prefix: str = "",
) -> Iterator[str]:
    """Yield the answer's text pieces as they are produced; `stats` (if given) is filled in as it goes.

    `llm` is a `helpers.Model` or a `llama_cpp.Llama`. A string prompt is a single user message. Setting
    `stop_event` ends the generation within one token, or within one graph computation while the prompt is
    read. `on_progress(done, total)` is called (in this thread) as prompt tokens are read. A Llama 2 message
    containing `[INST]`, `[/INST]`, `<<SYS>>` or `<</SYS>>` raises `SpecialTagError` (a ValueError) before the
    model is used, as Meta's reference refuses it, unless `allow_special_tags=True` sends it as written. On a server
    fed text (`connect(..., prompts="text")`), a message spelling a control token raises `ControlTokenError`
    (a ValueError) before anything is sent. `answer_prefix` is
    the start of the answer (a Continue): the prompt ends with it, left open, and the yielded text continues it.
    """
    model = as_model(llm)
    stats = stats if stats is not None else GenerationStats()
    clock = _Clock(stats)  # started now: the time to the first token includes building the prompt
    stats.finish_reason = "cancelled"  # until the engine starts
    planned = _plan(model, messages_or_prompt, as_settings(settings), template, stop_event,
                    allow_special_tags, answer_prefix)  # fmt: skip
    if planned is None or (stop_event is not None and stop_event.is_set()):
        return
    prompt, settings, stats.dropped_turns = planned
    stats.prompt_tokens = len(prompt)
    stats.seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**32 - 1)

    text = StopStrings(settings.stop, continuing=bool(answer_prefix))
    completion = model.complete(prompt, settings, stats.seed)
    stopped = False  # by the model's end-of-generation token, or by a stop string
    try:
        for event, at in completion.events(stop_event):
            if isinstance(event, PromptProgress):
                stats.prompt_read, stats.cached_tokens = event.done, event.cached
                if on_progress is not None:
                    on_progress(event.done, event.total)
                continue
            if isinstance(event, DraftCheck):
                stats.draft_proposed += event.proposed
                stats.draft_accepted += event.accepted
                continue
            if event.end_of_generation:
                stopped = True
                break
            clock.token(at)
            ready, stopped = text.add(event.piece)
            if ready:
                yield ready
            if stopped:
                break
        if rest := text.flush():
            yield rest
    finally:
        completion.close()  # the engine is free again before anything else uses this model
        stats.finish_reason = "stop" if stopped else "cancelled" if completion.cancelled else "length"
        clock.finish()
    if completion.cancelled and model.settled() is State.CLOSED:  # a failed load_model keeps it: just "cancelled"
        raise ModelUnloadedError(
            "The model was unloaded while generating (closed, or replaced by another load_model() call). Use the "
            "model load_model() returned last: re-run the cells after the load cell, the chat panel's too."
        )


def _plan(model, messages_or_prompt, settings, template, stop_event, allow_special_tags, answer_prefix):
    """(prompt token ids, settings, dropped turns): the dialog fitted to the context and ending with the answer
    prefix, and max_tokens lowered to the room left; None if `stop_event` was set while fitting."""
    if isinstance(messages_or_prompt, str) and not messages_or_prompt.strip():
        raise PromptError("The prompt is empty: write something for the model to answer.")
    messages = as_messages(messages_or_prompt)
    for i, message in enumerate(messages):
        if isinstance(message, dict):
            check_text(message.get("content"), f"Message {i + 1} ({message.get('role')})")
    check_text(answer_prefix, "The answer prefix")
    model.check_messages(messages, answer_prefix)  # a server fed text refuses control-token spellings
    prefix = model.tokenize(answer_prefix) if answer_prefix else []
    budget = settings.max_tokens + len(prefix)
    fitted = fit_to_context(model, messages, budget, template, stop_event, allow_special_tags=allow_special_tags)
    if fitted is None:
        return None
    room = fitted.max_tokens - len(prefix)
    if room < 1:
        raise ContextOverflowError("The answer already fills the context: start a new turn, or Clear.")
    if room != settings.max_tokens:
        settings = settings.replace(max_tokens=room)
    return fitted.tokens + prefix, settings, fitted.dropped


class _Clock:
    """Time to the first token, and tokens/s over the tokens after the first (the first waits for the prompt)."""

    def __init__(self, stats: GenerationStats):
        self.stats = stats
        self.started = self.first = self.last = time.perf_counter()

    def token(self, at: float) -> None:
        self.stats.completion_tokens += 1
        if self.stats.completion_tokens == 1:
            self.first = at
            self.stats.time_to_first_token_s = at - self.started
        self.last = at

    def finish(self) -> None:
        if self.stats.completion_tokens > 1 and self.last > self.first:
            self.stats.tokens_per_second = (self.stats.completion_tokens - 1) / (self.last - self.first)


def generate(llm, messages_or_prompt, settings: GenerationSettings | None = None, **kwargs) -> Generation:
    """The whole answer and its statistics (the same text `stream` yields, joined)."""
    stats = GenerationStats()
    text = "".join(stream(llm, messages_or_prompt, settings, stats=stats, **kwargs))
    return Generation(text=text, stats=stats)
