"""The model object: owns an engine (`helpers.backend.Backend`), the one thread the engine computes on, the
chat template, and a lifetime that turns every use after `close()` into `ModelUnloadedError`, never a crash.

All computation (prompt evaluation and sampling) runs on the model's engine thread. ggml's CPU backend
keeps an OpenMP thread team per calling thread, and an idle team keeps competing for the cores: after one
generation from a second thread, every later one was 20-30 % slower (measured with bench/run.py). Tokenizer
calls may come from any thread; `close()` waits for them and for the running computation (which it stops
first) before anything is freed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from helpers.backend import Backend, ModelUnloadedError, PromptProgress, SampledToken
from helpers.settings import GenerationSettings

ENGINE_THREAD = "llama-engine"
_POLL_SECONDS = 0.05  # how often a waiting consumer looks at its stop event


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
        self._users = 0  # calls into the backend under way
        self._running: Completion | None = None
        self._pending: set[Completion] = set()
        self._engine: ThreadPoolExecutor | None = None

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
            for completion in self._pending:
                completion.cancel_event.set()
            if self._running is not None:
                self._backend.interrupt()
            while self._users:
                self._state.wait()
            engine, self._engine = self._engine, None
        if engine is None:
            self._backend.close()
            return
        try:
            engine.submit(self._backend.close).result()  # freed on the thread that computed with it
        except RuntimeError:  # the interpreter is exiting: executors take no more work
            self._backend.close()
        engine.shutdown()

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
        """The `llama_cpp.Llama` this model runs (in-process models only)."""
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

    def encode_chat(self, messages, template: str | None = None) -> list[int]:
        from helpers.templates import encode_chat

        return encode_chat(self, messages, template)

    def render_chat(self, messages, template: str | None = None) -> str:
        from helpers.templates import render_chat

        return render_chat(messages, template or self.template, llm=self)

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
        threads = f", {self.n_threads} threads" if self.n_threads else ""
        return f"Loaded {name}: context {self.n_ctx()} tokens{threads}, {where}."

    # --- the engine thread --------------------------------------------------------------------------

    def run(self, function: Callable[[Backend], object]):
        """`function(backend)` on the engine thread, while the model stays open; returns its result."""
        if _on_engine_thread():
            raise RuntimeError("Already on an engine thread: call the backend directly.")

        def job():
            with self._using() as backend:
                return function(backend)

        return self._submit(job).result()

    def _submit(self, job) -> Future:
        with self._state:
            if self._closed:
                raise ModelUnloadedError("This model was closed or replaced by another load_model() call.")
            if self._engine is None:
                self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix=ENGINE_THREAD)
            return self._engine.submit(job)

    def complete(self, prompt: Sequence[int], settings: GenerationSettings, seed: int) -> Completion:
        """Start evaluating `prompt` and sampling on the engine thread; the returned `Completion` yields
        the events as they come. Used by `helpers.stream`."""
        if _on_engine_thread():
            raise RuntimeError("stream() cannot run on the llama-engine thread itself; call it from any other thread.")
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

    def next_event(self, stop_event: threading.Event | None = None):
        """(event, time), or None when the engine is done. Cancels the completion as soon as `stop_event`
        is set, even while the engine is inside a long prompt computation."""
        while True:
            if stop_event is not None and stop_event.is_set():
                self.cancel()
            try:
                item = self.events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if item is None:
                self.finished = True
                return None
            if isinstance(item[0], BaseException):
                raise item[0]
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
