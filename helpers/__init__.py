"""llama2-textgen helpers: everything the notebook calls, importable and tested.

Names are imported lazily so that `python -m helpers.machine.install` works before
llama-cpp-python is installed (it decides how to install it).
"""

from importlib import import_module

_EXPORTS = {
    # model catalogue and download
    "available_models": "files.catalogue",
    "get_model": "files.catalogue",
    "advice": "files.catalogue",
    "offline_model_path": "files.catalogue",
    "download_model": "files.download",
    "resolve_model": "files.download",
    # GPU and install
    "detect_gpu": "machine.gpu",
    "auto_gpu_layers": "machine.gpu",
    "install_command": "machine.install",
    "ensure_llama_cpp": "machine.install",
    # loading
    "load_model": "engine.loading",
    "unload_model": "engine.loading",
    "as_model": "engine.loading",
    "describe_model": "engine.loading",
    "ModelLoadError": "engine.loading",
    "NotGGUFError": "files.gguf_header",  # what a file that cannot be loaded is: not a GGUF, damaged, no weights, too new
    "DamagedModelError": "files.gguf_header",
    "NotAModelError": "files.gguf_header",
    "UnsupportedModelError": "files.gguf_header",
    "physical_cores": "engine.loading",
    "Model": "engine.model",
    "ModelUnloadedError": "engine.backend",
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
    "connect": "engine.remote",
    "RemoteModel": "engine.remote",
    "ServerError": "engine.remote",
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
