"""The model object: owns an engine (`helpers.engine.backend.Backend`), the thread the engine computes on, the
chat template, and a lifetime that turns every use after `close()` into `ModelUnloadedError`, never a crash.

Each computation (a generation: its prompt and every token; or a `run`) runs on an engine thread of its own,
one at a time per model, and that thread ends with it. ggml's CPU backend keeps an OpenMP thread team per
thread that has computed, and a team that outlives its work slows every other: with a second model's
thread still alive after it had generated, generation elsewhere fell from 71 to 25 tokens/s (SmolLM2,
2 cores); a thread that has ended takes its team with it (71.7 tokens/s). Tokenizer calls may come from any
thread; `close()` stops the running computation, waits for it and for them, then frees the engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from helpers.engine.backend import Backend, ModelUnloadedError, PromptProgress, SampledToken
from helpers.settings import GenerationSettings

ENGINE_THREAD = "llama-engine"
# How often a consumer waiting for the prompt to be read looks at its stop event. Only then: once tokens
# flow, each one is a chance to look, and a thread waking up 20 times a second on a 2-core machine took
# 6 % off 7B generation speed (bench/scale.py, helper / bare 0.937), since both cores compute.
_POLL_SECONDS = 0.05


class Model:
    """A loaded model. Get one from `helpers.load_model(path)`, or wrap your own `llama_cpp.Llama` by passing
    it to any helper. Use it as a context manager, or call `close()`, to free its memory now."""

    def __init__(
        self,
        backend: Backend,
        *,
        path: str | Path | None = None,
        n_threads: int | None = None,
        gpu_layers: int = 0,
        n_layers: int | None = None,
        template: str | None = None,
    ):
        self._backend = backend
        self.path = Path(path) if path else None
        self.n_threads, self.gpu_layers, self.n_layers = n_threads, gpu_layers, n_layers
        self._template = template
        self._state = threading.Condition()
        self._closed = False
        self.closings = 0  # times closed: a generation that sees it change was stopped by a close
        self._users = 0  # calls into the backend under way
        self._running: Completion | None = None
        self._pending: set[Completion] = set()
        self._computing = threading.Lock()  # one engine thread at a time

    # --- lifetime -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def _using(self):
        with self._state:
            if self._closed:
                raise ModelUnloadedError(
                    "This model was closed or replaced by another load_model() call, which freed its memory; "
                    "use the model load_model() returned last (re-run the cells after the load cell)."
                )
            self._users += 1
        try:
            yield self._backend
        finally:
            with self._state:
                self._users -= 1
                self._state.notify_all()

    def close(self) -> None:
        """Stop any generation, wait for it, and free the engine's memory. Idempotent."""
        if _on_engine_thread():
            raise RuntimeError("close() cannot run on the engine thread (from inside a generation).")
        with self._state:
            if self._closed:
                return
            self._closed = True
            self.closings += 1
            for completion in self._pending:
                completion.cancel_event.set()
            if self._running is not None:
                self._backend.interrupt()
            while self._users:
                self._state.wait()
        self._backend.close()

    def _reopen(self, backend: Backend) -> None:
        """Give a closed model a fresh engine (the loader's way back after a failed load)."""
        with self._state:
            self._backend, self._closed = backend, False

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<helpers.Model {self.path.name if self.path else type(self._backend).__name__} ({state})>"

    # --- the engine and its tokenizer ---------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        with self._using() as backend:
            return backend

    @property
    def llama(self):
        """The `llama_cpp.Llama` this model runs (in-process models only). Use it through the model: once the
        model is closed or replaced, llama-cpp-python's own methods on it crash instead of raising."""
        with self._using() as backend:
            return backend.llama

    @property
    def metadata(self) -> dict[str, str]:
        with self._using() as backend:
            return backend.metadata

    @property
    def add_bos(self) -> bool:
        with self._using() as backend:
            return backend.add_bos

    def n_ctx(self) -> int:
        with self._using() as backend:
            return backend.n_ctx()

    def n_vocab(self) -> int:
        with self._using() as backend:
            return backend.n_vocab()

    def token_bos(self) -> int:
        with self._using() as backend:
            return backend.token_bos()

    def token_eos(self) -> int:
        with self._using() as backend:
            return backend.token_eos()

    def is_control(self, token: int) -> bool:
        with self._using() as backend:
            return backend.is_control(token)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        with self._using() as backend:
            return backend.tokenize(text, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        with self._using() as backend:
            return backend.detokenize(tokens, special=special)

    def cached_tokens(self) -> list[int]:
        """The token ids the KV cache holds now (what the next prompt can reuse)."""
        return self.run(lambda backend: backend.cached_tokens())

    # --- templates and generation (the helpers of the same names, as methods) ------------------------

    @property
    def template(self) -> str:
        """The chat template's name: Llama 2's for Llama 2 models, else the one in the GGUF."""
        if self._template is None:
            from helpers.templates import template_for

            self._template = template_for(self)
        return self._template

    def encode_chat(self, messages, template: str | None = None, *, allow_special_tags: bool = False) -> list[int]:
        from helpers.templates import encode_chat

        return encode_chat(self, messages, template, allow_special_tags=allow_special_tags)

    def render_chat(self, messages, template: str | None = None, *, allow_special_tags: bool = False) -> str:
        from helpers.templates import render_chat

        return render_chat(messages, template or self.template, llm=self, allow_special_tags=allow_special_tags)

    def stream(self, messages_or_prompt, settings: GenerationSettings | None = None, **kwargs) -> Iterator[str]:
        from helpers.generation import stream

        return stream(self, messages_or_prompt, settings, **kwargs)

    def generate(self, messages_or_prompt, settings: GenerationSettings | None = None, **kwargs):
        from helpers.generation import generate

        return generate(self, messages_or_prompt, settings, **kwargs)

    def describe(self) -> str:
        """One line about the model for the notebook."""
        name = self.path.name if self.path else "model"
        if self.gpu_layers < 0 or (self.n_layers is not None and self.gpu_layers > self.n_layers):
            where = "all layers on the GPU"
        else:
            where = f"{self.gpu_layers} layers on the GPU" if self.gpu_layers else "on the CPU"
        threads = f", {self.n_threads} thread{'s' if self.n_threads != 1 else ''}" if self.n_threads else ""
        return f"Loaded {name}: context {self.n_ctx()} tokens{threads}, {where}."

    # --- the engine thread --------------------------------------------------------------------------

    def run(self, function: Callable[[Backend], object]):
        """`function(backend)` on the engine thread, while the model stays open; returns its result."""

        def job():
            with self._using() as backend:
                return function(backend)

        return self._submit(job).result()

    def _submit(self, job) -> Future:
        """Run `job()` on a new engine thread once this model's previous one has finished."""
        if _on_engine_thread():  # it would wait for itself
            raise RuntimeError("Generation cannot start on an engine thread; call it from any other thread.")
        if self._closed:
            raise ModelUnloadedError("This model was closed or replaced by another load_model() call.")
        future: Future = Future()

        def engine():
            with self._computing:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(job())
                    except BaseException as error:  # handed to whoever waits on the future
                        future.set_exception(error)

        threading.Thread(target=engine, name=ENGINE_THREAD, daemon=True).start()
        return future

    def complete(self, prompt: Sequence[int], settings: GenerationSettings, seed: int) -> Completion:
        """Start evaluating `prompt` and sampling on the engine thread; the returned `Completion` yields
        the events as they come. Used by `helpers.stream`."""
        completion = Completion(self)
        with self._state:
            self._pending.add(completion)
        completion.future = self._submit(lambda: self._produce(completion, list(prompt), settings, seed))
        return completion

    def _produce(self, completion: Completion, prompt, settings, seed) -> None:
        out = completion.events
        try:
            with self._using() as backend:
                with self._state:
                    self._running = completion
                try:
                    for event in backend.complete(prompt, settings, seed, completion.cancel_event):
                        out.put((event, time.perf_counter()))
                finally:
                    with self._state:
                        self._running = None
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            out.put((error, time.perf_counter()))
        finally:
            with self._state:
                self._pending.discard(completion)
            out.put(None)

    def _interrupt(self, completion: Completion) -> None:
        with self._state:
            completion.cancel_event.set()
            if self._running is completion:
                self._backend.interrupt()


class Completion:
    """One generation running on a model's engine thread: `next_event()` hands over its `PromptProgress` and
    `SampledToken` events with the time each was made; `cancel()` stops it (mid-prompt too); `close()`
    cancels if needed and waits until the engine is free."""

    def __init__(self, model: Model):
        self.model = model
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancel_event = threading.Event()
        self.future: Future | None = None
        self.finished = False
        self.sampling = False  # the prompt is read and tokens are coming

    def next_event(self, stop_event: threading.Event | None = None):
        """(event, time), or None when the engine is done. Cancels the completion as soon as `stop_event`
        is set: within 50 ms while the prompt is read (even inside one long graph computation), at the next
        token after that."""
        while True:
            if stop_event is not None and stop_event.is_set():
                self.cancel()
            polling = stop_event is not None and not self.sampling and not self.cancel_event.is_set()
            try:
                item = self.events.get(timeout=_POLL_SECONDS if polling else None)
            except queue.Empty:
                continue
            if item is None:
                self.finished = True
                return None
            if isinstance(item[0], BaseException):
                raise item[0]
            self.sampling = self.sampling or isinstance(item[0], SampledToken)
            return item

    def cancel(self) -> None:
        if not self.finished:
            self.model._interrupt(self)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def close(self) -> None:
        if self.future is None:
            return
        if not self.future.done():
            self.cancel()
        self.future.result()
        self.finished = True


def _on_engine_thread() -> bool:
    return threading.current_thread().name.startswith(ENGINE_THREAD)


__all__ = ["Model", "Completion", "ModelUnloadedError", "PromptProgress", "SampledToken"]
