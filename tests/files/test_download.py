"""download_model against a local server speaking the Hub's protocol, serving the real SmolLM2 GGUF through
the real `hf_hub_download` (no mocking of huggingface_hub)."""

import email.utils
import hashlib
import time
from datetime import datetime, timedelta, timezone

import pytest

from helpers.errors import (
    AccessDeniedError,
    ChecksumMismatchError,
    DownloadError,
    DownloadStalledError,
    DownloadTimeoutError,
    GatedModelError,
    HubServerError,
    HubUnreachableError,
    ModelFileNotFoundError,
    NotEnoughDiskError,
    RateLimitedError,
    UsageError,
)
from helpers.files.catalogue import OFFLINE_MODEL, available_models, get_model
from helpers.files.download import download_model, resolve_model
from helpers.files.hub import Deadlines
from tests.support.hub_server import HubServer, HubState, Repo

REPO = "TheBloke/Llama-2-7B-Chat-GGUF"
FILE = "llama-2-7b-chat.Q4_K_M.gguf"
FAST = Deadlines(head=0.5, slow_head=5, stall=1.0)  # short deadlines, so slow-server tests take seconds


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(smol_path):
    """The catalogue's Llama 2 repo, with the small model standing in for its Q4_K_M file."""
    return HubState(repos={REPO: Repo(files={FILE: smol_path})})


def test_full_download_then_cache_without_get(hub, tmp_path, smol_path):
    with HubServer(hub) as url:
        path = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
        assert path.name == FILE and sha256(path) == sha256(smol_path)
        assert "models--TheBloke--Llama-2-7B-Chat-GGUF" in str(path)
        assert len(hub.gets()) == 1
        again = download_model("llama-2-7b-chat", quant="Q4_K_M", cache_dir=tmp_path, endpoint=url)
        assert again == path
        assert len(hub.gets()) == 1  # served from the cache: no second GET


def test_repo_id_and_filename_work_too(hub, tmp_path):
    with HubServer(hub) as url:
        assert download_model(REPO, FILE, cache_dir=tmp_path, endpoint=url).is_file()


def test_missing_file_names_it_and_lists_the_repos_files(hub, tmp_path, smol_path):
    hub.repos[REPO].files["llama-2-7b-chat.Q2_K.gguf"] = smol_path
    with HubServer(hub) as url, pytest.raises(ModelFileNotFoundError) as raised:
        download_model("llama-2-7b-chat", quant="Q5_K_M", cache_dir=tmp_path, endpoint=url)
    message = str(raised.value)
    assert message.startswith(f"llama-2-7b-chat.Q5_K_M.gguf was not found in {REPO}")
    assert message.endswith(f"Files in {REPO}: {FILE}, llama-2-7b-chat.Q2_K.gguf.")  # what the Hub lists


def test_404_without_an_error_code_is_still_a_missing_file(hub, tmp_path):
    hub.fault, hub.fault_methods = (404, {}), ("HEAD",)
    with HubServer(hub) as url, pytest.raises(ModelFileNotFoundError, match=rf"HTTP 404\)\. Files in {REPO}: {FILE}\."):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)


def test_unknown_repo(hub, tmp_path):
    with HubServer(hub) as url, pytest.raises(ModelFileNotFoundError, match="not found on the Hub"):
        download_model("nobody/nothing", "x.gguf", cache_dir=tmp_path, endpoint=url)


def test_gated_repo_says_how_to_get_access(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # no stored token
    hub.repos[REPO].gated = True
    with HubServer(hub) as url, pytest.raises(GatedModelError, match="accept the licence.*HF_TOKEN.*Secrets"):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert not list(tmp_path.rglob("*.gguf"))


def test_gated_repo_with_token_downloads(hub, tmp_path):
    hub.repos[REPO].gated = True
    with HubServer(hub) as url:
        assert download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url, token="hf_test").is_file()


DROP_AT = 30_000_000  # bytes sent before the server closes the connection (the file is ~98 MB)


def range_start(header):
    return int(header.removeprefix("bytes=").split("-")[0])


def test_dropped_connection_recovers_by_resuming(hub, tmp_path, smol_path):
    hub.drop_after_bytes = DROP_AT
    with HubServer(hub) as url:
        path = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert sha256(path) == sha256(smol_path)
    ranged = [r for _, _, r in hub.gets() if r]
    assert len(hub.gets()) == 2 and len(ranged) == 1
    assert 0 < range_start(ranged[0]) <= DROP_AT  # resumed from what was written, not restarted


def test_interrupted_download_never_passes_for_finished(hub, tmp_path, smol_path):
    hub.drop_after_bytes, hub.fail_after_drop = DROP_AT, True
    with HubServer(hub) as url:
        with pytest.raises(HubServerError, match="HTTP 503.*Hub's side.*(resumes from there|starts over)"):
            download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
        assert not list(tmp_path.rglob(FILE))  # nothing under the final name
        assert all(p.stat().st_size < smol_path.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
        kept = [p.stat().st_size for p in tmp_path.rglob("*.incomplete")]  # huggingface_hub 1.x keeps one

        hub.fail_after_drop = False  # the network is back
        path = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert sha256(path) == sha256(smol_path)
    last_range = hub.gets()[-1][2]
    assert (range_start(last_range) if last_range else 0) == (kept[0] if kept else 0)  # resumed, or restarted
    assert not list(tmp_path.rglob("*.incomplete"))


def test_no_network_uses_cache_then_offline_model(hub, tmp_path, capsys):
    """Unreachable means no connection at all: nothing listens on the port."""
    with HubServer(hub) as url:
        cached = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    dead = "http://127.0.0.1:9"  # nothing listens there
    assert download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=dead) == cached
    with pytest.raises(HubUnreachableError, match="bundled offline model"):
        download_model("llama-2-13b-chat", cache_dir=tmp_path, endpoint=dead)
    path = resolve_model("llama-2-13b-chat", cache_dir=tmp_path, endpoint=dead)
    assert path == download_model(OFFLINE_MODEL)
    printed = capsys.readouterr()
    notices = printed.err.strip().splitlines()
    assert len(notices) == 1 and "cannot be reached" in notices[0] and printed.out == ""


def test_not_enough_disk_stops_before_downloading(hub, tmp_path, monkeypatch):
    import helpers.files.hub as download

    monkeypatch.setattr(download, "DISK_MARGIN_BYTES", 10**15)  # 1 PB of margin: never fits
    with HubServer(hub) as url, pytest.raises(NotEnoughDiskError, match="Not enough disk space"):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert hub.gets() == []


def test_catalogue():
    assert available_models() == ["llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat", OFFLINE_MODEL]
    entry = get_model("llama-2-7b-chat")
    assert (entry.filename, entry.size_gb, entry.ram_gb) == ("llama-2-7b-chat.Q4_K_M.gguf", 4.08, 6.58)
    with pytest.raises(ValueError, match="available: llama-2-7b-chat, llama-2-13b-chat"):
        get_model("llama-3")
    with pytest.raises(ValueError, match="available: Q2_K, Q3_K_S"):
        get_model("llama-2-7b-chat", "Q9")
    # File sizes agree with the card's bits per weight (bytes x 8 / 6.74e9 parameters).
    assert 4.7 < get_model("llama-2-7b-chat").size_gb * 8e9 / 6.74e9 < 4.9


# --- errors by cause ------------------------------------------------------------------------------------------

INVALID_TOKEN = {"X-Error-Message": "Invalid credentials in Authorization header"}


@pytest.mark.parametrize(
    "status,headers,error,message",
    [
        (401, INVALID_TOKEN, AccessDeniedError, "HTTP 401.*HF_TOKEN"),
        (403, {}, AccessDeniedError, "HTTP 403.*accept the licence.*HF_TOKEN"),
        (429, {"Retry-After": "120"}, RateLimitedError, r"HTTP 429.*again in 120 s \(after \d\d:\d\d:\d\d UTC\)"),
        (429, {}, RateLimitedError, "HTTP 429.*Wait a few minutes"),
        (500, {}, HubServerError, "HTTP 500.*Hub's side.*Try again in a few minutes"),
        (503, {}, HubServerError, "HTTP 503.*Hub's side"),
    ],
)
def test_refused_metadata_says_why_and_what_to_do(hub, tmp_path, status, headers, error, message):
    hub.fault = (status, headers)
    with HubServer(hub) as url, pytest.raises(error, match=message) as raised:
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert "interrupted" not in str(raised.value)
    assert [method for method, _, _ in hub.requests] == ["HEAD"]  # asked once, no download tried
    if status == 429:
        assert raised.value.retry_after == (120 if headers else None)


def test_retry_after_as_a_date(hub, tmp_path):
    when = datetime.now(timezone.utc) + timedelta(seconds=90)
    hub.fault = (429, {"Retry-After": email.utils.format_datetime(when, usegmt=True)})
    with HubServer(hub) as url, pytest.raises(RateLimitedError, match=r"again in (8\d|90) s \(after") as raised:
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert 80 <= raised.value.retry_after <= 90


def test_refused_download_after_the_metadata_says_why(hub, tmp_path):
    hub.fault, hub.fault_methods = (500, {}), ("GET",)
    with HubServer(hub) as url, pytest.raises(HubServerError, match="HTTP 500.*Hub's side.*starts over"):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert not list(tmp_path.rglob(FILE)) and not list(tmp_path.rglob("*.incomplete"))


def test_long_rate_limit_on_the_download_stops_at_once(hub, tmp_path):
    """huggingface_hub would sleep through Retry-After (121 s here) up to 5 times: the helper says when instead."""
    hub.fault, hub.fault_methods = (429, {"Retry-After": "120"}), ("GET",)
    started = time.monotonic()
    with HubServer(hub) as url, pytest.raises(RateLimitedError, match=f"{FILE}.*again in 120 s"):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert time.monotonic() - started < 10 and len(hub.gets()) == 1


def test_hub_errors_fall_back_to_the_cached_copy(hub, tmp_path):
    with HubServer(hub) as url:
        cached = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
        for fault in ((503, {}), (429, {"Retry-After": "60"})):
            hub.fault = fault
            assert download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url) == cached
        hub.fault, hub.head_delay = None, 1.0  # a slow Hub: the copy at hand, without waiting longer
        started = time.monotonic()
        assert download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url, deadlines=FAST) == cached
        assert time.monotonic() - started < FAST.slow_head
        hub.fault, hub.head_delay = (403, {}), 0.0  # refused access is not an outage: said even with a copy at hand
        with pytest.raises(AccessDeniedError):
            download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)


# --- the file is checked against the Hub's sha256 ----------------------------------------------------------------


def test_damaged_download_is_deleted_and_the_next_run_fetches_it_again(hub, tmp_path, smol_path):
    hub.corrupt = True
    expected = sha256(smol_path)
    with HubServer(hub) as url:
        with pytest.raises(ChecksumMismatchError, match=f"sha256 is [0-9a-f]{{64}}, the Hub's is {expected}.*deleted"):
            download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
        assert not [p for p in tmp_path.rglob(FILE) if p.is_symlink() or p.exists()]  # no link left, dangling or not

        hub.corrupt = False
        path = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    assert sha256(path) == expected and len(hub.gets()) == 2


# --- deadlines --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [{"stall_after_bytes": 1_000_000}, {"trickle_seconds": 0.2}])
def test_stalled_download_stops_at_the_deadline_and_keeps_nothing(hub, tmp_path, fault):
    for name, value in fault.items():
        setattr(hub, name, value)
    started = time.monotonic()
    with HubServer(hub) as url, pytest.raises(DownloadStalledError) as raised:
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url, deadlines=FAST)
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert "stalled" in message and "Nothing was saved under its name" in message
    assert ("no data arrived for 1 s" if "stall_after_bytes" in fault else "bytes arrived in") in message
    assert not list(tmp_path.rglob(FILE))
    partials = list(tmp_path.rglob("*.incomplete"))
    assert ("resumes from there" in message) == bool(partials)  # it says what it left
    assert len(hub.gets()) == 1  # stopped, not retried in a loop


def test_hub_that_never_starts_sending_is_a_timeout(hub, tmp_path):
    """huggingface_hub retries a GET that times out 5 times (resuming): then the helper names the cause."""
    hub.get_delay = 30
    with HubServer(hub) as url, pytest.raises(DownloadTimeoutError, match="did not start sending .* within 0.5 s"):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url, deadlines=Deadlines(stall=0.5))
    assert len(hub.gets()) == 6 and not list(tmp_path.rglob(FILE))


def test_slow_hub_gets_more_time_with_a_notice(hub, tmp_path, smol_path, capsys):
    hub.head_delay = 1.0  # over FAST.head, under FAST.slow_head
    with HubServer(hub) as url:
        path = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url, deadlines=FAST)
    assert sha256(path) == sha256(smol_path)
    printed = capsys.readouterr()
    assert printed.out == "" and "has not answered in 0.5 s; waiting up to 5 s more" in printed.err


def test_very_slow_hub_is_a_timeout_not_a_reason_to_switch_models(hub, tmp_path):
    hub.head_delay = 3.0
    deadlines = Deadlines(head=0.3, slow_head=1.0, stall=1.0)
    with HubServer(hub) as url, pytest.raises(DownloadTimeoutError, match="did not answer within 1 s"):
        resolve_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url, deadlines=deadlines)


# --- answers of any shape, secrets, a loaded file (issue 22) ------------------------------------------------

DEEP = b"[" * 100_000
NO_OID = b'[{"type": "file", "path": "x.gguf", "size": 1}]'  # a listing huggingface_hub reads with KeyError: 'oid'


@pytest.mark.parametrize(
    "fault,error,message",
    [
        (dict(fault=(404, {"X-Error-Code": "EntryNotFound"}), fault_everywhere=True), ModelFileNotFoundError,
         "was not found in .*HTTP 404.*Files this catalogue knows"),
        (dict(fault=(404, {"X-Error-Code": "EntryNotFound"}), fault_methods=("HEAD",), tree_body=NO_OID),
         ModelFileNotFoundError, "was not found in .*Files this catalogue knows"),
        (dict(fault=(404, {"X-Error-Code": "EntryNotFound"}), fault_methods=("HEAD",), tree_body=DEEP),
         ModelFileNotFoundError, "was not found in .*Files this catalogue knows"),
        (dict(fault=(429, {"Retry-After": "99999999999999999999999"})), RateLimitedError,
         r"again in 604800 s \(after \d{4}-\d\d-\d\d"),
        (dict(fault=(429, {"Retry-After": "99999999999999999999999"}), fault_methods=("GET",)), RateLimitedError,
         "again in 604800 s"),
        (dict(fault=(429, {"RateLimit": '"api";r=0;t=99999999999999999999'}), fault_methods=("GET",)),
         RateLimitedError, "again in 604800 s"),
        (dict(fault=(429, {"Retry-After": "²"}), fault_methods=("GET",)), RateLimitedError, "Wait a few minutes"),
        (dict(fault=(200, {"X-Big": "y" * 200_000})), DownloadError, "does not speak the Hub's protocol.*endpoint="),
        (dict(fault=(302, {"Location": "{url}"})), DownloadError, "TooManyRedirects.*Check endpoint="),
        (dict(fault=(302, {"Location": "{url}"}), fault_methods=("GET",)), DownloadError, "TooManyRedirects"),
        (dict(fault=(307, {"Location": "ftp://127.0.0.1/x"}), fault_methods=("GET",)), DownloadError,
         "does not speak the Hub's protocol"),
        (dict(fault=(418, {}), fault_body=DEEP, fault_everywhere=True), DownloadError, "HTTP 418"),
        (dict(fault=(200, {"X-Repo-Commit": "../../../etc", "ETag": '"abc"'}), fault_methods=("HEAD",)),
         DownloadError, "ValueError: Invalid pointer path"),  # huggingface_hub's own ValueError, translated
    ],
)  # fmt: skip
def test_hub_answers_of_any_shape_end_in_the_projects_errors(hub, tmp_path, fault, error, message):
    for name, value in fault.items():
        setattr(hub, name, value)
    started = time.monotonic()
    with HubServer(hub) as url, pytest.raises(error, match=message):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url, deadlines=FAST)
    assert time.monotonic() - started < 15 and not list(tmp_path.rglob(FILE))


@pytest.mark.parametrize("endpoint", ["ftp://127.0.0.1:1", "not a url", "http://127.0.0.1:99999", "http://"])
def test_an_endpoint_that_is_not_http_is_a_usage_error(tmp_path, endpoint):
    with pytest.raises(UsageError, match="endpoint must be the Hub's http"):
        download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=endpoint)


def test_the_token_and_userinfo_are_never_shown(hub, tmp_path, monkeypatch, caplog):
    """The Hub's error echoes the Authorization header; the endpoint carries a password; huggingface_hub logs
    each request's URL (at DEBUG)."""
    import base64
    import logging
    import traceback

    token, password, env_token = "hf_given0123456789abcdefXYZ", "pw-77a1c9e0", "hf_fromenv0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", env_token)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.fault, hub.fault_methods = (418, {"X-Error-Message": f"bad header Authorization: Bearer {token}"}), ("HEAD",)
    shown = []
    with HubServer(hub) as url:
        endpoint = url.replace("://", f"://bob:{password}@")
        with pytest.raises(DownloadError, match=r"HTTP 418.*Authorization: Bearer \*\*\*") as raised:
            download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=endpoint, token=token)
        shown += [str(raised.value), *traceback.format_exception(raised.value)]
        hub.fault, hub.fault_methods = (503, {}), ("GET",)
        with pytest.raises(HubServerError) as raised:
            download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=endpoint)  # the token from HF_TOKEN
        shown += [str(raised.value), *traceback.format_exception(raised.value)]
    logged = [record.getMessage() for record in caplog.records]
    assert any("://***@127.0.0.1" in line for line in logged)  # request URLs, userinfo included, were logged
    text = "\n".join(shown + logged)
    secrets = [token, password, env_token, base64.b64encode(f"bob:{password}".encode()).decode()[:-2]]
    assert not [secret for secret in secrets if secret in text], text


@pytest.mark.model  # it loads the downloaded file
def test_a_re_download_never_writes_over_a_loaded_file(hub, tmp_path, smol_path):
    """The loaded model's file is memory-mapped: a download of the same file (after the cached copy was deleted,
    or a new revision of it) goes to a new inode, and the model still generates what it did."""
    from helpers import generate, load_model
    from helpers.files.hub import forget
    from tests.conftest import VOCAB
    from tests.support.dialogs import GREEDY

    with HubServer(hub) as url:
        path = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
        blob = path.resolve()
        inode = blob.stat().st_ino
        with load_model(path) as model:
            before = generate(model, "Name a colour.", GREEDY.replace(max_tokens=8)).text
            with open(blob, "rb") as held:  # the loaded inode, read through a descriptor opened before
                forget(path)  # the cached copy deleted (as a checksum mismatch does): downloaded afresh
                again = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
                assert again == path and again.resolve().stat().st_ino != inode
                hub.repos[REPO] = Repo(files={FILE: VOCAB}, commit="1" * 40)  # a new revision, other bytes
                newer = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
                assert newer != path and sha256(newer) == sha256(VOCAB)
                assert hashlib.sha256(held.read()).hexdigest() == sha256(smol_path)  # never written over
            after = generate(model, "Name a colour.", GREEDY.replace(max_tokens=8)).text
    assert after == before and len(before) > 0
