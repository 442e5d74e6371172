"""Command line for the generation core: `python -m helpers "your prompt" [--system ...] [--model NAME|PATH] ...`.

Streams the answer to stdout, then prints the stats line (to stderr, so the answer can be piped).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from helpers.files.catalogue import DEFAULT_MODEL, available_models
from helpers.settings import GenerationSettings


def parse_args(argv):
    defaults = GenerationSettings()
    p = argparse.ArgumentParser(prog="python -m helpers", description="Chat with a Llama 2 GGUF model.")
    p.add_argument("prompt")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--model",
        default=None,
        help=f"a GGUF path or one of: {', '.join(available_models())} (default {DEFAULT_MODEL})",
    )
    p.add_argument("--quant", default=None, help="quantization of a catalogue model (default Q4_K_M)")
    p.add_argument("--offline", action="store_true", help="use the bundled offline model")
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--n-gpu-layers", default="auto")
    p.add_argument("--template", default=None, help="chat template name (default: chosen from the model)")
    p.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="use the model served at URL (http://127.0.0.1:8080/v1) instead of loading one; API key from $LLAMA_API_KEY",
    )
    p.add_argument(
        "--prompts",
        choices=("tokens", "text"),
        default="tokens",
        help="with --server: send token ids (llama-server, vLLM) or, for servers that take text only (Ollama, "
        "LM Studio, llama_cpp.server), the prompt as text; a message spelling a control token is then refused",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="GGUF",
        help="with --server: a local GGUF of the served model, for servers without llama-server's /tokenize",
    )
    for f in dataclasses.fields(GenerationSettings):  # one option per setting, from its metadata
        flag, default, meta = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name), f.metadata
        if f.name == "stop":
            p.add_argument(flag, action="append", default=[], help=f"{meta['help']} (repeatable)")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        elif "choices" in meta:  # None is spelled "off"
            p.add_argument(flag, choices=[c or "off" for c in meta["choices"]], default=default, help=meta["help"])
        else:
            kind = int if "int" in str(f.type) else float  # "int", "int | None" or "float"
            low, high = meta["range"]
            p.add_argument(flag, type=kind, default=default, help=f"{meta['label']}, {low}..{high}: {meta['help']}")
    args = p.parse_args(argv)
    for f in dataclasses.fields(GenerationSettings):
        if "choices" in f.metadata and getattr(args, f.name) == "off":
            setattr(args, f.name, None)
    return args


def model_path(model: str | None, quant: str | None, *, offline: bool) -> Path:
    """The file --model, --quant and --offline name; a name or quantization the catalogue lacks, or --offline with
    another model than the bundled one, is an error before anything is downloaded or loaded."""
    from helpers.errors import UsageError
    from helpers.files.catalogue import MODELS, OFFLINE_MODEL, get_model
    from helpers.files.download import resolve_model

    if model and Path(model).is_file():
        return Path(model)
    name = model or DEFAULT_MODEL
    if offline:
        if model and model != OFFLINE_MODEL:
            if model not in MODELS and "/" not in model:
                get_model(model)  # UnknownModelError, listing the catalogue
            raise UsageError(
                f"--offline runs the bundled model {OFFLINE_MODEL}, not {model}: leave out --model, or leave out "
                f"--offline to use {model} (a copy already downloaded is used without a connection)."
            )
        get_model(OFFLINE_MODEL, quant)  # its one quantization, or UnknownModelError listing it
        return resolve_model(OFFLINE_MODEL, offline=True)
    return resolve_model(name, quant)  # an unknown name or quantization is refused before the Hub is asked


def main(argv=None) -> int:
    from helpers.engine.loading import load_model
    from helpers.engine.remote import connect
    from helpers.errors import HelpersError, UsageError
    from helpers.generation import GenerationStats, stream

    args = parse_args(argv)
    try:
        settings = GenerationSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings)})
        if args.server is not None:
            if not args.server.strip():
                raise UsageError("--server needs the server's URL, e.g. --server http://127.0.0.1:8080/v1")
            key = os.environ.get("LLAMA_API_KEY")
            llm = connect(args.server, api_key=key, prompts=args.prompts, tokenizer=args.tokenizer)
        else:
            path = model_path(args.model, args.quant, offline=args.offline)
            if args.n_gpu_layers != "auto" and not args.n_gpu_layers.lstrip("-").isdigit():
                raise UsageError(f"--n-gpu-layers must be auto or a whole number, not {args.n_gpu_layers!r}")
            layers = args.n_gpu_layers if args.n_gpu_layers == "auto" else int(args.n_gpu_layers)
            llm = load_model(path, n_ctx=args.n_ctx, n_gpu_layers=layers)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        stats = GenerationStats()
        for piece in stream(llm, messages, settings, stats=stats, template=args.template):
            print(piece, end="", flush=True)
        print()
    except HelpersError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(stats.line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
