"""The HTTP client for model servers: HTTP/1.1 on the standard library's `http.client`, and the SSE reader."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from helpers.errors import (
    ServerAuthError,
    ServerError,
    ServerResponseError,
    ServerUnavailableError,
    UsageError,
    scrub,
    scrubbed,
)

DEFAULT_TIMEOUT = 60.0  # seconds for one request, from connecting to its last byte (a stream: to connect)
MAX_BODY_BYTES = 64 * 1024**2  # a JSON answer: /props with a long chat template, /tokenize of a whole context
MAX_EVENT_BYTES = 4 * 1024**2  # one event of a stream (a token is ~300 bytes; llama-server's probs, a few KB)
MAX_JSON_DEPTH = 64  # nesting in any JSON a server sends (llama-server's deepest is 4): deeper is refused


# --- HTTP ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the server is: `base_url` in the OpenAI client's form (`http://127.0.0.1:8080/v1`), shown without
    userinfo; `http://user:password@host/v1` sends the userinfo as HTTP Basic credentials (when no api_key)."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)  # sent as a bearer token, never shown
    timeout: float = DEFAULT_TIMEOUT
    userinfo: str | None = field(default=None, repr=False)  # "user:password" from the URL, never shown

    @classmethod
    def parse(cls, base_url: str, api_key: str | None, timeout: float) -> Endpoint:
        if not isinstance(base_url, str):
            raise UsageError(f"base_url must be a string like http://127.0.0.1:8080/v1, got {type(base_url).__name__}.")
        try:
            parts = urlsplit(base_url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                "base_url must be an http(s) address like http://127.0.0.1:8080/v1, "
                f"got {scrub(repr(base_url), [api_key])}."
            )
        if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and 0 < timeout < 10**7):
            raise UsageError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = f"{host}:{port}" if port is not None else host
        shown = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        return cls(shown.rstrip("/"), api_key or None, float(timeout), unquote(userinfo) if userinfo else None)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What `scrub` removes from every message about this server: the key, the URL's password and userinfo."""
        found = [self.api_key, self.userinfo]
        if self.userinfo:
            found += self.userinfo.split(":", 1)[1:]
        return tuple(s for s in found if s)

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    @property
    def root(self) -> str:
        """The server's own address: base_url without its trailing /v1 (llama-server's /tokenize is there)."""
        return re.sub(r"/v1$", "", self.base_url)

    def url(self, path: str) -> str:
        """`/v1/...` paths go under base_url, others under the root."""
        return self.base_url + path[3:] if path.startswith("/v1/") else self.root + path

    def headers(self, body: bytes | None) -> dict:
        headers = {"Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif self.userinfo:
            headers["Authorization"] = "Basic " + base64.b64encode(self.userinfo.encode()).decode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def json(self, method: str, path: str, body: dict | None = None):
        """One request whose answer is JSON, all of it within `timeout` seconds, from connecting to the last byte."""
        exchange = Exchange(self, self.timeout, f"{self.timeout:g} s (connect(..., timeout=))")
        try:
            response = exchange.open(method, path, body)
            payload = exchange.read(response, MAX_BODY_BYTES)
        finally:
            exchange.close()
        try:
            return bounded_json(payload)
        except ValueError:
            raise scrubbed(
                ServerResponseError(
                    f"{self.url(path)} did not answer with JSON ({payload[:80]!r}): is {self.base_url} an "
                    "OpenAI-compatible server's address (ending in /v1)?"
                ),
                self.secrets,
            ) from None


class Exchange:
    """One request and its answer on a connection of its own, with one deadline for all of it: `seconds` from
    now (None: connecting still has the endpoint's timeout, then no limit). At the deadline, or when `stop()`
    is called from any thread, the socket is shut down, so a read blocked on a silent server returns at once
    (a per-read timeout would let a server that drips a byte a second hold the call forever)."""

    def __init__(self, endpoint: Endpoint, seconds: float | None, limit: str):
        self.endpoint, self.seconds, self.limit = endpoint, seconds, limit  # limit: the deadline, in words
        self.deadline = time.monotonic() + seconds if seconds is not None else None
        self.ended: str | None = None  # "deadline" or "stop" once the socket was shut down from outside
        self.path = ""
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None  # kept: http.client drops its own when a response will close
        self._connection: http.client.HTTPConnection | None = None
        self._done = threading.Event()
        if seconds is not None:
            threading.Thread(target=self._watch, name="http-deadline", daemon=True).start()

    def _watch(self) -> None:
        if not self._done.wait(max(0.0, self.deadline - time.monotonic())):
            self.stop("deadline")

    def stop(self, why: str = "stop") -> None:
        """Shut the socket down (from any thread); the reads waiting on it end."""
        with self._lock:
            self.ended = self.ended or why
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._done.set()
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        if self._sock is not None:
            self._sock.close()

    def fail(self, error: ServerError) -> ServerError:
        return scrubbed(error, self.endpoint.secrets)

    def expired(self) -> ServerUnavailableError:
        return self.fail(
            ServerUnavailableError(
                f"{self.endpoint.base_url} did not finish answering {self.path} within {self.limit}. Is it overloaded "
                "or stuck? Try again, or allow more time."
            )
        )

    def broken(self, error: BaseException) -> ServerError:
        """What a failed read means: the deadline passed, or the server stopped answering."""
        if self.ended == "deadline" or isinstance(error, socket.timeout | TimeoutError):
            return self.expired()
        if isinstance(error, http.client.HTTPException) and not isinstance(error, ConnectionError):
            return self.fail(
                ServerResponseError(
                    f"{self.endpoint.base_url} answered {self.path} with something that is not HTTP "
                    f"({type(error).__name__}: {reason(error)[:120]}). Is the address a model server's?"
                )
            )
        return self.fail(
            ServerUnavailableError(
                f"{self.endpoint.base_url} stopped answering {self.path} ({reason(error)}). The server may have "
                "stopped or restarted; try again."
            )
        )

    def open(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        """Send the request; the response once its headers came (status checked: errors raise ServerError)."""
        endpoint, self.path = self.endpoint, path
        url = urlsplit(endpoint.url(path))
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        wait = endpoint.timeout if self.deadline is None else min(endpoint.timeout, self.deadline - time.monotonic())
        connection = kind(url.hostname, url.port, timeout=max(wait, 0.001))
        with self._lock:
            self._connection = connection
        try:
            connection.connect()
        except OSError as error:
            if self.ended == "deadline" or (self.deadline is not None and time.monotonic() >= self.deadline):
                raise self.expired() from None
            raise self.fail(
                ServerUnavailableError(
                    f"No answer from {endpoint.base_url} ({reason(error)}). Is the server running, and is the address "
                    "right? Start one with `make serve`, or check the host and port."
                )
            ) from None
        with self._lock:
            self._sock = connection.sock
            self._sock.settimeout(None)  # the deadline is the watcher's: one for the whole exchange
            if self.ended:
                self._sock.shutdown(socket.SHUT_RDWR)
        data = json.dumps(body).encode() if body is not None else None
        target = url.path + (f"?{url.query}" if url.query else "")
        try:
            connection.request(method, target, body=data, headers=endpoint.headers(data))
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            raise self.broken(error) from None
        if response.status >= 400:
            try:
                payload = self.read(response, 64 * 1024, cut=True)
            except ServerError:
                payload = b""
            raise self.fail(_http_error(endpoint, path, response.status, payload))
        return response

    def read(self, response, limit: int, *, cut: bool = False) -> bytes:
        """The body, at most `limit` bytes (more: ServerResponseError, or the first `limit` when `cut`)."""
        try:
            payload = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as error:
            raise self.broken(error) from None
        if len(payload) > limit and not cut:
            raise self.fail(
                ServerResponseError(
                    f"{self.endpoint.base_url} answered {self.path} with over {limit // 1024**2} MiB: not the API's "
                    "answer. Is the address a model server's?"
                )
            )
        return payload[:limit]


def reason(error: BaseException) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


def error_message(payload: bytes) -> str:
    """The message in an OpenAI-style error body ({"error": {"message": ...}}), FastAPI's ({"detail": ...}),
    or the body itself; at most 300 characters."""
    try:
        body = bounded_json(payload)
    except ValueError:
        return payload.decode("utf-8", "replace").strip()[:300]
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            return str(error.get("message", error))[:300]
        return str(error)[:300]
    return str(body)[:300]


def _http_error(endpoint: Endpoint, path: str, status: int, payload: bytes) -> ServerError:
    message = error_message(payload)
    error = _http_error_for(endpoint, path, status, message)
    error.status, error.detail = status, message
    return error


def _http_error_for(endpoint: Endpoint, path: str, status: int, message: str) -> ServerError:
    if status in (401, 403):
        key = "the API key it was given" if endpoint.api_key else "requests without an API key"
        return ServerAuthError(
            f"{endpoint.base_url} refused {key} (HTTP {status}: {message}). Pass the server's key: "
            "connect(url, api_key=...), or LLAMA_API_KEY for `make serve`."
        )
    if status == 404 and re.search(r"model .*not found", message, re.IGNORECASE):  # Ollama: a model not pulled
        return ServerResponseError(
            f"{endpoint.base_url} does not have that model (HTTP 404: {message}). Pull it there (Ollama: "
            "`ollama pull NAME`), or pass connect(..., model=) one of the models it lists."
        )
    if status == 404:
        return ServerResponseError(
            f"{endpoint.url(path)} does not exist (HTTP 404: {message}). base_url is the OpenAI-style address "
            "ending in /v1, e.g. http://127.0.0.1:8080/v1."
        )
    if status >= 500:
        return ServerResponseError(
            f"The server failed (HTTP {status} from {path}: {message}). Try again, or see its log."
        )
    return ServerResponseError(f"The server rejected the request to {path} (HTTP {status}: {message}).")


# --- server-sent events --------------------------------------------------------------------------------


def _line(response) -> bytes:
    """One line of a stream, at most MAX_EVENT_BYTES long."""
    raw = response.readline(MAX_EVENT_BYTES + 1)
    if len(raw) > MAX_EVENT_BYTES:
        raise ServerResponseError(
            f"The server sent a line of over {MAX_EVENT_BYTES // 1024**2} MiB in its stream: not a completion's "
            "event. Is the address a model server's?"
        )
    return raw


def sse_events(response) -> Iterator[dict | None]:
    """The JSON objects of an event stream (`data: {...}` lines, events ended by a blank line); None for
    `data: [DONE]`. Comments (`:` pings) are skipped. Raises ServerResponseError on an event that is not JSON,
    or that is larger than MAX_EVENT_BYTES or nested deeper than MAX_JSON_DEPTH."""
    data: list[str] = []
    size = 0
    while True:
        raw = _line(response)
        if not raw:
            if data:
                raise ServerResponseError("The event stream ended in the middle of an event.")
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
                size += len(raw)
                if size > MAX_EVENT_BYTES:
                    raise ServerResponseError(f"The server sent an event of over {MAX_EVENT_BYTES // 1024**2} MiB.")
            continue
        if not data:
            continue
        text, data, size = "\n".join(data), [], 0
        if text.strip() == "[DONE]":
            yield None
            continue
        yield _json_object(text, "an event")


def json_lines(response) -> Iterator[dict]:
    """The JSON objects of a newline-delimited JSON stream (Ollama's `/api/generate`), one per line. Raises
    ServerResponseError on a line that is not a JSON object (or is too large or too deep, as in `sse_events`)."""
    while True:
        raw = _line(response)
        if not raw:
            return
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        yield _json_object(line, "a line")


_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings (skipped whole) and brackets


def bounded_json(text: str | bytes):
    """`json.loads(text)`, refusing (ValueError) JSON nested deeper than MAX_JSON_DEPTH before parsing it: the
    standard parser recurses once per level and ends in RecursionError on a few thousand."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # only then can it be too deep
        depth = 0
        for found in _NESTING.finditer(text):
            bracket = found.group()
            if bracket in "[{":
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            elif bracket in "]}":
                depth -= 1
    return json.loads(text)


def _json_object(text: str, what: str) -> dict:
    """`text` read as a JSON object; ServerResponseError naming `what` the server sent when it is not one."""
    try:
        event = bounded_json(text)
    except ValueError as error:
        deep = "nested" in str(error)
        raise ServerResponseError(
            f"The server sent {what} that is {'JSON nested too deep' if deep else 'not JSON'}: {text[:120]!r}."
        ) from None
    if not isinstance(event, dict):
        raise ServerResponseError(f"The server sent {what} that is not a JSON object: {text[:120]!r}.")
    return event
