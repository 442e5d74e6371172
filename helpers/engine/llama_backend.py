"""The in-process backend: `helpers.engine.backend.Backend` over a `llama_cpp.Llama`. The only module that touches
llama-cpp-python's private members (its model, context, batch and sampler factory).

The KV cache is described by the `Llama`'s own bookkeeping (`input_ids[:n_tokens]`), so a user who also
calls `Llama.generate` on the same object sees a consistent state. Prompts are evaluated in batches of
`n_batch` tokens (512 by default) that start at multiples of `n_batch` (positions counted from 0): a fresh
prompt is cut exactly as `Llama.eval` cuts it, and a prompt resumed after a stop into the same batches as
one read in one go, so both give bit-identical logits. Progress is reported after each batch. Smaller
batches would report more often but read the prompt slower (docs/performance.md, "Batch size").

Stopping inside one llama.cpp graph computation uses llama.cpp's abort callback, which ggml's CPU backend
polls after every graph node (about 1,000 per 7B graph). The callback is libc's `strlen` applied to a
two-byte flag: it returns 0 until `interrupt()` writes a non-zero byte, and it runs without Python or the GIL,
so a busy Python thread elsewhere can never slow a graph down. (CUDA graphs are not polled; there a stop
takes effect at the next batch or token.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import llama_cpp
import numpy as np

from helpers.engine.backend import DraftCheck, PromptProgress, SampledToken
from helpers.engine.prompt_lookup import PromptLookup, StepCosts
from helpers.errors import DecodeError, ModelUnloadedError, UsageError
from helpers.settings import GenerationSettings

_SPECIAL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED


def _flag_reader():
    """A C function that reads a byte flag: libc's strlen (0 while the flag is empty)."""
    if sys.platform == "win32":
        return ctypes.cast(ctypes.cdll.msvcrt.strlen, llama_cpp.ggml_abort_callback)
    library = ctypes.CDLL(None) if sys.platform != "darwin" else ctypes.CDLL(ctypes.util.find_library("c"))
    return ctypes.cast(library.strlen, llama_cpp.ggml_abort_callback)


_READ_FLAG = _flag_reader()


# --- llama.cpp's log -------------------------------------------------------------------------------

_ABORTED = re.compile(r"failed with error 1$|compute status: 1$|failed to decode, ret = 2$")


@functools.cache
def _errors_only_log():
    """A llama.cpp log callback that prints errors only. llama-cpp-python's own maps ggml's log levels as they
    were before ggml added DEBUG (WARN = 3 is taken for ERROR), so with verbose=False it still printed
    warnings such as "decode: removing memory module entries ..." after every stop. A stop itself (an abort
    through the abort callback: ggml status 1, llama_decode 2) is logged as three errors; those are not shown."""
    import llama_cpp

    error, continued = 4, 5  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
    last = {"level": 0}

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        last["level"] = last["level"] if level == continued else level
        message = text.decode("utf-8", errors="replace")
        if last["level"] == error and not _ABORTED.search(message):
            print(message, end="", file=sys.stderr)

    return callback


@contextmanager
def captured_native_log(lines: list[str], echo: bool):
    """Route llama.cpp's log into `lines` (and to stderr when `echo`); afterwards llama.cpp prints errors
    only, or everything (llama-cpp-python's logger) when `echo`."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        message = text.decode("utf-8", errors="replace")
        lines.append(message)
        if echo:
            print(message, end="", file=sys.stderr)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        after = _logger.llama_log_callback if echo else _errors_only_log()
        llama_cpp.llama_log_set(after, ctypes.c_void_p(0))


class LlamaCppBackend:
    """A `Backend` over one `llama_cpp.Llama`. `owned`: the backend frees it on `close()`; otherwise (a Llama
    the user built and passed in) it is only referenced weakly and left to its owner."""

    def __init__(self, llama: llama_cpp.Llama, *, owned: bool):
        self._owned = owned
        self._strong = llama if owned else None
        self._weak = weakref.ref(llama)
        self.step_costs = StepCosts()  # what a step of n tokens costs on this model here, for sizing drafts
        self._flag = ctypes.create_string_buffer(2)  # [0] != 0: stop the running graph computation
        self._special_spellings: dict[str, int] | None = None

    def before_llama_close(self, callback) -> None:
        """Run `callback()` when the Llama's `close()` starts (its own or its deletion's), before it frees anything:
        its exit stack runs last-in first-out, and this goes on it after everything the Llama holds."""
        self.llama._stack.callback(callback)

    # --- the Llama, while it is alive -------------------------------------------------------------

    @property
    def llama(self) -> llama_cpp.Llama:
        llama = self._weak()
        if llama is None or llama._model.model is None or llama._ctx.ctx is None:
            raise ModelUnloadedError("The llama_cpp.Llama behind this model was closed or deleted.")
        return llama

    @property
    def metadata(self) -> dict[str, str]:
        return self.llama.metadata

    @property
    def add_bos(self) -> bool:
        return bool(self.llama._model.add_bos_token())

    @property
    def vocab_only(self) -> bool:
        return bool(self.llama.model_params.vocab_only)

    @property
    def logits_all(self) -> bool:
        return bool(self.llama._logits_all)

    def n_ctx(self) -> int:
        # llama.cpp rounds the context up to a multiple of 256; llama-cpp-python's token bookkeeping keeps
        # the size that was asked for, so that is all a prompt and answer may use.
        llama = self.llama
        return min(llama.n_ctx(), len(llama.input_ids))

    def n_vocab(self) -> int:
        return self.llama.n_vocab()

    def token_bos(self) -> int:
        return self.llama.token_bos()

    def token_eos(self) -> int:
        return self.llama.token_eos()

    def is_control(self, token: int) -> bool:
        return bool(self.llama._model.token_get_attr(token) & _SPECIAL)

    def special_spellings(self) -> dict[str, int]:
        """Every text llama.cpp reads as one token when control tokens are parsed: the texts of the control,
        user-defined and unknown tokens (llama-vocab.cpp's `cache_special_tokens`), by spelling."""
        if self._special_spellings is None:
            model, parsed = self.llama._model, _SPECIAL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            found = {}
            for token in range(model.n_vocab()):  # about 50 ms for 50,000 tokens, once
                if model.token_get_attr(token) & parsed and (text := model.token_get_text(token)):
                    found.setdefault(text, token)
            self._special_spellings = found
        return self._special_spellings

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return self.llama.detokenize(list(tokens), special=special)

    def cached_tokens(self) -> list[int]:
        llama = self.llama
        return llama.input_ids[: llama.n_tokens].tolist()

    def prompt_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """The logits at every position of `tokens`, evaluated afresh (for perplexity; the model must be loaded
        with logits_all=True); afterwards the KV cache holds `tokens`, and the bookkeeping says so."""
        llama = self.llama
        llama.reset()
        llama.eval(list(tokens))
        return np.array(llama.scores[: len(tokens)])

    # --- generation (on the model's engine thread) ------------------------------------------------

    def interrupt(self) -> None:
        self._flag[0] = b"x"

    def complete(
        self, prompt: Sequence[int], settings: GenerationSettings, seed: int, cancel: threading.Event
    ) -> Iterator[PromptProgress | SampledToken | DraftCheck]:
        llama = self.llama
        if self.vocab_only:
            raise UsageError("This Llama was loaded with vocab_only=True: it can tokenize but not generate.")
        prompt = list(prompt)
        cached = self._keep_prefix(llama, prompt) if settings.cache_prompt else self._truncate(llama, 0)
        self._flag[0] = b"\0"
        llama_cpp.llama_set_abort_callback(llama.ctx, _READ_FLAG, ctypes.cast(self._flag, ctypes.c_void_p))
        try:
            yield PromptProgress(cached, len(prompt), cached)
            done = cached
            chunk = llama.n_batch  # what the batch buffer holds
            while done < len(prompt):
                if self._stopped(cancel):
                    return
                end = min(len(prompt), (done // chunk + 1) * chunk)
                if not self._decode(llama, prompt[done:end], done):
                    return
                done = end
                yield PromptProgress(done, len(prompt), cached)
            yield from self._sample(llama, settings, seed, cancel)
        finally:
            llama_cpp.llama_set_abort_callback(llama.ctx, llama_cpp.ggml_abort_callback(), None)

    def _sample(self, llama, settings: GenerationSettings, seed: int, cancel: threading.Event):
        """Tokens from llama-cpp-python's own sampler chain (as `Llama.generate` builds it), each token
        evaluated before the next is sampled; the last one is not evaluated. With a drafter, each token is
        evaluated together with a draft of the tokens after it (see `_verify`)."""
        llama.set_seed(seed)
        sampler = llama._init_sampler(
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=settings.min_p,
            temp=settings.temperature,
            repeat_penalty=settings.repeat_penalty,
        )
        vocab = llama._model.vocab
        drafter = self._drafter(llama, settings)
        try:
            token, kept, produced = sampler.sample(llama._ctx, -1), [], 0
            while True:
                for out in (*kept, token):  # the draft tokens the model kept, then its own next token
                    produced += 1
                    end = bool(llama_cpp.llama_vocab_is_eog(vocab, out))
                    yield SampledToken(out, b"" if end else llama.detokenize([out]), end)
                    if end or produced == settings.max_tokens or self._stopped(cancel):
                        return
                    if drafter is not None:
                        drafter.add([out])
                # llama-cpp-python's batch holds n_batch tokens and `set_batch` writes without a bounds check
                left = min(settings.max_tokens - produced, self.n_ctx() - llama.n_tokens, llama.n_batch) - 1
                draft = drafter.draft(left) if drafter is not None else []
                started = time.perf_counter()
                if not self._decode(llama, [token, *draft], llama.n_tokens, logits=len(draft) + 1):
                    return
                if not draft:
                    token, kept = sampler.sample(llama._ctx, -1), []
                else:
                    token, kept = self._verify(llama, sampler, vocab, draft)
                if drafter is not None:  # what this step cost, for sizing the next drafts
                    self.step_costs.observe(len(draft) + 1, time.perf_counter() - started)
                if draft:
                    yield DraftCheck(len(draft), len(kept))
        finally:
            sampler.close()

    def _drafter(self, llama, settings: GenerationSettings) -> PromptLookup | None:
        """The prompt-lookup drafter over the KV cache's tokens, or None: speculation off, or a model whose
        memory cannot drop the positions of a rejected draft (recurrent and hybrid models)."""
        model = llama._model.model
        if settings.speculative != "prompt-lookup":
            return None
        if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
            return None
        return PromptLookup(llama.input_ids[: llama.n_tokens].tolist(), costs=self.step_costs)

    def _verify(self, llama, sampler, vocab, draft: list[int]) -> tuple[int, list[int]]:
        """After one batch evaluated a token and the `draft` after it: the model's own token at each drafted
        position, sampled with the normal sampler chain, for as long as it equals the draft (exact for any
        chain, as every sample sees the same logits and sampler state as in normal decoding). Returns
        (the model's next token, the draft tokens kept); the KV cache keeps the token and the kept ones."""
        kept = []
        for i, drafted in enumerate(draft):
            token = sampler.sample(llama._ctx, i)
            if token != drafted or llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            kept.append(token)
        else:
            token = sampler.sample(llama._ctx, len(draft))  # every draft token kept: the model's next one
        start = llama.n_tokens - len(draft) - 1
        if len(kept) < len(draft) and self._truncate(llama, start + 1 + len(kept)) != start + 1 + len(kept):
            raise DecodeError("llama.cpp could not drop a rejected draft from the KV cache.")
        return token, kept

    def _stopped(self, cancel: threading.Event) -> bool:
        return cancel.is_set() or self._flag.raw[0] != 0

    def _decode(self, llama, tokens: list[int], start: int, *, logits: int = 1) -> bool:
        """Evaluate `tokens` at positions start...; False if the computation was interrupted. Either way the
        bookkeeping afterwards says exactly what the KV cache holds. Logits are computed for the last `logits`
        tokens (all of them with logits_all)."""
        llama._batch.set_batch(batch=tokens, n_past=start, logits_all=llama._logits_all)
        for i in range(len(tokens) - logits, len(tokens) - 1):
            llama._batch.batch.logits[i] = True
        status = llama_cpp.llama_decode(llama.ctx, llama._batch.batch)
        if status == 0:
            llama.input_ids[start : start + len(tokens)] = tokens
            llama.n_tokens = start + len(tokens)
            llama._requires_eval = False
            return True
        self._truncate(llama, start)  # llama.cpp has already dropped the failed batch's positions
        if status == 2:
            return False
        raise DecodeError(
            f"llama.cpp could not evaluate {len(tokens)} tokens at position {start} (status {status}): "
            + ("the context is full." if status == 1 else "out of memory?")
        )

    def _truncate(self, llama, keep: int) -> int:
        """Drop everything from position `keep` on from the KV cache; returns `keep`."""
        if keep == 0 or not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            llama._ctx.kv_cache_clear()
            keep = 0
        llama.n_tokens = keep
        llama._requires_eval = True
        return keep

    def _keep_prefix(self, llama, prompt: list[int]) -> int:
        """Keep the longest common prefix of the cache and `prompt`, at most all but the prompt's last token
        (evaluated again for fresh logits, as llama.cpp's server does); returns its length."""
        held = llama.input_ids[: llama.n_tokens]
        n = min(len(held), len(prompt) - 1)
        differ = np.flatnonzero(held[:n] != np.asarray(prompt[:n], dtype=held.dtype))
        return self._truncate(llama, int(differ[0]) if len(differ) else n)

    # --- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        llama, self._strong = self._strong, None
        if self._owned and llama is not None:
            llama.close()
