"""Models split in parts on the Hub: every part downloaded with `hf_hub_download` (through
`helpers.files.hub.download_file`: its cache, resume, token and errors), then joined in order into one GGUF
in the Hub cache, resumably.

The Hub refuses files over 50 GB, so TheBloke uploaded the biggest Llama 2 70B files (Q6_K, Q8_0) as
`<file>-split-a`, `<file>-split-b`, to be joined with `cat` (his model card). The joined file goes next to the
repo's snapshots, `models--<org>--<name>/joined/<commit>/<file>`, so deleting the repo from the cache deletes
it too. The parts are deleted once joined, unless `keep_parts=True`; until then both copies are on disk,
and the free-disk check counts both.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from helpers.errors import DownloadError, UsageError
from helpers.files import hub
from helpers.files.catalogue import MODELS, get_model
from helpers.files.gguf_header import check_gguf

CHUNK_BYTES = 64 * 1024**2


def joined_path(cache: Path, repo_id: str, commit: str, filename: str) -> Path:
    return hub.repo_cache_dir(cache, repo_id) / "joined" / commit / filename


def _cached_commit(cache: Path, repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` (default main) points to in the local cache, as hf_hub_download recorded it."""
    if revision and len(revision) == 40:
        return revision
    ref = hub.repo_cache_dir(cache, repo_id) / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def join_parts(parts: list[Path], target: Path) -> Path:
    """Concatenate `parts` into `target`. The bytes go to `target` + ".joining" first, and a join that was
    interrupted continues after the bytes already there; `target` appears only once it is complete."""
    partial = target.with_name(target.name + ".joining")
    sizes = [part.stat().st_size for part in parts]
    total = sum(sizes)
    done = partial.stat().st_size if partial.exists() else 0
    if done > total:  # not the start of these parts: start over
        partial.unlink()
        done = 0
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "ab") as out:
        start = 0
        for part, size in zip(parts, sizes):
            if start + size > done:
                with open(part, "rb") as source:
                    source.seek(max(0, done - start))
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
            start += size
        out.flush()
        os.fsync(out.fileno())
    if partial.stat().st_size != total:
        raise DownloadError(
            f"Joining {target.name} gave {partial.stat().st_size:,} bytes instead of {total:,}: run the cell again."
        )
    os.replace(partial, target)
    return target


def download_split_model(
    name_or_repo: str,
    filename: str | None = None,
    *,
    quant: str | None = None,
    parts: tuple[str, ...] | list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    keep_parts: bool = False,
) -> Path:
    """The local path of a model file that the Hub holds in parts (a catalogue entry with `parts`, or a repo
    id with `filename` and `parts`), downloading and joining what is missing. A file in one piece is handed
    to `download_model` as it is."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    hub.check_endpoint(endpoint)
    if name_or_repo in MODELS:
        entry = get_model(name_or_repo, quant)
        repo_id, filename = entry.repo_id, filename or entry.filename
        parts, revision = parts or entry.parts, revision or entry.revision
    else:
        repo_id = name_or_repo
    kwargs = dict(revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint)
    if not parts:
        return hub.download_file(name_or_repo, filename, quant=quant, **kwargs)
    if filename is None:
        raise UsageError(f"Give the name of the joined file for the parts {', '.join(parts)} (filename=...).")
    cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    commit = _cached_commit(cache, repo_id, revision)
    if commit and joined_path(cache, repo_id, commit, filename).is_file():
        return joined_path(cache, repo_id, commit, filename)

    # Free disk: the parts still to download, plus the joined copy, which exists beside them until the end.
    try:
        metas = [
            get_hf_file_metadata(hf_hub_url(repo_id, p, revision=revision, endpoint=endpoint), token=token)
            for p in parts
        ]
    except (HfHubHTTPError, OfflineModeIsEnabled, *hub.httpx_errors("HTTPError"), OSError):
        metas = []  # no network, gated, missing...: download_model below says which, in its words
    if metas:
        total = sum(meta.size or 0 for meta in metas)
        missing = sum(
            meta.size or 0
            for part, meta in zip(parts, metas)
            if not isinstance(
                try_to_load_from_cache(repo_id, part, cache_dir=cache_dir, revision=meta.commit_hash), str
            )
        )
        partial = joined_path(cache, repo_id, metas[0].commit_hash or "", filename + ".joining")
        done = partial.stat().st_size if partial.is_file() else 0
        hub.check_disk_space(cache, missing + total - done)

    paths = [hub.download_file(repo_id, part, **kwargs) for part in parts]
    commit = paths[0].parent.name  # .../snapshots/<commit>/<part>
    target = join_parts(paths, joined_path(cache, repo_id, commit, filename))
    check_gguf(target)
    if not keep_parts:
        for path in paths:
            hub.forget(path)  # the part: its snapshot link and the blob
    return target
