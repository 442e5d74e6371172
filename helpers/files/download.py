"""`download_model()` and `resolve_model()`: a model's file, wherever it comes from: the bundled offline model, one
file of the Hub (`helpers.files.hub`), or a file the Hub holds in parts (`helpers.files.split_download`)."""

from __future__ import annotations

from pathlib import Path

from helpers.errors import HubUnreachableError
from helpers.files.catalogue import MODELS, OFFLINE_MODEL, get_model, offline_model_path
from helpers.files.hub import Deadlines, download_file, notice
from helpers.files.split_download import download_split_model


def download_model(
    name_or_repo: str,
    filename: str | None = None,
    *,
    quant: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    deadlines: Deadlines | None = None,
) -> Path:
    """Download (or find in the cache) a GGUF file and return its local path.

    `name_or_repo` is a catalogue name (see `available_models()`) or a Hub repo id. `token=None` uses
    `HF_TOKEN` or Colab's HF_TOKEN secret, as huggingface_hub does. A file downloaded now is checked against
    the Hub's sha256; a cached one is returned as it is. The Hub counts as unreachable only when no connection
    can be made: then the cached copy is used, or HubUnreachableError raised. A catalogue file the Hub holds in
    parts (70B Q6_K, Q8_0) is downloaded part by part and joined.
    """
    if name_or_repo == OFFLINE_MODEL:
        return offline_model_path()
    if name_or_repo in MODELS and filename is None and get_model(name_or_repo, quant).parts:
        return download_split_model(
            name_or_repo, quant=quant, revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint
        )
    return download_file(
        name_or_repo,
        filename,
        quant=quant,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        endpoint=endpoint,
        deadlines=deadlines or Deadlines(),
    )


def resolve_model(name: str, quant: str | None = None, *, offline: bool = False, **kwargs) -> Path:
    """The model's local path; when the Hub cannot be reached (no connection), say so in one line on stderr
    and use the offline model. Any other problem (a slow Hub, a refused token, a damaged file) is raised."""
    if offline:
        return download_model(OFFLINE_MODEL)
    try:
        return download_model(name, quant=quant, **kwargs)
    except HubUnreachableError:
        notice(f"The Hugging Face Hub cannot be reached: using the bundled offline model {OFFLINE_MODEL} instead.")
        return download_model(OFFLINE_MODEL)
