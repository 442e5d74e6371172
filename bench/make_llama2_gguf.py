"""Write a GGUF with the exact Llama 2 7B or 13B architecture, the real Llama 2 vocabulary and RANDOM weights.

For benchmarks only: load time, memory, prompt and generation speed and KV-cache behaviour are those of the real
model (same tensors, shapes, types and hyper-parameters), but the weights are random, so the text is gibberish.
Never offer the file to users as a model.

    python bench/make_llama2_gguf.py OUT.gguf [--size 7b|13b] [--layers N] [--quant Q4_K_M] [--vocab PATH] [--seed N]

Architecture: Meta's published Llama 2 configurations (Touvron et al. 2023; meta-llama/Llama-2-7b-hf and -13b-hf
config.json), laid out with llama.cpp's tensor names (gguf-py `MODEL_TENSORS[MODEL_ARCH.LLAMA]`). Q4_0 is written
directly, as llama.cpp's `llama-quantize ... Q4_0` lays it out: every matrix Q4_0 except output.weight, which it
makes Q6_K; norms F32. Block formats: ggml-common.h (block_q4_0: f16 d, 16 bytes of nibbles, w = d * (q - 8);
block_q6_K: ql[128], qh[64], int8 scales[16], f16 d, w = d * scale * (q - 32)). Each block's scale is chosen so
every matrix has mean 0 and standard deviation 1/sqrt(row length) (fan-in), which keeps activations finite
through all layers. Any other quantization is made from the Q4_0 file by llama.cpp's own quantizer.

Measured on 2 cores (Intel Xeon VM, AVX-512), llama-cpp-python 0.3.36, machine otherwise idle:
    7B Q4_0    3,825,807,360 bytes (4.54 bits/weight)   8.5 s, peak RSS 0.27 GB (tensors are streamed)
    7B Q4_K_M  4,081,004,544 bytes (4.85 bits/weight)   8.5 s + 224 s in llama.cpp's quantizer, peak RSS 0.77 GB
    2 layers at 7B width (the tests' file): 409,727,264 bytes in ~2.5 s
Ctrl-C while llama.cpp requantizes returns at once, but its worker finishes in the background until the process
exits (see `requantize`).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "ggml-vocab-llama-spm.gguf"
ARCH = "llama"
Q4_0 = gguf.GGMLQuantizationType.Q4_0
Q6_K = gguf.GGMLQuantizationType.Q6_K
F32 = gguf.GGMLQuantizationType.F32


@dataclass(frozen=True)
class Llama2Shape:
    """Hyper-parameters of one Llama 2 size (Touvron et al. 2023, table 1; Meta's config.json)."""

    n_embd: int  # hidden_size
    n_layer: int  # num_hidden_layers
    n_head: int  # num_attention_heads
    n_head_kv: int  # num_key_value_heads (= n_head: no grouped-query attention below 70B)
    n_ff: int  # intermediate_size
    n_vocab: int = 32000
    n_ctx_train: int = 4096
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SIZES = {
    "7b": Llama2Shape(n_embd=4096, n_layer=32, n_head=32, n_head_kv=32, n_ff=11008),
    "13b": Llama2Shape(n_embd=5120, n_layer=40, n_head=40, n_head_kv=40, n_ff=13824),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write. `shape` is numpy order (rows, row length): GGUF's ne reversed."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))


def llama2_shape(size: str = "7b") -> Llama2Shape:
    try:
        return SIZES[size.lower()]
    except KeyError:
        raise ValueError(f"Unknown Llama 2 size {size!r}; available: {', '.join(SIZES)}") from None


def tensor_plan(size: str = "7b", layers: int | None = None) -> list[TensorSpec]:
    """The tensors of a Llama 2 GGUF in llama.cpp's layout (names, shapes, Q4_0 types), in file order."""
    p = llama2_shape(size)
    n_layer = p.n_layer if layers is None else layers
    if n_layer < 1:
        raise ValueError(f"layers must be at least 1, got {n_layer}")
    n_embd_kv = p.head_dim * p.n_head_kv
    plan = [TensorSpec("token_embd.weight", (p.n_vocab, p.n_embd), Q4_0)]
    for i in range(n_layer):
        blk = f"blk.{i}."
        plan += [
            TensorSpec(blk + "attn_norm.weight", (p.n_embd,), F32),
            TensorSpec(blk + "attn_q.weight", (p.n_embd, p.n_embd), Q4_0),
            TensorSpec(blk + "attn_k.weight", (n_embd_kv, p.n_embd), Q4_0),
            TensorSpec(blk + "attn_v.weight", (n_embd_kv, p.n_embd), Q4_0),
            TensorSpec(blk + "attn_output.weight", (p.n_embd, p.n_embd), Q4_0),
            TensorSpec(blk + "ffn_norm.weight", (p.n_embd,), F32),
            TensorSpec(blk + "ffn_gate.weight", (p.n_ff, p.n_embd), Q4_0),
            TensorSpec(blk + "ffn_up.weight", (p.n_ff, p.n_embd), Q4_0),
            TensorSpec(blk + "ffn_down.weight", (p.n_embd, p.n_ff), Q4_0),
        ]
    plan += [
        TensorSpec("output_norm.weight", (p.n_embd,), F32),
        TensorSpec("output.weight", (p.n_vocab, p.n_embd), Q6_K),  # llama.cpp's quantizer keeps this one at Q6_K
    ]
    return plan


def parameter_count(plan: list[TensorSpec]) -> int:
    return sum(t.n_params for t in plan)


def hyper_parameters(size: str = "7b", layers: int | None = None) -> dict[str, tuple[object, gguf.GGUFValueType]]:
    """The llama.* keys (convert_hf_to_gguf.py's names and types) for a size."""
    p = llama2_shape(size)
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    return {
        f"{ARCH}.block_count": (p.n_layer if layers is None else layers, u32),
        f"{ARCH}.context_length": (p.n_ctx_train, u32),
        f"{ARCH}.embedding_length": (p.n_embd, u32),
        f"{ARCH}.feed_forward_length": (p.n_ff, u32),
        f"{ARCH}.attention.head_count": (p.n_head, u32),
        f"{ARCH}.attention.head_count_kv": (p.n_head_kv, u32),
        f"{ARCH}.attention.layer_norm_rms_epsilon": (p.rms_eps, f32),
        f"{ARCH}.rope.dimension_count": (p.head_dim, u32),
        f"{ARCH}.vocab_size": (p.n_vocab, u32),
    }


# --- random blocks -------------------------------------------------------------------------------------------
# Q4_0: q is a uniform nibble, so E[(q - 8)^2] = (16^2 - 1) / 12 + 0.5^2 = 21.5; a random sign on each block's d
# cancels the -0.5 mean. Q6_K: E[(q - 32)^2] = (64^2 - 1) / 12 + 0.5^2 = 341.5; the sign is on each sub-block scale.
Q4_0_MEAN_SQUARE = 21.5
Q6_K_MEAN_SQUARE = 341.5
Q6_K_SCALE = 8  # |int8 sub-block scale|; d ~ 1e-4 stays a normal f16 for rows up to 13824 long


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(-(2**63), 2**63, size=-(-n // 8), dtype=np.int64)  # full range: every bit uniform
    return words.view(np.uint8)[:n]


def _f16_bits(x: float) -> int:
    d = np.float16(x)
    if not np.isfinite(d) or abs(float(d)) < np.finfo(np.float16).smallest_normal:
        raise ValueError(f"block scale {x} is not a normal f16")
    return int(d.view(np.uint16))


def random_tensor(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """The bytes of one tensor (uint8, shape spec.byte_shape): random blocks with std 1/sqrt(row length), or F32
    ones for a norm."""
    if spec.qtype == F32:
        return np.ones(spec.shape, dtype=np.float32)
    target_std = 1.0 / np.sqrt(spec.shape[-1])
    block_size, type_size = gguf.GGML_QUANT_SIZES[spec.qtype]
    blocks = _random_bytes(rng, spec.nbytes).reshape(-1, type_size)
    if spec.qtype == Q4_0:
        d = blocks[:, 0:2].view("<u2")  # the random sign bit of each block stays
        d &= 0x8000
        d |= _f16_bits(target_std / np.sqrt(Q4_0_MEAN_SQUARE))
    elif spec.qtype == Q6_K:
        scales = blocks[:, 192:208]
        scales[:] = np.where(scales & 1, Q6_K_SCALE, 256 - Q6_K_SCALE)  # +-Q6_K_SCALE as int8
        blocks[:, 208:210].view("<u2")[:] = _f16_bits(target_std / (Q6_K_SCALE * np.sqrt(Q6_K_MEAN_SQUARE)))
    else:
        raise ValueError(f"no random block writer for {spec.qtype.name}")
    assert block_size * blocks.shape[0] == spec.n_params
    return blocks.reshape(spec.byte_shape)


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """One generator per tensor, keyed by its name: the same seed gives the same blk.0 whatever `layers` is."""
    return np.random.default_rng([seed, *name.encode()])


# --- metadata ------------------------------------------------------------------------------------------------


def read_kv(path: Path) -> dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """Every KV of a GGUF as (value, type, array item type), strings as raw bytes so they copy exactly. Skips the
    reader's GGUF.* pseudo-fields (version and counts: the header, not KVs)."""
    kv = {}
    for name, field in gguf.GGUFReader(path).fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub_type = None
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"{path}: nested array {name!r} is not supported")
            sub_type = gguf.GGUFValueType(field.types[1])
            if sub_type == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
        elif vtype == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]])
        else:
            value = field.contents()
        kv[name] = (value, vtype, sub_type)
    return kv


def model_name(size: str) -> str:
    # The project recognises Llama 2 by `llama[ _-]*v?2` in general.name.
    return f"Llama-2-{size.upper()}-shaped random weights (benchmark only)"


def metadata(vocab: Path, size: str, layers: int | None) -> dict:
    """The vocabulary file's KVs in its order, with the size's llama.* values and this file's name and type."""
    kv = read_kv(vocab)
    arch = kv.get("general.architecture", (b"",))[0]
    if arch != ARCH.encode():
        raise ValueError(f"{vocab}: general.architecture is {arch!r}, expected {ARCH!r} (a Llama vocabulary GGUF)")
    n_tokens = len(kv["tokenizer.ggml.tokens"][0])
    if n_tokens != llama2_shape(size).n_vocab:
        raise ValueError(f"{vocab} has {n_tokens} tokens; Llama 2 has {llama2_shape(size).n_vocab}")
    u32, string = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    for key, (value, vtype) in hyper_parameters(size, layers).items():
        kv[key] = (value, vtype, None)
    kv["general.name"] = (model_name(size), string, None)
    kv["general.description"] = ("Random weights in the shape of Llama 2, for speed and memory tests.", string, None)
    kv["general.file_type"] = (int(gguf.LlamaFileType.MOSTLY_Q4_0), u32, None)
    kv["general.quantization_version"] = (gguf.GGML_QUANT_VERSION, u32, None)
    return kv


# --- requantization through llama.cpp ------------------------------------------------------------------------


def llama_ftype(quant: str) -> int:
    """llama.cpp's LLAMA_FTYPE_MOSTLY_<quant> value; a ValueError listing the valid names otherwise."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    value = getattr(llama_cpp, prefix + quant.upper(), None)
    if value is None:
        valid = sorted(name.removeprefix(prefix) for name in dir(llama_cpp) if name.startswith(prefix))
        raise ValueError(f"Unknown quantization {quant!r}; valid: {', '.join(valid)}")
    return value


def requantize(src: Path, dst: Path, quant: str, *, nthread: int = 2) -> None:
    """Requantize a GGUF with llama.cpp's quantizer (the `llama-quantize` tool's code) to LLAMA_FTYPE_MOSTLY_<quant>.

    llama.cpp runs on a worker thread while this one waits, so that Ctrl-C raises KeyboardInterrupt at once: on the
    calling thread, the interrupt would surface inside llama-cpp-python's log callback, where ctypes prints and
    drops it. The quantizer itself cannot be stopped; it finishes in the background (the process exits first)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(quant)
    params.nthread = nthread
    params.allow_requantize = True
    status = []
    worker = threading.Thread(
        target=lambda: status.append(
            llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
        ),
        name="llama-quantize",
        daemon=True,
    )
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if status != [0]:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant} (see its log above)")


# --- the file ------------------------------------------------------------------------------------------------


def write_q4_0(path: Path, plan: list[TensorSpec], kv: dict, seed: int) -> None:
    """Stream the file: header, KVs and tensor infos first, then one tensor at a time (never the whole model in
    memory)."""
    writer = gguf.GGUFWriter(path, ARCH)
    for key, (value, vtype, sub_type) in kv.items():
        if key != "general.architecture":  # the writer adds it first
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for spec in plan:
        if spec.qtype == F32:
            writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes)
        else:
            writer.add_tensor_info(spec.name, spec.byte_shape, np.dtype(np.uint8), spec.nbytes, raw_dtype=spec.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec in plan:
            writer.write_tensor_data(random_tensor(spec, tensor_rng(seed, spec.name)))
    finally:
        writer.close()


def make_llama2_gguf(
    out: Path,
    *,
    size: str = "7b",
    layers: int | None = None,
    quant: str = "Q4_0",
    vocab: Path = VOCAB,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write a Llama 2 shaped GGUF with random weights to `out` (through `out.part`, renamed at the end, so a
    failure or Ctrl-C leaves nothing under `out`) and return `out`. `layers` keeps the width but fewer blocks."""
    out, vocab = Path(out), Path(vocab)
    log = log or (lambda message: None)
    plan = tensor_plan(size, layers)
    if quant.upper() != "Q4_0":
        llama_ftype(quant)  # an unknown name fails now, not after writing gigabytes
    part = out.with_name(out.name + ".part")
    q4_0_part = part if quant.upper() == "Q4_0" else out.with_name(out.name + ".q4_0.part")
    try:
        t = time.perf_counter()
        kv = metadata(vocab, size, layers)
        write_q4_0(q4_0_part, plan, kv, seed)
        log(f"wrote Q4_0 {q4_0_part} ({len(plan)} tensors, {q4_0_part.stat().st_size:,} bytes) in {_since(t)}")
        if q4_0_part != part:
            t = time.perf_counter()
            requantize(q4_0_part, part, quant)
            log(f"requantized to {quant} with llama.cpp in {_since(t)}")
        os.replace(part, out)
    finally:
        for leftover in {part, q4_0_part}:
            leftover.unlink(missing_ok=True)
    return out


def _since(t: float) -> str:
    return f"{time.perf_counter() - t:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--size", default="7b", choices=sorted(SIZES))
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks at the full width (default: all)")
    parser.add_argument("--quant", default="Q4_0", help="Q4_0 (written directly) or any llama.cpp type, e.g. Q4_K_M")
    parser.add_argument("--vocab", type=Path, default=VOCAB, help=f"a Llama 2 vocabulary GGUF (default: {VOCAB})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    plan = tensor_plan(args.size, args.layers)
    try:
        out = make_llama2_gguf(
            args.out, size=args.size, layers=args.layers, quant=args.quant, vocab=args.vocab, seed=args.seed, log=print
        )
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} was not written", file=sys.stderr)
        return 130
    n_bytes = out.stat().st_size
    print(
        f"{out}: Llama 2 {args.size} shape, {args.layers or llama2_shape(args.size).n_layer} layers, {args.quant}, "
        f"random weights (benchmark only); {n_bytes:,} bytes ({n_bytes / 1e9:.2f} GB, "
        f"{8 * n_bytes / parameter_count(plan):.2f} bits/weight, {parameter_count(plan):,} parameters) "
        f"in {_since(t)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
