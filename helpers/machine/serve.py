"""Start llama.cpp's `llama-server` for the notebook's model (`make serve`), with settings that make its
answers match the in-process model's.

- Bound to 127.0.0.1 unless `--host` says otherwise: a server on another address is open to the network.
- `--parallel N` slots, each with the whole context (`-c` = per-slot context x N), continuous batching.
- `-fa off`: with flash attention (llama-server's default is `auto`) greedy answers differed from the
  in-process model's from the second token on; with it off they matched (docs/serving.md).
- The API key, if any, is read from the environment variable LLAMA_API_KEY, which llama-server itself
  reads: it never appears on a command line (`ps`), in a log, or in what this prints.

Usage: python -m helpers.machine.serve [--model NAME|PATH] [--quant Q] [--offline] [--port 8080] [--parallel 4]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from helpers.errors import UsageError

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_PARALLEL, DEFAULT_SLOT_CTX = "127.0.0.1", 8080, 4, 4096
API_KEY_ENV = "LLAMA_API_KEY"  # llama-server's own environment variable for --api-key


def server_binary() -> Path:
    """`.venv/bin/llama-server` (built by `make llama-server`, i.e. python -m helpers.machine.server_build)."""
    from helpers.machine.server_build import default_bin_dir

    return default_bin_dir() / "llama-server"


def server_command(
    model_path: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    parallel: int = DEFAULT_PARALLEL,
    slot_ctx: int = DEFAULT_SLOT_CTX,
    threads: int | None = None,
    n_gpu_layers: int | str = "auto",
    extra: list[str] | None = None,
    binary: str | Path | None = None,
) -> list[str]:
    """The llama-server command line (never with an API key on it: see API_KEY_ENV)."""
    from helpers.machine.cpu import physical_cores

    for name, value in (("port", port), ("parallel", parallel), ("slot_ctx", slot_ctx)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "port" else 1):
            raise UsageError(f"{name} must be a positive integer, got {value!r}.")
    argv = [
        str(binary or server_binary()),
        "--model",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--parallel",
        str(parallel),
        "--ctx-size",
        str(slot_ctx * parallel),
        "--threads",
        str(threads or physical_cores()),
        "--flash-attn",
        "off",
        "--n-gpu-layers",
        str(n_gpu_layers),
        "--no-webui",
    ]
    return argv + list(extra or [])


def main(argv: list[str]) -> int:
    from helpers.files.catalogue import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m helpers.machine.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF path or a catalogue name")
    p.add_argument("--quant", default=None, help="quantization of a catalogue model (default Q4_K_M)")
    p.add_argument("--offline", action="store_true", help="serve the bundled small model")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="slots: requests served at once")
    p.add_argument("--slot-ctx", type=int, default=DEFAULT_SLOT_CTX, help="context tokens per slot")
    p.add_argument("--n-gpu-layers", default="auto")
    args, extra = p.parse_known_args(argv)
    binary = server_binary()
    if not binary.is_file():
        print(f"{binary} is missing: run `make llama-server` first.", file=sys.stderr)
        return 2
    if Path(args.model).is_file():
        path = Path(args.model)
    else:
        from helpers.files.download import resolve_model

        path = resolve_model(args.model, args.quant, offline=args.offline)
    try:
        command = server_command(
            path, host=args.host, port=args.port, parallel=args.parallel, slot_ctx=args.slot_ctx,
            n_gpu_layers=args.n_gpu_layers, extra=extra,
        )  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    keyed = bool(os.environ.get(API_KEY_ENV))
    key = f"with the API key from ${API_KEY_ENV}" if keyed else "without an API key"
    print(f"Serving {path.name} at http://{args.host}:{args.port}/v1 {key}; connect with:", flush=True)
    print(f'  helpers.connect("http://{args.host}:{args.port}/v1"' + (", api_key=...)" if keyed else ")"))
    print("$ " + " ".join(command), flush=True)
    os.execv(command[0], command)  # the server replaces this process: Ctrl-C stops it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
