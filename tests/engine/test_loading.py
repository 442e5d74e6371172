"""Loading: defaults, the one-model cache, quiet logs and clear errors, with the real small model."""

import re
import subprocess
import sys

import pytest

from helpers.engine.load_settings import known_settings
from helpers.engine.loading import load_model
from helpers.errors import DamagedModelError, ModelUnloadedError, NotGGUFError, UsageError
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


# --- settings checked before anything is loaded -------------------------------------------------------------

LOAD_MODEL_OWN = {"n_gpu_layers", "n_ctx", "n_threads", "verbose"}


def test_every_llama_setting_has_a_check():
    """The checked settings are exactly llama-cpp-python's `Llama.__init__` keywords (besides load_model's own):
    a setting added by a new llama-cpp-python is refused until it has a range here."""
    import inspect

    import llama_cpp

    parameters = set(inspect.signature(llama_cpp.Llama.__init__).parameters) - {"self", "model_path", "kwargs"}
    assert set(known_settings()) == parameters - LOAD_MODEL_OWN


def test_thread_counts_are_bounded_by_the_machine(smol_path):
    """n_threads=10**6 was accepted and the next generation segfaulted: at most the CPUs this process may use."""
    cpus = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)  # affinity-aware
    working = load_model(smol_path)
    for name in ("n_threads", "n_threads_batch"):
        for bad in (cpus + 1, 10**6, 0, -1, 2.0, True):
            with pytest.raises(UsageError, match=rf"{name} must be an integer from 1 to {cpus} \(the CPUs"):
                load_model(smol_path, **{name: bad})
    assert load_model(smol_path) is working and not working.closed
    most = load_model(smol_path, n_threads=cpus, n_threads_batch=1)
    assert (most.llama.n_threads, most.llama.n_threads_batch) == (cpus, 1)
    assert (most.llama.context_params.n_threads, most.llama.context_params.n_threads_batch) == (cpus, 1)
    assert generate(most, "Hi", GenerationSettings(max_tokens=3, seed=1)).stats.completion_tokens > 0


@pytest.mark.parametrize(
    "name, bad, allowed",
    [
        ("rope_freq_base", -1.0, "0 (the model's own) or a finite number above 1"),  # it answered "...."
        ("rope_freq_base", 0.5, "above 1"),
        ("rope_freq_base", float("inf"), "finite"),
        ("rope_freq_base", 3.5e38, "finite"),  # a C float's inf
        ("rope_freq_scale", -2.0, "0 (the model's own) or a finite number above 0"),
        ("yarn_ext_factor", 1.5, "a number in [0, 1]"),
        ("yarn_attn_factor", 0.0, "above 0"),
        ("yarn_beta_fast", float("nan"), "finite"),
        ("yarn_orig_ctx", -5, "an integer from 0 to 4294967295"),
        ("seed", -7, "an integer from 0 to 4294967295 or -1"),
        ("seed", 2**32, "an integer from 0 to 4294967295 or -1"),
        ("flash_attn", "yes", "True or False"),
        ("use_mmap", 1, "True or False"),
        ("op_offload", "no", "True or False (or None"),
        ("split_mode", 7, "one of 0 (none), 1 (layer), 2 (row), 3 (tensor)"),
        ("rope_scaling_type", 4, "one of -1 (from the model), 0 (none), 1 (linear), 2 (yarn), 3 (longrope)"),
        ("pooling_type", -2, "one of -1 (from the model)"),
        ("attention_type", 2, "one of -1 (from the model), 0 (causal), 1 (non-causal)"),
        ("type_k", 99, "one of 0 (f32), 1 (f16), 30 (bf16), 8 (q8_0)"),
        ("type_v", 12, "one of 0 (f32)"),  # Q4_K: not a KV cache type in llama.cpp's own tools
        ("n_ubatch", 0, "an integer from 1 to"),
        ("last_n_tokens_size", -1, "an integer from 0 to"),
        ("main_gpu", -1, "an integer from 0 to"),
        ("tensor_split", [0.0, 0.0], "not all 0"),
        ("tensor_split", "1,1", "a list of at most"),
        ("kv_overrides", {"k" * 200: 1}, "strings of at most 127 UTF-8 bytes"),
        ("kv_overrides", {"general.name": float("nan")}, "finite numbers"),
        ("kv_overrides", ["general.name"], "None or a dict"),
        ("lora_path", "/no/such/lora.gguf", "the path of an existing file"),
        ("lora_scale", float("inf"), "a finite number"),
        ("numa", 9, "True, False or a NUMA strategy from 0 to 4"),
        ("chat_format", 3, "a string or None"),
        ("chat_handler", "llama-2", "a chat handler (a callable)"),
        ("draft_model", "prompt-lookup", "LlamaDraftModel or None"),
        ("tokenizer", "spm", "BaseLlamaTokenizer or None"),
        ("vocab_only", None, "True or False"),
    ],
)
def test_llama_settings_out_of_range_are_refused_before_loading(smol_path, name, bad, allowed):
    working = load_model(smol_path)
    with pytest.raises(UsageError, match=rf"^{name} must be .*{re.escape(allowed)}.*; got "):
        load_model(smol_path, **{name: bad})
    assert load_model(smol_path) is working and not working.closed


def test_an_unknown_setting_is_refused_with_the_known_ones(smol_path):
    with pytest.raises(UsageError) as caught:
        load_model(smol_path, n_gpu=3, context=1024)
    message = str(caught.value)
    assert message.startswith("Unknown load_model setting(s): context, n_gpu. Known llama_cpp.Llama settings: ")
    listed = message.split("settings: ")[1].split(" (and")[0].split(", ")
    assert listed == known_settings()
    with pytest.raises(UsageError, match="verbose must be True or False"):
        load_model(smol_path, verbose="yes")


def test_settings_inside_their_ranges_load_as_llama_cpp_reads_them(smol_path):
    """The model's own RoPE base given explicitly is the same as 0 (llama-context.cpp: 0 takes the model's);
    the yarn values' negative "from the model" and seed -1 are accepted."""
    from gguf import GGUFReader

    base = float(GGUFReader(smol_path).fields["llama.rope.freq_base"].contents())
    settings = GenerationSettings(max_tokens=12, seed=5, cache_prompt=False)
    default = generate(load_model(smol_path), "Write about the sea.", settings).text
    same = load_model(smol_path, rope_freq_base=base, yarn_ext_factor=-1.0, yarn_beta_slow=-1.0, seed=-1)
    assert same.llama.context_params.rope_freq_base == pytest.approx(base)
    assert generate(same, "Write about the sea.", settings).text == default
    other = load_model(smol_path, rope_freq_base=base * 4)  # a valid base of another model: other text
    assert generate(other, "Write about the sea.", settings).text != default
