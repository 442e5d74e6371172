"""The whole notebook executed headless with the offline model, in a kernel like today's Jupyter
(ipykernel 7, ipywidgets 8) and one like Colab's (ipykernel 6, ipywidgets 7.7.1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.demo import printed, run_notebook
from helpers.generation import generate
from helpers.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "llama2_textgen.ipynb"
COLAB_KERNEL = ROOT / "tests" / "data" / "colab-kernel"  # `make test` installs ipykernel 6 + ipywidgets 7.7.1 here


@pytest.fixture(params=["jupyter", "colab"])
def kernel(request, monkeypatch):
    if request.param == "colab":
        if not COLAB_KERNEL.is_dir():
            pytest.fail(f"{COLAB_KERNEL} is missing: run `make test`, which installs it.")
        monkeypatch.setenv("PYTHONPATH", str(COLAB_KERNEL))
    return request.param


def test_notebook_runs_top_to_bottom(kernel, smol):
    versions = "import ipykernel, ipywidgets; print(ipykernel.__version__, ipywidgets.__version__)"
    # After Run All (the quantization section included) the chat model is loaded and the panel answers.
    chat = (
        "panel = helpers.ui.live_panel(model)\n"
        "panel.prompt.value = 'Say hi.'\n"
        "panel.generate_button.click()\n"
        "panel.wait(300)\n"
        "print(model.closed, [m['role'] for m in panel.history], panel.controls['max_tokens'].value, panel.seed.value)"
    )
    # The measured quantization section runs once (it takes about a minute), in the Jupyter kernel.
    parameters = {"OFFLINE": True, "MAX_TOKENS": 40, "SEED": 7, "COMPARE_QUANTIZATIONS": kernel == "jupyter"}
    parameters["INSTALL"] = False  # never replace the test environment's llama-cpp-python (a GPU host's plan may)
    nb = run_notebook(NOTEBOOK, parameters, extra_cells=[chat, versions])
    kernel_version, widgets_version = printed_by(nb.cells[-1]).split()
    if kernel == "colab":
        assert (kernel_version[0], widgets_version) == ("6", "7.7.1")
    else:
        assert (kernel_version[0], widgets_version[0]) == ("7", "8")

    # The streamed answer is exactly what the generation core gives for the same settings.
    system = nb_parameter(nb, "SYSTEM_PROMPT")
    prompt = nb_parameter(nb, "PROMPT")
    expected = generate(
        smol,
        [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        GenerationSettings(max_tokens=40, seed=7, cache_prompt=False),
    )
    out = printed(nb, "demo")
    assert expected.text in out and "tokens/s" in out
    assert printed_by(nb.cells[-2]).strip() == "False ['user', 'assistant'] 40 7"
    # The chat panel rendered as a widget, after a line for a saved copy opened without its kernel.
    panel = [c for c in nb.cells if "build_ui" in c.source][0]
    assert len(panel.outputs) == 2
    assert "Run the cells" in panel.outputs[0]["data"]["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in panel.outputs[1]["data"]
    if kernel == "jupyter":
        (quant,) = [c for c in nb.cells if "compare_quantizations" in c.source]
        html = "".join(o.get("data", {}).get("text/html", "") for o in quant.outputs)
        for kind in ("Q4_1", "F32", "Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"):
            assert f"SmolLM2-135M-Instruct.{kind}.gguf" in html
        assert any("image/png" in o.get("data", {}) for o in quant.outputs)


def printed_by(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def nb_parameter(nb, name):
    namespace = {}
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            exec(cell.source, namespace)
    return namespace[name]


def test_make_demo_falls_back_to_the_offline_model_with_one_line():
    env = os.environ | {"HF_ENDPOINT": "http://127.0.0.1:9"}  # a Hub that cannot be reached
    done = subprocess.run(
        [sys.executable, "-m", "helpers.demo", str(NOTEBOOK), "MAX_TOKENS=24", "COMPARE_QUANTIZATIONS=False"]
        + ["INSTALL=False"],  # never replace the test environment's llama-cpp-python
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    notices = [line for line in lines if "cannot be reached" in line]
    assert len(notices) == 1 and "offline model" in notices[0]
    assert "tokens/s" in lines[-1]
    assert len(" ".join(lines[2:-1]).split()) >= 5  # a real answer between the notice/path and the stats
