"""Loading a GGUF with llama-cpp-python into a `helpers.Model`: better defaults, one cached model, quiet
logs, clear errors, and a failed load that leaves the previous model working.

Defaults that differ from llama-cpp-python's: context = the model's training context capped at 4096
(the library's is 512), threads = physical cores (the library's is cpu_count() // 2), and all layers on
the GPU when the build can offload and they fit.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import re
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

from helpers.engine.backend import ModelUnloadedError  # noqa: F401  (re-exported: helpers.engine.loading.ModelUnloadedError)
from helpers.engine.model import Model
from helpers.files.gguf_check import read_checked_info
from helpers.files.gguf_header import ModelInfo, read_info

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

    from helpers.machine.gpu import auto_gpu_layers, detect_gpu

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


_ABORTED = re.compile(r"failed with error 1$|compute status: 1$|failed to decode, ret = 2$")


@functools.cache
def _errors_only_log():
    """A llama.cpp log callback that prints errors only. llama-cpp-python's own maps ggml's log levels as they
    were before ggml added DEBUG (WARN = 3 is taken for ERROR), so with verbose=False it still printed
    warnings such as "decode: removing memory module entries ..." after every stop. A stop itself (an abort
    through the abort callback: ggml status 1, llama_decode 2) is logged as three errors; those are not shown."""
    import llama_cpp

    error, continued = 4, 5  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
    last = {"level": 0}

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        last["level"] = last["level"] if level == continued else level
        message = text.decode("utf-8", errors="replace")
        if last["level"] == error and not _ABORTED.search(message):
            print(message, end="", file=sys.stderr)

    return callback


@contextmanager
def captured_native_log(lines: list[str], echo: bool):
    """Route llama.cpp's log into `lines` (and to stderr when `echo`); afterwards llama.cpp prints errors
    only, or everything (llama-cpp-python's logger) when `echo`."""
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
        after = _logger.llama_log_callback if echo else _errors_only_log()
        llama_cpp.llama_log_set(after, ctypes.c_void_p(0))


def _explain_failure(path: Path, info: ModelInfo, n_gpu_layers: int, n_ctx: int, log: list[str], kwargs) -> str:
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
    elif kwargs:
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
        cause = f"llama.cpp rejected it with these settings ({settings}): try without them."
    else:
        cause = "the file may be damaged or incomplete: delete it and download it again."
    return f"Could not load {path.name}: {cause}{detail}"


class LoadedModels:
    """The cache of loaded models: the one model `load_model` keeps (keyed by file and settings), and the
    `Model` wrapping each `llama_cpp.Llama` a user passed to a helper (held weakly: it goes with the Llama)."""

    def __init__(self):
        self.key: tuple | None = None
        self.model: Model | None = None
        self.recipe: dict | None = None  # how to load the kept model again
        self.wrappers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_cache = LoadedModels()
atexit.register(lambda: unload_model())  # freed while llama_cpp still exists, not during interpreter teardown


def as_model(llm) -> Model:
    """`llm` itself if it is a `Model`; for a `llama_cpp.Llama` (a vocab-only one too), the `Model` that wraps
    it, made once per Llama and left open while the Llama lives."""
    if isinstance(llm, Model):
        return llm
    import llama_cpp

    if not isinstance(llm, llama_cpp.Llama):
        raise TypeError(f"Expected a model from helpers.load_model() or a llama_cpp.Llama, got {type(llm).__name__}.")
    model = _cache.wrappers.get(llm)
    if model is None or model.closed:
        from helpers.engine.llama_backend import LlamaCppBackend

        model = Model(
            LlamaCppBackend(llm, owned=False),
            path=llm.model_path,
            n_threads=llm.n_threads,
            gpu_layers=llm.model_params.n_gpu_layers,
        )
        _cache.wrappers[llm] = model
    return model


def unload_model() -> None:
    """Free the kept model's memory now (stopping any generation on it first). Using it afterwards raises
    ModelUnloadedError instead of crashing inside llama.cpp."""
    model, _cache.model, _cache.key, _cache.recipe = _cache.model, None, None, None
    if model is not None:
        model.close()


def describe_model(llm) -> str:
    """One line about a loaded model for the notebook."""
    return as_model(llm).describe()


def check_load_settings(n_gpu_layers, n_ctx, n_threads, info: ModelInfo, kwargs: dict | None = None) -> None:
    """Raise ValueError for settings llama.cpp would reject or crash on, before anything is unloaded."""
    import inspect

    import llama_cpp

    known = set(inspect.signature(llama_cpp.Llama.__init__).parameters) - {"self", "kwargs", "model_path"}
    unknown = sorted(set(kwargs or {}) - known)
    if unknown:
        raise ValueError(f"Unknown llama_cpp.Llama setting(s): {', '.join(unknown)}; see help(llama_cpp.Llama).")
    for name in ("n_batch", "n_ubatch"):  # llama.cpp crashes (segfault) on a negative batch size
        value = (kwargs or {}).get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if n_gpu_layers != "auto" and (isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int)):
        raise ValueError(f'n_gpu_layers must be "auto", -1 (all layers) or a number of layers, got {n_gpu_layers!r}.')
    if n_gpu_layers != "auto" and n_gpu_layers < -1:
        raise ValueError(f"n_gpu_layers must be -1 (all layers) or more, got {n_gpu_layers}.")
    limit = max(info.ctx_train, MAX_DEFAULT_CTX) * 8
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 16 <= n_ctx <= limit):
        raise ValueError(
            f"n_ctx must be an integer from 16 to {limit} (8x the model's training context of {info.ctx_train}), "
            f"or None for the default; got {n_ctx!r}."
        )
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
        raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}.")


def _check_path_encoding(path: Path) -> None:
    """llama-cpp-python passes the path to llama.cpp as UTF-8 (`model_path.encode("utf-8")`): a file name that is
    not valid UTF-8 (Latin-1 bytes from an old archive, say) cannot be opened that way."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", errors="backslashreplace")
        raise ValueError(
            f"The path {shown} is not valid UTF-8, and llama-cpp-python can only open UTF-8 paths: rename the file "
            "(or the folder with the non-UTF-8 name) and load it again."
        ) from None


def _load(path: Path, info: ModelInfo, *, n_gpu_layers, n_ctx, n_threads, verbose, kwargs):
    """(the engine for `path`, the GPU layers it got)."""
    import llama_cpp

    from helpers.engine.llama_backend import LlamaCppBackend

    layers = resolve_gpu_layers(n_gpu_layers, info, n_ctx)
    log: list[str] = []
    with captured_native_log(log, echo=verbose):
        try:
            llama = llama_cpp.Llama(
                model_path=str(path),
                n_gpu_layers=layers,
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=verbose,
                **kwargs,
            )
        except ValueError as error:
            raise ModelLoadError(_explain_failure(path, info, layers, n_ctx, log, kwargs)) from error
    return LlamaCppBackend(llama, owned=True), layers


def load_model(
    path,
    *,
    n_gpu_layers="auto",
    n_ctx: int | None = None,
    n_threads: int | None = None,
    verbose: bool = False,
    **kwargs,
) -> Model:
    """A `helpers.Model` for `path`; the same file and settings again return the already loaded model.

    Loading another file or other settings first stops and frees the previous model (memory for two is
    rarely there). If the new one then fails to load, the previous one is loaded again, so the model you
    had keeps working.
    """
    info = read_checked_info(path)  # the file is there, a GGUF model, every header value within llama.cpp's limits
    check_load_settings(n_gpu_layers, n_ctx, n_threads, info, kwargs)
    path = info.path.resolve()
    _check_path_encoding(path)
    n_ctx = n_ctx or default_n_ctx(info)
    n_threads = n_threads or physical_cores()
    stat = path.stat()
    # Keyed on what was asked ("auto"), not on what it resolves to: free VRAM shrinks by the loaded
    # model's own share, so resolving again on a re-run would pick fewer layers and reload for nothing.
    key = (str(path), stat.st_size, stat.st_mtime_ns, n_gpu_layers, n_ctx, n_threads, tuple(sorted(kwargs.items())))
    if _cache.key == key and _cache.model is not None and not _cache.model.closed:
        return _cache.model
    recipe = dict(n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose, kwargs=kwargs)
    previous, previous_key, previous_recipe = _cache.model, _cache.key, _cache.recipe
    unload_model()  # before measuring free VRAM for "auto"
    try:
        backend, layers = _load(path, info, **recipe)
    except BaseException:
        if previous is not None:
            previous._reopen(_load(previous.path, read_info(previous.path), **previous_recipe)[0])
            _cache.model, _cache.key, _cache.recipe = previous, previous_key, previous_recipe
        raise
    model = Model(backend, path=path, n_threads=n_threads, gpu_layers=layers, n_layers=info.n_layers)
    _cache.model, _cache.key, _cache.recipe = model, key, recipe
    return model
