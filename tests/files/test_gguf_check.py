"""Header validation before llama.cpp sees a file: damaged headers are the project's clear errors, never a signal,
a BufferError or a multi-GB allocation; good files still load; a rejected file leaves the loaded model working."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.engine.loading import load_model
from helpers.errors import DamagedModelError, ModelLoadError, NotAModelError, NotGGUFError, UnsupportedModelError
from helpers.files.gguf_check import LLAMA_MAX_LAYERS
from helpers.files.gguf_header import read_info
from helpers.settings import GenerationSettings
from tests.conftest import VOCAB
from tests.support.header_fuzz import is_failure, patch, patch_length, tiny_base

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_path):
    """SmolLM2's header with 2 tiny layers of random weights (4 MB), and where its fields are (built once)."""
    return tiny_base(tmp_path_factory.getbasetemp(), smol_path)


def _copy(tmp_path, data: bytes, name="bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_fuzz_base_and_the_real_files_pass(tiny, smol_path, llama2_tiny_path):
    path, _, _ = tiny
    for good in (path, smol_path, llama2_tiny_path):
        model = load_model(good, n_ctx=256)
        assert model.generate(
            "Hi", GenerationSettings(max_tokens=2, seed=1), template="llama-2"
        ).stats.completion_tokens


LLAMA_CPP_LOAD = """
import sys, llama_cpp
try:
    llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
except ValueError:
    print("refused")
"""


@pytest.mark.parametrize(
    ("value", "llama_cpp_aborts"), [(0, True), (LLAMA_MAX_LAYERS, False), (LLAMA_MAX_LAYERS + 1, True)]
)
def test_llama_cpp_itself_aborts_just_outside_the_layer_limit(tiny, tmp_path, value, llama_cpp_aborts):
    # The reference for the limit: llama.cpp alone, in a child. 512 layers are refused cleanly (the file has 2),
    # 0 and 513 kill the process with SIGABRT; the project's check turns those into DamagedModelError.
    path, base, header = tiny
    bad = _copy(tmp_path, patch(base, header, "llama.block_count", value))
    done = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOAD, str(bad)], capture_output=True, text=True)
    if llama_cpp_aborts:
        assert done.returncode == -6, done  # SIGABRT from GGML_ASSERT
        with pytest.raises(DamagedModelError, match=rf"llama.block_count is {value:,}; llama.cpp accepts 1 to 512"):
            load_model(bad)
    else:
        assert (done.returncode, done.stdout.strip()) == (0, "refused")
        with pytest.raises(ModelLoadError, match="blk.2"):  # llama.cpp's own clean refusal: a missing tensor
            load_model(bad)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("llama.block_count", 0xFFFF, "llama.block_count is 65,535"),
        (
            "llama.context_length",
            0x7FFFFFFF,
            "llama.context_length is 2,147,483,647; llama.cpp accepts 1 to 16,777,216",
        ),
        ("llama.context_length", 0x80000000, "llama.context_length is 2,147,483,648"),
        ("llama.context_length", 0, "llama.context_length is 0"),
        ("llama.embedding_length", 0, "llama.embedding_length is 0"),
        ("llama.attention.head_count", 0, "llama.attention.head_count is 0"),
        ("llama.attention.head_count", 6, "embedding size 64 does not divide into 6 attention heads"),
        ("llama.attention.head_count_kv", 0, "llama.attention.head_count_kv is 0"),
        ("llama.attention.head_count_kv", 3, "4 attention heads do not share evenly among 3 key/value heads"),
        ("llama.rope.dimension_count", 64, "rope.dimension_count is 64, not the head size 16"),
        ("llama.attention.layer_norm_rms_epsilon", float("nan"), "layer_norm_rms_epsilon is nan, not a finite number"),
        ("llama.attention.layer_norm_rms_epsilon", -1.0, "layer_norm_rms_epsilon is -1.0; llama.cpp's normalisation"),
        ("tokenizer.ggml.bos_token_id", 49152, "bos_token_id is 49,152, outside the vocabulary of 49,152 tokens"),
        ("GGUF.version", 1, "GGUF version 1"),
        ("GGUF.kv_count", 2**60, "claims 1,152,921,504,606,846,976 metadata entries"),
        ("GGUF.tensor_count", 2**40, "1,099,511,627,776 tensors"),
        ("token_embd.weight ne[1]", 49151, "output_norm.weight starts at offset 1,769,472 instead of 1,769,440"),
        ("token_embd.weight type", 77, "ggml type 77"),
        ("blk.0.attn_q.weight offset", 1, "starts at offset 1 instead of"),
    ],
)
def test_header_values_that_crash_or_overload_llama_cpp_are_clear_errors(tiny, tmp_path, field, value, message):
    path, base, header = tiny
    bad = _copy(tmp_path, patch(base, header, field, value))
    error = UnsupportedModelError if field == "GGUF.version" else DamagedModelError
    with pytest.raises(error, match=message.replace(".", r"\.")) as raised:
        load_model(bad)
    assert "bad.gguf" in str(raised.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("general.name (length)", 2**63 - 1),  # past the end: no OverflowError, no huge read
        ("general.name (length)", 2**64 - 1),
        ("tokenizer.ggml.tokens (item count)", 2**29),  # under llama.cpp's 2^30, over what the file holds
        ("tokenizer.ggml.tokens (item count)", 2**31),
        ("token_embd.weight (name length)", 2**40),
    ],
)
def test_forged_lengths_are_checked_against_the_file_size(tiny, tmp_path, field, value):
    path, base, header = tiny
    with pytest.raises(
        DamagedModelError,
        match="bytes, only .* are left in the file|more than its|past the end|llama.cpp reads at most",
    ):
        read_info(_copy(tmp_path, patch_length(base, header, field, value)))


def test_a_header_cut_anywhere_is_reported_as_damaged(tmp_path, smol_path):
    # The case: cuts from 4 bytes to 1 MB raised BufferError (a memoryview of the mmap outlived the error).
    with open(smol_path, "rb") as f:
        head = f.read(1_100_000)
    for cut in [4, 5, 8, 12, 23, 24, 25, 100, 4095, 65_537, 500_001, 999_999, 1_000_000, 1_099_999]:
        part = _copy(tmp_path, head[:cut], "cut.gguf")
        with pytest.raises(DamagedModelError, match="cut.gguf is damaged or truncated"):
            read_info(part)
    with pytest.raises(NotGGUFError):
        read_info(_copy(tmp_path, head[:3], "cut.gguf"))


def test_a_vocabulary_only_gguf_is_not_called_damaged():
    with pytest.raises(NotAModelError, match="vocabulary-only GGUF") as raised:
        load_model(VOCAB)
    assert "damaged" not in str(raised.value) and "download it again" not in str(raised.value)
    assert read_info(VOCAB).n_params == 0  # still readable for its metadata


def test_a_file_name_that_is_not_utf8_is_named_as_the_cause(tiny, tmp_path):
    path, _, _ = tiny
    odd = os.fsencode(tmp_path) + b"/caf\xe9.gguf"  # a Latin-1 name
    os.link(path, odd)
    with pytest.raises(ValueError, match=r"caf\\xe9.gguf is not valid UTF-8") as raised:
        load_model(os.fsdecode(odd))
    assert not isinstance(raised.value, ModelLoadError) and "damaged" not in str(raised.value)


def test_cli_n_ctx_minus_one_names_the_setting(tiny, capsys):
    from helpers.__main__ import main

    assert main(["Hi", "--model", str(tiny[0]), "--n-ctx", "-1"]) == 2
    err = capsys.readouterr().err
    assert "n_ctx must be an integer from 16" in err and "damaged" not in err


def test_rejected_files_leave_the_loaded_model_working(tiny, tmp_path, smol_path):
    path, base, header = tiny
    working = load_model(smol_path)
    with pytest.raises(DamagedModelError):  # refused by the header check: nothing is unloaded
        load_model(_copy(tmp_path, patch(base, header, "llama.block_count", 513)))
    with pytest.raises(NotAModelError):
        load_model(VOCAB)
    with pytest.raises(ModelLoadError):  # refused by llama.cpp (2 layers of tensors, 1 declared): reloaded
        load_model(_copy(tmp_path, patch(base, header, "llama.block_count", 1)))
    assert load_model(smol_path) is working and not working.closed
    assert working.generate("Hi", GenerationSettings(max_tokens=3, seed=1)).stats.completion_tokens > 0


def test_fuzzed_headers_end_in_a_clear_error_or_a_load():
    # 200 seeded corruptions, each loaded in a forked child (python -m tests.support.header_fuzz --cases 1000 for more).
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.header_fuzz", "--cases", "200", "--seed", "13", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = json.loads(done.stdout)
    outcomes = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    print("header fuzz tally:", outcomes)
    assert len(results) == 200
    assert [r for r in results if is_failure(r["outcome"])] == []
    assert outcomes.get("loaded", 0) >= 10 and outcomes.get("error:DamagedModelError", 0) >= 100
    # About a quarter are tokenizer corruptions (names, strings, types, merges), most refused before llama.cpp.
    tokenizer = [r for r in results if r["corruption"].startswith("tokenizer:")]
    refused = [r for r in tokenizer if r["outcome"] in ("error:DamagedModelError", "error:UnsupportedModelError")]
    assert len(tokenizer) >= 30 and len(refused) >= 25


def test_an_architecture_llama_cpp_does_not_know_is_named_as_the_cause(tiny, tmp_path):
    # Every 'llama' in the header renamed to 'xllam' (same length): a well-formed file of an unknown architecture.
    path, base, header = tiny
    head = (
        base[: header.data_start]
        .replace(b"llama.", b"xllam.")
        .replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00xllam")
    )
    bad = _copy(tmp_path, head + base[header.data_start :])
    assert read_info(bad).architecture == "xllam"
    with pytest.raises(ModelLoadError, match="too old for the model's architecture") as raised:
        load_model(bad)
    assert "damaged" not in str(raised.value)
