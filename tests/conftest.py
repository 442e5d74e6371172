"""Shared fixtures: the real small model (SmolLM2-135M-Instruct, Llama architecture) and the real Llama 2
tokenizer vocabulary, both loaded once per session."""

from pathlib import Path

import pytest

VOCAB = Path(__file__).parent / "data" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="session")
def smol_path():
    from helpers.files.catalogue import offline_model_path

    return offline_model_path()


@pytest.fixture
def smol(smol_path):
    """The small chat model through the project's loader: loaded once, handed back from its cache after
    (a test that loads another model makes the next use reload this one)."""
    from helpers.engine.loading import load_model

    return load_model(smol_path)


@pytest.fixture(scope="module")
def server_url(smol_path):
    """llama-server serving the small model on 127.0.0.1 (one per test module), its OpenAI base URL."""
    from helpers.machine.serve import server_binary
    from tests.support.llama_server import running_server

    if not server_binary().is_file():
        pytest.skip(f"{server_binary()} is missing: run `make llama-server`")
    # One compute thread: the test process computes with its own model in between, and on a busy 2-core
    # machine two servers' worth of spinning threads made both 15-35x slower (1 vs 27 tokens/s measured).
    with running_server(smol_path, parallel=1, slot_ctx=2048, threads=1) as url:
        yield url


@pytest.fixture(scope="session")
def llama2_vocab():
    """A Llama built from the real Llama 2 SPM vocabulary only (no weights): tokenizer-level tests."""
    import llama_cpp

    if not VOCAB.is_file():
        pytest.fail(f"{VOCAB} is missing: run `make test` (it fetches it with tests/support/fetch_vocab.py).")
    llama = llama_cpp.Llama(model_path=str(VOCAB), vocab_only=True, verbose=False)
    yield llama
    llama.close()


@pytest.fixture(scope="session")
def llama2_tiny_path(tmp_path_factory):
    """A Llama-2-7B-shaped GGUF with two blocks: the real vocabulary, width and tensor layout, random Q4_0
    weights (0.4 GB, written in about 2 s by bench/make_llama2_gguf.py). Its text is gibberish."""
    from bench.make_llama2_gguf import make_llama2_gguf

    return make_llama2_gguf(tmp_path_factory.mktemp("llama2") / "llama2-7b-shaped-2-layers.gguf", layers=2, seed=0)


# The test tiers (pyproject.toml lists the markers; `make test-fast` deselects all of them). A test is marked by
# the fixtures it uses, or by its module when every test there needs the same (they load the model directly).
NEEDS = {
    "model": {"smol", "llama2_vocab", "llama2_tiny_path", "panel", "variants", "tiny", "llm", "real", "tricky"},
    "server": {"server_url", "remote"},
    "kernel": {"kernel"},
}
MODULE_NEEDS = {
    "tests/engine/test_model.py": "model",
    "tests/engine/test_loading.py": "model",
    "tests/test_generation.py": "model",
    "tests/test_cli.py": "model",
    "tests/test_quantization.py": "model",
    "tests/test_llama2_7b_shape.py": "model",
    "tests/ui/test_panel.py": "model",
    "tests/test_notebook.py": "kernel",
}
TEST_NEEDS = {  # tests that start llama-server or load models in child processes themselves
    "tests/engine/test_remote.py::test_api_key_sent_and_never_shown": "server",
    "tests/engine/test_remote.py::test_parallel_slots_serve_concurrent_clients": "server",
    "tests/engine/test_text_prompts.py::test_llama_cpp_server_in_text_mode": "server",  # llama_cpp.server
    "tests/engine/test_text_prompts.py::test_notebook_with_a_text_only_server": "kernel",
    "tests/files/test_gguf_check.py::test_fuzzed_headers_end_in_a_clear_error_or_a_load": "model",
}


def _mark_tiers(config, items):
    root = Path(config.rootpath)
    for item in items:
        needs = {marker for marker, fixtures in NEEDS.items() if fixtures & set(item.fixturenames)}
        module = Path(str(item.fspath)).relative_to(root).as_posix()
        if module in MODULE_NEEDS:
            needs.add(MODULE_NEEDS[module])
        if f"{module}::{item.originalname}" in TEST_NEEDS:
            needs.add(TEST_NEEDS[f"{module}::{item.originalname}"])
        for marker in needs:
            item.add_marker(getattr(pytest.mark, marker))


def pytest_collection_modifyitems(config, items):
    from helpers.machine.gpu import detect_gpu

    _mark_tiers(config, items)

    needs_gpu = [item for item in items if "gpu" in item.keywords]
    if not needs_gpu:
        return
    gpu = detect_gpu()
    if gpu is None:
        reason = "no NVIDIA GPU on this machine (nvidia-smi not found or no device)"
    elif not gpu.llama_cpp_offload:
        reason = f"{gpu.name} found, but this llama-cpp-python build cannot offload (a CPU-only build)"
    else:
        return
    for item in needs_gpu:
        item.add_marker(pytest.mark.skip(reason=reason))
