"""Run the classic Jupyter Notebook (6.5.x, its own server and front end) on 127.0.0.1 for the browser test, so
that it always stops by itself: a process group of its own, ended as a whole when the `with` block ends; killed
by the kernel if the process that started it dies (PR_SET_PDEATHSIG, Linux); and ended by coreutils' `timeout`
after `lifetime_s` whatever happens. Its kernels are children of the server and go with it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.llama_server import _die_with_parent, free_port


@dataclass(frozen=True)
class ClassicNotebook:
    url: str  # http://127.0.0.1:PORT
    token: str
    log: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/notebooks/{name}?token={self.token}"


@contextmanager
def running_classic_notebook(python: Path, root_dir: Path, *, env: dict | None = None, lifetime_s: int = 1800):
    """Start `python -m notebook` serving `root_dir` (its kernels run on that same Python); yields a
    ClassicNotebook. Its config and data folders are fresh ones under `root_dir` (nothing from the user's)."""
    port, token = free_port(), secrets.token_hex(16)
    log = root_dir / "classic-notebook.log"
    command = [
        shutil.which("timeout") or "timeout",
        "--kill-after=5",
        str(lifetime_s),
        str(python),
        "-m",
        "notebook",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--NotebookApp.token={token}",
        f"--NotebookApp.notebook_dir={root_dir}",
        "--allow-root",
    ]
    environment = os.environ | {
        "JUPYTER_CONFIG_DIR": str(root_dir / ".jupyter-config"),
        "JUPYTER_DATA_DIR": str(root_dir / ".jupyter-data"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # Python 3.13's frozen-modules warning from the debugger
        **(env or {}),
    }
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command,
            cwd=root_dir,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a busy 2-core machine can take minutes
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"The classic notebook did not start; its log:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield ClassicNotebook(url, token, log)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
