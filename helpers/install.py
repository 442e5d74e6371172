"""The one place that decides how llama-cpp-python is installed: CUDA build on an NVIDIA GPU, else CPU.

Used by the Makefile (`python -m helpers.install`) and by the notebook's install cell alike. Standard
library only: it runs before llama-cpp-python exists. CMake flags: llama-cpp-python's CMakeLists.txt
(LLAVA_BUILD) and llama.cpp's ggml/CMakeLists.txt (GGML_CUDA); pip passes them through CMAKE_ARGS.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from helpers.gpu import GPUInfo, detect_gpu

LLAMA_CPP_VERSION = "0.3.36"
REQUIREMENT = f"llama-cpp-python=={LLAMA_CPP_VERSION}"

# Parts of the build this project never loads: the multimodal library (mtmd/llava) and llama.cpp's
# "common" utilities; and AMX, which crashes on some VMs (see llama_cpp_build.cmake).
BUILD_HOOK = Path(__file__).with_name("llama_cpp_build.cmake")
BUILD_CMAKE_ARGS = ["-DLLAVA_BUILD=OFF", f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={shlex.quote(str(BUILD_HOOK))}"]


@dataclass(frozen=True)
class InstallPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    reason: str = ""
    restart_needed: bool = False  # llama_cpp is already imported in this process

    def shell(self) -> str:
        env = " ".join(f'{k}="{v}"' for k, v in self.env.items())
        return f"{env} {' '.join(self.argv)}".strip()


def install_command(
    gpu: GPUInfo | None,
    *,
    installed: bool,
    python: str = sys.executable,
    jobs: int | None = None,
    imported: bool = False,
) -> InstallPlan | None:
    """The pip command to run, or None when the installed build already has the backend needed.

    `installed`: llama-cpp-python is importable; `gpu.llama_cpp_offload` says whether that build offloads.
    """
    jobs = jobs or os.cpu_count() or 1
    env = {"CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    pip = [python, "-m", "pip", "install"]
    if gpu is None:
        if installed:
            return None
        return InstallPlan(
            argv=[*pip, REQUIREMENT],
            env={**env, "CMAKE_ARGS": " ".join(BUILD_CMAKE_ARGS)},
            reason="no NVIDIA GPU: CPU build",
        )
    if installed and gpu.llama_cpp_offload:
        return None
    cmake = ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={gpu.cuda_arch}", *BUILD_CMAKE_ARGS]
    # --no-cache-dir: pip's wheel cache would hand back a CPU wheel built earlier from the same source.
    argv = [*pip, REQUIREMENT, "--no-cache-dir"]
    reason = f"{gpu.name}: CUDA build for compute capability {gpu.compute_capability}"
    if installed:
        # Replace the CPU-only build, leave its dependencies (numpy in Colab) alone.
        argv += ["--force-reinstall", "--no-deps"]
        reason += ", replacing the CPU-only build"
    return InstallPlan(
        argv=argv, env={**env, "CMAKE_ARGS": " ".join(cmake)}, reason=reason, restart_needed=imported or installed
    )


def is_installed(python: str = sys.executable) -> bool:
    done = subprocess.run(
        [python, "-c", "import importlib.metadata as m; m.version('llama-cpp-python')"], capture_output=True
    )
    return done.returncode == 0


def ensure_llama_cpp(
    gpu: GPUInfo | None = None, *, python: str = sys.executable, run: bool = True
) -> InstallPlan | None:
    """Install llama-cpp-python with the right backend if needed; print what is done and why."""
    if gpu is None:
        gpu = detect_gpu()
    plan = install_command(gpu, installed=is_installed(python), python=python, imported="llama_cpp" in sys.modules)
    if plan is None:
        print("llama-cpp-python is installed with the backend this machine needs: nothing to do.")
        return None
    print(f"Installing llama-cpp-python ({plan.reason}); building from source takes a few minutes.")
    print(f"$ {plan.shell()}", flush=True)
    if run:
        subprocess.run(plan.argv, env={**os.environ, **plan.env}, check=True)
        if plan.restart_needed:
            print("Done. Restart the kernel (Runtime > Restart session in Colab), then run the notebook again.")
        else:
            print("Done.")
    return plan


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    try:
        ensure_llama_cpp(run=not dry)
    except subprocess.CalledProcessError as error:
        print(f"pip failed (exit {error.returncode}); the build log is above.", file=sys.stderr)
        return error.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
