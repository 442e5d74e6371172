"""A small OpenAI-compatible server on 127.0.0.1 that can misbehave on purpose, for the failures a real
llama-server does not produce on demand: an HTTP 500, a stream cut in the middle of the answer, events that
are not JSON, and a server that takes text prompts only (as llama-cpp-python's `llama_cpp.server`, which
answers a token-id prompt with HTTP 500 "Input should be a valid string").

Hostile modes, for the deadlines and the scrubbing: "echo-500" and "echo-401" answer with a body that echoes the
request's headers (the Authorization header with them); "silent" sends a stream's headers and then nothing,
"silent-after-token" one token and then nothing; "drip" sends every answer a byte every `drip_seconds`;
"many-tokens" claims 10^9 generated tokens in one chunk, "endless" streams tokens and never finishes;
"nested" sends an event nested 100,000 deep, "huge-event" one data line of 8 MiB; "many-headers" answers with
200 headers, "redirect-loop" with a redirect to itself; "scripted" streams `events` as they are (each string
one `data:` line). Whatever waits ends when
the server stops (or after a minute), so a test never hangs on its server.

It speaks llama-server's shape: /v1/models, /props, /tokenize and /detokenize (one token per byte, ids
offset by 3; `<s>` = 1 and `</s>` = 2 when control tokens are parsed), and /v1/completions streamed as
server-sent events, each chunk one token.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = ["Hi", " there", "!"]
SPECIAL = {"<s>": 1, "</s>": 2}


@dataclass
class FakeState:
    # "ok" | "error-500" | "cut" | "malformed" | "text-only" | "error-event"
    mode: str = "ok"  # or one of the hostile modes in the module's docstring
    model_path: str = "/models/fake.gguf"
    props: bool = True  # False: no /props and /tokenize, like vLLM
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)  # each request's headers, as received
    drip_seconds: float = 1.0
    events: list[str] = field(default_factory=list)  # what "scripted" streams
    stopping: threading.Event = field(default_factory=threading.Event)  # set when the server stops


def tokenize(text: str, special: bool) -> list[int]:
    parts = re.split("(<s>|</s>)", text) if special else [text]
    tokens: list[int] = []
    for part in parts:
        if special and part in SPECIAL:
            tokens.append(SPECIAL[part])
        else:
            tokens += [3 + b for b in part.encode("utf-8")]
    return tokens


def detokenize(tokens: list[int]) -> str:
    names = {v: k for k, v in SPECIAL.items()}
    out = b""
    for t in tokens:
        out += names[t].encode() if t in names else bytes([t - 3]) if 3 <= t < 259 else b""
    return out.decode("utf-8", "replace")


class _Handler(BaseHTTPRequestHandler):
    state: FakeState
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: a cut is just a close

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        if self.state.mode == "drip":
            return self._drip(status, data)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drip(self, status: int, data: bytes) -> None:
        """The whole answer, status line included, one byte every drip_seconds."""
        head = f"HTTP/1.0 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        try:
            for byte in head.encode() + data:
                if self.state.stopping.wait(self.state.drip_seconds):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:
            pass  # the client gave up, as it should

    def _echo(self, status: int) -> bool:
        """An error whose body echoes the request's headers, as a careless proxy or debug server does."""
        if self.state.mode != f"echo-{status}":
            return False
        echoed = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
        self._json(status, {"error": {"code": status, "message": f"rejected request with headers {echoed}"}})
        return True

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.state.headers.append(dict(self.headers))
        return ok

    def do_GET(self):
        if self._echo(401) or (self.path == "/v1/models" and self._echo(500)):
            return
        if self.state.mode in ("many-headers", "redirect-loop"):
            self.send_response(200 if self.state.mode == "many-headers" else 302)
            for i in range(200 if self.state.mode == "many-headers" else 0):
                self.send_header(f"X-Header-{i}", "x")
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake", "meta": {"n_vocab": 259, "n_ctx": 512}}]})
        elif self.path == "/props" and self.state.props:
            self._json(
                200,
                {
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "total_slots": 1,
                    "model_path": self.state.model_path,
                    "default_generation_settings": {"n_ctx": 512},
                },
            )
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self._echo(401):
            return
        if self.path == "/tokenize" and self.state.props:
            self._json(200, {"tokens": tokenize(body["content"], body.get("parse_special", True))})
        elif self.path == "/detokenize":
            self._json(200, {"content": detokenize(body["tokens"])})
        elif self.path == "/v1/completions":
            self.state.requests.append(body)
            self._complete(body)
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def _complete(self, body: dict) -> None:
        mode = self.state.mode
        if mode == "text-only" and not isinstance(body.get("prompt"), str):
            self._json(500, {"detail": "1 validation error: prompt: Input should be a valid string"})
            return
        if mode in ("error-500", "echo-500"):
            if self._echo(500):
                return
            self._json(500, {"error": {"code": 500, "message": "model crashed", "type": "server_error"}})
            return
        if not body.get("stream"):
            self._json(200, {"choices": [{"text": "Hi", "index": 0, "finish_reason": "length"}]})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def send(event) -> None:
            text = event if isinstance(event, str) else json.dumps(event)
            self.wfile.write(f"data: {text}\n\n".encode())
            self.wfile.flush()

        if mode == "scripted":
            for event in self.state.events:
                send(event)
            return
        if mode in ("silent", "silent-after-token", "many-tokens", "endless", "nested", "huge-event"):
            return self._hostile_stream(mode, send)
        for i, piece in enumerate(ANSWER):
            if mode == "cut" and i == 2:
                return  # the connection closes with the answer half sent
            if mode == "malformed" and i == 1:
                send('{"choices": [{"text": "th')
                return
            if mode == "error-event" and i == 1:
                send({"error": {"code": 500, "message": "slot crashed", "type": "server_error"}})
                return
            send({"choices": [{"text": piece, "index": 0, "finish_reason": None}]})
        send({"choices": [{"text": "", "index": 0, "finish_reason": "stop"}]})
        send("[DONE]")

    def _hostile_stream(self, mode: str, send) -> None:
        try:
            if mode == "silent-after-token":
                send({"choices": [{"text": "Hi", "index": 0, "finish_reason": None}]})
            if mode == "many-tokens":
                verbose = {"tokens": [7], "tokens_predicted": 10**9}
                send({"choices": [{"text": "Hi", "index": 0, "finish_reason": None}], "__verbose": verbose})
            if mode == "endless":
                while not self.state.stopping.is_set():
                    send({"choices": [{"text": "la", "index": 0, "finish_reason": None}]})
            if mode == "nested":
                send('{"choices": [' + "[" * 100_000 + "]" * 100_000 + "]}")
            if mode == "huge-event":
                send(json.dumps({"choices": [{"text": "x" * (8 * 1024**2), "index": 0, "finish_reason": None}]}))
            self.state.stopping.wait(60)  # then nothing, until the server stops
        except OSError:
            pass  # the client closed the stream, as it should


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client that hung up
            super().handle_error(request, client_address)


class FakeServer:
    """`with FakeServer() as fake:` serves at `fake.url` (…/v1); set `fake.state.mode` to misbehave."""

    def __init__(self):
        self.state = FakeState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.stopping.set()  # whatever waits ends now
        self.httpd.shutdown()
        self.httpd.server_close()
