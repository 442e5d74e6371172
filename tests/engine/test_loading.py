"""Loading: defaults, the one-model cache, quiet logs and clear errors, with the real small model."""

import subprocess
import sys

import pytest

from helpers.engine.loading import load_model
from helpers.errors import DamagedModelError, ModelUnloadedError, NotGGUFError
from helpers.files.gguf_header import read_info
from helpers.generation import generate
from helpers.machine.cpu import physical_cores
from helpers.settings import GenerationSettings


def test_defaults_serve_users_better_than_the_library(smol_path):
    import llama_cpp

    llm = load_model(smol_path)
    info = read_info(smol_path)
    assert llm.n_ctx() == min(llama_cpp.llama_model_n_ctx_train(llm.llama.model), 4096) == min(info.ctx_train, 4096)
    assert llm.n_ctx() > 512
    assert llm.n_threads == physical_cores()
    if not llama_cpp.llama_supports_gpu_offload():
        assert llm.gpu_layers == 0  # a CPU-only build: "auto" offloads nothing, whatever nvidia-smi says


def test_physical_cores_matches_lscpu():
    out = subprocess.run(["lscpu", "-p=CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    cores = {line for line in out.splitlines() if not line.startswith("#")}
    assert physical_cores() == len(cores)


def test_same_settings_reuse_the_loaded_model(smol_path):
    first = load_model(smol_path)
    assert load_model(smol_path) is first
    other = load_model(smol_path, n_ctx=1024)
    assert other is not first and other.n_ctx() == 1024
    # The old one was freed; using it through the helpers is a clear error, not a crash in llama.cpp.
    with pytest.raises(ModelUnloadedError, match="replaced by another load_model"):
        generate(first, "Hello")
    assert generate(other, "Hello", GenerationSettings(max_tokens=3, seed=1)).stats.completion_tokens > 0


def test_model_info_matches_the_gguf_package(smol_path, llama2_vocab):
    from gguf import GGUFReader

    from tests.conftest import VOCAB

    for path in (smol_path, VOCAB):
        info, reader = read_info(path), GGUFReader(path)

        def field(key, reader=reader):
            return reader.fields[key].contents() if key in reader.fields else None

        arch = field("general.architecture")
        assert info.architecture == arch
        assert info.name == field("general.name")
        assert info.n_layers == (field(f"{arch}.block_count") or 0)
        assert info.ctx_train == (field(f"{arch}.context_length") or 4096)
        assert info.n_params == sum(int(t.n_elements) for t in reader.tensors)
    info = read_info(smol_path)
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == (30, 576, 9, 3)
    assert info.kv_bytes_per_token == 2 * 30 * (576 * 3 // 9) * 2
    assert 4 < info.bits_per_weight < 8  # Q4_1 with some larger tensors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_model"):
        load_model(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>404</html>" * 10)
    with pytest.raises(NotGGUFError, match="not a GGUF model"):
        load_model(bad)


def test_truncated_gguf_gives_clear_error_and_keeps_nothing_broken(tmp_path, smol_path):
    working = load_model(smol_path)
    part = tmp_path / "partial.gguf"
    part.write_bytes(smol_path.read_bytes()[:5_000_000])
    with pytest.raises(DamagedModelError, match="partial.gguf is truncated: its tensors need"):
        load_model(part)
    # Nothing was unloaded: the working model is still the loaded one.
    assert load_model(smol_path) is working and not working.closed
    assert working.tokenize("hello")


def test_native_log_stays_quiet(smol_path):
    # Loading, then a stop while a long prompt is read (llama.cpp logs the abort as errors and the KV
    # cleanup as a warning, which llama-cpp-python's logger printed even with verbose=False).
    code = (
        "import threading\n"
        "from helpers import GenerationSettings, GenerationStats\n"
        "from helpers.engine.loading import load_model\n"
        f"llm = load_model({str(smol_path)!r}, n_ctx=2048)\n"
        "print('loaded', llm.n_ctx())\n"
        "stop, stats = threading.Event(), GenerationStats()\n"
        "threading.Timer(0.5, stop.set).start()\n"
        "list(llm.stream('word ' * 1500, GenerationSettings(max_tokens=2), stop_event=stop, stats=stats))\n"
        "print(stats.finish_reason, stats.prompt_read < stats.prompt_tokens)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["loaded", "2048", "cancelled", "True"]
    assert done.stderr.strip() == ""
