"""bench/make_llama2_gguf.py's random-weight Llama 2, held against Meta's published Llama 2 7B configuration,
gguf-py's tensor names and dequantizers, llama.cpp's own quantizer and loader, and the real Llama 2 vocabulary."""

import re

import gguf
import llama_cpp
import numpy as np
import pytest

from bench.make_llama2_gguf import VOCAB, make_llama2_gguf, parameter_count, requantize, tensor_plan

# meta-llama/Llama-2-7b-hf config.json, as published.
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "vocab_size": 32000,
}
LAYERS = 2  # full width, two blocks: every kind of tensor, 0.41 GB, written in ~3 s
PROMPTS = ["Hello world", " leading space", "Ünïcödé 日本語 🦙", "def f(x):\n\treturn x * 2", "<s>[INST] hi [/INST]"]


def expected_tensors(config: dict, n_layers: int) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensor names (gguf-py's TENSOR_NAMES) and GGUF dims (ne: row length first) for a HF config."""
    n_embd, n_ff, n_vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_embd_kv = n_embd // config["num_attention_heads"] * config["num_key_value_heads"]
    name, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    tensors = {name[T.TOKEN_EMBD]: (n_embd, n_vocab), name[T.OUTPUT_NORM]: (n_embd,), name[T.OUTPUT]: (n_embd, n_vocab)}
    per_block = {
        T.ATTN_NORM: (n_embd,),
        T.ATTN_Q: (n_embd, n_embd),
        T.ATTN_K: (n_embd, n_embd_kv),
        T.ATTN_V: (n_embd, n_embd_kv),
        T.ATTN_OUT: (n_embd, n_embd),
        T.FFN_NORM: (n_embd,),
        T.FFN_GATE: (n_embd, n_ff),
        T.FFN_UP: (n_embd, n_ff),
        T.FFN_DOWN: (n_ff, n_embd),
    }
    for bid in range(n_layers):
        tensors |= {name[t].format(bid=bid): ne for t, ne in per_block.items()}
    assert all(t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA] for t in per_block)
    return {f"{n}.weight": ne for n, ne in tensors.items()}


@pytest.fixture(scope="module")
def tiny(llama2_tiny_path):
    return llama2_tiny_path  # LAYERS blocks (conftest.py)


@pytest.fixture(scope="module")
def tiny_reader(tiny):
    return gguf.GGUFReader(tiny)


@pytest.fixture(scope="module")
def llm(tiny):
    model = llama_cpp.Llama(model_path=str(tiny), n_ctx=256, verbose=False)
    yield model
    model.close()


def test_tensor_names_and_shapes_are_llama2_7b(tiny_reader):
    actual = {t.name: tuple(int(n) for n in t.shape) for t in tiny_reader.tensors}
    assert actual == expected_tensors(LLAMA2_7B, LAYERS)


def test_tensor_types_are_what_llama_cpp_makes_for_q4_0(tiny, tiny_reader, tmp_path):
    # llama.cpp's quantizer picks the type of each tensor for Q4_0 (output.weight: Q6_K, norms: F32).
    reference = tmp_path / "llama-quantize.Q4_0.gguf"
    requantize(tiny, reference, "Q4_0")
    expected = {t.name: t.tensor_type.name for t in gguf.GGUFReader(reference).tensors}
    assert {t.name: t.tensor_type.name for t in tiny_reader.tensors} == expected
    assert tiny.stat().st_size == reference.stat().st_size


def test_weights_have_mean_zero_and_std_one_over_sqrt_fan_in(tiny_reader):
    tensors = {t.name: t for t in tiny_reader.tensors}
    for name in ["token_embd.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight", "output.weight"]:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data[:1024], t.tensor_type)  # 1024 rows: 4M+ weights
        fan_in = int(t.shape[0])
        assert w.shape[-1] == fan_in
        assert abs(w.mean()) < 5 * w.std() / np.sqrt(w.size), name  # five standard errors
        assert w.std() == pytest.approx(1 / np.sqrt(fan_in), rel=0.01), name
    for name in ["blk.0.attn_norm.weight", "blk.1.ffn_norm.weight", "output_norm.weight"]:
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.all(tensors[name].data == 1.0)


def test_every_kv_of_the_vocabulary_is_carried_over(tiny_reader):
    vocab = {k: f for k, f in gguf.GGUFReader(VOCAB).fields.items() if not k.startswith("GGUF.")}
    ours = tiny_reader.fields
    set_here = {
        "general.name",
        "general.file_type",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.dimension_count",
        "llama.vocab_size",
    }
    assert len(vocab) == 22 and set(vocab) <= set(ours)
    for key, field in vocab.items():
        assert ours[key].types == field.types, key
        if key not in set_here:
            assert ours[key].contents() == field.contents(), key

    def value(key):
        return ours[key].contents()

    c = LLAMA2_7B
    assert value("llama.block_count") == LAYERS
    assert value("llama.context_length") == c["max_position_embeddings"]
    assert value("llama.embedding_length") == c["hidden_size"]
    assert value("llama.feed_forward_length") == c["intermediate_size"]
    assert value("llama.attention.head_count") == c["num_attention_heads"]
    assert value("llama.attention.head_count_kv") == c["num_key_value_heads"]
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(c["rms_norm_eps"])
    assert value("llama.rope.dimension_count") == c["hidden_size"] // c["num_attention_heads"]
    assert value("llama.vocab_size") == c["vocab_size"] == len(value("tokenizer.ggml.tokens"))
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert re.search(r"llama[ _-]*v?2", value("general.name"), re.IGNORECASE)  # how the project spots Llama 2
    assert "random" in value("general.name")


def test_llama_cpp_loads_it_as_llama2_7b(llm):
    c, m = LLAMA2_7B, llm.model
    assert llama_cpp.llama_model_n_embd(m) == c["hidden_size"]
    assert llama_cpp.llama_model_n_layer(m) == LAYERS
    assert llama_cpp.llama_model_n_head(m) == c["num_attention_heads"]
    assert llama_cpp.llama_model_n_head_kv(m) == c["num_key_value_heads"]
    assert llama_cpp.llama_model_n_ctx_train(m) == c["max_position_embeddings"]
    assert llm.n_vocab() == c["vocab_size"]
    assert llama_cpp.llama_model_n_params(m) == parameter_count(tensor_plan("7b", layers=LAYERS))


def test_it_tokenizes_like_the_llama2_vocabulary(llm, llama2_vocab):
    for text in PROMPTS:
        assert llm.tokenize(text.encode()) == llama2_vocab.tokenize(text.encode()), text
    ids = llama2_vocab.tokenize(b"Hello world")
    assert llm.detokenize(ids) == llama2_vocab.detokenize(ids)


def test_logits_after_eval_are_finite_and_of_unit_scale(llm):
    llm.reset()
    llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog."))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    assert np.isfinite(logits).all()
    assert 0.5 < logits.std() < 2.0  # unit-variance weights keep activations near unit scale
    assert logits.max() - logits.min() > 1.0  # not constant


def test_requantizing_to_q4_k_m(tmp_path):
    # One block keeps this to ~15 s on 2 cores: llama.cpp's K-quant search is slow (7B: ~4 min).
    out = make_llama2_gguf(tmp_path / "tiny.Q4_K_M.gguf", layers=1, quant="Q4_K_M")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the Q4_0 step and .part are gone
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types.values()) == {"F32", "Q4_K", "Q6_K"}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert n_params == parameter_count(tensor_plan("7b", layers=1))
    # 4.85 bits/weight at 32 layers; with one block the Q6_K output matrix weighs more.
    assert 4.5 < 8 * out.stat().st_size / n_params < 5.5


def test_unknown_quantization_lists_valid_ones_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown quantization 'Q4_K_X'; valid: .*Q4_K_M"):
        make_llama2_gguf(tmp_path / "x.gguf", layers=1, quant="Q4_K_X")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_requantize_leaves_no_file(tmp_path):
    # IQ2_XXS needs an importance matrix, so llama.cpp refuses it after the Q4_0 file is written.
    with pytest.raises(RuntimeError, match="could not quantize"):
        make_llama2_gguf(tmp_path / "x.gguf", layers=1, quant="IQ2_XXS")
    assert list(tmp_path.iterdir()) == []


def test_full_size_parameter_counts():
    # Llama-2-7b-hf and -13b-hf: 6,738,415,616 and 13,015,864,320 parameters (sum of their safetensors shapes).
    assert parameter_count(tensor_plan("7b")) == 6_738_415_616
    assert parameter_count(tensor_plan("13b")) == 13_015_864_320
    assert len(tensor_plan("7b")) == 291 and len(tensor_plan("13b")) == 363


def test_unknown_size_lists_the_sizes():
    with pytest.raises(ValueError, match="available: 7b, 13b"):
        tensor_plan("70b")
