"""GPU detection from nvidia-smi outputs (T4, A100, H100, Colab's T4 on driver 580, two cards, [N/A] fields,
MIG devices, none), Apple Silicon with the platform faked, the layer arithmetic with the real Llama 2
figures, the install plan for each machine, and the prebuilt-wheel path run with the real pip against a
local wheel index.

Nothing here asserts which backend this machine's llama-cpp-python was built with: where the answer
depends on it, the test asks the build itself (`llama_supports_gpu_offload`)."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from helpers.files.catalogue import ARCHITECTURE, GB, get_model
from helpers.machine.advice import catalogue_gpu_layers
from helpers.machine.gpu import (
    COMPUTE_BUFFER_BYTES,
    MARGIN_FRACTION,
    GiB,
    MiB,
    auto_gpu_layers,
    describe_gpu,
    detect_gpu,
    detect_gpus,
)
from helpers.machine.install import (
    LLAMA_CPP_VERSION,
    REQUIREMENT,
    ensure_llama_cpp,
    install_command,
    wheel_command,
    wheel_variant,
)
from tests.support.wheel_index import WheelIndex, fake_wheel, write_index

RECORDED = (
    Path(__file__).resolve().parents[1] / "support" / "nvidia_smi"
)  # recorded outputs and the stand-in `nvidia-smi` that replays them
LINUX = ("Linux", "x86_64")
MAC = ("Darwin", "arm64")


def this_build_offloads() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@pytest.fixture
def fake_nvidia_smi(monkeypatch):
    """Put the stand-in `nvidia-smi` first on PATH, answering as the given recorded card."""

    def install(card):
        monkeypatch.setenv("NVIDIA_SMI_CARD", card)
        monkeypatch.setenv("PATH", f"{RECORDED}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    return install


def recorded_rows(card):
    """The recorded CSV read plainly: [(index, name, total MiB, free MiB or None), ...]."""
    rows = []
    for line in (RECORDED / f"{card}.csv").read_text().splitlines():
        index, _uuid, name, total, free, *_ = (part.strip() for part in line.split(","))
        rows.append((index, name, int(total), None if free == "[N/A]" else int(free)))
    return rows


@pytest.mark.parametrize(
    "card,name,total_mib,cap,cuda",
    [
        ("t4", "Tesla T4", 15360, "7.5", "12.2"),
        ("a100", "NVIDIA A100-SXM4-40GB", 40960, "8.0", "12.2"),
        ("h100", "NVIDIA H100 80GB HBM3", 81559, "9.0", "12.4"),
        ("colab-t4", "Tesla T4", 15360, "7.5", "13.0"),
    ],
)
def test_detect_gpu_from_recorded_outputs(fake_nvidia_smi, card, name, total_mib, cap, cuda):
    fake_nvidia_smi(card)
    gpu = detect_gpu()
    assert (gpu.name, gpu.total_bytes, gpu.compute_capability, gpu.cuda_version) == (name, total_mib * MiB, cap, cuda)
    assert gpu.free_bytes == recorded_rows(card)[0][3] * MiB < gpu.total_bytes
    assert gpu.backend == "cuda" and gpu.uuid.startswith("GPU-")
    assert gpu.llama_cpp_offload is this_build_offloads()  # asked in a child process, so checked against this one
    assert ("CPU-only build" in describe_gpu(gpu)) is not this_build_offloads()


def test_na_fields_do_not_break_detection(fake_nvidia_smi):
    fake_nvidia_smi("na")  # free memory and compute capability reported as [N/A]
    gpu = detect_gpu(check_offload=False)
    assert gpu.name == "NVIDIA A10G" and gpu.total_bytes == 23028 * MiB
    assert gpu.free_bytes == gpu.total_bytes and not gpu.free_reported
    assert gpu.compute_capability == "" and gpu.cuda_arch == "native"
    assert "not reported" in describe_gpu(gpu)
    plan = install_command(gpu, installed=False, python="py")
    assert "-DCMAKE_CUDA_ARCHITECTURES=native" in plan.env["CMAKE_ARGS"]


def test_several_gpus_all_reported_most_free_used(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi("two")
    rows = recorded_rows("two")
    gpus = detect_gpus(check_offload=False)
    assert [(g.index, g.name, g.total_bytes, g.free_bytes) for g in gpus] == [
        (i, n, t * MiB, f * MiB) for i, n, t, f in rows
    ]
    most_free = max(rows, key=lambda row: row[3])
    assert detect_gpu(check_offload=False).name == most_free[1]
    text = describe_gpu(detect_gpu(check_offload=False), gpus)
    assert all(name in text for _, name, _, _ in rows)

    # CUDA_VISIBLE_DEVICES: by index, by UUID prefix, several, none.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert detect_gpu(check_offload=False).name == rows[0][1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus[0].uuid[:12])
    assert detect_gpu(check_offload=False).name == rows[0][1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert detect_gpu(check_offload=False).name == most_free[1]
    for hidden in ("", "-1", "7"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert detect_gpu(check_offload=False) is None


def test_mig_devices_replace_their_gpu(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi("mig")  # an A100 40GB split into two 3g.20gb devices, the first one in use
    gpus = detect_gpus(check_offload=False)
    assert [(g.index, g.total_bytes, g.free_bytes) for g in gpus] == [
        ("0:0", 19968 * MiB, (19968 - 9826) * MiB),
        ("0:1", 19968 * MiB, (19968 - 13) * MiB),
    ]
    assert all("MIG 3g.20gb" in g.name and g.uuid.startswith("MIG-") and g.cuda_arch == "80" for g in gpus)
    # A CUDA process sees one MIG device: the first visible, not the emptiest.
    assert detect_gpu(check_offload=False).index == "0:0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus[1].uuid)
    assert detect_gpu(check_offload=False).index == "0:1"


def test_no_gpu(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi("none")
    assert detect_gpu() is None and detect_gpus() == []
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_gpu() is None
    assert "No NVIDIA GPU" in describe_gpu(None)


# --- Apple Silicon, with the platform faked (not run on a Mac) -------------------------------------


@pytest.fixture
def fake_mac(tmp_path, monkeypatch):
    """sysctl / vm_stat / sw_vers answering like a Mac with `ram_gib` of RAM and `available_gib` free;
    no working nvidia-smi."""

    def install(ram_gib, available_gib, wired_limit_mb=0):
        page = 16384
        answers = {
            "sysctl": f'case "$2" in hw.memsize) echo {ram_gib * GiB};; iogpu.wired_limit_mb) echo {wired_limit_mb};; '
            '*) echo "Apple M1 Pro";; esac',
            "vm_stat": "cat <<'EOF'\n"
            + textwrap.dedent(
                f"""\
                Mach Virtual Memory Statistics: (page size of {page} bytes)
                Pages free:                               {available_gib * GiB // page // 2}.
                Pages active:                             123456.
                Pages inactive:                           {available_gib * GiB // page // 4}.
                Pages speculative:                        {available_gib * GiB // page // 4}.
                Pages wired down:                         65432.
                """
            )
            + "EOF",
            "sw_vers": "echo 15.1",
            "nvidia-smi": "exit 9",  # a Mac has none; this hides a real one on a GPU host
        }
        for name, body in answers.items():
            script = tmp_path / name
            script.write_text(f"#!/bin/sh\n{body}\n")
            script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin")

    return install


def test_apple_silicon_reports_metal_with_unified_memory(fake_mac):
    fake_mac(ram_gib=16, available_gib=9)
    gpu = detect_gpu(check_offload=False, system=MAC)
    assert gpu.backend == "metal" and "Metal" in gpu.name
    assert gpu.total_bytes == 16 * GiB * 2 // 3  # Metal's working-set limit on a Mac with <= 36 GB
    assert gpu.free_bytes == 9 * GiB  # less than the limit: what macOS can hand out now
    assert "unified memory" in describe_gpu(replace(gpu, llama_cpp_offload=True))
    # The same tools on Linux are not a Metal GPU.
    assert detect_gpu(check_offload=False, system=LINUX) is None
    # A raised limit (sudo sysctl iogpu.wired_limit_mb=14336) is what Metal then allows.
    fake_mac(ram_gib=16, available_gib=15, wired_limit_mb=14336)
    assert detect_gpu(check_offload=False, system=MAC).total_bytes == 14336 * MiB


def test_apple_silicon_auto_layers_fill_unified_memory(fake_mac):
    n_layers, kv_per_token = ARCHITECTURE["llama-2-7b-chat"]
    size = int(get_model("llama-2-7b-chat", "Q4_K_M").size_gb * GB)
    for ram, available, everything in ((16, 14, True), (8, 7, False)):
        fake_mac(ram_gib=ram, available_gib=available)
        gpu = detect_gpu(check_offload=False, system=MAC)
        layers = auto_gpu_layers(
            model_bytes=size,
            n_layers=n_layers,
            kv_bytes_per_token=kv_per_token,
            n_ctx=4096,
            free_bytes=gpu.free_bytes,
            total_bytes=gpu.total_bytes,
        )
        room = gpu.free_bytes - COMPUTE_BUFFER_BYTES - MARGIN_FRACTION * gpu.total_bytes
        if everything:  # 16 GB Mac: 4.08 GB + 2 GiB of KV cache fit in the 10.7 GiB Metal may use
            assert size + kv_per_token * 4096 <= room and layers == n_layers + 1
        else:  # 8 GB Mac: 5.3 GiB for Metal, part of the layers
            per_layer = size / (n_layers + 1) + kv_per_token * 4096 / n_layers
            assert 0 < layers < n_layers and layers * per_layer <= room < (layers + 1) * per_layer


def test_install_plan_on_apple_silicon_is_the_default_metal_build():
    plan = install_command(None, installed=False, python="py", system=MAC)
    assert plan.argv == ["py", "-m", "pip", "install", REQUIREMENT]
    cmake = plan.env["CMAKE_ARGS"]
    assert "-DLLAVA_BUILD=OFF" in cmake
    for flag in ("CUDA", "AVX", "AMX", "march", "x86"):
        assert flag not in cmake.replace("llama_cpp_build.cmake", "")
    assert "Metal" in plan.reason
    metal = GPUInfoLike(backend="metal", offload=True)
    assert install_command(metal, installed=True, system=MAC) is None
    replacing = install_command(GPUInfoLike(backend="metal", offload=False), installed=True, python="py", system=MAC)
    assert {"--force-reinstall", "--no-deps", "--no-cache-dir"} <= set(replacing.argv)
    assert not replacing.restart_needed  # llama_cpp was not imported here
    imported = install_command(GPUInfoLike(backend="metal", offload=False), installed=True, imported=True, system=MAC)
    assert imported.restart_needed


def GPUInfoLike(*, backend="cuda", offload=None, cuda="12.2", cap="7.5", name="Tesla T4"):
    from helpers.machine.gpu import GPUInfo

    return GPUInfo(name, 15360 * MiB, 15101 * MiB, "535.104.05", cuda, cap, offload, backend=backend)


# --- how many layers fit: checked against the definition, with the real model figures -------------


def budget(total_mib, free_mib):
    return free_mib * MiB - COMPUTE_BUFFER_BYTES - MARGIN_FRACTION * total_mib * MiB


CARDS = {"t4": (15360, 15101), "a100": (40960, 40339), "h100": (81559, 81001), "8gb": (8192, 7800)}


@pytest.mark.parametrize("card", list(CARDS))
@pytest.mark.parametrize("model", ["llama-2-7b-chat", "llama-2-13b-chat"])
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0"])
def test_auto_layers_fill_the_card_and_no_more(card, model, quant):
    total, free = CARDS[card]
    n_layers, kv_per_token = ARCHITECTURE[model]
    size = int(get_model(model, quant).size_gb * GB)
    layers = catalogue_gpu_layers(model, quant, free_bytes=free * MiB, total_bytes=total * MiB)
    whole = size + kv_per_token * 4096
    if whole <= budget(total, free):
        assert layers == n_layers + 1  # everything, the output layer included
    else:
        per_layer = size / (n_layers + 1) + kv_per_token * 4096 / n_layers
        assert layers * per_layer <= budget(total, free) < (layers + 1) * per_layer


def test_known_fits():
    # Llama 2 7B Q4_K_M (4.08 GB + 2 GiB KV at 4096) fits a free Colab T4 entirely; 13B Q8_0 (13.83 GB) does not.
    t4 = dict(free_bytes=15101 * MiB, total_bytes=15360 * MiB, n_ctx=4096)
    assert auto_gpu_layers(model_bytes=4_081_004_224, n_layers=32, kv_bytes_per_token=512 * 1024, **t4) == 33
    assert 0 < auto_gpu_layers(model_bytes=int(13.83 * GB), n_layers=40, kv_bytes_per_token=800 * 1024, **t4) < 40
    assert (
        auto_gpu_layers(
            model_bytes=int(4.08 * GB), n_layers=32, kv_bytes_per_token=512 * 1024, **t4 | {"free_bytes": 0}
        )
        == 0
    )


# --- the source-build plan -----------------------------------------------------------------------


def gpu_with(offload, card="t4", fake=None):
    fake(card)
    return replace(detect_gpu(check_offload=False), llama_cpp_offload=offload)


def test_cpu_machine():
    plan = install_command(None, installed=False, python="py", system=LINUX)
    assert plan.argv == ["py", "-m", "pip", "install", REQUIREMENT]
    assert "-DLLAVA_BUILD=OFF" in plan.env["CMAKE_ARGS"] and "GGML_CUDA" not in plan.env["CMAKE_ARGS"]
    assert plan.env["CMAKE_BUILD_PARALLEL_LEVEL"] == str(os.cpu_count())
    assert install_command(None, installed=True, system=LINUX) is None


@pytest.mark.parametrize("card,arch", [("t4", "75"), ("a100", "80"), ("h100", "90")])
def test_gpu_machine_builds_cuda_for_its_compute_capability(fake_nvidia_smi, card, arch):
    gpu = gpu_with(None, card, fake_nvidia_smi)
    plan = install_command(gpu, installed=False, python="py")
    assert "-DGGML_CUDA=on" in plan.env["CMAKE_ARGS"]
    assert f"-DCMAKE_CUDA_ARCHITECTURES={arch}" in plan.env["CMAKE_ARGS"]
    assert "--no-cache-dir" in plan.argv and "--force-reinstall" not in plan.argv
    assert not plan.restart_needed


def test_cpu_build_on_gpu_machine_is_replaced(fake_nvidia_smi):
    plan = install_command(gpu_with(False, fake=fake_nvidia_smi), installed=True, python="py", imported=True)
    assert {"--force-reinstall", "--no-deps", "--no-cache-dir"} <= set(plan.argv)
    assert plan.restart_needed and "replacing the CPU-only build" in plan.reason
    assert not any("ipywidgets" in part for part in plan.argv)


def test_cuda_build_already_there(fake_nvidia_smi):
    assert install_command(gpu_with(True, fake=fake_nvidia_smi), installed=True) is None


def test_install_step_reports_nothing_to_do_here():
    # Runs the real helper, as the notebook's install cell does, on this machine (no stand-in on PATH): the
    # build installed here is the one this machine needs, whichever it is.
    code = "from helpers.machine.install import ensure_llama_cpp; ensure_llama_cpp(run=False)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PATH": "/usr/bin:/bin"},
    )
    assert "nothing to do" in out.stdout


def installed_wheel_tag() -> str:
    from importlib.metadata import distribution

    wheel = distribution("llama-cpp-python").read_text("WHEEL") or ""
    return " ".join(line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:"))


def test_the_installed_build_has_what_install_py_asked_for():
    """A build made here by helpers.machine.install from source: no multimodal library, and no AMX tile
    instructions (they SIGILL on this project's build machine). A prebuilt wheel from the index is not ours."""
    if "manylinux" in installed_wheel_tag() or "macosx" in installed_wheel_tag():
        pytest.skip(
            f"llama-cpp-python is a prebuilt wheel ({installed_wheel_tag()}), not built by helpers.machine.install"
        )
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    assert not list(lib.glob("libmtmd*")) and list(lib.glob("libllama.so*"))
    if shutil.which("objdump") and os.uname().machine == "x86_64":
        disassembly = subprocess.run(
            ["objdump", "-d", str(next(lib.glob("libggml-cpu.so*")))], capture_output=True, text=True, check=True
        ).stdout
        assert "tilezero" not in disassembly and "tdpbssd" not in disassembly


# --- prebuilt CUDA wheels: which variant -------------------------------------------------------------


@pytest.mark.parametrize(
    "driver_cuda,cap,runtimes,system,expected",
    [
        ("13.0", "7.5", {12}, LINUX, "cu125"),  # Colab: driver 580, CUDA 12.8 toolkit -> newest 12.x wheel
        ("13.0", "7.5", set(), LINUX, "cu130"),  # no toolkit found: what the driver runs
        ("13.2", "9.0", {13}, LINUX, "cu132"),
        ("12.2", "7.5", {12}, LINUX, "cu122"),  # a driver runs its CUDA version and older
        ("12.8", "8.0", {12, 13}, LINUX, "cu125"),  # there is no cu126-cu129
        ("13.0", "7.0", set(), LINUX, "cu125"),  # V100: CUDA 13 wheels have no code for it
        ("12.0", "7.5", {12}, LINUX, None),  # older than every 12.x wheel
        ("11.8", "7.5", {11}, LINUX, "cu118"),
        ("11.8", "9.0", {11}, LINUX, None),  # H100 on a CUDA 11.8 driver: the 11.8 wheels stop at 8.9
        ("12.4", "9.0", {11, 12}, LINUX, "cu124"),
        ("12.8", "12.0", {12}, LINUX, "cu125"),  # Blackwell: compiles the wheels' 9.0 PTX when loading
        ("12.4", "5.2", {12}, LINUX, None),  # Maxwell (M60): no wheel has code for it
        ("12.4", "8.9", {12}, ("Linux", "aarch64"), None),  # GH200 and Jetson: no wheels
        ("12.4", "8.9", {12}, MAC, None),
        (None, "7.5", {12}, LINUX, None),
    ],
)
def test_wheel_variant(driver_cuda, cap, runtimes, system, expected):
    variant, why = wheel_variant(GPUInfoLike(cuda=driver_cuda, cap=cap), runtime_majors=runtimes, system=system)
    assert variant == expected and why


def test_wheel_variant_says_which_condition_ruled_the_wheels_out():
    def why(driver_cuda, cap, runtimes):
        return wheel_variant(GPUInfoLike(cuda=driver_cuda, cap=cap), runtime_majors=runtimes, system=LINUX)[1]

    assert why("11.4", "7.5", {11}) == "the driver supports CUDA 11.4, older than every wheel variant"
    assert why("12.0", "7.5", {12}) == "no wheel for the CUDA runtime here (CUDA 12) runs on a driver for CUDA 12.0"
    assert why("12.2", "7.5", {13}).endswith(
        "(CUDA 13) runs on a driver for CUDA 12.2 (newer than the driver: update the driver, or the build will not run)"
    )
    assert "newer" not in why("13.0", "7.5", {11})  # an old toolkit: the driver runs it
    assert why("12.4", "5.2", {12}) == "no wheel it can use has code for compute capability 5.2"
    assert "9.0 PTX" in why("12.8", "12.0", {12}) and "9.0 PTX" not in why("12.8", "9.0", {12})


def test_wheel_command_is_wheels_only():
    plan = wheel_command(GPUInfoLike(), "cu125", installed=False, python="py", index="http://i/whl")
    assert plan.argv[:5] == ["py", "-m", "pip", "install", REQUIREMENT]
    assert "--only-binary=llama-cpp-python" in plan.argv
    assert plan.argv[plan.argv.index("--extra-index-url") + 1] == "http://i/whl/cu125"
    assert plan.kind == "wheel" and not plan.env  # nothing for CMake: nothing is built
    replacing = wheel_command(GPUInfoLike(offload=False), "cu125", installed=True, python="py", imported=True)
    assert {"--force-reinstall", "--no-deps"} <= set(replacing.argv) and replacing.restart_needed
    assert not wheel_command(GPUInfoLike(offload=False), "cu125", installed=True, python="py").restart_needed


# --- prebuilt CUDA wheels: the real pip against a local wheel index ------------------------------


@pytest.fixture(scope="module")
def venv_with_pip(tmp_path_factory):
    """An empty virtual environment with pip (made once: about 5 s), copied for each test."""
    path = tmp_path_factory.mktemp("venv") / "template"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


@pytest.fixture
def target(venv_with_pip, tmp_path, monkeypatch):
    """A fresh environment to install into, and a pip that only sees 127.0.0.1 (no PyPI, no pip.conf)."""
    copy = tmp_path / "venv"
    shutil.copytree(venv_with_pip, copy, symlinks=True)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return str(copy / "bin" / "python")


def run_install(python, index, capsys, gpu=None):
    """ensure_llama_cpp on a Colab-like T4 (driver CUDA 13.0, CUDA 12 toolkit) with this index. Its source
    build is pointed at the same local server (PIP_INDEX_URL), which has no source distribution: a fallback
    to the source build shows as pip failing to find one, in seconds, instead of building llama.cpp."""
    gpu = gpu or GPUInfoLike(cuda="13.0")
    try:
        plan = ensure_llama_cpp(gpu, python=python, index=index, system=LINUX, runtime_majors={12})
        error = None
    except subprocess.CalledProcessError as failed:
        plan, error = None, failed
    return plan, error, capsys.readouterr().out


def offload_in(python):
    code = "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_supports_gpu_offload())"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.split()


def test_good_wheel_is_installed_and_checked(target, tmp_path, capsys, monkeypatch):
    write_index(tmp_path / "index", "cu125", [fake_wheel(tmp_path / "w", LLAMA_CPP_VERSION, offload=True)])
    with WheelIndex(tmp_path / "index") as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/empty/")
        plan, error, out = run_install(target, url, capsys)
    assert error is None and plan.kind == "wheel", out
    assert offload_in(target) == [LLAMA_CPP_VERSION, "True"]
    assert "prebuilt cu125 wheel" in out and "driver supports CUDA 13.0" in out
    assert "Done in" in out and "source" not in out


def test_missing_version_builds_from_source(target, tmp_path, capsys, monkeypatch):
    write_index(tmp_path / "index", "cu125", [fake_wheel(tmp_path / "w", "0.3.30", offload=True)])
    with WheelIndex(tmp_path / "index") as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/empty/")
        plan, error, out = run_install(target, url, capsys)
    assert f"no llama-cpp-python {LLAMA_CPP_VERSION} wheel" in out and "(it has 0.3.30)" in out
    assert_fell_back_to_source(error, out)
    assert offload_in(target) == []  # nothing installed


def test_wheel_that_cannot_offload_builds_from_source(target, tmp_path, capsys, monkeypatch):
    write_index(tmp_path / "index", "cu125", [fake_wheel(tmp_path / "w", LLAMA_CPP_VERSION, offload=False)])
    with WheelIndex(tmp_path / "index") as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/empty/")
        plan, error, out = run_install(target, url, capsys)
    assert "cannot offload" in out
    assert_fell_back_to_source(error, out)
    # The source build replaces the wheel that was installed, whatever pip's cache holds.
    assert {"--force-reinstall", "--no-cache-dir"} <= set(error.cmd)


def test_unreachable_index_builds_from_source_with_one_line(target, tmp_path, capsys, monkeypatch):
    with WheelIndex(tmp_path) as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/empty/")
        closed = WheelIndex(tmp_path)  # a port that was free a moment ago: nothing listens there
        closed.httpd.server_close()
        plan, error, out = run_install(target, closed.url, capsys)
    notices = [line for line in out.splitlines() if "cannot be reached" in line]
    assert len(notices) == 1 and "Building from source instead" in notices[0]
    assert_fell_back_to_source(error, out)


def install_other_version(python, tmp_path, version="0.3.30"):
    wheel = fake_wheel(tmp_path / "old", version, offload=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", str(wheel)], check=True)
    assert offload_in(python) == [version, "True"]


def test_a_local_version_label_is_the_pinned_version(target, tmp_path, capsys):
    """A wheel built as 0.3.35+cu125 satisfies pip's ==0.3.35 (PEP 440): it must not be replaced forever."""
    install_other_version(target, tmp_path, version=f"{LLAMA_CPP_VERSION}+cu125")
    assert ensure_llama_cpp(replace(GPUInfoLike(), llama_cpp_offload=True), python=target, system=LINUX) is None
    out = capsys.readouterr().out
    assert "nothing to do" in out and "replacing" not in out
    done = subprocess.run([target, "-m", "pip", "install", "--no-index", REQUIREMENT], capture_output=True, text=True)
    assert done.returncode == 0 and "already satisfied" in done.stdout  # pip agrees


def test_another_installed_version_is_replaced_by_the_pinned_wheel(target, tmp_path, capsys, monkeypatch):
    """A GPU build of another version (an older venv, a preinstalled package) is not "nothing to do"."""
    install_other_version(target, tmp_path)
    write_index(tmp_path / "index", "cu125", [fake_wheel(tmp_path / "w", LLAMA_CPP_VERSION, offload=True)])
    with WheelIndex(tmp_path / "index") as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/empty/")
        plan, error, out = run_install(target, url, capsys)
    assert error is None and plan.kind == "wheel", out
    assert f"llama-cpp-python 0.3.30 is installed; this project pins {LLAMA_CPP_VERSION}: replacing it." in out
    assert offload_in(target) == [LLAMA_CPP_VERSION, "True"]


def test_another_installed_version_on_a_cpu_machine_is_rebuilt(target, tmp_path, capsys, monkeypatch, fake_nvidia_smi):
    install_other_version(target, tmp_path)
    fake_nvidia_smi("none")
    with WheelIndex(tmp_path) as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/empty/")  # no source distribution: pip fails in seconds
        with pytest.raises(subprocess.CalledProcessError) as failed:
            ensure_llama_cpp(python=target, system=LINUX)
    out = capsys.readouterr().out
    assert "0.3.30 is installed" in out and "no NVIDIA GPU: CPU build" in out
    assert REQUIREMENT in failed.value.cmd and "-DLLAVA_BUILD=OFF" in out  # this module's build, not pip's


def test_only_binary_never_builds_the_source_distribution(target, tmp_path, monkeypatch):
    """pip with the wheel plan's flags refuses an index that has only the source distribution."""
    sdist = tmp_path / "w" / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    sdist.parent.mkdir()
    sdist.write_bytes(b"not a real source distribution: pip must never try to build it")
    write_index(tmp_path / "index", "cu125", [sdist])
    with WheelIndex(tmp_path / "index") as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/empty/")
        plan = wheel_command(GPUInfoLike(), "cu125", installed=False, python=target, index=url)
        done = subprocess.run(plan.argv, capture_output=True, text=True)
    assert done.returncode != 0 and "No matching distribution" in done.stderr
    assert "Building wheel" not in done.stdout + done.stderr


def assert_fell_back_to_source(error, out):
    assert "Building from source instead" in out
    assert error is not None, out  # the source build's pip ran (and found no source here)
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=75" in out  # for the GPU's compute capability
    assert "--only-binary=llama-cpp-python" not in error.cmd


# --- on a real GPU only ------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_offloads_every_layer_of_the_small_model(smol_path):
    from helpers.engine.loading import load_model
    from helpers.generation import generate
    from helpers.settings import GenerationSettings

    llm = load_model(smol_path, n_ctx=2048)
    assert llm.gpu_layers == 31
    result = generate(llm, "Tell me about GPUs.", GenerationSettings(max_tokens=64, seed=1))
    print(f"GPU: {result.stats.line()}")
    assert result.stats.tokens_per_second > 100


# --- the GPU check script (it needs a GPU to run; here: its syntax, its dry run, its table) -------------

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0


def test_gpu_check_dry_run_shows_every_step(tmp_path):
    env = os.environ | {
        "PATH": f"{RECORDED}{os.pathsep}{os.environ['PATH']}",
        "NVIDIA_SMI_CARD": "h100",
        "GPU_CHECK_DIR": str(tmp_path),
    }
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    steps = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert "GPU: NVIDIA H100 80GB HBM3" in done.stdout
    expected = [
        "-m helpers.install",
        "-m pytest -m gpu",
        "bench/make_llama2_gguf.py",
        "bench/scale.py",
        "gpu_table.py",
    ]
    assert [next(i for i, s in enumerate(steps) if e in s) for e in expected] == sorted(
        next(i for i, s in enumerate(steps) if e in s) for e in expected
    )
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_gpu_check_on_a_fresh_checkout_sets_up_first(tmp_path):
    env = os.environ | {
        "PATH": f"{RECORDED}{os.pathsep}{os.environ['PATH']}",
        "NVIDIA_SMI_CARD": "t4",
        "GPU_CHECK_DIR": str(tmp_path),
    }
    fresh = tmp_path / "checkout"
    for part in ("bench", "helpers"):  # what the script runs before make setup; no .venv
        shutil.copytree(ROOT / part, fresh / part, ignore=shutil.ignore_patterns("__pycache__", "*.gguf"))
    env["PYTHON"] = "/usr/bin/a-python-meant-for-something-else"  # must not reach make setup
    done = subprocess.run(
        ["bash", str(fresh / "bench" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    steps = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert steps[0] == "env -u PYTHON make setup" and steps[1] == ".venv/bin/python -m helpers.install"
    assert f"--install {tmp_path}/setup.log {tmp_path}/install.log" in steps[-1]
    # A Python named for the check that does not exist is refused, not set up over.
    env["GPU_CHECK_PYTHON"] = str(tmp_path / "no-such" / "python")
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "is not a Python here" in done.stderr


def test_gpu_check_needs_a_gpu(tmp_path):
    env = os.environ | {"PATH": f"{RECORDED}{os.pathsep}/usr/bin{os.pathsep}/bin", "NVIDIA_SMI_CARD": "none"}
    done = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "needs one" in done.stderr


def test_gpu_table_from_the_steps_output(capsys, fake_nvidia_smi):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_table import table

    from helpers.machine.install import InstallPlan, _done

    _done(InstallPlan(argv=[], reason="NVIDIA H100 80GB HBM3: prebuilt cu125 wheel", kind="wheel"), start=0.0)
    install_log = capsys.readouterr().out
    # bench/scale.py's rows, printed as it prints them.
    rows = [
        (
            "model",
            "llama2-7b-shaped.Q4_0.gguf",
            "Loaded llama2-7b-shaped.Q4_0.gguf: context 4096 tokens, all layers on the GPU.",
        ),
        ("turn 5 first token, cache on", "0.03 s", ""),
        ("turn 5 first token, cache off", "0.21 s", ""),
        ("prompt tokens/s, helpers.stream", "5123.40", "607-token prompt"),
        ("generation tokens/s, helpers.stream", "150.20", "128 tokens, median of 3"),
    ]
    width = max(len(r[0]) for r in rows)
    scale = "\n".join(f"{name:<{width}}  {value:>12}  {note}" for name, value, note in rows)
    result = dict(table(install_log, scale, "NVIDIA H100 80GB HBM3", 3_825_517_184))
    assert result["install"].startswith("NVIDIA H100 80GB HBM3: prebuilt cu125 wheel, ")
    # From a fresh checkout: make setup's install, then helpers.machine.install's second run with nothing to do.
    ensure_llama_cpp(gpu_with(True, card="h100", fake=fake_nvidia_smi), run=False)
    second_run = capsys.readouterr().out
    assert "nothing to do" in second_run
    both = dict(table(install_log + second_run, scale, "NVIDIA H100 80GB HBM3", 3_825_517_184))
    assert both["install"] == result["install"]
    replaced = install_log + "Done in 612 s (Tesla T4: CUDA build for compute capability 7.5).\n"
    assert dict(table(replaced, scale, "Tesla T4", 3_825_517_184))["install"].endswith("7.5, 612 s")
    assert result["layers offloaded"] == "all layers on the GPU"
    assert (result["prompt tokens/s"], result["generation tokens/s"]) == ("5123.40", "150.20")
    assert result["time to first token, 5th turn, cache off"] == "0.21 s"
    ceiling = 3350e9 / 3_825_517_184  # H100 SXM: 3.35 TB/s
    assert result["generation / bandwidth ceiling"].startswith(f"{150.20 / ceiling:.2f} of {ceiling:.0f} tokens/s")


def test_helper_packages_follow_requirements_and_are_found_missing_in_a_bare_python(tmp_path):
    """Colab gets only the helpers' own packages (not all of requirements.txt, which would replace its
    ipykernel): their ranges are requirements.txt's, this venv has them, and a bare Python lacks them."""
    from helpers.machine.install import HELPER_PACKAGES, missing_packages

    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    for requirement in HELPER_PACKAGES:
        assert any(line.split("#")[0].strip() == requirement for line in requirements), requirement
    assert missing_packages() == []
    assert missing_packages(("gguf>=99.0,<100",)) == ["gguf>=99.0,<100"]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], check=True)
    code = "from helpers.machine.install import ensure_helper_packages; ensure_helper_packages(run=False)"
    done = subprocess.run(
        [tmp_path / "bare/bin/python", "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr
    assert f"Installing {', '.join(HELPER_PACKAGES)}" in done.stdout and "pip install --quiet" in done.stdout
