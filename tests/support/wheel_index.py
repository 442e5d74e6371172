"""A stand-in for llama-cpp-python's wheel index (https://abetlen.github.io/llama-cpp-python/whl/cu<XY>):
a folder in the simple-index layout (PEP 503: `<variant>/llama-cpp-python/index.html` linking the files),
served on 127.0.0.1, so that the real pip can be pointed at it.

The wheels in it are not llama-cpp-python: `fake_wheel` writes a tiny `llama_cpp_python` wheel whose
`llama_cpp` module only answers `llama_supports_gpu_offload()`. It stands in for the index's files (what
pip downloads and installs, and what the install step asks afterwards), not for the library under test.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def fake_wheel(folder: Path, version: str, *, offload: bool) -> Path:
    """A py3-none-any `llama_cpp_python` wheel whose module reports `offload` for llama_supports_gpu_offload()."""
    name = f"llama_cpp_python-{version}"
    files = {
        "llama_cpp/__init__.py": f"__version__ = {version!r}\n\n\ndef llama_supports_gpu_offload():\n"
        f"    return {offload}\n",
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n",
        f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests/support/wheel_index.py\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{name}.dist-info/RECORD"] = "\n".join([*record, f"{name}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def write_index(root: Path, variant: str, files: list[Path]) -> None:
    """`root/variant/llama-cpp-python/index.html` linking `files` (copied to `root/files/`), as the
    project's index does (its links point at release assets elsewhere)."""
    page = root / variant / "llama-cpp-python"
    page.mkdir(parents=True, exist_ok=True)
    (root / "files").mkdir(exist_ok=True)
    links = []
    for file in files:
        (root / "files" / file.name).write_bytes(file.read_bytes())
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        links.append(f'    <a href="/files/{file.name}#sha256={digest}">{file.name}</a><br>')
    body = "\n".join(links)
    (page / "index.html").write_text(
        f"<!DOCTYPE html>\n<html>\n  <body>\n    <h1>Links for llama-cpp-python</h1>\n{body}\n  </body>\n</html>\n"
    )


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class WheelIndex:
    """`with WheelIndex(root) as url:` serves the folder `root` on a free 127.0.0.1 port. The server stops
    when the block ends, and by itself after `lifetime` seconds if it never does."""

    def __init__(self, root: Path, lifetime: float = 600):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.deadline = time.monotonic() + lifetime

    def _serve(self):
        self.httpd.timeout = 0.5
        while self.httpd.socket.fileno() != -1 and time.monotonic() < self.deadline:
            self.httpd.handle_request()

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self.url

    def __exit__(self, *exc):
        self.deadline = 0
        self.thread.join()
        self.httpd.server_close()
