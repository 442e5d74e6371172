"""Models in parts: the real SmolLM2 GGUF cut in two and served as the catalogue's Llama 2 70B Q6_K parts by the
local Hub stand-in, downloaded with the real `hf_hub_download`, joined, resumed, and checked for disk space.
The reference for the joined file is the original file itself."""

import hashlib
import shutil
from collections import namedtuple

import pytest

from helpers.errors import NotEnoughDiskError
from helpers.files import download, hub
from helpers.files.catalogue import ARCHITECTURE, get_model
from helpers.files.split_download import download_split_model, join_parts
from helpers.machine.advice import catalogue_gpu_layers
from helpers.machine.gpu import MiB
from tests.support.hub_server import HubServer, HubState, Repo

ENTRY = get_model("llama-2-70b-chat", "Q6_K")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def split_hub(smol_path, tmp_path):
    """The 70B repo with the small model's bytes cut at an odd place into the Q6_K file's two parts."""
    data = smol_path.read_bytes()
    cut = len(data) // 3 + 7
    folder = tmp_path / "parts"
    folder.mkdir()
    files = {}
    for name, chunk in zip(ENTRY.parts, (data[:cut], data[cut:])):
        (folder / name).write_bytes(chunk)
        files[name] = folder / name
    return HubState(repos={ENTRY.repo_id: Repo(files=files)})


def test_catalogue_lists_70b_with_its_parts():
    assert ENTRY.parts == ("llama-2-70b-chat.Q6_K.gguf-split-a", "llama-2-70b-chat.Q6_K.gguf-split-b")
    assert ENTRY.filename == "llama-2-70b-chat.Q6_K.gguf" and ENTRY.repo_id == "TheBloke/Llama-2-70B-Chat-GGUF"
    assert get_model("llama-2-70b-chat").parts == ()  # Q4_K_M is one file
    assert get_model("llama-2-70b-chat", "Q8_0").parts[1].endswith("Q8_0.gguf-split-b")
    # Sizes agree with Llama 2 70B's 68.98e9 parameters at the quantizations' bits per weight.
    assert 4.7 < get_model("llama-2-70b-chat").size_gb * 8e9 / 68.98e9 < 4.9


def test_parts_downloaded_joined_and_parts_removed(split_hub, tmp_path, smol_path):
    cache = tmp_path / "cache"
    with HubServer(split_hub) as url:
        path = download_split_model("llama-2-70b-chat", quant="Q6_K", cache_dir=cache, endpoint=url)
        assert path.name == ENTRY.filename and sha256(path) == sha256(smol_path)
        assert "models--TheBloke--Llama-2-70B-Chat-GGUF" in str(path)
        assert sorted(r[1].rsplit("/", 1)[-1] for r in split_hub.gets()) == list(ENTRY.parts)
        assert not list(cache.rglob("*split-*"))  # the parts are gone once joined: one copy stays
        gets = len(split_hub.gets())
        assert download_split_model("llama-2-70b-chat", quant="Q6_K", cache_dir=cache, endpoint=url) == path
        assert len(split_hub.gets()) == gets  # already joined: nothing downloaded again
    # And without the Hub at all.
    assert (
        download_split_model("llama-2-70b-chat", quant="Q6_K", cache_dir=cache, endpoint="http://127.0.0.1:9") == path
    )


def test_the_notebook_path_joins_parts_too(split_hub, tmp_path, smol_path):
    """resolve_model (the notebook's download cell) hands a catalogue file in parts to download_split_model."""
    with HubServer(split_hub) as url:
        path = download.resolve_model("llama-2-70b-chat", "Q6_K", cache_dir=tmp_path, endpoint=url)
    assert path.name == ENTRY.filename and sha256(path) == sha256(smol_path)


def test_keep_parts(split_hub, tmp_path):
    with HubServer(split_hub) as url:
        download_split_model("llama-2-70b-chat", quant="Q6_K", cache_dir=tmp_path / "c", endpoint=url, keep_parts=True)
    assert len(list((tmp_path / "c").rglob("*split-*"))) == 2


def test_one_piece_files_go_through_download_model(tmp_path, smol_path):
    hub = HubState(repos={ENTRY.repo_id: Repo(files={"llama-2-70b-chat.Q4_K_M.gguf": smol_path})})
    with HubServer(hub) as url:
        path = download_split_model("llama-2-70b-chat", cache_dir=tmp_path, endpoint=url)
    assert path.name == "llama-2-70b-chat.Q4_K_M.gguf" and sha256(path) == sha256(smol_path)


def test_an_interrupted_join_continues_where_it_stopped(tmp_path, smol_path):
    data = smol_path.read_bytes()
    cut = len(data) // 2
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(data[:cut])
    b.write_bytes(data[cut:])
    target = tmp_path / "joined.gguf"
    # A join that stopped 1000 bytes into the second part...
    (tmp_path / "joined.gguf.joining").write_bytes(data[: cut + 1000])
    # ...continues from there: it reads nothing of part a again (spoiled here, same size, to prove it).
    a.write_bytes(b"x" * cut)
    assert sha256(join_parts([a, b], target)) == sha256(smol_path)
    assert not (tmp_path / "joined.gguf.joining").exists()


def test_a_join_longer_than_the_parts_starts_over(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"GGUF" + b"1" * 10)
    b.write_bytes(b"2" * 10)
    (tmp_path / "t.joining").write_bytes(b"z" * 100)
    assert join_parts([a, b], tmp_path / "t").read_bytes() == b"GGUF" + b"1" * 10 + b"2" * 10


def test_disk_check_counts_parts_and_joined_copy(split_hub, tmp_path, smol_path, monkeypatch):
    size = smol_path.stat().st_size
    usage = namedtuple("usage", "total used free")
    # Room for the parts (one copy) but not for the parts and the joined file together.
    monkeypatch.setattr(hub, "DISK_MARGIN_BYTES", 0)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * size, 0, 2 * size - 1))
    with HubServer(split_hub) as url, pytest.raises(NotEnoughDiskError, match="Not enough disk space"):
        download_split_model("llama-2-70b-chat", quant="Q6_K", cache_dir=tmp_path, endpoint=url)
    assert split_hub.gets() == []  # stopped before downloading anything
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * size, 0, 2 * size))
    with HubServer(split_hub) as url:
        assert download_split_model("llama-2-70b-chat", quant="Q6_K", cache_dir=tmp_path, endpoint=url).is_file()


# --- 70B on a GPU: grouped-query attention sizes the KV cache ---------------------------------------


def test_70b_kv_cache_uses_its_8_kv_heads(tmp_path):
    """The catalogue's figure equals what modelinfo reads from a GGUF header with Llama 2 70B's
    hyper-parameters (80 blocks, 8192 wide, 64 heads, 8 KV heads): 1/8 of a full-attention cache."""
    import gguf

    from helpers.files.gguf_header import read_info

    path = tmp_path / "llama-2-70b-header.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(80)
    writer.add_embedding_length(8192)
    writer.add_head_count(64)
    writer.add_head_count_kv(8)
    writer.add_context_length(4096)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    info = read_info(path)
    n_layers, kv_per_token = ARCHITECTURE["llama-2-70b-chat"]
    assert (info.n_layers, info.kv_bytes_per_token) == (n_layers, kv_per_token)
    assert kv_per_token * 8 == 2 * 80 * 8192 * 2  # full attention would be 8x: 2.5 MiB per token
    assert kv_per_token * 4096 == 1.25 * 1024**3


@pytest.mark.parametrize(
    "quant,card,everything",
    [("Q4_K_M", "h100", True), ("Q8_0", "h100", True), ("Q3_K_M", "a100-40", True), ("Q4_K_M", "t4", False)],
)
def test_70b_auto_layers(quant, card, everything):
    total, free = {"h100": (81559, 81001), "a100-40": (40960, 40339), "t4": (15360, 15101)}[card]
    n_layers = ARCHITECTURE["llama-2-70b-chat"][0]
    layers = catalogue_gpu_layers("llama-2-70b-chat", quant, free_bytes=free * MiB, total_bytes=total * MiB)
    assert (layers == n_layers + 1) is everything
    if not everything:
        assert 0 < layers < n_layers
