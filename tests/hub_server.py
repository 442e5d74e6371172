"""A small HTTP server on 127.0.0.1 that speaks the Hugging Face Hub's resolve protocol, so that the real
`hf_hub_download` can be tested without the Hub.

HEAD/GET {endpoint}/{repo_id}/resolve/{revision}/{filename}: X-Repo-Commit, ETag (X-Linked-Etag for
LFS files), Content-Length (X-Linked-Size); errors as X-Error-Code (RepoNotFound, GatedRepo,
EntryNotFound, RevisionNotFound); GET honours Range (resume). Faults can be switched on per test.
"""

from __future__ import annotations

import hashlib
import re
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
        if state.fail_after_drop and state.dropped:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
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
        found = self._resolve()
        if not found:
            return
        repo, path, size = found
        data = path.read_bytes()
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


class HubServer:
    """`with HubServer(state) as url:` serves `state` at url (the endpoint) on a free 127.0.0.1 port."""

    def __init__(self, state: HubState):
        handler = type("Handler", (_Handler,), {"state": state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
