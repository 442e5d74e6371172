"""GPU check: what `nvidia-smi` reports, whether llama-cpp-python can offload, and how many layers fit.

Uses only the standard library so it runs before llama-cpp-python is installed. Whether the installed
build can offload is asked in a child process (`llama_supports_gpu_offload`), so the check never imports
llama_cpp into the notebook kernel (a later reinstall would then need a restart).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3

QUERY = "name,memory.total,memory.free,driver_version,compute_cap"


@dataclass(frozen=True)
class GPUInfo:
    name: str
    total_bytes: int
    free_bytes: int
    driver_version: str
    cuda_version: str | None
    compute_capability: str  # "7.5" for a T4
    llama_cpp_offload: bool | None  # None: llama-cpp-python is not installed

    @property
    def cuda_arch(self) -> str:
        """The CMAKE_CUDA_ARCHITECTURES value: "7.5" -> "75"."""
        return self.compute_capability.replace(".", "")


def parse_nvidia_smi(query_csv: str, header: str = "") -> dict | None:
    """The first GPU from `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` output, plus the
    CUDA version from plain `nvidia-smi`'s header."""
    lines = [line for line in query_csv.strip().splitlines() if line.strip()]
    if not lines:
        return None
    name, total, free, driver, cap = (part.strip() for part in lines[0].split(","))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {
        "name": name,
        "total_bytes": int(float(total)) * MiB,
        "free_bytes": int(float(free)) * MiB,
        "driver_version": driver,
        "cuda_version": cuda.group(1) if cuda else None,
        "compute_capability": cap,
    }


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def llama_cpp_offload(python: str = sys.executable) -> bool | None:
    """Whether the installed llama-cpp-python build can offload to a GPU; None if it is not installed."""
    out = _run([python, "-c", "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())"])
    return None if out is None else out.strip().endswith("True")


def detect_gpu(check_offload: bool = True) -> GPUInfo | None:
    """The NVIDIA GPU, or None when there is none (or no working driver). `check_offload=False` skips
    asking a child process whether llama-cpp-python can offload (`llama_cpp_offload` is then None)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = _run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"])
    parsed = parse_nvidia_smi(query or "", _run(["nvidia-smi"]) or "")
    if parsed is None:
        return None
    return GPUInfo(**parsed, llama_cpp_offload=llama_cpp_offload() if check_offload else None)


# --- how many layers fit --------------------------------------------------------------------------

COMPUTE_BUFFER_BYTES = 512 * MiB  # scratch buffers of the CUDA backend (measured ~0.3-0.5 GiB for 7B)
MARGIN_FRACTION = 0.05  # of total VRAM, left free for the driver and other processes


def auto_gpu_layers(
    *, model_bytes: int, n_layers: int, kv_bytes_per_token: int, n_ctx: int, free_bytes: int, total_bytes: int
) -> int:
    """Layers to offload: all (n_layers + 1, the output layer included) when weights, KV cache and
    scratch fit in free VRAM with a margin; otherwise as many repeating layers as fit; 0 if none."""
    budget = free_bytes - COMPUTE_BUFFER_BYTES - int(MARGIN_FRACTION * total_bytes)
    if n_layers <= 0 or budget <= 0:
        return 0
    if model_bytes + kv_bytes_per_token * n_ctx <= budget:
        return n_layers + 1
    # Token embeddings stay on the CPU; the output layer weighs about one block: share over n + 1.
    per_layer = model_bytes / (n_layers + 1) + kv_bytes_per_token * n_ctx / n_layers
    return max(0, min(n_layers, int(budget // per_layer)))


def describe(gpu: GPUInfo | None) -> str:
    """A short, friendly summary for the notebook's GPU cell."""
    if gpu is None:
        return (
            "No NVIDIA GPU found: the model will run on the CPU (fine for 7B Q4_K_M on a laptop, a few "
            "tokens/s). In Colab: Runtime > Change runtime type > T4 GPU, then run again."
        )
    lines = [
        f"GPU: {gpu.name}, {gpu.free_bytes / GiB:.1f} of {gpu.total_bytes / GiB:.1f} GiB free, "
        f"compute capability {gpu.compute_capability}, driver {gpu.driver_version}, CUDA {gpu.cuda_version or '?'}."
    ]
    if gpu.llama_cpp_offload is None:
        lines.append("llama-cpp-python is not installed yet: the next cell builds it with CUDA.")
    elif gpu.llama_cpp_offload:
        lines.append("llama-cpp-python can offload to this GPU.")
    else:
        lines.append(
            "WARNING: the installed llama-cpp-python is a CPU-only build: it would silently ignore the GPU. "
            "The next cell rebuilds it with CUDA."
        )
    return "\n".join(lines)
