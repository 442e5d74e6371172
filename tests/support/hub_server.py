"""A small HTTP server on 127.0.0.1 that speaks the Hugging Face Hub's resolve protocol, so that the real
`hf_hub_download` can be tested without the Hub.

HEAD/GET {endpoint}/{repo_id}/resolve/{revision}/{filename}: X-Repo-Commit, ETag (X-Linked-Etag for
LFS files), Content-Length (X-Linked-Size); errors as X-Error-Code (RepoNotFound, GatedRepo,
EntryNotFound, RevisionNotFound); GET honours Range (resume). GET {endpoint}/api/models/{repo_id}/tree/{revision}
lists the files (what `HfApi.list_repo_files` reads). Faults can be switched on per test: a dropped
connection, any status with any headers, a damaged body, a slow HEAD, a body that stalls or trickles. Slow
answers end when the server stops, so a test never waits on them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


@dataclass
class Repo:
    files: dict[str, Path]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    drop_after_bytes: int | None = None  # a full GET sends this many bytes, then closes the connection
    fail_after_drop: bool = False  # and every request after that drop gets a 503
    dropped: bool = False
    fault: tuple[int, dict[str, str]] | None = None  # (status, headers) answered to resolve requests instead
    fault_methods: tuple[str, ...] = ("HEAD", "GET")  # ... of these methods
    fault_body: bytes = b""  # ... with this body
    fault_everywhere: bool = False  # ... and to the file listing (/api/models/.../tree) too
    tree_body: bytes | None = None  # the file listing answers 200 with this body instead
    corrupt: bool = False  # GET bodies have one byte changed (same size, same ETag)
    head_delay: float = 0.0  # seconds a HEAD waits before answering
    get_delay: float = 0.0  # seconds a GET of a file waits before answering
    stall_after_bytes: int | None = None  # a GET sends this many bytes of the body, then nothing
    trickle_seconds: float | None = None  # a GET sends one byte of the body every this many seconds
    stopping: threading.Event = field(default_factory=threading.Event)  # set when the server stops
    _etags: dict[Path, str] = field(default_factory=dict)

    def etag(self, path: Path) -> str:
        if path not in self._etags:
            self._etags[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._etags[path]

    def gets(self):
        return [r for r in self.requests if r[0] == "GET"]


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _error(self, status: int, code: str):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _resolve(self):
        state = self.state
        state.requests.append((self.command, self.path, self.headers.get("Range")))
        delay = state.head_delay if self.command == "HEAD" else state.get_delay
        if delay and state.stopping.wait(delay):
            return None  # the server is stopping: no answer
        if state.fail_after_drop and state.dropped:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if state.fault and self.command in state.fault_methods:
            self._fault()
            return None
        match = RESOLVE.match(self.path.split("?")[0])
        repo = state.repos.get(match["repo"]) if match else None
        if repo is None:
            self._error(404, "RepoNotFound")
            return None
        if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
            self._error(403, "GatedRepo")
            return None
        if match["revision"] not in ("main", repo.commit):
            self._error(404, "RevisionNotFound")
            return None
        path = repo.files.get(match["filename"])
        if path is None:
            self._error(404, "EntryNotFound")
            return None
        size = path.stat().st_size
        return repo, path, size

    def _fault(self):
        """The fault's status, headers and body; a `{url}` in a header value is this request's URL (a Location
        that points back at itself makes a redirect loop)."""
        status, headers = self.state.fault
        body = b"" if self.command == "HEAD" else self.state.fault_body
        self.send_response(status)
        url = f"http://{self.headers.get('Host')}{self.path}"
        for key, value in {"Content-Length": str(len(self.state.fault_body)), **headers}.items():
            self.send_header(key, value.replace("{url}", url))
        self.end_headers()
        self.wfile.write(body)

    def _headers(self, status, repo, path, size, length, extra=()):
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{self.state.etag(path)}"')
        self.send_header("X-Linked-Etag", f'"{self.state.etag(path)}"')
        self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()

    def do_HEAD(self):
        found = self._resolve()
        if found:
            repo, path, size = found
            self._headers(200, repo, path, size, size)

    def do_GET(self):
        if self.path.startswith("/api/models/"):
            return self._tree()
        found = self._resolve()
        if not found:
            return
        repo, path, size = found
        data = path.read_bytes()
        if self.state.corrupt:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        if self.state.stall_after_bytes is not None or self.state.trickle_seconds is not None:
            return self._slow_body(repo, path, size, data)
        wanted = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if wanted:
            start = int(wanted[1])
            end = int(wanted[2]) if wanted[2] else size - 1
            self._headers(206, repo, path, size, end - start + 1, [("Content-Range", f"bytes {start}-{end}/{size}")])
            self.wfile.write(data[start : end + 1])
            return
        if self.state.drop_after_bytes is not None and not self.state.dropped:
            self._headers(200, repo, path, size, size)
            self.wfile.write(data[: self.state.drop_after_bytes])
            self.wfile.flush()
            self.state.dropped = True
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._headers(200, repo, path, size, size)
        self.wfile.write(data)

    def _slow_body(self, repo, path, size, data):
        """A body that stops after stall_after_bytes, or comes a byte every trickle_seconds."""
        state = self.state
        self._headers(200, repo, path, size, size)
        try:
            if state.stall_after_bytes is not None:
                self.wfile.write(data[: state.stall_after_bytes])
                self.wfile.flush()
                state.stopping.wait(60)
            else:
                for i in range(size):
                    if state.stopping.wait(state.trickle_seconds):
                        break
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should
        self.close_connection = True

    def _tree(self):
        """GET /api/models/{repo}/tree/{revision}: the repository's files, as the Hub lists them."""
        self.state.requests.append((self.command, self.path, None))
        if self.state.fault and self.state.fault_everywhere:
            return self._fault()
        if self.state.tree_body is not None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.state.tree_body)))
            self.end_headers()
            return self.wfile.write(self.state.tree_body)
        match = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/?]+)", self.path)
        repo = self.state.repos.get(match["repo"]) if match else None
        if repo is None:
            return self._error(404, "RepoNotFound")
        if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
            return self._error(403, "GatedRepo")
        entries = [
            {
                "type": "file",
                "path": name,
                "size": file.stat().st_size,
                "oid": self.state.etag(file)[:40],  # a git blob id in the real Hub; unused here
                "lfs": {"oid": self.state.etag(file), "size": file.stat().st_size, "pointerSize": 134},
            }
            for name, file in repo.files.items()
        ]
        body = json.dumps(entries).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client that gave up
            super().handle_error(request, client_address)


class HubServer:
    """`with HubServer(state) as url:` serves `state` at url (the endpoint) on a free 127.0.0.1 port."""

    def __init__(self, state: HubState):
        handler = type("Handler", (_Handler,), {"state": state})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> str:
        self.httpd.RequestHandlerClass.state.stopping.clear()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc):
        self.httpd.RequestHandlerClass.state.stopping.set()  # slow answers end now
        self.httpd.shutdown()
        self.httpd.server_close()
