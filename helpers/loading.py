"""Loading a GGUF with llama-cpp-python: better defaults, one cached model, quiet logs, clear errors.

Defaults that differ from llama-cpp-python's: context = the model's training context capped at 4096
(the library's is 512), threads = physical cores (the library's is cpu_count() // 2), and all layers on
the GPU when the build can offload and they fit.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from helpers.modelinfo import ModelInfo, read_info

MAX_DEFAULT_CTX = 4096


class ModelLoadError(RuntimeError):
    """llama.cpp could not load the model; the message gives the likely cause and what to try."""


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's arithmetic units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus) // 2) if len(cpus) > 2 else len(cpus)
        cores.add(core)
    return max(1, len(cores))


def default_n_ctx(info: ModelInfo) -> int:
    return min(info.ctx_train or MAX_DEFAULT_CTX, MAX_DEFAULT_CTX)


def resolve_gpu_layers(n_gpu_layers, info: ModelInfo, n_ctx: int) -> int:
    """ "auto": every layer that fits in free VRAM (0 without a GPU or with a CPU-only build)."""
    if n_gpu_layers != "auto":
        return int(n_gpu_layers)
    import llama_cpp

    from helpers.gpu import auto_gpu_layers, detect_gpu

    if not llama_cpp.llama_supports_gpu_offload():
        return 0
    gpu = detect_gpu(check_offload=False)  # offload support was just checked in this process
    if gpu is None:
        return 0
    return auto_gpu_layers(
        model_bytes=info.size_bytes,
        n_layers=info.n_layers,
        kv_bytes_per_token=info.kv_bytes_per_token,
        n_ctx=n_ctx,
        free_bytes=gpu.free_bytes,
        total_bytes=gpu.total_bytes,
    )


@contextmanager
def captured_native_log(lines: list[str], echo: bool):
    """Route llama.cpp's log into `lines` (and to stderr when `echo`), then restore the library's logger."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        message = text.decode("utf-8", errors="replace")
        lines.append(message)
        if echo:
            print(message, end="", file=sys.stderr)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _explain_failure(path: Path, info: ModelInfo, n_gpu_layers: int, n_ctx: int, log: list[str]) -> str:
    errors = [line.strip() for line in log if "error" in line.lower() or "failed" in line.lower()]
    detail = f" llama.cpp said: {' | '.join(errors[-3:])}" if errors else ""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    need = info.size_bytes + info.kv_bytes_per_token * n_ctx
    if any("unknown model architecture" in line for line in log):
        cause = "this llama-cpp-python is too old for the model's architecture: upgrade llama-cpp-python."
    elif available and need > available:
        cause = (
            f"probably out of memory: the model needs about {need / 1e9:.1f} GB, {available / 1e9:.1f} GB of RAM is "
            "free. Try a smaller quantization (see available_models()), a smaller n_ctx, or offload layers to a GPU."
        )
    elif n_gpu_layers:
        cause = (
            f"probably out of GPU memory with n_gpu_layers={n_gpu_layers}: try fewer layers, a smaller n_ctx or a "
            "smaller quantization."
        )
    else:
        cause = "the file may be damaged or incomplete: delete it and download it again."
    return f"Could not load {path.name}: {cause}{detail}"


_loaded: dict = {"key": None, "llm": None}  # the one model kept loaded, and the settings it was loaded with


def unload_model() -> None:
    """Free the loaded model's memory now. Using it afterwards raises ModelUnloadedError (through the
    helpers) instead of crashing inside llama.cpp."""
    llm, _loaded["llm"], _loaded["key"] = _loaded["llm"], None, None
    if llm is not None:
        llm.unloaded = True
        llm.close()


class ModelUnloadedError(RuntimeError):
    """The model was freed because another model (or other settings) was loaded."""


def ensure_usable(llm) -> None:
    if getattr(llm, "unloaded", False):
        raise ModelUnloadedError(
            "This model was unloaded when another model or other settings were loaded with load_model(); "
            "use the new one (re-run the cells after the load cell)."
        )


def describe_model(llm) -> str:
    """One line about a loaded model for the notebook."""
    if llm.gpu_layers < 0 or llm.gpu_layers > read_info(llm.model_path).n_layers:
        where = "all layers on the GPU"
    else:
        where = f"{llm.gpu_layers} layers on the GPU" if llm.gpu_layers else "on the CPU"
    return f"Loaded {Path(llm.model_path).name}: context {llm.n_ctx()} tokens, {llm.n_threads} threads, {where}."


def load_model(
    path,
    *,
    n_gpu_layers="auto",
    n_ctx: int | None = None,
    n_threads: int | None = None,
    verbose: bool = False,
    **kwargs,
):
    """A `llama_cpp.Llama` for `path`; the same file and settings again return the already loaded model."""
    import llama_cpp

    info = read_info(path)  # checks the file is there and is a GGUF
    path = info.path.resolve()
    n_ctx = n_ctx or default_n_ctx(info)
    n_threads = n_threads or physical_cores()
    stat = path.stat()
    # Keyed on what was asked ("auto"), not on what it resolves to: free VRAM shrinks by the loaded
    # model's own share, so resolving again on a re-run would pick fewer layers and reload for nothing.
    key = (str(path), stat.st_size, stat.st_mtime_ns, n_gpu_layers, n_ctx, n_threads, tuple(sorted(kwargs.items())))
    if _loaded["key"] == key:
        return _loaded["llm"]
    unload_model()  # before measuring free VRAM for "auto"
    layers = resolve_gpu_layers(n_gpu_layers, info, n_ctx)
    log: list[str] = []
    with captured_native_log(log, echo=verbose):
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_gpu_layers=layers,
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=verbose,
                **kwargs,
            )
        except ValueError as error:
            raise ModelLoadError(_explain_failure(path, info, layers, n_ctx, log)) from error
    llm.gpu_layers = layers  # what "auto" chose, for display
    _loaded["key"], _loaded["llm"] = key, llm
    return llm
