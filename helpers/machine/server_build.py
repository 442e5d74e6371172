"""Build llama.cpp's `llama-server` from the source that the pinned llama-cpp-python release vendors.

Same kernels and build settings as the bindings (helpers/machine/install.py): a Release build with llama.cpp's
defaults (`-march=native`), no AMX (llama_cpp_build.cmake), CUDA for the detected GPU when there is one.
The differences: llama.cpp's "common" utilities are built (the server needs them, the bindings skip them),
and everything is linked statically, so the one file `.venv/bin/llama-server` is the whole server. No web
UI assets are downloaded (`LLAMA_USE_PREBUILT_UI=OFF`: the helpers need the HTTP API only), no HTTPS.

Built once: a stamp beside the binary records the version and the CMake flags; a later run with the same
ones does nothing. Standard library only (plus helpers.machine.gpu and helpers.machine.install, which are too).

Usage: python -m helpers.machine.server_build [--jobs N] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from helpers.machine.gpu import GPUInfo, detect_gpu
from helpers.machine.install import LLAMA_CPP_VERSION, REQUIREMENT

BUILD_HOOK = Path(__file__).with_name("llama_server_build.cmake")
VENDOR = "vendor/llama.cpp/"


def server_cmake_args(gpu: GPUInfo | None) -> list[str]:
    """The CMake flags for llama-server: the bindings' settings, the server on, everything else off."""
    args = [
        "-DCMAKE_BUILD_TYPE=Release",  # scikit-build-core's default for the bindings
        "-DBUILD_SHARED_LIBS=OFF",
        f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={BUILD_HOOK}",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI from the Hugging Face Hub
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_CURL=OFF",
    ]
    if gpu is not None:
        args += ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={gpu.cuda_arch}"]
    return args


def default_bin_dir() -> Path:
    """The virtual environment's bin folder (where `python -m helpers.machine.server_build` runs from)."""
    return Path(sys.prefix) / "bin"


def fetch_source(dest: Path, python: str = sys.executable) -> Path:
    """vendor/llama.cpp from the llama-cpp-python sdist (pip's cache makes a second download free)."""
    source = dest / f"llama.cpp-{LLAMA_CPP_VERSION}"
    if (source / "CMakeLists.txt").exists():
        return source
    with tempfile.TemporaryDirectory() as tmp:
        pip = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        subprocess.run([*pip, REQUIREMENT], check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        part = Path(tempfile.mkdtemp(dir=dest, prefix=".part-"))
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[-1]
                if inner.startswith(VENDOR) and (member.isfile() or member.isdir()):
                    member.name = inner[len(VENDOR) :]
                    tar.extract(member, part, filter="data")
        part.replace(source)  # never leave a half-extracted tree under the final name
    return source


def cache_matches(build: Path, source: Path) -> bool:
    """Whether CMake can reuse the build folder for this source: no cache yet, or one made for this source
    in this folder (CMakeCache.txt's CMAKE_HOME_DIRECTORY and CMAKE_CACHEFILE_DIR)."""
    cache = build / "CMakeCache.txt"
    if not cache.exists():
        return True
    text = cache.read_text(encoding="utf-8", errors="replace")
    found = dict(re.findall(r"^(CMAKE_HOME_DIRECTORY|CMAKE_CACHEFILE_DIR):INTERNAL=(.*)$", text, re.M))
    wanted = {"CMAKE_HOME_DIRECTORY": source, "CMAKE_CACHEFILE_DIR": build}
    return all(key in found and Path(found[key]).resolve() == path.resolve() for key, path in wanted.items())


def start_afresh(build: Path, source: Path, built_before: dict | None, wanted: dict) -> bool:
    """Whether the build folder must go: made from another version's source (a new pin) or at another path
    (a moved checkout), which CMake refuses; or last built with other settings (CUDA then, none now), whose
    options its cache would keep."""
    if not build.exists():
        return False
    return not cache_matches(build, source) or (built_before is not None and built_before != wanted)


def build_server(*, bin_dir: Path | None = None, jobs: int | None = None, force: bool = False) -> Path:
    """Build (or reuse) llama-server; returns the path of the installed binary."""
    bin_dir = bin_dir or default_bin_dir()
    target = bin_dir / "llama-server"
    stamp = bin_dir / ".llama-server.json"
    args = server_cmake_args(detect_gpu(check_offload=False))
    wanted = {"version": LLAMA_CPP_VERSION, "cmake_args": args}
    if not force and target.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        print(f"{target} is built from llama-cpp-python {LLAMA_CPP_VERSION}'s llama.cpp: nothing to do.")
        return target
    work = bin_dir.parent / "src"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    source = fetch_source(work)
    build = work / "llama-server-build"
    if start_afresh(build, source, json.loads(stamp.read_text()) if stamp.exists() else None, wanted):
        shutil.rmtree(build)
        stamp.unlink(missing_ok=True)  # an interrupted rebuild then resumes instead of starting afresh again
    # The other versions' sources and half-extracted ones go too.
    for old in [*work.glob("llama.cpp-*"), *work.glob(".part-*")]:
        if old != source:
            shutil.rmtree(old, ignore_errors=True)
    jobs = jobs or os.cpu_count() or 1
    print(f"Building llama-server from {source} with {jobs} jobs (a few minutes).", flush=True)
    subprocess.run(["cmake", "-S", source, "-B", build, *args, *_generator()], check=True)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", str(jobs)], check=True)
    built = build / "bin" / "llama-server"
    part = target.with_name(".llama-server.part")
    shutil.copy2(built, part)
    part.replace(target)
    stamp.write_text(json.dumps(wanted))
    print(f"Installed {target} in {time.monotonic() - started:.0f} s.")
    return target


def _generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.machine.server_build", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    options = parser.parse_args(argv)
    try:
        build_server(jobs=options.jobs, force=options.force)
    except subprocess.CalledProcessError as error:
        print(f"The llama-server build failed (exit {error.returncode}); the log is above.", file=sys.stderr)
        return error.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
