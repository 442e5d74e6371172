"""The model object: owns an engine (`helpers.engine.backend.Backend`), the thread the engine computes on, the
chat template, and a lifetime that turns every use after `close()` into `ModelUnloadedError`, never a crash.

Each computation (a generation: its prompt and every token; or a `run`) runs on an engine thread of its own,
one at a time per model, and that thread ends with it. ggml's CPU backend keeps an OpenMP thread team per
thread that has computed, and a team that outlives its work slows every other (docs/performance.md,
"Threads"); a thread that has ended takes its team with it. Tokenizer calls may come from any thread;
`close()` stops the running computation, waits for it and for them, then frees the engine.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from helpers.engine.backend import Backend
from helpers.errors import ModelUnloadedError, PromptError
from helpers.settings import GenerationSettings

ENGINE_THREAD = "llama-engine"
# How often a consumer waiting for the prompt to be read looks at its stop event. Only then: once tokens
# flow, each one is a chance to look, and a thread that wakes up 20 times a second while both cores compute
# slows generation (docs/performance.md, "Polling for Stop").
_POLL_SECONDS = 0.05


class State(enum.Enum):
    """A model's lifetime. READY -> CLOSING -> CLOSED is the only way to the end, and CLOSED is final. READY ->
    LOADING -> READY is the loader's: it frees the engine to try another file and, when that fails, loads the
    previous file again into the same model."""

    LOADING = "loading"  # no engine: released for another load_model(), given a new one if that load fails
    READY = "ready"
    CLOSING = "closing"  # close() is stopping the generation and freeing the engine
    CLOSED = "closed"


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
        self._lock = threading.Condition()  # guards the state, the backend and the counts below
        self._state = State.READY
        self._users = 0  # calls into the backend under way
        self._running: Completion | None = None
        self._pending: set[Completion] = set()
        self._computing = threading.Lock()  # one engine thread at a time
        self._ended_note: str | None = None  # why it was closed, when not by close() or load_model()

    # --- lifetime -----------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """Closed, or being closed: every use raises `ModelUnloadedError`."""
        return self._state in (State.CLOSING, State.CLOSED)

    @contextmanager
    def _using(self):
        with self._lock:
            if self._state is not State.READY:
                raise ModelUnloadedError(
                    self._ended_note
                    or (
                        "This model was closed or replaced by another load_model() call, which freed its memory; "
                        "use the model load_model() returned last (re-run the cells after the load cell)."
                    )
                )
            self._users += 1
        try:
            yield self._backend
        finally:
            with self._lock:
                self._users -= 1
                self._lock.notify_all()

    def close(self) -> None:
        """Stop any generation, wait for it, and free the engine's memory. Idempotent; a closed model stays
        closed."""
        with self._lock:
            if self._state in (State.CLOSING, State.CLOSED):
                while self._state is State.CLOSING:
                    self._lock.wait()
                return
            if self._state is State.LOADING:  # no engine to free: the loader gave it up
                self._become(State.CLOSED)
                return
        self._stop_and_free(State.CLOSING)
        with self._lock:
            if self._state in (State.CLOSING, State.LOADING):
                self._become(State.CLOSED)

    def release_engine(self) -> None:
        """For the loader: stop any generation and free the engine, keeping the model (state "loading") so
        that `attach_engine` can give it a new one; `close()` ends it for good."""
        if self._state is State.READY:
            self._stop_and_free(State.LOADING)

    def attach_engine(self, backend: Backend) -> None:
        """For the loader: the engine of a model whose engine was released (a closed model is not brought
        back: the engine is freed at once)."""
        with self._lock:
            if self._state is State.LOADING:
                self._backend = backend
                self._become(State.READY)
                return
        backend.close()

    def settled(self) -> State:
        """The state once no load or close is under way (what a stopped generation reports)."""
        with self._lock:
            while self._state in (State.LOADING, State.CLOSING):
                self._lock.wait()
            return self._state

    def _stop_and_free(self, state: State) -> None:
        if _on_engine_thread():
            raise RuntimeError("close() cannot run on the engine thread (from inside a generation).")
        with self._lock:
            if self._state is not State.READY:
                return
            self._become(state)
            for completion in self._pending:
                completion.cancel_event.set()
            if self._running is not None:
                self._backend.interrupt()
            while self._users:
                self._lock.wait()
            backend, self._backend = self._backend, None
        backend.close()

    def _become(self, state: State) -> None:
        self._state = state
        self._lock.notify_all()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._state.value
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
        check_text(text, "The text to tokenize")
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
            self._template = _story().template_for(self)
        return self._template

    def encode_chat(self, messages, template: str | None = None, *, allow_special_tags: bool = False) -> list[int]:
        return _story().encode_chat(self, messages, template, allow_special_tags=allow_special_tags)

    def render_chat(self, messages, template: str | None = None, *, allow_special_tags: bool = False) -> str:
        return _story().render_chat(
            messages, template or self.template, llm=self, allow_special_tags=allow_special_tags
        )

    def check_messages(self, messages, answer_prefix: str = "") -> None:
        """Refuse, before a prompt is built, what this model's engine cannot be sent safely (`helpers.stream` asks).
        An engine fed token ids takes any text: content is tokenized as plain text. (A server fed text refuses
        control-token spellings: `RemoteModel`.)"""

    def stream(self, messages_or_prompt, settings: GenerationSettings | None = None, **kwargs) -> Iterator[str]:
        return _story().stream(self, messages_or_prompt, settings, **kwargs)

    def generate(self, messages_or_prompt, settings: GenerationSettings | None = None, **kwargs):
        return _story().generate(self, messages_or_prompt, settings, **kwargs)

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
        if self._state is not State.READY:
            raise ModelUnloadedError(
                self._ended_note or "This model was closed or replaced by another load_model() call."
            )
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
        the events as they come. Used by `helpers.stream`. An empty prompt is refused: llama.cpp has nothing to
        compute the first token from (it reported a memory error, then freed memory twice)."""
        if not len(prompt):
            raise PromptError(
                "The prompt is empty once tokenized (this model's vocabulary turned the text into no tokens): "
                "there is nothing to answer. Check the model's tokenizer with model.tokenize('Hello')."
            )
        completion = Completion(self)
        with self._lock:
            self._pending.add(completion)
        completion.future = self._submit(lambda: self._produce(completion, list(prompt), settings, seed))
        return completion

    def _produce(self, completion: Completion, prompt, settings, seed) -> None:
        out = completion.queue
        try:
            with self._using() as backend:
                with self._lock:
                    self._running = completion
                try:
                    for event in backend.complete(prompt, settings, seed, completion.cancel_event):
                        out.put((event, time.perf_counter()))
                finally:
                    with self._lock:
                        self._running = None
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            out.put((error, time.perf_counter()))
        finally:
            with self._lock:
                self._pending.discard(completion)
            out.put(None)

    def _interrupt(self, completion: Completion) -> None:
        with self._lock:
            completion.cancel_event.set()
            if self._running is completion:
                self._backend.interrupt()


class Completion:
    """One generation running on a model's engine thread: `next_event()` hands over its `PromptProgress` and
    sampled-token events with the time each was made; `cancel()` stops it (mid-prompt too); `close()`
    cancels if needed and waits until the engine is free."""

    def __init__(self, model: Model):
        self.model = model
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # (event, time) from the engine, then None
        self.cancel_event = threading.Event()
        self.future: Future | None = None
        self.finished = False

    def next_event(self, stop_event: threading.Event | None = None):
        """(event, time), or None when the engine is done. Cancels the completion as soon as `stop_event`
        is set: within 50 ms, while the prompt is read (even inside one long graph computation) and while a
        server goes silent between tokens."""
        while True:
            if stop_event is not None and stop_event.is_set():
                self.cancel()
            polling = stop_event is not None and not self.cancel_event.is_set()
            try:
                item = self.queue.get(timeout=_POLL_SECONDS if polling else None)
            except queue.Empty:
                continue
            if item is None:
                self.finished = True
                return None
            if isinstance(item[0], BaseException):
                raise item[0]
            return item

    def events(self, stop_event: threading.Event | None = None):
        """(event, time) pairs until the engine is done or the completion is cancelled (see `next_event`)."""
        while (item := self.next_event(stop_event)) is not None and not self.cancelled:
            yield item

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


# The `Model` wrapping each `llama_cpp.Llama` a user passed to a helper, made once per Llama and held weakly (it
# goes when the Llama goes): the one piece of module state the engine keeps.
_wrappers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_model(llm) -> Model:
    """`llm` itself if it is a `Model`; for a `llama_cpp.Llama` (a vocab-only one too), the `Model` that wraps
    it, made once per Llama and left open while the Llama lives."""
    if isinstance(llm, Model):
        return llm
    import llama_cpp

    if not isinstance(llm, llama_cpp.Llama):
        raise TypeError(f"Expected a model from helpers.load_model() or a llama_cpp.Llama, got {type(llm).__name__}.")
    model = _wrappers.get(llm)
    if model is None or model.closed:
        from helpers.engine.llama_backend import LlamaCppBackend

        backend = LlamaCppBackend(llm, owned=False)
        model = Model(backend, path=llm.model_path, n_threads=llm.n_threads, gpu_layers=llm.model_params.n_gpu_layers)
        backend.before_llama_close(_closer(weakref.ref(model)))
        _wrappers[llm] = model
    return model


def _closer(model_ref: weakref.ref) -> Callable[[], None]:
    """What the user's own `Llama.close()` (or its deletion) runs before freeing the model: the wrapping
    `Model`'s close, which stops a generation and waits for every call into the Llama to end (freeing it
    under a running computation crashed the process). On the engine thread itself, where waiting would wait
    for itself, the Llama is just closed: that thread is not computing then."""

    def close() -> None:
        model = model_ref()
        if model is not None and not _on_engine_thread():
            model._ended_note = "The llama_cpp.Llama behind this model was closed or deleted: build it again."
            model.close()

    return close


def check_text(text, what: str) -> None:
    """Refuse text that UTF-8 cannot encode (a lone surrogate such as "\\ud800", left by bytes decoded with
    errors="surrogateescape" or by a JSON "\\ud800" escape): llama.cpp takes UTF-8, and the encoder's own
    UnicodeEncodeError says nothing about where the text came from."""
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PromptError(
            f"{what} holds a lone surrogate ({text[error.start]!r} at character {error.start}), which is not text "
            "UTF-8 can encode: it usually comes from bytes decoded with errors='surrogateescape'. Remove it, or "
            "replace it first: text.encode('utf-8', 'replace').decode('utf-8')."
        ) from None


def describe_model(llm) -> str:
    """One line about a loaded model for the notebook."""
    return as_model(llm).describe()


def _story():
    """The public face, whose `stream`, `generate`, `encode_chat`, `render_chat` and `template_for` these methods
    are: the story's functions sit above the engine, so the engine reaches them only through the face, when
    they are called (as whisper's model has `decode` and `transcribe` as methods)."""
    import helpers

    return helpers


def _on_engine_thread() -> bool:
    return threading.current_thread().name.startswith(ENGINE_THREAD)


__all__ = ["Model", "Completion", "State", "as_model", "check_text", "describe_model"]
