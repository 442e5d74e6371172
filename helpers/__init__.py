"""llama2-textgen helpers: everything the notebook calls, importable and tested.

Names are imported lazily so that `python -m helpers.install` works before
llama-cpp-python is installed (it decides how to install it).
"""

from importlib import import_module

_EXPORTS = {
    # model catalogue and download
    "available_models": "catalogue",
    "get_model": "catalogue",
    "advice": "catalogue",
    "offline_model_path": "catalogue",
    "download_model": "download",
    "resolve_model": "download",
    # GPU and install
    "detect_gpu": "gpu",
    "auto_gpu_layers": "gpu",
    "install_command": "install",
    "ensure_llama_cpp": "install",
    # loading
    "load_model": "loading",
    "unload_model": "loading",
    "as_model": "loading",
    "describe_model": "loading",
    "ModelLoadError": "loading",
    "NotGGUFError": "modelinfo",  # what a file that cannot be loaded is: not a GGUF, damaged, no weights, too new
    "DamagedModelError": "modelinfo",
    "NotAModelError": "modelinfo",
    "UnsupportedModelError": "modelinfo",
    "physical_cores": "loading",
    "Model": "model",
    "ModelUnloadedError": "backend",
    # prompt templates
    "render_chat": "templates",
    "encode_chat": "templates",
    "available_templates": "templates",
    "template_for": "templates",
    "SpecialTagError": "templates",
    "ChatTemplateError": "templates",
    # generation
    "GenerationSettings": "settings",
    "PRESETS": "settings",
    "stream": "generation",
    "generate": "generation",
    "Generation": "generation",
    "GenerationStats": "generation",
    # a model on a server (llama-server, vLLM)
    "connect": "remote",
    "RemoteModel": "remote",
    "ServerError": "remote",
    # widgets
    "build_ui": "ui",
    "quant_picker": "ui",
    # quantization
    "compare_quantizations": "quantization",
    "perplexity": "quantization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        if name in _EXPORTS.values() or name in ("modelinfo", "demo", "fitting", "llama_backend", "gguf_check"):
            return import_module(f"helpers.{name}")  # a submodule: helpers.gpu, helpers.ui, ...
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    value = getattr(import_module(f"helpers.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
