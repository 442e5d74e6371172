"""Generation: stream text from a chat or a prompt, cancel within one token, and report honest statistics.

Tokens come from `Llama.generate` on the exact token ids of `encode_chat`, so what the model sees is what
the template says. Sampling is the library's own (same sampler chain and seed handling as
`create_completion`); this module adds stop strings, UTF-8-safe streaming, context fitting and timing.
"""

from __future__ import annotations

import codecs
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from helpers.loading import ensure_usable
from helpers.settings import GenerationSettings
from helpers.templates import encode_chat, validate_dialog


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    tokens_per_second: float = 0.0  # generation only: tokens after the first / time after the first
    finish_reason: str = ""  # "stop" | "length" | "cancelled"
    dropped_turns: int = 0  # user/assistant pairs left out so the prompt fits the context
    seed: int = 0

    def line(self) -> str:
        dropped = f" | {self.dropped_turns} oldest turns dropped" if self.dropped_turns else ""
        return (
            f"{self.prompt_tokens} prompt tokens | {self.completion_tokens} generated | "
            f"{self.tokens_per_second:.1f} tokens/s | first token after {self.time_to_first_token_s:.2f} s | "
            f"finish: {self.finish_reason}{dropped}"
        )


@dataclass
class Generation:
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)


def as_messages(messages_or_prompt) -> list[dict]:
    if isinstance(messages_or_prompt, str):
        return [{"role": "user", "content": messages_or_prompt}]
    return list(messages_or_prompt)


def fit_to_context(llm, messages: Sequence[dict], max_tokens: int, template: str | None = None):
    """(token ids, dropped pairs): drop the oldest user/assistant pairs, keeping the system prompt and the
    last user message, until prompt + max_tokens fit in the context."""
    ensure_usable(llm)
    dialog = validate_dialog(messages)
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(system) :]
    n_ctx = llm.n_ctx()
    for dropped in range(0, len(turns), 2):
        tokens = encode_chat(llm, system + turns[dropped:], template)
        if len(tokens) + max_tokens <= n_ctx:
            return tokens, dropped // 2
    raise ValueError(
        f"The last message alone needs {len(tokens)} prompt tokens; with max_tokens={max_tokens} that exceeds the "
        f"context of {n_ctx} tokens. Shorten the message or the system prompt, lower max_tokens, or load the "
        "model with a larger n_ctx."
    )


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def stream(
    llm,
    messages_or_prompt,
    settings: GenerationSettings | None = None,
    *,
    stop_event: threading.Event | None = None,
    template: str | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yield the answer's text pieces as they are produced; `stats` (if given) is filled in as it goes.

    A string prompt is a single user message. Setting `stop_event` ends the generation within one token.
    """
    if _on_engine_thread():
        raise RuntimeError("stream() cannot run on the llama-engine thread itself; call it from any other thread.")
    settings = settings or GenerationSettings()
    stats = stats if stats is not None else GenerationStats()
    prompt, stats.dropped_turns = fit_to_context(llm, as_messages(messages_or_prompt), settings.max_tokens, template)
    stats.prompt_tokens = len(prompt)
    stats.seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**32)

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, answer_started = "", False
    first = last = started = time.perf_counter()
    stats.finish_reason = "length"
    tokens: queue.SimpleQueue = queue.SimpleQueue()
    halt = threading.Event()
    producer = _ENGINE.submit(_produce, llm, prompt, settings, stats.seed, stop_event, halt, tokens)
    try:
        while (item := tokens.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            token, at = item
            if stop_event is not None and stop_event.is_set():
                stats.finish_reason = "cancelled"
                break
            if token is _EOG:
                stats.finish_reason = "stop"
                break
            last = at
            stats.completion_tokens += 1
            if stats.completion_tokens == 1:
                first = at
                stats.time_to_first_token_s = first - started
            pending += decoder.decode(llm.detokenize([token]))
            if not answer_started:  # Meta's decode drops the space SentencePiece puts before the answer
                pending = pending.lstrip()
                answer_started = bool(pending)
            hits = [i for i in (pending.find(s) for s in settings.stop) if i >= 0]
            if hits:
                pending = pending[: min(hits)]
                stats.finish_reason = "stop"
                break
            keep = _held_back(pending, settings.stop)
            ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            if ready:
                yield ready
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending
    finally:
        halt.set()
        producer.result()  # llama.cpp is free again before anything else uses this model
        if stats.completion_tokens > 1 and last > first:
            stats.tokens_per_second = (stats.completion_tokens - 1) / (last - first)


# All llama.cpp work of this process runs on one thread. ggml's CPU backend keeps an OpenMP thread team
# per calling thread, and an idle team keeps competing for the cores: after generating once from a second
# thread (the widget panel's), every later generation was 20-30 % slower (measured: bench/run.py).
_ENGINE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-engine")
_EOG = object()


def _on_engine_thread() -> bool:
    return threading.current_thread().name.startswith("llama-engine")


def on_engine(function, *args):
    """Run `function(*args)` on the thread that runs llama.cpp, and return its result."""
    if _on_engine_thread():
        return function(*args)
    return _ENGINE.submit(function, *args).result()


def _produce(llm, prompt, settings, seed, stop_event, halt, out):
    """On the engine thread: sample tokens into `out` as (token, time), then None."""
    import llama_cpp

    try:
        # Evaluate the prompt from scratch every time. Reusing the KV cache of an earlier prompt
        # re-evaluates the last prompt token alone, which changes the logits in their last bits and so,
        # sooner or later, the sampled text: the same seed would no longer give the same answer, and a
        # cancelled generation would change the next one. Prompt processing is 20-60x faster than
        # generation, so this costs little.
        llm.reset()
        llm.set_seed(seed)
        vocab = llm._model.vocab
        generated = 0
        tokens = llm.generate(
            prompt,
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=settings.min_p,
            temp=settings.temperature,
            repeat_penalty=settings.repeat_penalty,
        )
        try:
            for token in tokens:
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    out.put((_EOG, time.perf_counter()))
                    break
                out.put((token, time.perf_counter()))
                generated += 1
                if generated >= settings.max_tokens or halt.is_set():
                    break
                if stop_event is not None and stop_event.is_set():
                    out.put((_EOG, time.perf_counter()))  # the consumer reports "cancelled" first
                    break
        finally:
            tokens.close()
    except BaseException as error:  # handed to the consumer, which raises it in the caller's thread
        out.put(error)
    finally:
        out.put(None)


def generate(llm, messages_or_prompt, settings: GenerationSettings | None = None, **kwargs) -> Generation:
    """The whole answer and its statistics (the same text `stream` yields, joined)."""
    stats = GenerationStats()
    text = "".join(stream(llm, messages_or_prompt, settings, stats=stats, **kwargs))
    return Generation(text=text, stats=stats)
