"""llama2-textgen helpers: everything the notebook calls, importable and tested. This file is the public face.

Names are imported when first used, so that `python -m helpers.install` runs before llama-cpp-python is
installed (it decides how to install it), and so that a lower layer can call up into the story through
`import helpers` without an import circle (see the README's module map and tests/test_layout.py).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from helpers.errors import __all__ as _ERRORS

_EXPORTS = {
    # models: the catalogue, the Hub, loading, a server
    "available_models": "files.catalogue",
    "get_model": "files.catalogue",
    "offline_model_path": "files.catalogue",
    "download_model": "files.download",
    "resolve_model": "files.download",
    "load_model": "engine.loading",
    "unload_model": "engine.loading",
    "Model": "engine.model",
    "as_model": "engine.model",
    "describe_model": "engine.model",
    "connect": "engine.remote",
    "RemoteModel": "engine.remote",
    # this machine
    "detect_gpu": "machine.gpu",
    "detect_gpus": "machine.gpu",
    "describe_gpu": "machine.gpu",
    "auto_gpu_layers": "machine.gpu",
    "advice": "machine.advice",
    "physical_cores": "machine.cpu",
    "install_command": "machine.install",
    "ensure_llama_cpp": "machine.install",
    "ensure_helper_packages": "machine.install",
    # prompts and generation
    "render_chat": "templates",
    "encode_chat": "templates",
    "available_templates": "templates",
    "template_for": "templates",
    "GenerationSettings": "settings",
    "PRESETS": "settings",
    "stream": "generation",
    "generate": "generation",
    "Generation": "generation",
    "GenerationStats": "generation",
    # the chat panel
    "build_ui": "ui.panel",
    "quant_picker": "ui.picker",
    "fallback_note": "ui.picker",
    # quantization
    "compare_quantizations": "quantization",
    "perplexity": "quantization",
    "files_to_compare": "quantization",
    "plot_quantizations": "quantization",
    # every error, rooted at HelpersError (helpers/errors.py draws the tree)
    **dict.fromkeys(_ERRORS, "errors"),
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names come from __getattr__
    from helpers.engine.loading import load_model, unload_model
    from helpers.engine.model import Model, as_model, describe_model
    from helpers.engine.remote import RemoteModel, connect
    from helpers.errors import (
        AccessDeniedError,
        ChatTemplateError,
        ChecksumMismatchError,
        ContextOverflowError,
        ControlTokenError,
        DamagedModelError,
        DecodeError,
        DialogError,
        DownloadError,
        DownloadStalledError,
        DownloadTimeoutError,
        GatedModelError,
        HelpersError,
        HubServerError,
        HubUnreachableError,
        ModelFileError,
        ModelFileMissingError,
        ModelFileNotFoundError,
        ModelLoadError,
        ModelUnloadedError,
        NotAModelError,
        NotEnoughDiskError,
        NotGGUFError,
        PromptError,
        QuantizeError,
        RateLimitedError,
        ServerAuthError,
        ServerError,
        ServerResponseError,
        ServerUnavailableError,
        SpecialTagError,
        TextPromptMismatchError,
        TokenPromptsUnsupportedError,
        UnknownModelError,
        UnsupportedModelError,
        UsageError,
    )
    from helpers.files.catalogue import available_models, get_model, offline_model_path
    from helpers.files.download import download_model, resolve_model
    from helpers.generation import Generation, GenerationStats, generate, stream
    from helpers.machine.advice import advice
    from helpers.machine.cpu import physical_cores
    from helpers.machine.gpu import auto_gpu_layers, describe_gpu, detect_gpu, detect_gpus
    from helpers.machine.install import ensure_helper_packages, ensure_llama_cpp, install_command
    from helpers.quantization import compare_quantizations, files_to_compare, perplexity, plot_quantizations
    from helpers.settings import PRESETS, GenerationSettings
    from helpers.templates import available_templates, encode_chat, render_chat, template_for
    from helpers.ui.panel import build_ui
    from helpers.ui.picker import fallback_note, quant_picker


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        try:
            return import_module(f"helpers.{name}")  # a submodule: helpers.engine, helpers.quantization, ...
        except ModuleNotFoundError as error:
            if error.name != f"helpers.{name}":
                raise
        raise AttributeError(f"module 'helpers' has no attribute {name!r}") from None
    value = getattr(import_module(f"helpers.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
