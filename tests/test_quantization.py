"""Quantization measured: perplexity against an independent numpy computation, the variants made offline
from the bundled model, and the comparison table."""

import math

import llama_cpp
import numpy as np
import pytest

from helpers.engine.loading import load_model, unload_model
from helpers.quantization import (
    EVAL_TEXT,
    compare_quantizations,
    files_to_compare,
    make_variants,
    perplexity,
    plot_quantizations,
)
from helpers.settings import GenerationSettings


def reference_perplexity(model, text, window):
    """One token at a time, logits read straight from llama.cpp, log-softmax in float64 by hand."""
    llm = model.llama
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
    n_vocab = llm.n_vocab()
    nll = []
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window]
        llm.reset()
        for i, token in enumerate(chunk[:-1]):
            llm.eval([token])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,)).astype(np.float64)
            top = logits.max()
            log_z = top + math.log(np.exp(logits - top).sum())
            nll.append(log_z - logits[chunk[i + 1]])
    return math.exp(sum(nll) / len(nll))


@pytest.fixture(scope="module")
def variants(tmp_path_factory, smol_path):
    return make_variants(smol_path, tmp_path_factory.mktemp("quants"), kinds=("Q8_0", "Q2_K"))


def test_perplexity_matches_independent_computation(variants):
    # On the F32 file the batched and the one-token-at-a-time paths do the same arithmetic; on quantized
    # files llama.cpp's batched kernels round differently (measured: up to 1.8 nats on single tokens).
    f32 = variants[0]
    text = EVAL_TEXT[:900]
    scorer = load_model(f32, n_ctx=512, logits_all=True)
    ours = perplexity(scorer, text, window=96)
    longer = perplexity(scorer, text, window=256)
    unload_model()
    reference = reference_perplexity(load_model(f32, n_ctx=512), text, window=96)
    assert 1 < ours < 100
    assert ours == pytest.approx(reference, rel=1e-3)
    assert longer < ours  # a longer window gives more context, so a lower perplexity


def test_perplexity_needs_all_logits(smol):
    with pytest.raises(ValueError, match="logits_all=True"):
        perplexity(smol)


def test_variants_made_offline(variants, smol_path):
    from gguf import GGUFReader

    f32, q8, q2 = variants
    assert [p.name.split(".")[1] for p in variants] == ["F32", "Q8_0", "Q2_K"]
    assert {t.tensor_type.name for t in GGUFReader(f32).tensors} == {"F32"}
    assert q2.stat().st_size < smol_path.stat().st_size < q8.stat().st_size < f32.stat().st_size
    # Re-running reuses what was made.
    mtimes = [p.stat().st_mtime_ns for p in variants]
    assert make_variants(smol_path, f32.parent, kinds=("Q8_0", "Q2_K")) == variants
    assert [p.stat().st_mtime_ns for p in variants] == mtimes


def test_comparison_table_and_plot(variants, smol_path, tmp_path, capfd):
    f32, q8, q2 = variants
    chat = load_model(smol_path)  # the notebook's chat model, loaded in this process
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(f32.read_bytes()[: 1 << 20])  # a GGUF cut short: its load fails in the child
    table = compare_quantizations([smol_path, f32, broken, q8, q2], gen_tokens=16)
    # Each file was measured in a child process: the model here is still loaded and usable.
    assert (
        not chat.closed
        and load_model(smol_path) is chat
        and chat.generate("Hi", GenerationSettings(max_tokens=2)).text is not None
    )
    assert table.loc["broken.gguf"].isna().all()
    assert "Measuring broken.gguf failed" in capfd.readouterr().err
    table = table.drop("broken.gguf")
    assert list(table.columns) == [
        "size_mb",
        "bits_per_weight",
        "load_s",
        "prompt_tokens_per_s",
        "generation_tokens_per_s",
        "perplexity",
    ]
    ppl = table["perplexity"]
    # The F32 file holds the same weights as the Q4_1 it came from: same perplexity up to arithmetic.
    assert ppl[f32.name] == pytest.approx(ppl[smol_path.name], rel=0.03)
    # 2-bit loses quality; 8-bit does not.
    assert ppl[q2.name] > 1.1 * ppl[q8.name]
    assert ppl[q8.name] == pytest.approx(ppl[f32.name], rel=0.03)
    assert table["bits_per_weight"][f32.name] == pytest.approx(32, rel=0.01)
    assert (table["generation_tokens_per_s"] > 0).all() and (table["prompt_tokens_per_s"] > 0).all()
    fig = plot_quantizations(table)
    assert len(fig.axes[0].collections[0].get_offsets()) == 4


def test_hub_files_are_compared_only_when_asked(tmp_path, capsys):
    elsewhere = tmp_path / "llama-2-7b-chat.Q4_K_M.gguf"  # not the bundled model: the Hub's files would be used
    assert files_to_compare("llama-2-7b-chat", elsewhere) == []
    assert "COMPARE_HUB_QUANTIZATIONS = True" in capsys.readouterr().out
