"""download_model against a local server speaking the Hub's protocol, serving the real SmolLM2 GGUF through
the real `hf_hub_download` (no mocking of huggingface_hub)."""

import hashlib

import pytest

from helpers.catalogue import OFFLINE_MODEL, available_models, get_model
from helpers.download import (
    DownloadError,
    GatedModelError,
    HubUnreachableError,
    ModelFileNotFoundError,
    NotEnoughDiskError,
    download_model,
    resolve_model,
)
from tests.hub_server import HubServer, HubState, Repo

REPO = "TheBloke/Llama-2-7B-Chat-GGUF"
FILE = "llama-2-7b-chat.Q4_K_M.gguf"


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


def test_missing_file_lists_quantizations(hub, tmp_path):
    with HubServer(hub) as url, pytest.raises(ModelFileNotFoundError, match="llama-2-7b-chat.Q5_K_M.gguf"):
        download_model("llama-2-7b-chat", quant="Q5_K_M", cache_dir=tmp_path, endpoint=url)


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
        with pytest.raises(DownloadError, match="interrupted.*Run the cell again.*never used as the model"):
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
    with HubServer(hub) as url:
        cached = download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=url)
    dead = "http://127.0.0.1:9"  # nothing listens there
    assert download_model("llama-2-7b-chat", cache_dir=tmp_path, endpoint=dead) == cached
    with pytest.raises(HubUnreachableError, match="bundled offline model"):
        download_model("llama-2-13b-chat", cache_dir=tmp_path, endpoint=dead)
    path = resolve_model("llama-2-13b-chat", cache_dir=tmp_path, endpoint=dead)
    assert path == download_model(OFFLINE_MODEL)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "cannot be reached" in out[0]


def test_not_enough_disk_stops_before_downloading(hub, tmp_path, monkeypatch):
    import helpers.download as download

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
