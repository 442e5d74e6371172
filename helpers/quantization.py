"""What quantization trades, measured: file size, bits per weight, load time, prompt and generation speed,
and perplexity, for several GGUF files of one model; plus making those files from one model offline.

Each file is measured in a child process (`python -m helpers.quantization`), so the model loaded in the
notebook stays loaded and a crash in one measurement ends only that child.

Perplexity is the standard one: exp of the mean negative log-likelihood of each token given the tokens
before it, over consecutive windows of the context size (the first token of each window is not scored).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from helpers.engine.llama_backend import captured_native_log
from helpers.engine.loading import load_model, unload_model
from helpers.engine.model import Model, as_model
from helpers.errors import QuantizeError, UsageError
from helpers.files.gguf_header import read_info
from helpers.generation import GenerationStats, stream
from helpers.machine.cpu import physical_cores
from helpers.settings import GenerationSettings

# A fixed evaluation text (public domain: the opening of the US Declaration of Independence and of
# Darwin's "On the Origin of Species"), so that every file is scored on the same tokens.
EVAL_TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of "
    "mankind requires that they should declare the causes which impel them to the separation. We hold these "
    "truths to be self-evident, that all men are created equal, that they are endowed by their Creator with "
    "certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure "
    "these rights, Governments are instituted among Men, deriving their just powers from the consent of the "
    "governed. When on board H.M.S. Beagle, as naturalist, I was much struck with certain facts in the "
    "distribution of the inhabitants of South America, and in the geological relations of the present to the "
    "past inhabitants of that continent. These facts seemed to me to throw some light on the origin of species, "
    "that mystery of mysteries, as it has been called by one of our greatest philosophers. On my return home, it "
    "occurred to me, in 1837, that something might perhaps be made out on this question by patiently "
    "accumulating and reflecting on all sorts of facts which could possibly have any bearing on it. After five "
    "years' work I allowed myself to speculate on the subject, and drew up some short notes; these I enlarged in "
    "1844 into a sketch of the conclusions, which then seemed to me probable."
)

# The types the offline demo makes (llama.cpp's quantize names -> LLAMA_FTYPE_* values).
OFFLINE_TYPES = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_nlls(model: Model, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood of tokens[1:], each given the ones before it (one window; needs logits_all)."""
    logits = model.run(lambda backend: backend.prompt_logits(tokens))[:-1]
    logprobs = _log_softmax(logits)
    return -logprobs[np.arange(len(tokens) - 1), tokens[1:]]


def perplexity(llm, text: str = EVAL_TEXT, window: int | None = None) -> float:
    """exp(mean NLL) over consecutive windows of `window` tokens (default: the context size).
    The model must be loaded with logits_all=True."""
    model = as_model(llm)
    if not getattr(model.backend, "logits_all", False):
        raise UsageError("perplexity needs every position's logits: load the model with logits_all=True.")
    window = window or model.n_ctx()
    tokens = ([model.token_bos()] if model.add_bos else []) + model.tokenize(text)
    nlls = [token_nlls(model, tokens[i : i + window]) for i in range(0, len(tokens) - 1, window)]
    nlls = [n for n in nlls if len(n)]
    return float(np.exp(np.concatenate(nlls).mean()))


@dataclass
class QuantRow:
    file: str
    size_mb: float
    bits_per_weight: float
    load_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    perplexity: float


def measure(path: Path, *, text: str, n_ctx: int, gen_tokens: int, n_gpu_layers) -> QuantRow:
    """Load, time and score one file in this process (it unloads whatever model is loaded: the notebook uses
    `measure_in_child`)."""
    info = read_info(path)
    unload_model()
    start = time.perf_counter()
    llm = load_model(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
    load_s = time.perf_counter() - start
    stats = GenerationStats()
    prompt = [{"role": "user", "content": "Continue this text: " + text[:1500]}]
    for _ in stream(
        llm, prompt, GenerationSettings(max_tokens=gen_tokens, seed=1, temperature=0.0, cache_prompt=False), stats=stats
    ):
        pass
    unload_model()
    scorer = load_model(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, logits_all=True)
    ppl = perplexity(scorer, text)
    unload_model()
    return QuantRow(
        file=path.name,
        size_mb=info.size_bytes / 1e6,
        bits_per_weight=info.bits_per_weight,
        load_s=load_s,
        prompt_tokens_per_s=stats.prompt_tokens / stats.time_to_first_token_s,
        generation_tokens_per_s=stats.tokens_per_second,
        perplexity=ppl,
    )


def measure_in_child(path: Path, *, text: str, n_ctx: int, gen_tokens: int, n_gpu_layers) -> QuantRow:
    """`measure` in a child process. When it fails (an error, or a crash inside llama.cpp) the row holds NaN
    and one line on stderr says why; this process and its loaded model are untouched."""
    request = {
        "path": str(Path(path).resolve()),
        "text": text,
        "n_ctx": n_ctx,
        "gen_tokens": gen_tokens,
        "n_gpu_layers": n_gpu_layers,
    }
    root = str(Path(__file__).resolve().parents[1])  # the folder holding helpers/
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "row.json"
        done = subprocess.run(
            [sys.executable, "-m", "helpers.quantization", str(result)],
            input=json.dumps(request),
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode == 0 and result.is_file():
            return QuantRow(**json.loads(result.read_text()))
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    why = lines[-1] if lines else f"exit status {done.returncode}"
    print(f"Measuring {Path(path).name} failed ({why}); its row is left empty.", file=sys.stderr)
    nan = math.nan
    return QuantRow(Path(path).name, nan, nan, nan, nan, nan, nan)


def compare_quantizations(paths, *, text: str = EVAL_TEXT, n_ctx: int = 512, gen_tokens: int = 64, n_gpu_layers="auto"):
    """One row per GGUF file, each measured in a child process of its own (the model loaded here stays
    loaded); returns a pandas DataFrame if pandas is installed, else the rows."""
    rows = [
        measure_in_child(Path(p), text=text, n_ctx=n_ctx, gen_tokens=gen_tokens, n_gpu_layers=n_gpu_layers)
        for p in paths
    ]
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame([r.__dict__ for r in rows]).set_index("file")


def plot_quantizations(table):
    """Size against generation speed, coloured by perplexity (matplotlib)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = ax.scatter(
        table["size_mb"], table["generation_tokens_per_s"], c=table["perplexity"], cmap="viridis_r", s=80
    )
    for name, row in table.iterrows():
        ax.annotate(
            name.rsplit(".", 2)[-2],
            (row["size_mb"], row["generation_tokens_per_s"]),
            textcoords="offset points",
            xytext=(6, 4),
        )
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("generation tokens/s")
    fig.colorbar(points, label="perplexity (lower is better)")
    ax.set_title("What quantization trades")
    fig.tight_layout()
    return fig


# --- making the files offline --------------------------------------------------------------------


def dequantize_to_f32(source: Path, target: Path) -> Path:
    """Write `source` with every tensor dequantized to F32 (gguf package), metadata copied."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    part = target.with_suffix(target.suffix + ".part")
    writer = gguf.GGUFWriter(part, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = gguf.LlamaFileType.ALL_F32 if field.name == "general.file_type" else field.contents()
        kind = field.types[0]
        writer.add_key_value(
            field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    part.replace(target)
    return target


def quantize(source: Path, target: Path, kind: str) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python): `kind` is a name like "Q4_K_M"."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None)
    if ftype is None:
        raise UsageError(f"Unknown quantization {kind!r}; e.g. {', '.join(OFFLINE_TYPES)}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = physical_cores()
    part = target.with_suffix(target.suffix + ".part")
    log: list[str] = []
    with captured_native_log(log, echo=False):
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), ctypes.byref(params))
    if failed:
        part.unlink(missing_ok=True)
        errors = " | ".join(line.strip() for line in log if "error" in line.lower())
        raise QuantizeError(f"llama.cpp could not quantize {source.name} to {kind}. {errors}")
    part.replace(target)
    return target


def make_variants(source: Path, folder: Path, kinds=OFFLINE_TYPES) -> list[Path]:
    """F32 from `source`, then each of `kinds` from that F32; files already made are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = source.name.split(".")[0]
    f32 = folder / f"{stem}.F32.gguf"
    if not f32.exists():
        dequantize_to_f32(source, f32)
    made = [f32]
    for kind in kinds:
        target = folder / f"{stem}.{kind}.gguf"
        made.append(target if target.exists() else quantize(f32, target, kind))
    return made


ONLINE_TYPES = ("Q2_K", "Q4_K_M", "Q6_K")  # 2.8 + 4.1 + 5.5 GB for Llama 2 7B


def files_to_compare(name: str, model_path: Path, folder: Path = Path("quantized"), *, download: bool = False):
    """The files the notebook compares: variants made here from the bundled model when it is the one in
    use; else a few quantizations of the catalogue model, downloaded only when `download` is True (12 GB for
    Llama 2 7B) and otherwise none (an empty list, after one line saying how to ask for them)."""
    from helpers.files.catalogue import get_model, offline_model_path
    from helpers.files.download import download_model

    if Path(model_path) == offline_model_path():
        return [Path(model_path), *make_variants(Path(model_path), folder)]
    if not download:
        total = sum(get_model(name, kind).size_gb for kind in ONLINE_TYPES)
        print(
            f"Skipped: comparing {', '.join(ONLINE_TYPES)} of {name} downloads {total:.1f} GB. Set "
            "COMPARE_HUB_QUANTIZATIONS = True in the parameters cell and run this cell again to measure them."
        )
        return []
    return [download_model(name, quant=kind) for kind in ONLINE_TYPES]


def _child_main(result: str) -> None:
    """The child's side of `measure_in_child`: the request on stdin, the row written to `result`."""
    request = json.loads(sys.stdin.read())
    row = measure(Path(request.pop("path")), **request)
    Path(result).write_text(json.dumps(asdict(row)))


if __name__ == "__main__":
    _child_main(sys.argv[1])
