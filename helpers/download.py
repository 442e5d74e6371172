"""Fetching a GGUF from the Hugging Face Hub with `hf_hub_download`: its cache, its tqdm progress bar,
its resume of interrupted downloads, `HF_TOKEN` (or Colab's HF_TOKEN secret) and offline mode; plus a
free-disk check and errors that say what to do.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from helpers.catalogue import MODELS, OFFLINE_MODEL, get_model, offline_model_path

DISK_MARGIN_BYTES = 200 * 1024**2


class DownloadError(RuntimeError):
    """A model could not be downloaded; the message says what to do next."""


class GatedModelError(DownloadError):
    """The repository is gated: its licence must be accepted on the Hub and a token given."""


class ModelFileNotFoundError(DownloadError):
    """The repository, revision or file does not exist on the Hub."""


class HubUnreachableError(DownloadError):
    """The Hub cannot be reached and the file is not in the local cache."""


class NotEnoughDiskError(DownloadError):
    """The file would not fit on the disk that holds the cache."""


def _httpx_errors(name: str) -> tuple[type[Exception], ...]:
    """huggingface_hub 1.x raises httpx's exceptions, 2.x those of its fork httpx2: catch whichever exist."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            pass
    return tuple(found)


def resolve(name_or_repo: str, filename: str | None, quant: str | None, revision: str | None):
    """(repo_id, filename, revision) from a catalogue name (+ quant) or a Hub repo id (+ filename)."""
    if name_or_repo in MODELS:
        entry = get_model(name_or_repo, quant)
        return entry.repo_id, filename or entry.filename, revision or entry.revision
    if "/" not in name_or_repo:
        get_model(name_or_repo)  # raises "not found; available: ..."
    if filename is None:
        raise ValueError(f"Give the GGUF file name to download from {name_or_repo}, e.g. filename='model.Q4_K_M.gguf'.")
    return name_or_repo, filename, revision


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(cache_dir: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(_existing_parent(cache_dir)).free
    if needed_bytes + DISK_MARGIN_BYTES > free:
        raise NotEnoughDiskError(
            f"Not enough disk space: the file needs {needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free in "
            f"{_existing_parent(cache_dir)}. Free some space, pick a smaller quantization, or set cache_dir= "
            "(or HF_HUB_CACHE) to a larger disk."
        )


def _known_quants(repo_id: str) -> str:
    files = [f.filename for entries in MODELS.values() for f in entries.values() if f.repo_id == repo_id]
    return f" Files this catalogue knows in {repo_id}: {', '.join(files)}." if files else ""


def download_model(
    name_or_repo: str,
    filename: str | None = None,
    *,
    quant: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download (or find in the cache) a GGUF file and return its local path.

    `name_or_repo` is a catalogue name (see `available_models()`) or a Hub repo id. `token=None` uses
    `HF_TOKEN` or Colab's HF_TOKEN secret, as huggingface_hub does.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if name_or_repo == OFFLINE_MODEL:
        return offline_model_path()
    repo_id, filename, revision = resolve(name_or_repo, filename, quant, revision)
    cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    where = f"{repo_id}/{filename}"
    try:
        try:
            meta = get_hf_file_metadata(
                hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint), token=token
            )
        except (*_httpx_errors("TransportError"), OfflineModeIsEnabled):
            # No network: the cached copy, if there is one (hf_hub_download checks it).
            return Path(
                hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)
            )
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=meta.commit_hash)
        if not isinstance(cached, str):
            check_disk_space(cache, meta.size or 0)
        return Path(
            hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint)
        )
    except GatedRepoError:
        raise GatedModelError(
            f"{repo_id} is gated: open https://huggingface.co/{repo_id}, accept the licence, create a read token at "
            "https://huggingface.co/settings/tokens and set it as HF_TOKEN (in Colab: the key icon > Secrets > "
            "add HF_TOKEN and allow notebook access; elsewhere: export HF_TOKEN=... or pass token=)."
        ) from None
    except RepositoryNotFoundError:
        raise ModelFileNotFoundError(
            f"Repository {repo_id} not found on the Hub (or private: set HF_TOKEN). Check the name; catalogue "
            f"models: {', '.join(MODELS)}."
        ) from None
    except RevisionNotFoundError:
        raise ModelFileNotFoundError(
            f"Revision {revision!r} not found in {repo_id}; use revision=None for main."
        ) from None
    except LocalEntryNotFoundError:
        raise HubUnreachableError(
            f"Cannot reach the Hugging Face Hub and {where} is not in the cache ({cache}). Check the connection, "
            f"or use the bundled offline model: helpers.download_model({OFFLINE_MODEL!r})."
        ) from None
    except EntryNotFoundError:
        raise ModelFileNotFoundError(f"{filename} does not exist in {repo_id}.{_known_quants(repo_id)}") from None
    except (*_httpx_errors("HTTPError"), OSError) as error:
        raise DownloadError(
            f"The download of {where} was interrupted ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Run the cell again to continue: huggingface_hub resumes the partial file where it keeps one "
            "(1.x) or starts over (2.x). A partial file is never used as the model."
        ) from error


def resolve_model(name: str, quant: str | None = None, *, offline: bool = False, **kwargs) -> Path:
    """The model's local path; when the Hub cannot be reached, say so in one line and use the offline model."""
    if offline:
        return download_model(OFFLINE_MODEL)
    try:
        return download_model(name, quant=quant, **kwargs)
    except HubUnreachableError:
        print(f"The Hugging Face Hub cannot be reached: using the bundled offline model {OFFLINE_MODEL} instead.")
        return download_model(OFFLINE_MODEL)
