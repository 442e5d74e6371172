"""A stand-in for Ollama on 127.0.0.1: its HTTP API as its source defines it, since Ollama itself cannot be
installed here. Read from github.com/ollama/ollama at fb30760 (v0.32.7 and after):

- server/routes.go: the routes (1879-1926); GenerateHandler (245-793: without `raw` the prompt is wrapped in
  the model's template, 498-621; raw with a template, system or context is refused, 422-425; the `context`
  field only without raw, 712-719); streamResponse (2097-2140: NDJSON lines; an error before any output is
  that HTTP status with {"error": ...}, after it one {"error": ...} line and the end); ListHandler (1632);
  ShowHandler/GetModelInfo (1300-1545: the Modelfile's `FROM` is the model's GGUF blob).
- llm/llama_server.go: the prompt goes to llama-server's /completion as text (1528-1772; llama-server tokenizes
  it with add_special and parse_special), the options it maps (1393-1415), the final counts
  (prompt_eval_count = cache_n + prompt_n, eval_count = predicted_n: 1499-1515, 1713-1729).
- openai/openai.go and middleware/openai.go: /v1/completions takes a string prompt only (openai.go 148-163),
  maps temperature (default 1.0), top_p (default 1.0), seed, stop, max_tokens and the penalties but not top_k,
  min_p or repeat_penalty (786-855), renders the model's template (no raw), streams `data:` chunks with a usage
  chunk at the end when stream_options.include_usage, each chunk then carrying zeroed usage (middleware
  185-240); errors are {"error": {"message", "type", ...}} (openai.go 225-237, middleware 64-78).
- api/types.go: the request and response fields, DefaultOptions (1096-1123).

Generation: with `upstream` (a llama-server root) /api/generate forwards the prompt text to its /completion as
Ollama does, so the answer is the real model's; without it the answer is `state.answer`, one piece per token.
Either way the prompt text is tokenized with the model's GGUF vocabulary exactly as llama-server tokenizes it
(llama.cpp, BOS added, control-token spellings parsed), and the ids are kept in `state.prompt_tokens`: what the
model would have read.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VERSION = "0.32.7"
DEFAULT_OPTIONS = {  # api/types.go DefaultOptions (num_ctx: envconfig.ContextLength(), 4096 by default)
    "num_predict": -1, "num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "typical_p": 1.0,
    "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": -1,
    "num_ctx": 4096, "min_p": 0.0,
}  # fmt: skip
LLAMA2_TEMPLATE = "[INST] {prompt} [/INST]"  # the gist of the llama2 library model's TEMPLATE (no system)


@dataclass
class OllamaState:
    models: dict[str, Path]  # "llama2:7b-chat" -> its GGUF (the blob /api/show's Modelfile names in FROM)
    upstream: str | None = None  # a llama-server root (http://127.0.0.1:PORT): /api/generate forwards there
    answer: list[str] = field(default_factory=lambda: ["Hi", " there", "!"])
    # "ok" | "error-before" (HTTP 500 before any output) | "error-mid" (an {"error"} line after the first piece)
    # | "cut" (the connection closes mid-answer) | "count-off" (prompt_eval_count one more than it read)
    mode: str = "ok"
    context_length: int = 4096
    blobs: dict[str, str] = field(default_factory=dict)  # the FROM /api/show reports, when not the GGUF here
    cache_prompt: bool = True  # Ollama always sends true; a test sets False to compare with a fresh read
    requests: list[tuple[str, dict]] = field(default_factory=list)
    prompt_tokens: list[list[int]] = field(default_factory=list)  # the ids each prompt text became
    _vocabs: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tokenize(self, name: str, text: str) -> list[int]:
        """As llama-server tokenizes a prompt: BOS added when the vocabulary wants one, control tokens parsed."""
        import llama_cpp

        with self._lock:
            if name not in self._vocabs:
                self._vocabs[name] = llama_cpp.Llama(model_path=str(self.models[name]), vocab_only=True, verbose=False)
            return self._vocabs[name].tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def close(self) -> None:
        for llama in self._vocabs.values():
            llama.close()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(name: str) -> dict:
    return {
        "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
        "parameter_size": "7B" if "7b" in name else "135M", "quantization_level": "Q4_0",
    }  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    state: OllamaState
    protocol_version = "HTTP/1.1"  # Go's net/http: JSON with a Content-Length, streams chunked

    def log_message(self, *args):
        pass

    # --- writing -----------------------------------------------------------------------------------------

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:  # gin's NoRoute
        data = b"404 page not found"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # --- routes --------------------------------------------------------------------------------------------

    def do_GET(self):
        if self.path == "/api/version":
            self._json(200, {"version": VERSION})
        elif self.path == "/api/tags":
            self._json(200, {"models": [self._listed(name) for name in self.state.models]})
        elif self.path == "/v1/models":
            created = int(time.time())
            data = [{"id": n, "object": "model", "created": created, "owned_by": "library"} for n in self.state.models]
            self._json(200, {"object": "list", "data": data})
        else:
            self._not_found()

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw) if raw else None
        except ValueError as error:
            self._json(400, {"error": str(error)})
            return
        self.state.requests.append((self.path, body))
        if self.path == "/api/show":
            self._show(body)
        elif self.path == "/api/generate":
            self._generate(body)
        elif self.path == "/v1/completions":
            self._openai_completion(body)
        else:
            self._not_found()

    def _listed(self, name: str) -> dict:
        path = self.state.models[name]
        size = path.stat().st_size if path.is_file() else 0
        return {"name": name, "model": name, "modified_at": _now(), "size": size, "digest": "0" * 64,
                "details": _details(name)}  # fmt: skip

    def _show(self, body) -> None:
        name = (body or {}).get("model") or (body or {}).get("name")
        if not name:
            self._json(400, {"error": "model is required"})
            return
        if name not in self.state.models:
            self._json(404, {"error": f"model '{name}' not found"})
            return
        blob = self.state.blobs.get(name, self.state.models[name])
        modelfile = (
            '# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:\n'
            f'# FROM {name}\n\nFROM {blob}\nTEMPLATE "{LLAMA2_TEMPLATE}"\n'
        )
        info = {"general.architecture": "llama", "llama.context_length": self.state.context_length}
        self._json(200, {"modelfile": modelfile, "parameters": "", "template": LLAMA2_TEMPLATE,
                         "details": _details(name), "model_info": info, "capabilities": ["completion"],
                         "modified_at": _now()})  # fmt: skip

    # --- /api/generate (GenerateHandler) --------------------------------------------------------------------

    def _generate(self, body) -> None:
        if body is None:
            self._json(400, {"error": "missing request body"})
            return
        name = body.get("model", "")
        if name not in self.state.models:
            self._json(404, {"error": f"model '{name}' not found"})
            return
        raw = bool(body.get("raw"))
        if raw and (body.get("template") or body.get("system") or body.get("context")):
            self._json(400, {"error": "raw mode does not support template, system, or context"})
            return
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            self._json(400, {"error": "json: cannot unmarshal array into Go struct field GenerateRequest.prompt of type string"})  # fmt: skip
            return
        if prompt == "":
            self._json(200, {"model": name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"})
            return
        if not raw:
            prompt = LLAMA2_TEMPLATE.format(prompt=prompt)
        options = {**DEFAULT_OPTIONS, **(body.get("options") or {})}
        streaming = body.get("stream", True) is not False
        pieces = self._pieces(name, prompt, options)
        if not streaming:
            self._generate_whole(name, pieces, raw)
            return
        self._generate_stream(name, pieces, raw)

    def _generate_whole(self, name, pieces, raw) -> None:
        text, final = "", None
        try:
            for kind, value in pieces:
                if kind == "piece":
                    text += value
                else:
                    final = value
        except _RunnerError as error:
            self._json(500, {"error": str(error)})
            return
        self._json(200, self._final(name, final, raw, text))

    def _generate_stream(self, name, pieces, raw) -> None:
        started = False
        try:
            for kind, value in pieces:
                if not started:
                    self._start_stream("application/x-ndjson")
                    started = True
                if kind == "piece":
                    line = {"model": name, "created_at": _now(), "response": value, "done": False}
                else:
                    line = self._final(name, value, raw, "")
                self._chunk(json.dumps(line).encode() + b"\n")
        except _RunnerError as error:
            if not started:
                self._json(500, {"error": str(error)})
                return
            self._chunk(json.dumps({"error": str(error)}).encode() + b"\n")
        except _Cut:
            self.close_connection = True
            return  # no terminating chunk: the client sees the body end early
        self._end_stream()

    def _final(self, name: str, final: dict, raw: bool, text: str) -> dict:
        out = {"model": name, "created_at": _now(), "response": text, "done": True, **final}
        if not raw:
            out["context"] = self.state.tokenize(name, "x")  # the real one encodes prompt + answer; any ids do here
        return out

    def _pieces(self, name: str, prompt: str, options: dict):
        """("piece", text) for each generated piece, then ("final", {done_reason and the metrics})."""
        tokens = self.state.tokenize(name, prompt)
        self.state.prompt_tokens.append(tokens)
        started = time.perf_counter_ns()
        if self.state.mode == "error-before":
            raise _RunnerError("model runner has unexpectedly stopped, this may be due to resource limitations")
        if self.state.upstream:
            yield from self._forward(prompt, options, started)
            return
        limit, stops = options["num_predict"], options.get("stop") or []
        text, count, reason = "", 0, "stop"
        for piece in self.state.answer:
            if 0 <= limit <= count:
                reason = "length"
                break
            if self.state.mode == "error-mid" and count == 1:
                raise _RunnerError("an error was encountered while running the model: CUDA error")
            if self.state.mode == "cut" and count == 2:
                raise _Cut
            count += 1
            hit = [(text + piece).find(s) for s in stops if s in text + piece]
            if hit:
                piece = (text + piece)[: min(hit)][len(text) :]
                if piece:
                    yield "piece", piece
                break
            text += piece
            yield "piece", piece
        else:
            count += 1  # the end-of-generation token, which llama-server counts in predicted_n
        elapsed = time.perf_counter_ns() - started
        counted = len(tokens) + (self.state.mode == "count-off")
        yield "final", {"done_reason": reason, "total_duration": elapsed, "load_duration": 1000,
                        "prompt_eval_count": counted, "prompt_eval_duration": elapsed // 2,
                        "eval_count": count, "eval_duration": elapsed // 2}  # fmt: skip

    def _forward(self, prompt: str, options: dict, started: int):
        """llm/llama_server.go's Completion: the prompt text to llama-server's /completion, streamed back."""
        request = {
            "prompt": prompt, "stream": True, "cache_prompt": self.state.cache_prompt, "n_predict": options["num_predict"],
            "n_keep": options["num_keep"], "temperature": options["temperature"], "top_k": options["top_k"],
            "top_p": options["top_p"], "min_p": options["min_p"], "stop": options.get("stop") or [],
            "repeat_penalty": options["repeat_penalty"], "repeat_last_n": options["repeat_last_n"],
            "frequency_penalty": options["frequency_penalty"], "presence_penalty": options["presence_penalty"],
            "typical_p": options["typical_p"], "seed": options["seed"],
        }  # fmt: skip
        data = json.dumps(request).encode()
        upstream = urllib.request.Request(
            self.state.upstream + "/completion", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(upstream, timeout=600) as response:
            for line in response:
                line = line.strip()
                if not line or line.startswith(b":"):
                    continue
                event = json.loads(line.removeprefix(b"data: "))
                if event.get("content") and not event.get("stop"):
                    yield "piece", event["content"]
                if event.get("stop"):
                    timings = event.get("timings") or {}
                    yield "final", {
                        "done_reason": "length" if event.get("stop_type") == "limit" else "stop",
                        "total_duration": time.perf_counter_ns() - started, "load_duration": 1000,
                        "prompt_eval_count": timings.get("cache_n", 0) + timings.get("prompt_n", 0),
                        "prompt_eval_duration": int(timings.get("prompt_ms", 0) * 1e6),
                        "eval_count": timings.get("predicted_n", 0),
                        "eval_duration": int(timings.get("predicted_ms", 0) * 1e6),
                    }  # fmt: skip
                    return

    # --- /v1/completions (CompletionsMiddleware + CompleteWriter over GenerateHandler) --------------------------

    def _openai_error(self, status: int, message: str) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _openai_completion(self, body) -> None:
        body = body or {}
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            kind = "array" if isinstance(prompt, list) else type(prompt).__name__
            self._openai_error(
                400, f"json: cannot unmarshal {kind} into Go struct field CompletionRequest.prompt of type string"
            )
            return
        name = body.get("model", "")
        if name not in self.state.models:
            self._openai_error(404, f"model '{name}' not found")
            return
        options = dict(DEFAULT_OPTIONS)
        stop = body.get("stop")
        if stop is not None:
            options["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if body.get("max_tokens") is not None:
            options["num_predict"] = body["max_tokens"]
        options["temperature"] = body["temperature"] if body.get("temperature") is not None else 1.0
        if body.get("seed") is not None:
            options["seed"] = body["seed"]
        options["top_p"] = body.get("top_p") or 1.0
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pieces = self._pieces(name, LLAMA2_TEMPLATE.format(prompt=prompt), options)
        chunk_id = f"cmpl-{int(time.time() * 1000) % 999}"

        def chunk(text, finish, usage=None, choices=True) -> bytes:
            event = {"id": chunk_id, "object": "text_completion", "created": int(time.time()),
                     "choices": [{"text": text, "index": 0, "finish_reason": finish}] if choices else [],
                     "model": name, "system_fingerprint": "fp_ollama"}  # fmt: skip
            if include_usage:
                event["usage"] = usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        if not body.get("stream"):
            text, final = "", {}
            try:
                for kind, value in pieces:
                    text, final = (text + value, final) if kind == "piece" else (text, value)
            except _RunnerError as error:
                self._openai_error(500, str(error))
                return
            usage = {"prompt_tokens": final["prompt_eval_count"], "completion_tokens": final["eval_count"],
                     "total_tokens": final["prompt_eval_count"] + final["eval_count"]}  # fmt: skip
            self._json(200, {"id": chunk_id, "object": "text_completion", "created": int(time.time()),
                             "model": name, "system_fingerprint": "fp_ollama",
                             "choices": [{"text": text, "index": 0, "finish_reason": final["done_reason"]}],
                             "usage": usage})  # fmt: skip
            return
        started = False
        try:
            for kind, value in pieces:
                if not started:
                    self._start_stream("text/event-stream")
                    started = True
                if kind == "piece":
                    self._chunk(chunk(value, None))
                    continue
                self._chunk(chunk("", value["done_reason"]))
                if include_usage:
                    usage = {"prompt_tokens": value["prompt_eval_count"], "completion_tokens": value["eval_count"],
                             "total_tokens": value["prompt_eval_count"] + value["eval_count"]}  # fmt: skip
                    self._chunk(chunk("", None, usage, choices=False))
                self._chunk(b"data: [DONE]\n\n")
        except _RunnerError as error:
            if not started:
                self._openai_error(500, str(error))
                return
            # The writer unmarshals {"error": ...} into an empty GenerateResponse: an empty chunk, then the end.
            self._chunk(chunk("", None))
        except _Cut:
            self.close_connection = True
            return
        self._end_stream()


class _RunnerError(Exception):
    pass


class _Cut(Exception):
    pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that closed the stream (a Stop) is no error
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class OllamaStandIn:
    """`with OllamaStandIn({"llama2:7b-chat": gguf}) as ollama:` serves at `ollama.url` (…/v1, as a user gives
    it) and `ollama.root`; `ollama.state` holds the mode, the requests and the prompt ids."""

    def __init__(self, models: dict[str, str | Path], *, upstream: str | None = None):
        self.state = OllamaState({name: Path(path) for name, path in models.items()}, upstream=upstream)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.root + "/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def generate_requests(self) -> list[dict]:
        return [body for path, body in self.state.requests if path == "/api/generate"]

    def __enter__(self) -> OllamaStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.state.close()


__all__ = ["OllamaStandIn", "OllamaState", "LLAMA2_TEMPLATE", "VERSION"]
