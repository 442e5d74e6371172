"""Which quantization of a catalogue model suits this machine, and how many of its layers fit on the GPU:
the GPU cell's advice, from the catalogue's sizes and `auto_gpu_layers`' rule, before anything is downloaded."""

from __future__ import annotations

from helpers.files.catalogue import ARCHITECTURE, DEFAULT_QUANT, GB, GPU_ADVICE, get_model, quantizations
from helpers.machine.gpu import auto_gpu_layers


def catalogue_gpu_layers(name: str, quant: str, *, free_bytes: int, total_bytes: int, n_ctx: int = 4096) -> int:
    """`n_gpu_layers="auto"` for a catalogue file, from its size and architecture, before downloading it."""
    n_layers, kv = ARCHITECTURE[name]
    return auto_gpu_layers(
        model_bytes=int(get_model(name, quant).size_gb * GB),
        n_layers=n_layers,
        kv_bytes_per_token=kv,
        n_ctx=n_ctx,
        free_bytes=free_bytes,
        total_bytes=total_bytes,
    )


def advice(name: str, gpu, ram_bytes: int, n_ctx: int = 4096) -> str:
    """One line for the GPU cell: which quantization fits and how many layers to offload."""
    quant = recommend(name, gpu_free_bytes=gpu.free_bytes if gpu else None, ram_bytes=ram_bytes)
    entry = get_model(name, quant)
    needs = f" {GPU_ADVICE[name]}" if name in GPU_ADVICE else ""
    if gpu is None:
        return (
            f"Recommended: {name} {quant} ({entry.size_gb:.2f} GB file, {entry.ram_gb:.2f} GB RAM), on the CPU.{needs}"
        )
    n_layers = ARCHITECTURE[name][0]
    layers = catalogue_gpu_layers(name, quant, free_bytes=gpu.free_bytes, total_bytes=gpu.total_bytes, n_ctx=n_ctx)
    where = "all layers on the GPU" if layers > n_layers else f"{layers} of {n_layers + 1} layers on the GPU"
    return f"Recommended: {name} {quant} ({entry.size_gb:.2f} GB), {where} at n_ctx={n_ctx}.{needs}"


def recommend(name: str, *, gpu_free_bytes: int | None, ram_bytes: int) -> str:
    """The largest recommended quantization that fits the GPU (or, without one, the RAM)."""
    files = {quant: get_model(name, quant) for quant in quantizations(name)}
    budget = gpu_free_bytes * 0.85 if gpu_free_bytes else ram_bytes * 0.9
    fitting = [q for q, f in files.items() if f.ram_gb * GB <= budget]
    preferred = [q for q in fitting if "recommended" in files[q].note and "not recommended" not in files[q].note]
    if preferred:
        return preferred[-1] if gpu_free_bytes else (DEFAULT_QUANT if DEFAULT_QUANT in preferred else preferred[0])
    if fitting:
        return fitting[-1]
    return min(files, key=lambda q: files[q].size_gb)
