"""The HTTP client for model servers: HTTP/1.1 on the standard library's `http.client`, and the SSE reader."""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from helpers.errors import ServerAuthError, ServerError, ServerResponseError, ServerUnavailableError, UsageError

DEFAULT_TIMEOUT = 60.0  # seconds to connect, and to wait for any byte (prompt progress and pings come sooner)


# --- HTTP ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the server is: `base_url` in the OpenAI client's form (`http://127.0.0.1:8080/v1`)."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)  # sent as a bearer token, never shown
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def parse(cls, base_url: str, api_key: str | None, timeout: float) -> Endpoint:
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"base_url must be an http(s) address like http://127.0.0.1:8080/v1, got {base_url!r}.")
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise UsageError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        return cls(base_url.rstrip("/"), api_key or None, float(timeout))

    @property
    def root(self) -> str:
        """The server's own address: base_url without its trailing /v1 (llama-server's /tokenize is there)."""
        return re.sub(r"/v1$", "", self.base_url)

    def url(self, path: str) -> str:
        """`/v1/...` paths go under base_url, others under the root."""
        return self.base_url + path[3:] if path.startswith("/v1/") else self.root + path

    def open(
        self, method: str, path: str, body: dict | None = None, *, wait: bool = False
    ) -> tuple[http.client.HTTPConnection, object]:
        """Send one request; returns the connection and its response (status checked: errors raise).
        `timeout` bounds connecting and each read; `wait=True` (completions) waits for the answer as long as the
        server needs: with all slots busy llama-server queues a request and answers only when a slot frees
        (8 clients on 4 slots waited over a minute here). A stop still ends it at once (it closes the socket)."""
        url = urlsplit(self.url(path))
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        connection = kind(url.hostname, url.port, timeout=self.timeout)
        try:
            connection.connect()
        except OSError as error:
            connection.close()
            raise ServerUnavailableError(
                f"No answer from {self.base_url} ({reason(error)}). Is the server running, and is the address "
                "right? Start one with `make serve`, or check the host and port."
            ) from None
        if wait:
            connection.sock.settimeout(None)
        headers = {"Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        target = url.path + (f"?{url.query}" if url.query else "")
        try:
            connection.request(method, target, body=data, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ServerUnavailableError(
                f"{self.base_url} took the request to {path} but did not answer ({reason(error)}, after "
                f"{self.timeout:g} s at most per read). Is it overloaded? Try again, or connect(..., timeout=...)."
            ) from None
        if response.status >= 400:
            payload = response.read()
            connection.close()
            raise _http_error(self, path, response.status, payload)
        return connection, response

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        connection, response = self.open(method, path, body)
        try:
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise ServerUnavailableError(f"{self.base_url} stopped answering ({reason(error)}).") from None
        finally:
            connection.close()
        try:
            return json.loads(payload)
        except ValueError:
            raise ServerResponseError(
                f"{self.url(path)} did not answer with JSON ({payload[:80]!r}): is {self.base_url} an "
                "OpenAI-compatible server's address (ending in /v1)?"
            ) from None


def reason(error: BaseException) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


def error_message(payload: bytes) -> str:
    """The message in an OpenAI-style error body ({"error": {"message": ...}}), FastAPI's ({"detail": ...}),
    or the body itself."""
    try:
        body = json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", "replace").strip()[:300]
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
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


def sse_events(response) -> Iterator[dict | None]:
    """The JSON objects of an event stream (`data: {...}` lines, events ended by a blank line); None for
    `data: [DONE]`. Comments (`:` pings) are skipped. Raises ServerResponseError on a line that is not JSON."""
    data: list[str] = []
    while True:
        raw = response.readline()
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
            continue
        if not data:
            continue
        text, data = "\n".join(data), []
        if text.strip() == "[DONE]":
            yield None
            continue
        yield _json_object(text, "an event")


def json_lines(response) -> Iterator[dict]:
    """The JSON objects of a newline-delimited JSON stream (Ollama's `/api/generate`), one per line. Raises
    ServerResponseError on a line that is not a JSON object."""
    while True:
        raw = response.readline()
        if not raw:
            return
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        yield _json_object(line, "a line")


def _json_object(text: str, what: str) -> dict:
    """`text` read as a JSON object; ServerResponseError naming `what` the server sent when it is not one."""
    try:
        event = json.loads(text)
    except ValueError:
        raise ServerResponseError(f"The server sent {what} that is not JSON: {text[:120]!r}.") from None
    if not isinstance(event, dict):
        raise ServerResponseError(f"The server sent {what} that is not a JSON object: {text[:120]!r}.")
    return event
