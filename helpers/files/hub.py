"""Fetching one GGUF file from the Hugging Face Hub with `hf_hub_download`: its cache, its tqdm progress bar,
its resume of interrupted downloads, `HF_TOKEN` (or Colab's HF_TOKEN secret) and offline mode. Added here:
a free-disk check, the sha256 of every downloaded file checked against the Hub's `X-Linked-Etag`, a deadline
for a stalled download, a longer wait for a slow Hub, and errors named by their cause that say what to do.

What huggingface_hub (1.x and 2.x) does by itself, read in its `file_download.py` and `utils/_http.py`:
- it never hashes a downloaded file: the size is checked, the content is not;
- the file's body is read with `HF_HUB_DOWNLOAD_TIMEOUT` (10 s) per network read, so a server that sends a
  byte every few seconds is never timed out;
- a metadata request (HEAD) that times out ends in the same LocalEntryNotFoundError as no network at all;
- a 429 on the body's GET is retried 5 times, each after sleeping through the whole `Retry-After` (or the
  `RateLimit` header's reset time): a huge one overflows `time.sleep` or sleeps for ever;
- it raises httpx2's own exceptions for answers it cannot use (a redirect loop, headers over its limits, an
  `ftp://` endpoint) and `KeyError`/`TypeError` for a file listing of another shape.
`download_file` is the one boundary: whatever fails in it ends as a `DownloadError` (or a `UsageError` for a bad
argument) whose message says what to do, scrubbed of the token and the endpoint's userinfo
(`helpers.errors.scrub`), and so are huggingface_hub's log lines while it runs.

A file is never written over in place: huggingface_hub downloads to a temporary name and renames it over the
blob (`_chmod_and_move`), the joined parts go to `.joining` and are renamed (`split_download`), a damaged file
is unlinked (`forget`). A model already loaded keeps its memory-mapped inode; truncating that file instead
would end the process with SIGBUS at its next generation (docs/architecture.md, "The model's lifetime").
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import hashlib
import importlib
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

from helpers.errors import (
    AccessDeniedError,
    ChecksumMismatchError,
    DownloadError,
    DownloadStalledError,
    DownloadTimeoutError,
    GatedModelError,
    HelpersError,
    HubServerError,
    HubUnreachableError,
    ModelFileMissingError,
    ModelFileNotFoundError,
    NotEnoughDiskError,
    RateLimitedError,
    UsageError,
    scrub,
    scrubbed,
)
from helpers.files.catalogue import MODELS, OFFLINE_MODEL, get_model

DISK_MARGIN_BYTES = 200 * 1024**2
# A download that receives less than this in `Deadlines.stall` seconds has stalled: a trickle of a byte every
# few seconds keeps a connection open forever without ever finishing a 4 GB file.
STALL_MIN_BYTES = 64 * 1024
# A 429 whose Retry-After is longer than this stops the download with the time to retry, instead of letting
# huggingface_hub sleep through it (up to 5 times).
LONGEST_RATE_LIMIT_WAIT = 10.0
# A Retry-After longer than a week is read as a week: nobody waits longer, and a day count in seconds
# beyond that overflows datetime arithmetic (99999999999999999999999 s did).
LONGEST_RETRY_AFTER = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Deadlines:
    """How long a download waits for the Hub, in seconds."""

    head: float | None = None  # the file's metadata (HEAD); None: HF_HUB_ETAG_TIMEOUT (10 s unless set)
    slow_head: float = 60.0  # a Hub slower than `head` gets this long more, after a notice on stderr
    stall: float | None = None  # under STALL_MIN_BYTES received in this long stops; None: 60 s or more
    #                             if HF_HUB_DOWNLOAD_TIMEOUT is set higher


def httpx_errors(name: str) -> tuple[type[Exception], ...]:
    """huggingface_hub 1.x raises httpx's exceptions, 2.x those of its fork httpx2: catch whichever exist."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            pass
    return tuple(found)


def notice(message: str) -> None:
    """A line for the person waiting, on stderr: never mixed into an answer printed on stdout."""
    print(message, file=sys.stderr, flush=True)


def resolve(name_or_repo: str, filename: str | None, quant: str | None, revision: str | None):
    """(repo_id, filename, revision) from a catalogue name (+ quant) or a Hub repo id (+ filename)."""
    if name_or_repo in MODELS:
        entry = get_model(name_or_repo, quant)
        return entry.repo_id, filename or entry.filename, revision or entry.revision
    if "/" not in name_or_repo:
        get_model(name_or_repo)  # raises "not found; available: ..."
    if (
        name_or_repo.startswith(("/", ".", "~"))
        or name_or_repo.lower().endswith(".gguf")
        or Path(name_or_repo).exists()
    ):
        # A path, not a Hub repo id ("owner/name"): say that the file is not there.
        raise ModelFileMissingError(
            f"No GGUF file at {name_or_repo}: check the path, or give a catalogue name or a Hub repo id."
        )
    if filename is None:
        raise UsageError(f"Give the GGUF file name to download from {name_or_repo}, e.g. filename='model.Q4_K_M.gguf'.")
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


# --- the stall deadline: hooks on huggingface_hub's own HTTP client ------------------------------------------


def _retry_after_seconds(headers) -> float | None:
    """Retry-After as seconds from now: a number of seconds or an HTTP date (RFC 9110 10.2.3), at most
    LONGEST_RETRY_AFTER; None when absent or unreadable."""
    value = (headers.get("Retry-After") or "").strip()
    if re.fullmatch(r"[0-9]{1,30}", value):
        return min(float(value), LONGEST_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    except (TypeError, ValueError, OverflowError, IndexError):  # no date, a naive one, or one out of range
        return None
    return min(max(0.0, seconds), LONGEST_RETRY_AFTER)


def _rate_limit_reset(headers) -> float | None:
    """The IETF `RateLimit` header's reset time (`"api";r=0;t=55`), which huggingface_hub sleeps through
    when no request is left; None when absent or some remain."""
    found = re.search(r"\br=([0-9]+)\s*;\s*t=([0-9]{1,30})", headers.get("RateLimit") or "")
    if not found or int(found[1]) > 0:
        return None
    return min(float(found[2]), LONGEST_RETRY_AFTER)


def _retry_hint(seconds: float | None) -> str:
    if seconds is None:
        return "Wait a few minutes, then run it again (the Hub did not say how long)."
    when = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    at = when.strftime("%H:%M:%S UTC" if seconds < 12 * 3600 else "%Y-%m-%d %H:%M UTC")
    return f"Run it again in {seconds:.0f} s (after {at}), as the Hub's Retry-After says."


def _rate_limited(where: str, seconds: float | None) -> RateLimitedError:
    return RateLimitedError(
        f"The Hugging Face Hub is rate limiting this machine (HTTP 429) while fetching {where}. {_retry_hint(seconds)} "
        "A token (HF_TOKEN) raises the limit.",
        retry_after=seconds,
    )


@functools.cache
def _stall_guard(httpx_module):
    """A response body stream for `httpx_module` (httpx2 or httpx: the one huggingface_hub uses) that raises
    DownloadStalledError when less than STALL_MIN_BYTES arrive in `seconds`; a read that waits `seconds` for
    a single byte ends in the transport's ReadTimeout, turned into the same error."""

    class StallGuard(httpx_module.SyncByteStream):
        def __init__(self, stream, seconds: float):
            self.stream, self.seconds = stream, seconds

        def __iter__(self):
            start, received = time.monotonic(), 0
            try:
                for chunk in self.stream:
                    received += len(chunk)
                    now = time.monotonic()
                    if now - start >= self.seconds:
                        if received < STALL_MIN_BYTES:
                            raise DownloadStalledError(
                                f"only {received} bytes arrived in {now - start:.1f} s (the deadline is "
                                f"{STALL_MIN_BYTES // 1024} KiB in {self.seconds:g} s)"
                            )
                        start, received = now, 0
                    yield chunk
            except httpx_module.ReadTimeout:
                raise DownloadStalledError(f"no data arrived for {self.seconds:g} s") from None

        def close(self):
            self.stream.close()

        @property
        def elapsed(self):  # httpx2 reads the response time from its stream
            return getattr(self.stream, "elapsed", None)

    return StallGuard


def _limit_read_wait(request, *, seconds: float) -> None:
    """Request hook: a GET waits at most `seconds` for each network read (HEAD keeps its own timeout)."""
    if request.method == "GET":
        timeout = dict(request.extensions.get("timeout") or {})
        timeout["read"] = seconds
        request.extensions["timeout"] = timeout


def _watch_body(response, *, seconds: float) -> None:
    """Response hook: guard a GET's body against stalls; stop at a long rate limit instead of sleeping it out."""
    if response.request.method != "GET":
        return
    if response.status_code == 429:
        wait = _retry_after_seconds(response.headers)
        reset = _rate_limit_reset(response.headers)
        unreadable = wait is None and bool((response.headers.get("Retry-After") or "").strip())
        if unreadable or max(wait or 0.0, reset or 0.0) > LONGEST_RATE_LIMIT_WAIT:
            raise _rate_limited(str(response.request.url).rsplit("/", 1)[-1], max(wait or 0.0, reset or 0.0) or None)
    elif response.status_code in (200, 206):
        httpx_module = importlib.import_module(type(response).__module__.split(".")[0])
        response.stream = _stall_guard(httpx_module)(response.stream, seconds)


class _ScrubSecrets(logging.Filter):
    """A filter on huggingface_hub's logger: each record's text scrubbed (its warnings print request URLs)."""

    def __init__(self, secrets):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage(), self.secrets), None
        return True


@contextlib.contextmanager
def _scrubbed_logs(secrets):
    """While inside, every huggingface_hub logger (each module has its own: a filter on the parent does not
    see the children's records) scrubs its records before any handler sees them."""
    import huggingface_hub.file_download  # noqa: F401  (its loggers exist once it is imported)

    guard = _ScrubSecrets(secrets)
    loggers = [
        logger
        for name, logger in list(logging.root.manager.loggerDict.items())
        if name.split(".")[0] == "huggingface_hub" and isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        logger.addFilter(guard)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(guard)


def check_endpoint(endpoint: str | None) -> None:
    """endpoint= (None: HF_ENDPOINT, else huggingface.co) must be an http(s) address."""
    if endpoint is None:
        return
    try:
        parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
        port_ok = parts is not None and (parts.port is None or parts.port > 0)
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise UsageError(
            f"endpoint must be the Hub's http(s) address, like https://huggingface.co; got {scrub(repr(endpoint))}."
        )


@contextlib.contextmanager
def _deadline_on_downloads(seconds: float):
    """While inside, every client huggingface_hub makes carries the stall hooks. huggingface_hub has one shared
    client made by a factory (`set_client_factory`); the factory in place (the user's, if they set one) is
    wrapped, and put back afterwards. Setting a factory closes the shared client, so two downloads must not
    run at the same time in two threads."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY  # the same name in 1.x and 2.x; there is no public getter

    def factory():
        client = previous()
        hooks = client.event_hooks
        hooks["request"].append(functools.partial(_limit_read_wait, seconds=seconds))
        hooks["response"].append(functools.partial(_watch_body, seconds=seconds))
        client.event_hooks = hooks
        return client

    huggingface_hub.set_client_factory(factory)
    try:
        yield
    finally:
        huggingface_hub.set_client_factory(previous)


# --- checks after a download -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * 1024**2):
            digest.update(block)
    return digest.hexdigest()


def repo_cache_dir(cache: Path, repo_id: str) -> Path:
    """A model repo's folder in huggingface_hub's cache: `models--<org>--<name>`."""
    return cache / f"models--{repo_id.replace('/', '--')}"


def forget(pointer: Path) -> None:
    """Remove a downloaded file from huggingface_hub's cache: the blob and the snapshot's link to it, so the
    next call downloads it again. The refs stay: they only name the commit."""
    blob = pointer.resolve()
    pointer.unlink(missing_ok=True)
    if blob != pointer:
        blob.unlink(missing_ok=True)


def _partials(storage: Path) -> list[Path]:
    return sorted((storage / "blobs").glob("*.incomplete")) if (storage / "blobs").is_dir() else []


def _partial_note(storage: Path) -> str:
    """What happened to the bytes already received: huggingface_hub 1.x keeps `blobs/<etag>.incomplete` and
    resumes from it, 2.x deletes its per-download temporary file."""
    kept = _partials(storage)
    if kept:
        size = sum(p.stat().st_size for p in kept)
        return (
            f"huggingface_hub kept the {size / 1e6:.1f} MB received as {kept[0]}; running again resumes from there. "
            "A partial file is never used as the model."
        )
    return "No partial file was kept: running again starts over."


# --- the download -------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    """One file asked of the Hub: where it is cached, and the errors about it."""

    repo_id: str
    filename: str
    revision: str | None
    cache_dir: str | Path | None
    token: str | None
    endpoint: str | None

    @property
    def secrets(self) -> tuple[str, ...]:
        """The token given or stored, and the endpoint's userinfo: never in a message (`scrub`)."""
        found = [self.token]
        try:
            from huggingface_hub import get_token

            found.append(get_token())
        except (ImportError, OSError):
            pass
        userinfo = urlsplit(self.endpoint).netloc.rpartition("@")[0] if self.endpoint else ""
        found += [userinfo, *userinfo.split(":", 1)[1:]]
        return tuple(s for s in found if isinstance(s, str) and s)

    @property
    def where(self) -> str:
        return f"{self.repo_id}/{self.filename}"

    @property
    def page(self) -> str:
        from huggingface_hub import constants

        return f"{(self.endpoint or constants.ENDPOINT).rstrip('/')}/{self.repo_id}"

    @property
    def storage(self) -> Path:
        from huggingface_hub import constants

        cache = Path(self.cache_dir) if self.cache_dir else Path(constants.HF_HUB_CACHE)
        return repo_cache_dir(cache, self.repo_id)

    def cached(self) -> Path | None:
        """The copy in the cache, if there is one (what hf_hub_download returns without network)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(
                hf_hub_download(
                    self.repo_id,
                    self.filename,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=True,
                )
            )
        except (LocalEntryNotFoundError, EntryNotFoundError):
            return None

    def files_on_hub(self) -> str:
        """The repository's files (GGUF ones if it has any), for a "not found" message; best effort."""
        from huggingface_hub import HfApi

        try:
            files = HfApi(endpoint=self.endpoint, token=self.token).list_repo_files(
                self.repo_id, revision=self.revision
            )
        except (
            OSError,
            ValueError,
            LookupError,
            TypeError,
            AttributeError,
            RecursionError,
            *httpx_errors("HTTPError"),
        ):
            return _known_quants(self.repo_id)  # a listing of another shape (no "oid": KeyError) names none
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return _known_quants(self.repo_id)
        shown = [f for f in files if f.endswith(".gguf")] or files
        more = f", and {len(shown) - 30} more" if len(shown) > 30 else ""
        return f" Files in {self.repo_id}: {', '.join(shown[:30])}{more}." if shown else f" {self.repo_id} is empty."

    def not_the_hub(self, error: BaseException) -> DownloadError:
        first = (str(error).splitlines() or [""])[0][:200]
        return DownloadError(
            f"What answered at {self.page} for {self.where} does not speak the Hub's protocol ({type(error).__name__}: "
            f"{first}). Check endpoint= (or HF_ENDPOINT) and any proxy in between, then try again."
        )

    def unreachable(self, why: str) -> HubUnreachableError:
        return HubUnreachableError(
            f"Cannot reach the Hugging Face Hub ({why}) and {self.where} is not in the cache ({self.storage.parent}). "
            f"Check the connection, or use the bundled offline model: helpers.download_model({OFFLINE_MODEL!r})."
        )

    def http_error(self, error, after: str = "") -> DownloadError:
        """A DownloadError named by the HTTP status of huggingface_hub's HfHubHTTPError; `after` is appended."""
        problem = self._http_error(error)
        if after:
            problem.args = (f"{problem} {after}",)
        return problem

    def _http_error(self, error) -> DownloadError:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        response = error.response
        status = response.status_code
        token_help = (
            "create a read token at https://huggingface.co/settings/tokens and set it as HF_TOKEN (in Colab: the key "
            "icon > Secrets > add HF_TOKEN and allow notebook access; elsewhere: export HF_TOKEN=... or pass token=)"
        )
        if isinstance(error, GatedRepoError):
            return GatedModelError(f"{self.repo_id} is gated: open {self.page}, accept the licence, then {token_help}.")
        if isinstance(error, RevisionNotFoundError):
            return ModelFileNotFoundError(f"Revision {self.revision!r} not found in {self.repo_id}; use revision=None.")
        if isinstance(error, RepositoryNotFoundError):
            return ModelFileNotFoundError(
                f"Repository {self.repo_id} not found on the Hub (HTTP {status}; or it is private or gated: set "
                f"HF_TOKEN). Check the name; catalogue models: {', '.join(MODELS)}."
            )
        if status == 401:
            return AccessDeniedError(
                f"The Hub refused the request for {self.where} (HTTP 401: no valid token). If the model needs one, "
                f"{token_help}; if HF_TOKEN is set, it is wrong or expired: make a new one."
            )
        if status == 403:
            return AccessDeniedError(
                f"The Hub denied access to {self.where} (HTTP 403). Open {self.page} and accept the licence if it "
                f"asks, and check that HF_TOKEN is a token with read access (a fine-grained token needs 'read access "
                f"to contents of public gated repos'); or {token_help}."
            )
        if status == 404:
            return ModelFileNotFoundError(
                f"{self.filename} was not found in {self.repo_id} (HTTP 404).{self.files_on_hub()}"
            )
        if status == 429:
            return _rate_limited(self.where, _retry_after_seconds(response.headers))
        if status >= 500:
            return HubServerError(
                f"The Hugging Face Hub answered HTTP {status} for {self.where}: a problem on the Hub's side, not "
                "yours. Try again in a few minutes (https://status.huggingface.co)."
            )
        said = getattr(error, "server_message", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
        return DownloadError(
            f"The Hub answered HTTP {status} for {self.where}: {' '.join(str(said).split())[:300]}. Check the "
            "repository and file names, and endpoint= (or HF_ENDPOINT) if you set one."
        )


def download_file(
    name_or_repo: str,
    filename: str | None = None,
    *,
    quant: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    deadlines: Deadlines = Deadlines(),
) -> Path:
    """Download (or find in the cache) one GGUF file of the Hub and return its local path.

    `name_or_repo` is a catalogue name (see `available_models()`) or a Hub repo id. `token=None` uses
    `HF_TOKEN` or Colab's HF_TOKEN secret, as huggingface_hub does. A file downloaded now is checked against
    the Hub's sha256; a cached one is returned as it is. The Hub counts as unreachable only when no connection
    can be made: then the cached copy is used, or HubUnreachableError raised.
    """
    from huggingface_hub import constants

    check_endpoint(endpoint)
    request = _Request(*resolve(name_or_repo, filename, quant, revision), cache_dir, token, endpoint)
    stall = deadlines.stall if deadlines.stall is not None else max(60.0, constants.HF_HUB_DOWNLOAD_TIMEOUT)
    secrets = request.secrets
    try:
        with _scrubbed_logs(secrets), _deadline_on_downloads(stall):
            return _download(request, deadlines, stall)
    except HelpersError as error:  # the one boundary: no token or userinfo in any message
        raise scrubbed(error, secrets) from None
    except (LookupError, TypeError, ValueError, ArithmeticError, RecursionError) as error:
        # huggingface_hub reading an answer of a shape it does not expect (a KeyError for a missing field, an
        # OverflowError for a huge number): the Hub's answer, not this machine, is at fault.
        raise scrubbed(request.not_the_hub(error), secrets) from None


def _download(request: _Request, deadlines: Deadlines, stall: float) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, LocalEntryNotFoundError

    no_connection = (*httpx_errors("ConnectError"), *httpx_errors("ConnectTimeout"), ConnectionError)
    timeouts = httpx_errors("TimeoutException")
    not_the_hub = tuple(
        kind for name in ("TooManyRedirects", "UnsupportedProtocol", "ProtocolError", "DecodingError")
        for kind in httpx_errors(name)
    )  # fmt: skip
    first = deadlines.head if deadlines.head is not None else constants.HF_HUB_ETAG_TIMEOUT
    for attempt, head in enumerate((first, deadlines.slow_head)):
        try:
            meta = _metadata(request, head)
            break
        except no_connection as error:  # OfflineModeIsEnabled is a ConnectionError
            if cached := request.cached():
                return cached
            raise request.unreachable(type(error).__name__) from None
        except timeouts:
            if cached := request.cached():
                return cached
            if attempt:
                raise DownloadTimeoutError(
                    f"The Hugging Face Hub accepted the connection but did not answer within {head:g} s for "
                    f"{request.where}. The Hub or the network is very slow: try again later."
                ) from None
            notice(
                f"The Hugging Face Hub has not answered in {head:g} s; waiting up to {deadlines.slow_head:g} s more "
                f"for {request.where}."
            )
        except HfHubHTTPError as error:
            if error.response.status_code in (429, 500, 502, 503, 504) and (cached := request.cached()):
                return cached
            raise request.http_error(error) from None
        except (*httpx_errors("HTTPError"), OSError) as error:  # a redirect loop, huge headers, not HTTP
            if cached := request.cached():
                return cached
            raise request.not_the_hub(error) from None
    if meta.commit_hash is None or meta.etag is None:  # a proxy or captive portal answered, not the Hub
        if cached := request.cached():
            return cached
        raise request.unreachable("what answered is not the Hub: no X-Repo-Commit or ETag")

    cached = try_to_load_from_cache(
        request.repo_id, request.filename, cache_dir=request.cache_dir, revision=meta.commit_hash
    )
    if not isinstance(cached, str):
        check_disk_space(request.storage.parent, meta.size or 0)
    try:
        path = Path(
            hf_hub_download(
                request.repo_id,
                request.filename,
                revision=request.revision,
                cache_dir=request.cache_dir,
                token=request.token,
                endpoint=request.endpoint,
                etag_timeout=head,
            )
        )
    except DownloadStalledError as error:
        raise DownloadStalledError(
            f"The download of {request.where} stalled: {error}. Nothing was saved under its name; "
            f"{_partial_note(request.storage)} Check the connection and run it again."
        ) from None
    except RateLimitedError as error:
        raise _rate_limited(request.where, error.retry_after) from None
    except HfHubHTTPError as error:
        raise request.http_error(error, after=_partial_note(request.storage)) from None
    except LocalEntryNotFoundError as error:  # huggingface_hub's own HEAD failed after ours succeeded
        cause = error.__cause__
        if isinstance(cause, HfHubHTTPError):
            raise request.http_error(cause) from None
        if isinstance(cause, (FileMetadataError, *no_connection)):
            raise request.unreachable(type(cause).__name__) from None
        raise DownloadTimeoutError(f"The Hub stopped answering while {request.where} was requested: retry.") from None
    except not_the_hub as error:
        raise request.not_the_hub(error) from None
    except timeouts:
        raise DownloadTimeoutError(
            f"The Hub did not start sending {request.where} within {stall:g} s, after 6 tries. {_partial_note(request.storage)}"
        ) from None
    except (*httpx_errors("HTTPError"), OSError) as error:
        raise DownloadError(
            f"The download of {request.where} was interrupted ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"{_partial_note(request.storage)} Run the cell again to continue."
        ) from error
    if not isinstance(cached, str):
        _verify(path, meta.etag, request)
    return path


def _metadata(request: _Request, timeout: float):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(request.repo_id, request.filename, revision=request.revision, endpoint=request.endpoint)
    return get_hf_file_metadata(url, token=request.token, timeout=timeout)


def _verify(path: Path, etag: str, request: _Request) -> None:
    """Compare a freshly downloaded file with the Hub's sha256 of it (X-Linked-Etag: every LFS file, so every
    GGUF); a mismatch deletes it from the cache. The blob's name is the etag huggingface_hub downloaded it
    under (the same as `etag` unless the file changed on the Hub in between). A small file kept in git has a
    git blob id as its etag instead, and is not checked."""
    blob = path.resolve().name.lower()
    expected = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else etag.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        return
    got = _sha256(path)
    if got != expected:
        forget(path)
        raise ChecksumMismatchError(
            f"The downloaded {request.where} is damaged: its sha256 is {got}, the Hub's is {expected}. It has been "
            "deleted from the cache; run the cell again to download it afresh. If it happens again, a proxy or "
            "the network is altering the file."
        )
