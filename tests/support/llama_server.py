"""Run the project's llama-server on 127.0.0.1 for tests and benchmarks, so that it always stops by itself.

Three guards: the server runs in a process group of its own, killed as a whole when the `with` block (or
the fixture) ends; the kernel kills it if the process that started it dies (PR_SET_PDEATHSIG, Linux);
and coreutils' `timeout` ends it after `lifetime_s` whatever happens (the watchdog).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from helpers.machine.serve import server_binary, server_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        # PR_SET_PDEATHSIG: SIGTERM to `timeout` when the test process dies; timeout passes it on to the server
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def wait_healthy(root: str, process: subprocess.Popen, timeout_s: float = 120, api_key: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {process.returncode} before it was ready.")
        try:
            with urllib.request.urlopen(root + "/health", timeout=2) as response:
                if json.loads(response.read()).get("status") == "ok":
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llama-server did not become healthy within {timeout_s} s.")


@contextmanager
def running_server(
    model_path: str | Path,
    *,
    parallel: int = 1,
    slot_ctx: int = 2048,
    api_key: str | None = None,
    threads: int | None = None,
    extra: list[str] | None = None,
    lifetime_s: int = 1800,
    log_path: Path | None = None,
):
    """Start llama-server for `model_path`; yields its OpenAI base URL (http://127.0.0.1:PORT/v1). `threads`:
    llama-server's compute threads (default: physical cores)."""
    binary = server_binary()
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing: run `make llama-server`.")
    port = free_port()
    command = server_command(
        model_path, port=port, parallel=parallel, slot_ctx=slot_ctx, threads=threads, n_gpu_layers=0, extra=extra
    )
    watchdog = [shutil.which("timeout") or "timeout", "--kill-after=5", str(lifetime_s)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
    if api_key:
        env["LLAMA_API_KEY"] = api_key
    log = open(log_path, "wb") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
    process = subprocess.Popen(
        watchdog + command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: killed as one
        preexec_fn=_die_with_parent,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(root, process)
        except RuntimeError as error:
            log.seek(0)
            tail = log.read()[-3000:].decode("utf-8", "replace")
            raise RuntimeError(f"{error}\n--- llama-server log ---\n{tail}") from None
        yield root + "/v1"
    finally:
        stop_group(process, log)


def stop_group(process: subprocess.Popen, log) -> None:
    """End a server started in its own process group: SIGTERM, then SIGKILL after 10 s; close its log."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    log.close()


def get_json(url: str, api_key: str | None = None) -> object:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{url}: HTTP {error.code}") from None
