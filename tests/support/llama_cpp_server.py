"""Run llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`, the `server` extra's
dependencies come from requirements-dev.txt) on 127.0.0.1 for tests, with the guards tests/support/llama_server.py
gives llama-server: its own process group, killed when the `with` block ends; killed if the test process dies;
and coreutils' `timeout` as a watchdog."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.support.llama_server import _die_with_parent, free_port, stop_group


@contextmanager
def running_llama_cpp_server(model_path: str | Path, *, n_ctx: int = 2048, threads: int = 1, lifetime_s: int = 900):
    """Yields the base URL (http://127.0.0.1:PORT/v1) of `python -m llama_cpp.server` serving `model_path`."""
    port = free_port()
    command = [
        shutil.which("timeout") or "timeout", "--kill-after=5", str(lifetime_s),
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--verbose", "False",
    ]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read()[-3000:].decode("utf-8", "replace")
                raise RuntimeError(f"llama_cpp.server did not start (exit code {process.poll()}):\n{tail}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        stop_group(process, log)
