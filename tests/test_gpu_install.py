"""GPU detection from nvidia-smi outputs of real cards (T4, A100, H100, none), the layer arithmetic with the
real Llama 2 7B/13B figures, and the install command built for each case."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.catalogue import ARCHITECTURE, GB, get_model
from helpers.gpu import COMPUTE_BUFFER_BYTES, MARGIN_FRACTION, MiB, auto_gpu_layers, describe, detect_gpu
from helpers.install import REQUIREMENT, install_command

RECORDED = Path(__file__).parent / "nvidia_smi"


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """Put an `nvidia-smi` on PATH that answers like the given card did."""

    def install(card):
        script = tmp_path / "nvidia-smi"
        if card == "none":
            body = f"cat {RECORDED / 'none.txt'}; exit 6"
        else:
            body = f'case "$1" in --query-gpu=*) cat {RECORDED / (card + ".csv")};; *) cat {RECORDED / (card + ".txt")};; esac'
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    return install


@pytest.mark.parametrize(
    "card,name,total_mib,cap,cuda",
    [
        ("t4", "Tesla T4", 15360, "7.5", "12.2"),
        ("a100", "NVIDIA A100-SXM4-40GB", 40960, "8.0", "12.2"),
        ("h100", "NVIDIA H100 80GB HBM3", 81559, "9.0", "12.4"),
    ],
)
def test_detect_gpu_from_recorded_outputs(fake_nvidia_smi, card, name, total_mib, cap, cuda):
    fake_nvidia_smi(card)
    gpu = detect_gpu()
    assert (gpu.name, gpu.total_bytes, gpu.compute_capability, gpu.cuda_version) == (name, total_mib * MiB, cap, cuda)
    assert gpu.free_bytes < gpu.total_bytes
    assert gpu.llama_cpp_offload is False  # this machine's build is CPU-only
    assert "CPU-only build" in describe(gpu)


def test_no_gpu(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi("none")
    assert detect_gpu() is None
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_gpu() is None
    assert "No NVIDIA GPU" in describe(None)


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
    layers = auto_gpu_layers(
        model_bytes=size,
        n_layers=n_layers,
        kv_bytes_per_token=kv_per_token,
        n_ctx=4096,
        free_bytes=free * MiB,
        total_bytes=total * MiB,
    )
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


# --- the install command -----------------------------------------------------------------------


def gpu_with(offload, card="t4", fake=None):
    fake(card)
    gpu = detect_gpu()
    return gpu.__class__(**{**gpu.__dict__, "llama_cpp_offload": offload})


def test_cpu_machine(fake_nvidia_smi):
    plan = install_command(None, installed=False, python="py")
    assert plan.argv == ["py", "-m", "pip", "install", REQUIREMENT]
    assert "-DLLAVA_BUILD=OFF" in plan.env["CMAKE_ARGS"] and "GGML_CUDA" not in plan.env["CMAKE_ARGS"]
    assert plan.env["CMAKE_BUILD_PARALLEL_LEVEL"] == str(os.cpu_count())
    assert install_command(None, installed=True) is None


@pytest.mark.parametrize("card,arch", [("t4", "75"), ("a100", "80"), ("h100", "90")])
def test_gpu_machine_builds_cuda_for_its_compute_capability(fake_nvidia_smi, card, arch):
    gpu = gpu_with(None, card, fake_nvidia_smi)
    plan = install_command(gpu, installed=False, python="py")
    assert "-DGGML_CUDA=on" in plan.env["CMAKE_ARGS"]
    assert f"-DCMAKE_CUDA_ARCHITECTURES={arch}" in plan.env["CMAKE_ARGS"]
    assert "--no-cache-dir" in plan.argv and "--force-reinstall" not in plan.argv
    assert not plan.restart_needed


def test_cpu_build_on_gpu_machine_is_replaced(fake_nvidia_smi):
    plan = install_command(gpu_with(False, fake=fake_nvidia_smi), installed=True, python="py")
    assert {"--force-reinstall", "--no-deps", "--no-cache-dir"} <= set(plan.argv)
    assert plan.restart_needed and "replacing the CPU-only build" in plan.reason
    assert not any("ipywidgets" in part for part in plan.argv)


def test_cuda_build_already_there(fake_nvidia_smi):
    assert install_command(gpu_with(True, fake=fake_nvidia_smi), installed=True) is None


def test_install_step_reports_nothing_to_do_here():
    # Runs the real helper, as the notebook's install cell does, in this CPU-only environment.
    code = "from helpers.install import ensure_llama_cpp; ensure_llama_cpp(run=False)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PATH": "/usr/bin:/bin"},
    )
    assert "nothing to do" in out.stdout


def test_the_installed_build_has_what_install_py_asked_for():
    """The library in this environment was built by `make` through helpers.install: no multimodal
    library, and no AMX tile instructions (they SIGILL on this machine)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    assert not list(lib.glob("libmtmd*")) and list(lib.glob("libllama.so*"))
    if shutil.which("objdump") and os.uname().machine == "x86_64":
        disassembly = subprocess.run(
            ["objdump", "-d", str(next(lib.glob("libggml-cpu.so*")))], capture_output=True, text=True, check=True
        ).stdout
        assert "tilezero" not in disassembly and "tdpbssd" not in disassembly


# --- on a real GPU only ------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_offloads_every_layer_of_the_small_model(smol_path):
    from helpers.generation import generate
    from helpers.loading import load_model
    from helpers.settings import GenerationSettings

    llm = load_model(smol_path, n_ctx=2048)
    assert llm.gpu_layers == 31
    result = generate(llm, "Tell me about GPUs.", GenerationSettings(max_tokens=64, seed=1))
    print(f"GPU: {result.stats.line()}")
    assert result.stats.tokens_per_second > 100
