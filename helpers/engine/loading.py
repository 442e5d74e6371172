"""Loading a GGUF with llama-cpp-python into a `helpers.Model`: better defaults, one cached model, quiet
logs, clear errors, and a failed load that leaves the previous model working.

Defaults that differ from llama-cpp-python's: context = the model's training context capped at 4096
(the library's is 512), threads = physical cores (the library's is cpu_count() // 2), and all layers on
the GPU when the build can offload and they fit.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path

from helpers.engine.load_settings import MAX_DEFAULT_CTX, check_load_settings
from helpers.engine.model import Model
from helpers.errors import ModelLoadError, UsageError
from helpers.files.gguf_check import read_checked_info
from helpers.files.gguf_header import ModelInfo, read_info
from helpers.machine.cpu import physical_cores


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


def _explain_failure(path: Path, info: ModelInfo, n_gpu_layers: int, n_ctx: int, log: list[str], kwargs) -> str:
    errors = [line.strip() for line in log if "error" in line.lower() or "failed" in line.lower()]
    detail = f" llama.cpp said: {' | '.join(errors[-3:])}" if errors else ""
    names = getattr(os, "sysconf_names", {})  # macOS has no SC_AVPHYS_PAGES
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if "SC_AVPHYS_PAGES" in names else 0
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


@dataclass
class KeptModel:
    """The one model `load_model` keeps, the key it was loaded with (file and settings) and how to load it again."""

    model: Model | None = None
    key: tuple | None = None
    recipe: dict | None = None


# The loader's cache: re-running a load cell returns this model instead of loading the weights again.
_kept = KeptModel()
atexit.register(lambda: unload_model())  # freed while llama_cpp still exists, not during interpreter teardown


def unload_model() -> None:
    """Free the kept model's memory now (stopping any generation on it first). Using it afterwards raises
    ModelUnloadedError instead of crashing inside llama.cpp."""
    model, _kept.model, _kept.key, _kept.recipe = _kept.model, None, None, None
    if model is not None:
        model.close()


def _check_path_encoding(path: Path) -> None:
    """llama-cpp-python passes the path to llama.cpp as UTF-8 (`model_path.encode("utf-8")`): a file name that is
    not valid UTF-8 (Latin-1 bytes from an old archive, say) cannot be opened that way."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", errors="backslashreplace")
        raise UsageError(
            f"The path {shown} is not valid UTF-8, and llama-cpp-python can only open UTF-8 paths: rename the file "
            "(or the folder with the non-UTF-8 name) and load it again."
        ) from None


def _load(path: Path, info: ModelInfo, *, n_gpu_layers, n_ctx, n_threads, verbose, kwargs):
    """(the engine for `path`, the GPU layers it got)."""
    import llama_cpp

    from helpers.engine.llama_backend import LlamaCppBackend, captured_native_log

    layers = resolve_gpu_layers(n_gpu_layers, info, n_ctx)
    log: list[str] = []
    with captured_native_log(log, echo=verbose):
        try:
            llama = llama_cpp.Llama(
                model_path=str(path),
                n_gpu_layers=layers,
                n_ctx=n_ctx,
                n_threads=n_threads,
                verbose=verbose,
                **{"n_threads_batch": n_threads, **kwargs},  # one count for both unless told otherwise
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

    Loading another file or other settings first stops the previous model's generation and frees its engine
    (memory for two is rarely there); the previous model is closed once the new one has loaded. If the new one
    fails to load, the previous file is loaded again into the previous model, which was never closed (its
    state was "loading"), so the model you had keeps working.
    """
    info = read_checked_info(path)  # the file is there, a GGUF model, every header value within llama.cpp's limits
    check_load_settings(n_gpu_layers, n_ctx, n_threads, info, kwargs, verbose)
    path = info.path.resolve()
    _check_path_encoding(path)
    n_ctx = n_ctx or default_n_ctx(info)
    n_threads = n_threads or physical_cores()
    stat = path.stat()
    # Keyed on what was asked ("auto"), not on what it resolves to: free VRAM shrinks by the loaded
    # model's own share, so resolving again on a re-run would pick fewer layers and reload for nothing.
    key = (str(path), stat.st_size, stat.st_mtime_ns, n_gpu_layers, n_ctx, n_threads, tuple(sorted(kwargs.items())))
    if _kept.key == key and _kept.model is not None and not _kept.model.closed:
        return _kept.model
    recipe = dict(n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose, kwargs=kwargs)
    previous = _kept.model if _kept.model is not None and not _kept.model.closed else None
    if previous is not None:
        previous.release_engine()  # stop its generation and free its memory before "auto" measures free VRAM
    try:
        backend, layers = _load(path, info, **recipe)
    except BaseException as error:
        if previous is not None and not _bring_back(previous) and isinstance(error, ModelLoadError):
            raise ModelLoadError(
                f"{error} The previous model ({previous.path.name}) could not be loaded again either: it is closed; "
                "load a model again."
            ) from error
        raise
    if previous is not None:
        previous.close()
    model = Model(backend, path=path, n_threads=n_threads, gpu_layers=layers, n_layers=info.n_layers)
    _kept.model, _kept.key, _kept.recipe = model, key, recipe
    return model


def _bring_back(previous: Model) -> bool:
    """After a failed load: the previous file loaded again into the same model, which was never closed (True);
    if even that fails, the previous model is closed (it cannot be kept waiting) and forgotten (False)."""
    try:
        previous.attach_engine(_load(previous.path, read_info(previous.path), **_kept.recipe)[0])
    except BaseException:
        previous.close()
        _kept.model, _kept.key, _kept.recipe = None, None, None
        return False
    return True
