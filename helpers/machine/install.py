"""The one place that decides how llama-cpp-python is installed: a prebuilt CUDA wheel or a CUDA build on an
NVIDIA GPU, the default (Metal) build on Apple Silicon, else a CPU build.

Used by the Makefile (`python -m helpers.install`) and by the notebook's install cell alike. Standard
library only: it runs before llama-cpp-python exists. CMake flags: llama-cpp-python's CMakeLists.txt
(LLAVA_BUILD) and llama.cpp's ggml/CMakeLists.txt (GGML_CUDA; GGML_METAL is on by default on Apple); pip
passes them through CMAKE_ARGS.

Prebuilt CUDA wheels: llama-cpp-python's own wheel index, `WHEEL_INDEX/cu<XY>` (its README and
.github/workflows/build-wheels-cuda.yaml, generate-index-from-release.yaml, as of v0.3.35): variants
cu118, cu121-cu125, cu130 and cu132, tagged `py3` (any Python 3) since 2026-03 (#2166); Linux x86_64 and
Windows. The Linux wheels leave libcudart and libcublas out (auditwheel --exclude): they load the
machine's own CUDA libraries of the same major version. CUDA 13 wheels hold code for compute capability
7.5 and later only. `--only-binary` keeps pip from quietly building the source distribution instead.
"""

from __future__ import annotations

import html.parser
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from helpers.machine.gpu import GPUInfo, detect_gpu, is_apple_silicon, llama_cpp_offload

LLAMA_CPP_VERSION = "0.3.35"
REQUIREMENT = f"llama-cpp-python=={LLAMA_CPP_VERSION}"

WHEEL_INDEX = "https://abetlen.github.io/llama-cpp-python/whl"
CUDA_WHEEL_VARIANTS = ((11, 8), (12, 1), (12, 2), (12, 3), (12, 4), (12, 5), (13, 0), (13, 2))
WHEEL_PLATFORMS = {("Linux", "x86_64")}  # where this project installs them (Windows has some variants too)

# Parts of the build this project never loads: the multimodal library (mtmd/llava) and llama.cpp's
# "common" utilities; and AMX, which crashes on some VMs (see llama_cpp_build.cmake).
BUILD_HOOK = Path(__file__).with_name("llama_cpp_build.cmake")
BUILD_CMAKE_ARGS = ["-DLLAVA_BUILD=OFF", f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={shlex.quote(str(BUILD_HOOK))}"]


@dataclass(frozen=True)
class InstallPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    reason: str = ""
    restart_needed: bool = False  # llama_cpp is already imported in this process: the new build needs a restart
    kind: str = "source"  # "source" (pip builds the source distribution) or "wheel" (prebuilt, --only-binary)

    def shell(self) -> str:
        env = " ".join(f'{k}="{v}"' for k, v in self.env.items())
        return f"{env} {' '.join(self.argv)}".strip()


def _system(system: tuple[str, str] | None) -> tuple[str, str]:
    return system or (platform.system(), platform.machine())


def install_command(
    gpu: GPUInfo | None,
    *,
    installed: bool,
    python: str = sys.executable,
    jobs: int | None = None,
    imported: bool = False,
    system: tuple[str, str] | None = None,
) -> InstallPlan | None:
    """The pip command that builds llama-cpp-python from source, or None when the installed build already
    has the backend needed.

    `installed`: llama-cpp-python is importable; `gpu.llama_cpp_offload` says whether that build offloads.
    `system`: (platform.system(), platform.machine()), given to plan for another machine.
    """
    jobs = jobs or os.cpu_count() or 1
    env = {"CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    pip = [python, "-m", "pip", "install"]
    if is_apple_silicon(_system(system)) and (gpu is None or gpu.backend == "metal"):
        # llama.cpp builds Metal by default on macOS arm64: no CUDA flags, nothing x86-only.
        offload = gpu.llama_cpp_offload if gpu else None
        if installed and offload is not False:
            return None
        argv, reason = [*pip, REQUIREMENT], "Apple Silicon: the default build, with Metal"
        if installed:  # a CPU-only build (e.g. made with GGML_METAL=off): replace it
            argv += ["--no-cache-dir", "--force-reinstall", "--no-deps"]
            reason += ", replacing the CPU-only build"
        return InstallPlan(
            argv=argv,
            env={**env, "CMAKE_ARGS": " ".join(BUILD_CMAKE_ARGS)},
            reason=reason,
            restart_needed=imported,
        )
    if gpu is None or gpu.backend != "cuda":
        if installed:
            return None
        return InstallPlan(
            argv=[*pip, REQUIREMENT],
            env={**env, "CMAKE_ARGS": " ".join(BUILD_CMAKE_ARGS)},
            reason="no NVIDIA GPU: CPU build",
            restart_needed=imported,  # another version is loaded in this process
        )
    if installed and gpu.llama_cpp_offload:
        return None
    cmake = ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={gpu.cuda_arch}", *BUILD_CMAKE_ARGS]
    # --no-cache-dir: pip's wheel cache would hand back a CPU wheel built earlier from the same source.
    argv = [*pip, REQUIREMENT, "--no-cache-dir"]
    reason = f"{gpu.name}: CUDA build for compute capability {gpu.compute_capability or '(native)'}"
    if installed:
        # Replace the CPU-only build, leave its dependencies (numpy in Colab) alone.
        argv += ["--force-reinstall", "--no-deps"]
        reason += ", replacing the CPU-only build"
    return InstallPlan(argv=argv, env={**env, "CMAKE_ARGS": " ".join(cmake)}, reason=reason, restart_needed=imported)


# --- prebuilt CUDA wheels -------------------------------------------------------------------------


def _version(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_toolkit_majors() -> set[int]:
    """CUDA major versions whose runtime this machine has: nvcc's release and the libcublas.so.N that the
    dynamic loader knows (`ldconfig -p`). A prebuilt wheel needs its major's libcudart and libcublas."""
    majors = set()
    for nvcc in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if found := _version((re.search(r"release (\d+\.\d+)", out) or [None, None])[1]):
            majors.add(found[0])
            break
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        cache = ""
    majors |= {int(n) for n in re.findall(r"libcublas\.so\.(\d+)\b", cache)}
    return majors


def _has_code_for(variant: tuple[int, int], capability: tuple[int, int]) -> bool:
    """Whether a wheel variant holds GPU code this compute capability runs (build-wheels-cuda.yaml, v0.3.35):
    CUDA 11.8 wheels 6.0-8.9 (no PTX); 12.x wheels 6.0-9.0 plus PTX for 9.0, which later GPUs compile at load;
    13.x wheels 7.5-9.0 plus that PTX."""
    if capability < (6, 0):
        return False
    if variant[0] == 11:
        return capability < (9, 0)
    if variant[0] >= 13:
        return capability >= (7, 5)
    return True


def wheel_variant(
    gpu: GPUInfo, *, runtime_majors: set[int], system: tuple[str, str] | None = None
) -> tuple[str | None, str]:
    """(the best wheel variant for this GPU, e.g. "cu125", or None; why). Best: the newest CUDA that the
    driver supports (nvidia-smi's "CUDA Version"), of a major version whose runtime libraries this machine
    has (any, when none is found), with code for the GPU's compute capability (`_has_code_for`)."""
    if _system(system) not in WHEEL_PLATFORMS:
        return None, f"no prebuilt CUDA wheels for {'/'.join(_system(system))}"
    driver = _version(gpu.cuda_version)
    if driver is None:
        return None, "nvidia-smi does not say which CUDA version the driver supports"
    fitting = [v for v in CUDA_WHEEL_VARIANTS if v <= driver]
    if not fitting:
        return None, f"the driver supports CUDA {gpu.cuda_version}, older than every wheel variant"
    if runtime_majors:
        fitting = [v for v in fitting if v[0] in runtime_majors]
        if not fitting:
            runtimes = " and ".join(f"CUDA {m}" for m in sorted(runtime_majors))
            newer = " (newer than the driver: update the driver, or the build will not run)"
            return None, (
                f"no wheel for the CUDA runtime here ({runtimes}) runs on a driver for CUDA {gpu.cuda_version}"
                + (newer if min(runtime_majors) > driver[0] else "")
            )
    capability = _version(gpu.compute_capability)
    if capability is not None:
        fitting = [v for v in fitting if _has_code_for(v, capability)]
        if not fitting:
            return None, f"no wheel it can use has code for compute capability {gpu.compute_capability}"
    major, minor = max(fitting)
    runtimes = f", CUDA {major} runtime found" if runtime_majors else ""
    ptx = ", its 9.0 PTX compiled for this GPU when first loaded" if capability and capability > (9, 0) else ""
    return f"cu{major}{minor}", f"driver supports CUDA {gpu.cuda_version}{runtimes}{ptx}"


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def find_wheel(index_url: str, version: str = LLAMA_CPP_VERSION, timeout: float = 15) -> tuple[bool, str]:
    """(whether the simple index at `index_url` lists a llama-cpp-python `version` wheel; why not)."""
    page = f"{index_url.rstrip('/')}/llama-cpp-python/"
    try:
        with urllib.request.urlopen(page, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        return False, f"the wheel index has no llama-cpp-python page ({page}: HTTP {error.code})"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return False, f"the wheel index cannot be reached ({page}: {reason})"
    links = _Links()
    links.feed(text)
    names = [href.rsplit("/", 1)[-1].split("#")[0] for href in links.hrefs]
    wheels = [name for name in names if name.endswith(".whl") and name.startswith("llama_cpp_python-")]
    if any(name.split("-")[1].replace("%2B", "+").split("+")[0] == version for name in wheels):
        return True, ""
    versions = sorted({name.split("-")[1] for name in wheels}, key=lambda v: [int(p) for p in re.findall(r"\d+", v)])
    has = f" (it has {', '.join(versions[-3:])})" if versions else ""
    return False, f"no llama-cpp-python {version} wheel on {page}{has}"


def wheel_command(
    gpu: GPUInfo,
    variant: str,
    *,
    installed: bool,
    python: str = sys.executable,
    index: str = WHEEL_INDEX,
    imported: bool = False,
) -> InstallPlan:
    """The pip command that installs the prebuilt `variant` wheel of the pinned version, wheels only."""
    argv = [python, "-m", "pip", "install", REQUIREMENT, "--only-binary=llama-cpp-python"]
    argv += ["--extra-index-url", f"{index.rstrip('/')}/{variant}", "--no-cache-dir"]
    if installed:
        argv += ["--force-reinstall", "--no-deps"]
    return InstallPlan(
        argv=argv,
        reason=f"{gpu.name}: prebuilt {variant} wheel",
        restart_needed=imported,
        kind="wheel",
    )


def _run_plan(plan: InstallPlan, *, quiet: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(plan.argv, env={**os.environ, **plan.env}, capture_output=quiet, text=True, check=not quiet)


def try_wheel(plan: InstallPlan, python: str) -> tuple[bool, str]:
    """Install the wheel; (whether the installed build can offload, checked in a child process; why not)."""
    done = _run_plan(plan, quiet=True)
    if done.returncode != 0:
        last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return False, f"pip could not install it ({last[-1].strip() if last else f'exit {done.returncode}'})"
    if not llama_cpp_offload(python):
        return False, "installed, but that build cannot offload to this GPU (llama_supports_gpu_offload() is False)"
    return True, ""


def installed_version(python: str = sys.executable) -> str | None:
    """The llama-cpp-python version that `python` has installed, or None."""
    done = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('llama-cpp-python'))"],
        capture_output=True,
        text=True,
    )
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def is_pinned(version: str | None) -> bool:
    """Whether an installed version is the pinned one. A local label ("0.3.35+cu125") matches, as it does
    for pip's `==0.3.35` (PEP 440)."""
    return version is not None and version.split("+")[0] == LLAMA_CPP_VERSION


def is_installed(python: str = sys.executable) -> bool:
    """The pinned version is installed (another version is replaced, as `pip install -r requirements.txt`
    would do, but with this module's build flags and backend)."""
    return is_pinned(installed_version(python))


def ensure_llama_cpp(
    gpu: GPUInfo | None = None,
    *,
    python: str = sys.executable,
    run: bool = True,
    index: str = WHEEL_INDEX,
    system: tuple[str, str] | None = None,
    runtime_majors: set[int] | None = None,
) -> InstallPlan | None:
    """Install llama-cpp-python with the right backend if needed; print what is chosen, why, and how long
    it took. On an NVIDIA GPU the prebuilt CUDA wheel comes first; when no wheel fits, the index cannot be
    reached, or the wheel's build cannot offload, it builds from source for the GPU. Returns the plan run
    (with `run=False`, the first plan it would run)."""
    start = time.monotonic()
    if gpu is None:
        gpu = detect_gpu(system=system)
    have, imported = installed_version(python), "llama_cpp" in sys.modules
    installed = is_pinned(have)
    if have and not installed:
        print(f"llama-cpp-python {have} is installed; this project pins {LLAMA_CPP_VERSION}: replacing it.")
    plan = install_command(gpu, installed=installed, python=python, imported=imported, system=system)
    if plan is None:
        print("llama-cpp-python is installed with the backend this machine needs: nothing to do.")
        return None
    if gpu is not None and gpu.backend == "cuda":
        majors = cuda_toolkit_majors() if runtime_majors is None else runtime_majors
        variant, why = wheel_variant(gpu, runtime_majors=majors, system=system)
        if variant is not None:
            found, why_not = find_wheel(f"{index.rstrip('/')}/{variant}")
            if found:
                wheel = wheel_command(gpu, variant, installed=installed, python=python, index=index, imported=imported)
                print(f"Installing llama-cpp-python {LLAMA_CPP_VERSION}: {wheel.reason} ({why}).")
                print(f"$ {wheel.shell()}", flush=True)
                if not run:
                    return wheel
                ok, why_not = try_wheel(wheel, python)
                if ok:
                    _done(wheel, start)
                    return wheel
            why = why_not
        print(f"No prebuilt CUDA wheel used: {why}. Building from source instead.")
        if not installed and run and is_installed(python):  # the wheel went in but is no use: replace it
            installed = True
            gpu = replace(gpu, llama_cpp_offload=False)
            plan = install_command(gpu, installed=True, python=python, imported=imported, system=system)
    print(f"Installing llama-cpp-python {LLAMA_CPP_VERSION} ({plan.reason}); building from source takes minutes.")
    print(f"$ {plan.shell()}", flush=True)
    if run:
        _run_plan(plan)
        _done(plan, start)
    return plan


# What the helpers import besides llama-cpp-python, with the ranges in requirements.txt. A local `make setup`
# installs all of requirements.txt; on Colab that would replace Colab's own ipykernel and notebook, so the
# notebook's install cell adds only these, and only when missing or out of range.
HELPER_PACKAGES = ("huggingface_hub>=1.0,<3", "gguf>=0.17,<1", "markdown-it-py>=3.0,<5")


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def missing_packages(requirements: tuple[str, ...] = HELPER_PACKAGES) -> list[str]:
    """The requirements ("name>=low,<high") that this Python lacks or holds outside their range."""
    import importlib.metadata

    missing = []
    for requirement in requirements:
        name, low, high = re.fullmatch(r"([\w.-]+)>=([\d.]+),<([\d.]+)", requirement).groups()
        try:
            have = _numbers(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if not _numbers(low) <= have < _numbers(high):
            missing.append(requirement)
    return missing


def ensure_helper_packages(*, python: str = sys.executable, run: bool = True) -> InstallPlan | None:
    """Install the helpers' own packages that this Python lacks (see HELPER_PACKAGES); print what and why."""
    missing = missing_packages()
    if not missing:
        print("The helpers' other packages are installed: nothing to do.")
        return None
    plan = InstallPlan([python, "-m", "pip", "install", "--quiet", *missing], reason="the helpers import them")
    print(f"Installing {', '.join(missing)} ({plan.reason}).\n$ {plan.shell()}", flush=True)
    if run:
        start = time.monotonic()
        _run_plan(plan)
        _done(plan, start)
    return plan


def _done(plan: InstallPlan, start: float) -> None:
    took = f"Done in {time.monotonic() - start:.0f} s ({plan.reason})."
    if plan.restart_needed:
        took += " Restart the kernel (Runtime > Restart session in Colab), then run the notebook again."
    print(took, flush=True)


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
