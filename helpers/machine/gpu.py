"""GPU check: the NVIDIA GPUs `nvidia-smi` reports (or Apple Silicon's Metal GPU), whether llama-cpp-python
can offload, and how many layers fit.

Uses only the standard library so it runs before llama-cpp-python is installed. Whether the installed
build can offload is asked in a child process (`llama_supports_gpu_offload`), so the check never imports
llama_cpp into the notebook kernel (a later reinstall would then need a restart).

nvidia-smi: `--query-gpu` fields are "[N/A]" where a driver or device cannot report them; a GPU in MIG mode
is used through its MIG devices, listed in plain `nvidia-smi`'s "MIG devices" table (NVIDIA's MIG user
guide). CUDA_VISIBLE_DEVICES takes indices, GPU-/MIG- UUIDs or UUID prefixes (CUDA's documentation).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace

MiB = 1024**2
GiB = 1024**3

QUERY = "index,uuid,name,memory.total,memory.free,driver_version,compute_cap"


@dataclass(frozen=True)
class GPUInfo:
    name: str
    total_bytes: int
    free_bytes: int
    driver_version: str
    cuda_version: str | None
    compute_capability: str  # "7.5" for a T4; "" when nvidia-smi cannot say
    llama_cpp_offload: bool | None  # None: llama-cpp-python is not installed (or not asked)
    backend: str = "cuda"  # "cuda" (NVIDIA) or "metal" (Apple Silicon, unified memory)
    index: str = "0"  # nvidia-smi's index; "0:1" for MIG device 1 of GPU 0
    uuid: str = ""  # GPU-... or MIG-...
    free_reported: bool = True  # False: nvidia-smi said [N/A], free_bytes is the total

    @property
    def cuda_arch(self) -> str:
        """The CMAKE_CUDA_ARCHITECTURES value: "7.5" -> "75"; "native" (CMake >= 3.24) when unknown."""
        return self.compute_capability.replace(".", "") or "native"


def _field(text: str) -> str | None:
    """A `--query-gpu` field, None for [N/A] / [Not Supported] / [Unknown Error] and the like."""
    text = text.strip()
    return None if not text or text.startswith("[") or text == "N/A" else text


def _mib(text: str | None) -> int | None:
    return None if text is None else int(float(text)) * MiB


# | GPU  GI  CI  MIG |  used MiB / total MiB | ... (the first line of each MIG device in plain nvidia-smi)
_MIG_ROW = re.compile(r"^\|\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\|\s+(\d+)MiB\s*/\s*(\d+)MiB", re.M)
#   MIG 3g.20gb     Device  0: (UUID: MIG-...)      (nvidia-smi -L)
_MIG_LIST = re.compile(r"^GPU (\d+):.*$|^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)]+)\)", re.M)


def parse_nvidia_smi(query_csv: str, header: str = "", listing: str = "") -> list[dict]:
    """Every GPU in `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` output, as GPUInfo fields;
    the CUDA version from plain `nvidia-smi`'s header. A GPU in MIG mode is replaced by its MIG devices
    (memory from plain `nvidia-smi`'s MIG table, profile names and UUIDs from `nvidia-smi -L`)."""
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    gpus = []
    for line in query_csv.strip().splitlines():
        parts = [_field(part) for part in line.split(",")]
        if len(parts) != len(QUERY.split(",")):
            continue  # an error message, not a row
        index, uuid, name, total, free, driver, cap = parts
        total_bytes, free_bytes = _mib(total) or 0, _mib(free)
        gpus.append(
            {
                "name": name or "NVIDIA GPU",
                "total_bytes": total_bytes,
                "free_bytes": total_bytes if free_bytes is None else free_bytes,
                "free_reported": free_bytes is not None,
                "driver_version": driver or "?",
                "cuda_version": cuda.group(1) if cuda else None,
                "compute_capability": cap or "",
                "index": index or str(len(gpus)),
                "uuid": uuid or "",
            }
        )
    migs = _mig_devices(header, listing)
    result = []
    for gpu in gpus:
        mine = [m for m in migs if m["gpu"] == gpu["index"]]
        if not mine:
            result.append(gpu)
        for mig in mine:
            result.append(
                gpu
                | {
                    "name": f"{gpu['name']} MIG {mig['profile']}".strip(),
                    "total_bytes": mig["total"],
                    "free_bytes": mig["total"] - mig["used"],
                    "free_reported": True,
                    "index": f"{gpu['index']}:{mig['device']}",
                    "uuid": mig["uuid"],
                }
            )
    return result


def _mig_devices(header: str, listing: str) -> list[dict]:
    profiles, gpu = {}, None
    for match in _MIG_LIST.finditer(listing):
        if match.group(1) is not None:
            gpu = match.group(1)
        elif gpu is not None:
            profiles[(gpu, match.group(3))] = (match.group(2), match.group(4))
    devices = []
    for gpu, _gi, _ci, device, used, total in _MIG_ROW.findall(header):
        profile, uuid = profiles.get((gpu, device), ("", ""))
        devices.append(
            {
                "gpu": gpu,
                "device": device,
                "used": int(used) * MiB,
                "total": int(total) * MiB,
                "profile": profile,
                "uuid": uuid,
            }
        )
    return devices


def visible(gpus: list[GPUInfo], cuda_visible_devices: str | None) -> list[GPUInfo]:
    """The GPUs CUDA_VISIBLE_DEVICES lets this process use, in its order (all of them when it is unset).
    Entries are indices or UUID prefixes; CUDA stops at the first invalid entry, and so does this."""
    if cuda_visible_devices is None:
        return gpus
    chosen = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        match = [g for g in gpus if entry and (g.index == entry or (len(entry) > 4 and g.uuid.startswith(entry)))]
        if not match:
            break
        chosen.append(match[0])
    return chosen


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def llama_cpp_offload(python: str = sys.executable, env: dict | None = None) -> bool | None:
    """Whether the installed llama-cpp-python build can offload to a GPU; None if it is not installed."""
    code = "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None if "No module named 'llama_cpp'" in done.stderr else False
    return done.stdout.strip().endswith("True")


def is_apple_silicon(system: tuple[str, str] | None = None) -> bool:
    """macOS on arm64 (`system` = (platform.system(), platform.machine()), given to fake another machine)."""
    return (system or (platform.system(), platform.machine())) == ("Darwin", "arm64")


def detect_gpus(check_offload: bool = True, *, system: tuple[str, str] | None = None) -> list[GPUInfo]:
    """Every GPU this machine has (MIG devices instead of a GPU in MIG mode), before CUDA_VISIBLE_DEVICES."""
    found = []
    if shutil.which("nvidia-smi") is not None:
        query = _run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]) or ""
        header = _run(["nvidia-smi"]) or ""
        listing = (_run(["nvidia-smi", "-L"]) or "") if "MIG devices" in header else ""
        found = [GPUInfo(**fields, llama_cpp_offload=None) for fields in parse_nvidia_smi(query, header, listing)]
    if not found and is_apple_silicon(system):
        found = [metal] if (metal := metal_gpu()) else []
    if found and check_offload:
        offload = llama_cpp_offload()
        found = [replace(gpu, llama_cpp_offload=offload) for gpu in found]
    return found


def detect_gpu(check_offload: bool = True, *, system: tuple[str, str] | None = None) -> GPUInfo | None:
    """The GPU llama.cpp will use, or None when there is none (or no working driver): among the NVIDIA GPUs
    CUDA_VISIBLE_DEVICES leaves visible, the one with the most free memory (a process can use only the first
    visible MIG device: that one, then); without one, on Apple Silicon,
    the Metal GPU. `check_offload=False` skips asking a child process whether llama-cpp-python can offload
    (`llama_cpp_offload` is then None)."""
    gpus = detect_gpus(check_offload, system=system)
    if gpus and gpus[0].backend == "cuda":
        gpus = visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        migs = [g for g in gpus if g.uuid.startswith("MIG-")]
        if migs:
            return migs[0]  # CUDA runs a process on one MIG device only: the first visible one
    return max(gpus, key=lambda g: g.free_bytes, default=None)


# --- Apple Silicon: Metal through unified memory -------------------------------------------------


def metal_gpu() -> GPUInfo | None:
    """The Metal GPU of an Apple Silicon Mac: its memory is the RAM. Metal lets one process keep about
    `recommendedMaxWorkingSetSize` resident on the GPU: 2/3 of RAM up to 36 GB, 3/4 above (as llama.cpp's
    Metal log shows it: 10922.67 MB on a 16 GB Mac), or `sysctl iogpu.wired_limit_mb` when that is set; free is
    that, or the RAM macOS can hand out now (vm_stat), whichever is less."""
    memsize = _run(["sysctl", "-n", "hw.memsize"])
    if not memsize or not memsize.strip().isdigit():
        return None
    ram = int(memsize.strip())
    working_set = ram * 3 // 4 if ram > 36 * GiB else ram * 2 // 3
    wired = (_run(["sysctl", "-n", "iogpu.wired_limit_mb"]) or "").strip()
    if wired.isdigit() and int(wired) > 0:  # the user raised (or lowered) the limit: Metal reports that
        working_set = min(ram, int(wired) * MiB)
    available = _vm_available(_run(["vm_stat"]) or "")
    chip = (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "Apple Silicon").strip()
    return GPUInfo(
        name=f"{chip} GPU (Metal)",
        total_bytes=working_set,
        free_bytes=min(working_set, available) if available else working_set,
        driver_version=(_run(["sw_vers", "-productVersion"]) or "").strip() or "?",
        cuda_version=None,
        compute_capability="",
        llama_cpp_offload=None,
        backend="metal",
        free_reported=available is not None,
    )


def _vm_available(vm_stat: str) -> int | None:
    """Free + inactive + speculative + purgeable pages from `vm_stat` (what macOS can give without swapping)."""
    size = re.search(r"page size of (\d+) bytes", vm_stat)
    pages = {k.strip().lower(): int(v) for k, v in re.findall(r"^Pages ([^:]+):\s+(\d+)\.", vm_stat, re.M)}
    if not size or not pages:
        return None
    return int(size.group(1)) * sum(pages.get(k, 0) for k in ("free", "inactive", "speculative", "purgeable"))


# --- how many layers fit --------------------------------------------------------------------------

COMPUTE_BUFFER_BYTES = 512 * MiB  # scratch buffers of the CUDA backend (measured ~0.3-0.5 GiB for 7B)
MARGIN_FRACTION = 0.05  # of total VRAM, left free for the driver and other processes


def auto_gpu_layers(
    *, model_bytes: int, n_layers: int, kv_bytes_per_token: int, n_ctx: int, free_bytes: int, total_bytes: int
) -> int:
    """Layers to offload: all (n_layers + 1, the output layer included) when weights, KV cache and
    scratch fit in free VRAM with a margin; otherwise as many repeating layers as fit; 0 if none.
    On Apple Silicon free and total are the unified memory Metal may use (see `metal_gpu`)."""
    budget = free_bytes - COMPUTE_BUFFER_BYTES - int(MARGIN_FRACTION * total_bytes)
    if n_layers <= 0 or budget <= 0:
        return 0
    if model_bytes + kv_bytes_per_token * n_ctx <= budget:
        return n_layers + 1
    # Token embeddings stay on the CPU; the output layer weighs about one block: share over n + 1.
    per_layer = model_bytes / (n_layers + 1) + kv_bytes_per_token * n_ctx / n_layers
    return max(0, min(n_layers, int(budget // per_layer)))


def describe_gpu(gpu: GPUInfo | None, gpus: list[GPUInfo] | None = None) -> str:
    """A short, friendly summary for the notebook's GPU cell (`gpus`: every GPU found, when several)."""
    if gpu is None:
        return (
            "No NVIDIA GPU found: the model will run on the CPU (fine for 7B Q4_K_M on a laptop, a few "
            "tokens/s). In Colab: Runtime > Change runtime type > T4 GPU, then run again."
        )
    free = f"{gpu.free_bytes / GiB:.1f}" if gpu.free_reported else "? (not reported)"
    if gpu.backend == "metal":
        lines = [
            f"GPU: {gpu.name}, {free} of {gpu.total_bytes / GiB:.1f} GiB of unified memory usable, macOS {gpu.driver_version}."
        ]
    else:
        lines = [
            f"GPU {gpu.index}: {gpu.name}, {free} of {gpu.total_bytes / GiB:.1f} GiB free, compute capability "
            f"{gpu.compute_capability or '?'}, driver {gpu.driver_version}, CUDA {gpu.cuda_version or '?'}."
        ]
    for other in gpus or []:
        if other != gpu:
            lines.append(f"  also GPU {other.index}: {other.name}, {other.free_bytes / GiB:.1f} GiB free")
    backend = "Metal" if gpu.backend == "metal" else "CUDA"
    if gpu.llama_cpp_offload is None:
        lines.append(f"llama-cpp-python is not installed yet: the next cell installs it with {backend}.")
    elif gpu.llama_cpp_offload:
        lines.append("llama-cpp-python can offload to this GPU.")
    else:
        lines.append(
            "WARNING: the installed llama-cpp-python is a CPU-only build: it would silently ignore the GPU. "
            f"The next cell replaces it with a {backend} build."
        )
    return "\n".join(lines)
