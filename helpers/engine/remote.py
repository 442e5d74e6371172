"""A model served over HTTP: `connect(base_url)` returns a `helpers.Model` whose engine is an OpenAI-compatible
server (llama.cpp's `llama-server` first of all), so `generate`, `stream`, `build_ui` and the command line
take it exactly like a model loaded in the kernel.

What goes over the wire (llama-server's fields are from its source, tools/server/server-schema.cpp and
server-task.cpp in the llama.cpp that llama-cpp-python 0.3.35 vendors):

- The prompt is sent to `/v1/completions` as a list of token ids: the exact encoding `encode_chat` makes,
  with control-token spellings typed by the user kept as text. Never rendered text for the server to
  tokenize: llama-server and llama-cpp-python both parse `</s>` or `<s>` in text as control tokens.
- Tokenizing uses the server's own `/tokenize` and `/detokenize` (llama-server), so the client needs no
  model file: the vocabulary is the one generating, and a laptop can drive a 70B model it could not hold.
  Each call is one loopback round trip (about a millisecond); a chat turn is encoded once. For servers
  without that endpoint (vLLM, LM Studio, llama_cpp.server) pass `tokenizer=` a local GGUF of the same model:
  any Llama 2 GGUF, or just its 724 KB vocabulary, tokenizes every Llama 2 chat model the same. An Ollama on
  this machine needs none: its model's GGUF is the file `/api/show` names.
- Streamed as server-sent events. Each chunk is one generated token; `verbose: true` makes llama-server
  add the token's id and the running count (`__verbose.tokens`, `tokens_predicted`), which keeps the
  completion-token count exact even when a token's text is held back (half a UTF-8 character, the start
  of a stop string). `return_progress: true` reports prompt progress, with the tokens reused from the
  server's prompt cache. Servers that ignore those fields still work: one chunk of text, one token.
- A stop closes the connection: llama-server notices at its next token and frees the slot. The socket is shut
  down from the stopping thread, so a stop also ends a wait on a server that went silent.
- Deadlines (`helpers.engine.http.Exchange`): every other request must end, connect to last byte, within
  `connect(..., timeout=)`; a completion must connect within it, and end within `stream_timeout` when one is
  given (a queued request can wait long for a slot, so by default it waits). `max_tokens` is enforced here
  too: a server that claims or sends more tokens than asked is cut off at `max_tokens`.
- What a server sends is bounded (events 4 MiB, JSON 64 levels deep, answers 64 MiB) and every message is
  scrubbed of the API key and the URL's userinfo (`helpers.errors.scrub`), whatever the server echoes.

Servers that take text only (Ollama, LM Studio, llama-cpp-python's `llama_cpp.server`) are refused unless
`connect(url, prompts="text")` opts in: then the rendered prompt goes as text, after the checks in
`helpers.engine.text_prompts` (no message may spell a control token; the text must read back as the same ids).
Ollama is spoken to in its own API, `/api/generate` with `raw: true`: its `/v1/completions` wraps any prompt in
the model's chat template and drops top_k, min_p and repeat_penalty (docs/serving.md, "Text-only servers").

Parity with the in-process model holds for llama-server started with `-fa off` (flash attention changes
the rounding) and repeat_penalty 1.0 (llama-server counts prompt tokens in the penalty window,
llama-cpp-python's sampler does not): see the README's "Serving and scaling out".
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from helpers.engine.backend import PromptProgress, SampledToken
from helpers.engine.http import DEFAULT_TIMEOUT, Endpoint, Exchange, error_message, json_lines, reason, sse_events
from helpers.engine.model import Model
from helpers.engine.text_prompts import check_messages, check_server_reading, prompt_text, server_tokens
from helpers.engine.tokenizers import LocalTokenizer, ServerTokenizer
from helpers.errors import (
    HelpersError,
    ServerAuthError,
    ServerError,
    ServerResponseError,
    ServerUnavailableError,
    TokenPromptsUnsupportedError,
    UsageError,
    scrubbed,
)
from helpers.files.hub import notice
from helpers.settings import GenerationSettings

# --- the backend ---------------------------------------------------------------------------------------


@dataclass
class Usage:
    """What the server said about the last completion (None where it did not say)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    timings: dict = field(default_factory=dict)


PROMPTS = ("tokens", "text")  # connect(..., prompts=): token ids (llama-server, vLLM), or text (text-only servers)


class RemoteBackend:
    """`helpers.engine.backend.Backend` over an OpenAI-compatible server: tokenizer calls go to the tokenizer,
    `complete` is one streamed `/v1/completions` request with a token-id prompt (or its text: `prompts="text"`)."""

    path = "/v1/completions"

    def __init__(
        self,
        endpoint: Endpoint,
        model_id: str,
        tokenizer,
        n_ctx: int,
        *,
        prompts: str = "tokens",
        stream_timeout: float | None = None,
    ):
        self.endpoint, self.model_id, self.prompts = endpoint, model_id, prompts
        self.stream_timeout = stream_timeout  # seconds a whole completion may take; None: as long as it needs
        self._tokenizer = tokenizer
        self._n_ctx = n_ctx
        self.metadata = tokenizer.metadata
        self.add_bos = tokenizer.add_bos
        self.last_usage = Usage()
        self._lock = threading.Lock()
        self._exchange: Exchange | None = None  # the completion under way
        self._told_speculative = False  # the notice that `settings.speculative` is not sent, given once

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._tokenizer.n_vocab()

    def token_bos(self) -> int:
        return self._tokenizer.token_bos()

    def token_eos(self) -> int:
        return self._tokenizer.token_eos()

    def is_control(self, token: int) -> bool:
        return self._tokenizer.is_control(token)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return self._tokenizer.tokenize(text, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return self._tokenizer.detokenize(tokens, special=special)

    def specials_in(self, text: str) -> list[str]:
        return self._tokenizer.specials_in(text)

    def prompt(self, prompt: Sequence[int]) -> list[int] | str:
        """What goes in the request: the token ids, or (`prompts="text"`) the text that reads back as them."""
        return list(prompt) if self.prompts == "tokens" else prompt_text(self, prompt)

    def cached_tokens(self) -> list[int]:
        return []  # the server's slots keep their own caches; it reports reuse per request

    def request(self, prompt: Sequence[int], settings: GenerationSettings, seed: int) -> dict:
        """The `/v1/completions` body: OpenAI's fields, plus llama-server's (and vLLM's) sampling extras."""
        return {
            "model": self.model_id,
            "prompt": self.prompt(prompt),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "min_p": settings.min_p,
            "repeat_penalty": settings.repeat_penalty,  # llama-server's name
            "repetition_penalty": settings.repeat_penalty,  # vLLM's name (each server ignores the other)
            "seed": seed,
            "stop": list(settings.stop),
            "cache_prompt": settings.cache_prompt,
            "return_progress": True,
            "verbose": True,
        }

    def interrupt(self) -> None:
        """Close the stream (from any thread): a blocked read returns at once, and the server stops at its next
        token."""
        with self._lock:
            if self._exchange is not None:
                self._exchange.stop()

    def complete(
        self, prompt: Sequence[int], settings: GenerationSettings, seed: int, cancel: threading.Event
    ) -> Iterator[PromptProgress | SampledToken]:
        prompt = list(prompt)
        if settings.speculative and not self._told_speculative:
            self._told_speculative = True  # llama-server's requests take no speculative options (server-schema.cpp)
            notice(
                f"speculative={settings.speculative!r} is ignored with a server: llama-server speculates by "
                "itself when started with --spec-type ngram-simple (or a draft model)."
            )
        self.last_usage = usage = Usage()
        request = self.request(prompt, settings, seed)
        limit = f"the stream_timeout of {self.stream_timeout:g} s" if self.stream_timeout else ""
        exchange = Exchange(self.endpoint, self.stream_timeout, limit)
        with self._lock:
            self._exchange = exchange
        if cancel.is_set():  # cancelled before the exchange could be stopped
            exchange.stop()
        try:
            response = exchange.open("POST", self.path, request)
            yield from self._events(response, prompt, usage, cancel, exchange, settings.max_tokens)
        except (OSError, http.client.HTTPException, ServerError) as error:
            if exchange.ended == "stop" or cancel.is_set():
                return  # the stream was closed on purpose: whatever the read saw then is no error
            if exchange.ended == "deadline":
                raise exchange.expired() from None
            if isinstance(error, ServerError):
                raise scrubbed(error, self.endpoint.secrets) from None
            raise scrubbed(
                ServerResponseError(
                    f"The connection to {self.endpoint.base_url} broke in the middle of the answer "
                    f"({reason(error)}). The server may have stopped or restarted; try again."
                ),
                self.endpoint.secrets,
            ) from None
        finally:
            with self._lock:
                self._exchange = None
            exchange.close()

    def _events(self, response, prompt, usage: Usage, cancel: threading.Event, exchange: Exchange, max_tokens: int):
        """Events of one streamed completion, one `SampledToken` per generated token, `max_tokens` at most. A
        token that comes without text is held until the next chunk: if the stream then ends with llama-server's
        "eos", it was the end-of-generation token (not counted, as in the in-process path); otherwise an
        ordinary one. More tokens than `max_tokens` (claimed by the count, or sent) end the stream there."""
        total = len(prompt)
        decoded = 0  # tokens the server says it has generated (when it says: llama-server's __verbose)
        counted = 0  # tokens handed on or held
        held: SampledToken | None = None
        progressed = False
        for event in sse_events(response):
            if _stopped(cancel, exchange):
                return
            if event is None:  # data: [DONE]
                break
            if "error" in event:
                message = error_message(json.dumps(event).encode())
                raise ServerResponseError(f"The server reported an error in the middle of the answer: {message}")
            if isinstance(event.get("usage"), dict):
                _read_usage(usage, event)
            if isinstance(event.get("prompt_progress"), dict):
                p = event["prompt_progress"]
                progressed = True
                yield PromptProgress(_count(p, "processed", 0), _count(p, "total", total), _count(p, "cache", 0))
                continue
            choices = event.get("choices")
            if not isinstance(choices, list):
                raise ServerResponseError(f"The server sent an event without choices: {json.dumps(event)[:120]}.")
            if not choices:
                continue  # the usage chunk
            choice = choices[0]
            if not isinstance(choice, dict) or not isinstance(choice.get("text") or "", str):
                raise ServerResponseError(f"The server sent a malformed choice: {json.dumps(choice)[:120]}.")
            if not progressed:  # a server without prompt progress: the prompt was read by the first chunk
                progressed = True
                yield PromptProgress(total, total, 0)
            text = choice.get("text") or ""
            details = event["__verbose"] if isinstance(event.get("__verbose"), dict) else {}
            finish = choice.get("finish_reason")
            count = details.get("tokens_predicted")
            if finish is None and isinstance(count, int) and not isinstance(count, bool):
                new, decoded = max(0, count - decoded), max(count, decoded)
            else:
                new = 1 if text else 0  # one chunk of text, one token
            over = finish is None and new > max_tokens - counted
            new = min(new, max_tokens - counted)  # a last chunk past max_tokens adds nothing
            counted += new
            if new and held is not None:
                yield held
                held = None
            for _ in range(new - 1):  # tokens whose text came with a later one (half a UTF-8 character)
                yield SampledToken(-1, b"", False)
            if new:
                ids = details.get("tokens") or [-1]
                token = SampledToken(_token_id(ids), _utf8(text), False)
                if text:
                    yield token
                else:
                    held = token
            if over:  # more than asked for: the answer ends at max_tokens, the stream is closed
                if held is not None:
                    yield held
                usage.finish_reason = "length"
                exchange.stop()
                return
            if finish is None:
                continue
            usage.finish_reason = finish
            if held is not None and details.get("stop_type") == "eos":
                yield SampledToken(held.id, b"", True)  # the end-of-generation token
            else:
                if held is not None:
                    yield held
                if finish == "stop":
                    yield SampledToken(-1, b"", True)
            held = None
        if usage.finish_reason is None and not _stopped(cancel, exchange):
            raise ServerResponseError(
                "The server ended the stream without finishing the answer (no finish_reason): it may have "
                "crashed or restarted. Try again."
            )

    def close(self) -> None:
        self.interrupt()
        self._tokenizer.close()


def _stopped(cancel: threading.Event, exchange: Exchange) -> bool:
    """True when the stream was stopped on purpose; at its deadline, the timeout error."""
    if exchange.ended == "deadline":
        raise exchange.expired()
    return cancel.is_set() or exchange.ended == "stop"


def _utf8(text: str) -> bytes:
    """A piece's bytes; a lone surrogate (JSON can escape one: "\\ud800") becomes U+FFFD, as invalid UTF-8 does."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text).encode("utf-8")


def _count(data: dict, key: str, default: int) -> int:
    """A count the server reported, or `default` when it is not a non-negative integer."""
    value = data.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _token_id(ids) -> int:
    """The last id of llama-server's `__verbose.tokens`, or -1 when it is not an integer list."""
    last = ids[-1] if isinstance(ids, list) and ids else -1
    return last if isinstance(last, int) and not isinstance(last, bool) else -1


def _read_usage(usage: Usage, event: dict) -> None:
    data = event["usage"]
    usage.prompt_tokens = data.get("prompt_tokens")
    usage.completion_tokens = data.get("completion_tokens")
    details = data.get("prompt_tokens_details") or {}
    usage.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(event.get("timings"), dict):
        usage.timings = event["timings"]


class OllamaBackend(RemoteBackend):
    """Ollama, in its own API: `/api/generate` with `raw: true` and the prompt as text (Ollama takes no token
    ids). Read from its source (ollama/ollama, server/routes.go GenerateHandler, llm/llama_server.go): raw
    skips the model's template, and the text goes to llama-server's `/completion`, which adds the BOS and parses
    control tokens. Every sampling setting maps to an option; the answer streams as JSON lines, one per piece of
    text, then a last one with `done_reason`, `prompt_eval_count` (the whole prompt, cached tokens included) and
    `eval_count`. Ollama always reuses its prompt cache and does not say how much: no cache figures."""

    path = "/api/generate"

    def request(self, prompt: Sequence[int], settings: GenerationSettings, seed: int) -> dict:
        options = {
            "num_ctx": self.n_ctx(),  # the context the helpers fit the dialog into (Ollama's default may differ)
            "num_predict": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "min_p": settings.min_p,
            "repeat_penalty": settings.repeat_penalty,
            "seed": seed,
        }
        if settings.stop:
            options["stop"] = list(settings.stop)
        # truncate: false: a prompt too long for the context is an error, never silently cut from the front
        return {
            "model": self.model_id,
            "prompt": self.prompt(prompt),
            "raw": True,
            "stream": True,
            "truncate": False,
            "options": options,
        }

    def _events(self, response, prompt, usage: Usage, cancel: threading.Event, exchange: Exchange, max_tokens: int):
        """One `SampledToken` per line with text (Ollama sends no ids, and no line for a token whose text is held
        back), the end-of-generation after a "stop"; at most `max_tokens`."""
        total, progressed, counted = len(prompt), False, 0
        for line in json_lines(response):
            if _stopped(cancel, exchange):
                return
            if "error" in line:
                raise ServerResponseError(f"The server reported an error in the middle of the answer: {line['error']}")
            if not progressed:  # no prompt progress: the prompt was read by the first line
                progressed = True
                yield PromptProgress(total, total, 0)
            text = line.get("response") or ""
            if not isinstance(text, str):
                raise ServerResponseError(f"The server sent a malformed line: {json.dumps(line)[:120]}.")
            if text and counted == max_tokens:  # more than asked for
                if not line.get("done"):
                    usage.finish_reason = "length"
                    exchange.stop()
                    return
                text = ""
            if text:
                counted += 1
                yield SampledToken(-1, _utf8(text), False)
            if line.get("done"):
                usage.finish_reason = line.get("done_reason") or "stop"
                usage.prompt_tokens, usage.completion_tokens = line.get("prompt_eval_count"), line.get("eval_count")
                usage.timings = {  # under llama-server's names; Ollama reports nanoseconds
                    "prompt_n": usage.prompt_tokens,
                    "prompt_ms": (line.get("prompt_eval_duration") or 0) / 1e6,
                    "predicted_n": usage.completion_tokens,
                    "predicted_ms": (line.get("eval_duration") or 0) / 1e6,
                }
                if usage.finish_reason == "stop":
                    yield SampledToken(-1, b"", True)
                return
        if not _stopped(cancel, exchange):
            raise ServerResponseError(
                "The server ended the stream without finishing the answer (no line with done: true): it may have "
                "stopped the model (Ollama also ends an answer that repeats one token 30 times). Try again."
            )


# --- the model -----------------------------------------------------------------------------------------


class RemoteModel(Model):
    """A model on a server, from `helpers.connect`. Everything a loaded `helpers.Model` does, except
    `llama` (there is no `llama_cpp.Llama` in this process)."""

    def __init__(self, backend: RemoteBackend, *, template: str | None, slots: int | None, server: str | None = None):
        super().__init__(backend, template=template)
        self.base_url, self.model_id, self.slots = backend.endpoint.base_url, backend.model_id, slots
        self.prompts, self.server = backend.prompts, server  # server: what it is, when it says (Ollama 0.32.7)
        self.text_check: str | None = None  # prompts="text": what connect found out about the server's reading

    @property
    def last_usage(self) -> Usage:
        """What the server reported about the last completion (its own token counts, cache use, timings)."""
        return self.backend.last_usage

    def check_messages(self, messages, answer_prefix: str = "") -> None:
        """A server fed text refuses a message that spells one of the vocabulary's special tokens (ControlTokenError,
        naming the message and the token); fed token ids, it takes any text."""
        if self.prompts == "text":
            check_messages(self.backend, messages, answer_prefix)

    def describe(self) -> str:
        slots = f", {self.slots} parallel slot{'s' if self.slots != 1 else ''}" if self.slots else ""
        server = f" ({self.server})" if self.server else ""
        line = f"Connected to {self.model_id} at {self.base_url}{server}: context {self.n_ctx()} tokens per request{slots}."
        if self.prompts == "text":
            line += (
                " Prompts go as text (prompts='text'): a message that spells a control token is refused; "
                f"{self.text_check}."
            )
        return line

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<helpers.RemoteModel {self.model_id} at {self.base_url} ({state})>"


def connect(
    base_url: str,
    *,
    api_key: str | None = None,
    model: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    tokenizer: str | Path | None = None,
    template: str | None = None,
    prompts: str = "tokens",
    stream_timeout: float | None = None,
) -> RemoteModel:
    """A model served at `base_url` (`http://127.0.0.1:8080/v1`), usable wherever a loaded model is.

    `api_key`: sent as `Authorization: Bearer ...`, never printed (nor is userinfo in `base_url`, sent as Basic
    credentials). `model`: which served model (default: the first `/v1/models` lists). `timeout`: seconds each
    request may take, from connecting to its last byte (a completion: to connect). `stream_timeout`: seconds a
    whole completion may take (default: as long as the server needs; a stop always ends it at once).
    `tokenizer`: a local GGUF of the same model, for servers without llama-server's `/tokenize` (vLLM, LM Studio,
    llama_cpp.server; an Ollama on this machine needs none). `template`: the chat template's name (default:
    Llama 2's for Llama 2 models, else the server's). `prompts`: "tokens" (token ids: llama-server, vLLM), or
    "text" for servers that take only text (Ollama, LM Studio, llama_cpp.server): then a message that spells a
    control token raises `ControlTokenError` before anything is sent (`helpers.engine.text_prompts`).

    Checks the server now: that it answers, accepts the key, takes token-id prompts (or, with prompts="text",
    reads the prompt text as the same ids, where it can tokenize), and tokenizes.
    """
    if prompts not in PROMPTS:
        raise UsageError(f"prompts must be one of: {', '.join(PROMPTS)}; got {prompts!r}.")
    if stream_timeout is not None and (
        isinstance(stream_timeout, bool) or not (isinstance(stream_timeout, int | float) and 0 < stream_timeout < 10**7)
    ):
        raise UsageError(f"stream_timeout must be a positive number of seconds or None, got {stream_timeout!r}.")
    endpoint = Endpoint.parse(base_url, api_key, timeout)
    try:
        return _connect(endpoint, model, tokenizer, template, prompts, stream_timeout)
    except HelpersError as error:  # the one boundary: nothing the server echoed keeps a secret
        raise scrubbed(error, endpoint.secrets) from None


def _connect(endpoint: Endpoint, model, tokenizer, template, prompts: str, stream_timeout) -> RemoteModel:
    base_url = endpoint.base_url
    listed = endpoint.json("GET", "/v1/models")
    data = listed.get("data") if isinstance(listed, dict) else None
    if not isinstance(data, list) or not data or not all(isinstance(m, dict) and "id" in m for m in data):
        raise ServerResponseError(
            f"{endpoint.url('/v1/models')} did not list any model: is {base_url} an OpenAI-compatible server?"
        )
    ids = [str(m["id"]) for m in data]
    if model is None:
        model, info = ids[0], data[0]
    elif model in ids:
        info = data[ids.index(model)]
    else:
        raise UsageError(f"The server does not serve {model!r}; it serves: {', '.join(ids)}.")
    if prompts == "tokens":
        _check_token_prompts(endpoint, model)

    meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
    props = _props(endpoint)
    ollama = _ollama_version(endpoint) if prompts == "text" and props is None else None
    shown = _ollama_show(endpoint, model) if ollama else {}
    if tokenizer is None and ollama:
        tokenizer = _ollama_gguf(shown, model)
    tok = LocalTokenizer(tokenizer) if tokenizer is not None else None
    if tok is None:
        if props is None:
            raise ServerResponseError(
                f"{endpoint.root} has no /props and /tokenize (llama.cpp's llama-server has them), so the prompt "
                "cannot be tokenized with the served model's vocabulary. Pass tokenizer= a local GGUF of the same "
                "model (for Llama 2, any Llama 2 GGUF): connect(url, tokenizer='llama-2-7b-chat.Q4_K_M.gguf')."
            )
        tok = ServerTokenizer(endpoint, props, _count(meta, "n_vocab", 0))
    settings = (props or {}).get("default_generation_settings")
    settings = settings if isinstance(settings, dict) else {}
    n_ctx = _count(settings, "n_ctx", 0) or _count(meta, "n_ctx", 0) or _count(info, "max_model_len", 0)
    n_ctx = n_ctx or _ollama_context(shown) or 4096
    kind = OllamaBackend if ollama else RemoteBackend
    backend = kind(endpoint, model, tok, n_ctx, prompts=prompts, stream_timeout=stream_timeout)
    server = f"Ollama {ollama}" if ollama else None
    remote = RemoteModel(backend, template=template, slots=_count(props or {}, "total_slots", 0) or None, server=server)
    if prompts == "text":
        try:
            reader = server_tokens(endpoint, model, llama_server=props is not None)
            remote.text_check = check_server_reading(remote, reader)
        except BaseException:
            remote.close()
            raise
    return remote


def _ollama_version(endpoint: Endpoint) -> str | None:
    """Ollama's version from its `/api/version` (routes.go), or None: not an Ollama."""
    try:
        answer = endpoint.json("GET", "/api/version")
    except ServerResponseError:
        return None
    version = answer.get("version") if isinstance(answer, dict) else None
    return version if isinstance(version, str) else None


def _ollama_show(endpoint: Endpoint, model: str) -> dict:
    answer = endpoint.json("POST", "/api/show", {"model": model})
    return answer if isinstance(answer, dict) else {}


def _ollama_gguf(shown: dict, model: str) -> str:
    """The model's GGUF on this machine: the `FROM` of the Modelfile `/api/show` returns (the blob's path)."""
    found = re.search(r"^FROM (.+)$", str(shown.get("modelfile") or ""), re.MULTILINE)
    path = Path(found.group(1).strip()) if found else None
    if path is None or not path.is_file():
        raise UsageError(
            f"Ollama's {model!r} is not a file on this machine ({path or 'no FROM in its Modelfile'}): Ollama runs "
            "elsewhere, or as another user. Pass connect(..., tokenizer=) a GGUF of the same model (for Llama 2, any "
            f"Llama 2 GGUF; `ollama show --modelfile {model}` names Ollama's copy)."
        )
    return str(path)


def _ollama_context(shown: dict) -> int | None:
    """The model's training context (`<architecture>.context_length`), at most 4096 as `load_model` chooses."""
    info = shown.get("model_info") if isinstance(shown.get("model_info"), dict) else {}
    trained = info.get(f"{info.get('general.architecture')}.context_length")
    return min(int(trained), 4096) if isinstance(trained, int) and trained > 0 else None


def _props(endpoint: Endpoint) -> dict | None:
    try:
        props = endpoint.json("GET", "/props")
    except ServerResponseError as error:
        if error.status == 404 or "not answer with JSON" in str(error):
            return None
        raise
    return props if isinstance(props, dict) else None


def _check_token_prompts(endpoint: Endpoint, model: str) -> None:
    """One token generated from a token-id prompt: a server that only takes text says no here, not mid-chat."""
    body = {"model": model, "prompt": [1, 2], "max_tokens": 1, "temperature": 0, "stream": False, "cache_prompt": False}
    try:
        answer = endpoint.json("POST", "/v1/completions", body)
    except ServerResponseError as error:
        # Rejected as invalid input (llama-cpp-python's server: HTTP 500 "Input should be a valid string").
        invalid = error.status in (400, 422) or re.search(r"string|prompt", str(error), re.IGNORECASE)
        if error.status is None or error.status == 404 or not invalid:
            raise
        raise TokenPromptsUnsupportedError(
            f"{endpoint.base_url} does not accept a prompt given as token ids (HTTP {error.status}: {error.detail}): "
            "it takes text only, as Ollama and LM Studio do (llama-cpp-python's llama_cpp.server takes text only "
            "too). connect(url, prompts='text') sends the rendered prompt as text instead. The risk: the server "
            "tokenizes that text itself and reads a typed </s> or <|im_end|> as the control token, ending or forging "
            "a turn; so with prompts='text' a message that spells a control token is refused before anything is sent. "
            "Or use a server that takes token ids: llama.cpp's llama-server (`make serve`) or vLLM."
        ) from None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        raise TokenPromptsUnsupportedError(
            f"{endpoint.base_url} answered a token-id prompt without choices: it does not seem to take token ids."
        )


__all__ = [
    "connect",
    "RemoteModel",
    "RemoteBackend",
    "OllamaBackend",
    "ServerError",
    "ServerUnavailableError",
    "ServerAuthError",
    "ServerResponseError",
    "TokenPromptsUnsupportedError",
]
