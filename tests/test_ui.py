"""The chat panel driven in plain Python (set values, click), with the real small model."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.generation import generate
from helpers.settings import GenerationSettings
from helpers.ui import build_ui, quant_picker


@pytest.fixture
def panel(smol):
    ui = build_ui(smol, system_prompt="You are a helpful assistant.")
    p = ui.panel
    p.controls["max_tokens"].value = 40
    p.seed.value = "5"
    p.cache_prompt.value = False  # each answer comparable token for token with a fresh generate()
    return p


def answer_text(p):
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", p.answer.value))


def test_generate_streams_the_same_answer_as_the_core(panel, smol):
    panel.prompt.value = "Name three rivers."
    panel.generate_button.click()
    assert panel.generate_button.disabled and not panel.stop_button.disabled
    panel.wait(60)
    expected = generate(
        smol, panel.messages()[:1] + [{"role": "user", "content": "Name three rivers."}], panel.settings()
    )
    assert panel.history[-1]["content"] == expected.text
    assert answer_text(panel) == expected.text
    assert "tokens/s" in panel.stats.value and panel.error.value == ""
    assert not panel.generate_button.disabled and panel.stop_button.disabled


def test_answer_grows_in_batches(panel, monkeypatch):
    values = []
    panel.answer.observe(lambda change: values.append(change["new"]), names="value")
    panel.controls["max_tokens"].value = 120
    panel.prompt.value = "Write a long story about a lighthouse."
    panel.generate_button.click()
    panel.wait(120)
    tokens = panel.last_stats.completion_tokens
    assert 2 < len(values) < tokens  # several updates, fewer than one per token
    assert all(len(answer_text_of(a)) <= len(answer_text_of(b)) for a, b in zip(values[1:], values[2:]))


def answer_text_of(value):
    import re

    return re.sub(r"<[^>]+>", "", value)


def test_stop_mid_generation(panel):
    panel.controls["max_tokens"].value = 400
    panel.prompt.value = "Count from one to two hundred, in words."
    panel.generate_button.click()
    deadline = time.time() + 30
    while len(answer_text(panel)) < 20 and time.time() < deadline:
        time.sleep(0.01)
    panel.stop_button.click()
    panel.wait(30)
    assert panel.last_stats.finish_reason == "cancelled"
    assert panel.last_stats.completion_tokens < 400
    assert not panel.generate_button.disabled


def test_follow_up_uses_the_history(panel, smol):
    panel.prompt.value = "My name is Ada. Say hello."
    panel.generate_button.click()
    panel.wait(60)
    first_answer = panel.history[-1]["content"]
    assert panel.prompt.value == ""  # ready for the next prompt
    panel.prompt.value = "What is my name?"
    messages = panel.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == first_answer
    panel.generate_button.click()
    panel.wait(60)
    assert len(panel.history) == 4
    assert panel.last_stats.prompt_tokens > len(smol.tokenize(first_answer))


def test_stop_while_the_prompt_is_read(panel):
    import re

    panel.prompt.value = "Summarise: " + "The tide rises and falls twice a day along the coast. " * 140
    seen = []
    panel.stats.observe(lambda change: seen.append(change["new"]), names="value")
    panel.generate_button.click()
    deadline = time.time() + 60
    while not any(re.search(r"reading the prompt: [1-9][\d,]* / ", v) for v in seen) and time.time() < deadline:
        time.sleep(0.01)
    panel.stop_button.click()
    clicked = time.perf_counter()
    panel.wait(30)
    stats = panel.last_stats
    assert stats.finish_reason == "cancelled" and stats.completion_tokens == 0
    assert 0 < stats.prompt_read < stats.prompt_tokens  # stopped in the middle of the prompt
    assert time.perf_counter() - clicked < 5  # reading the whole prompt takes about 7 s here
    assert "stopped while reading the prompt" in panel.stats.value and "tokens/s" not in panel.stats.value
    assert panel.history == [] and panel.prompt.value.startswith("Summarise")
    assert not panel.generate_button.disabled and panel.stop_button.disabled


def test_follow_up_reports_the_prompt_cache(panel):
    panel.cache_prompt.value = True
    panel.prompt.value = "My name is Ada. Say hello."
    panel.generate_button.click()
    panel.wait(60)
    panel.prompt.value = "What is my name?"
    panel.generate_button.click()
    panel.wait(60)
    assert panel.last_stats.cached_tokens > 20 and "from cache" in panel.stats.value


def test_double_click_starts_one_generation(panel):
    panel.prompt.value = "Say something."
    started = []
    original = panel._run
    panel._run = lambda *a: (started.append(1), original(*a))
    panel.generate_button.click()
    panel.generate_button.click()
    assert panel.start() is False
    panel.wait(60)
    assert started == [1]
    assert len(panel.history) == 2


def test_invalid_setting_shows_error_and_panel_stays_usable(panel):
    panel.prompt.value = "Hello"
    panel.controls["max_tokens"].value = 0
    panel.generate_button.click()
    assert "max_tokens must be an integer in [1, 32768]" in panel.error.value
    assert not panel.generate_button.disabled and panel.thread is None
    panel.controls["max_tokens"].value = 8
    panel.generate_button.click()
    panel.wait(60)
    assert panel.error.value == "" and len(panel.history) == 2


def test_error_inside_generation_is_shown(panel):
    panel.prompt.value = "word " * 5000  # longer than the 4096-token context
    panel.generate_button.click()
    panel.wait(60)
    assert "exceeds the context" in panel.error.value
    assert not panel.generate_button.disabled and panel.history == []


def test_presets_and_clear(panel):
    panel.preset.value = "Precise"
    assert panel.settings().temperature == 0.2
    panel.preset.value = "Creative"
    assert panel.settings().temperature == 1.0
    panel.history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    panel.clear_button.click()
    assert panel.history == [] and panel.stats.value == ""


def test_settings_from_controls():
    settings = GenerationSettings(max_tokens=7, seed=3, stop=("###",), cache_prompt=False)
    p = build_ui(None, settings=settings).panel
    assert p.settings() == settings


def test_quant_picker_labels_sizes():
    picker = quant_picker("llama-2-7b-chat")
    assert picker.value == "Q4_K_M"
    assert any("4.08 GB file" in label for label, _ in picker.options)
    with pytest.raises(ValueError, match="available"):
        quant_picker("llama-2-7b-chat", "Q9")


def test_panel_on_colab_widgets():
    """Everything above again with ipywidgets 7.7.1 and ipykernel 6, as Colab has them."""
    colab = Path(__file__).parent / "data" / "colab-kernel"
    assert colab.is_dir(), "run `make test`, which installs tests/data/colab-kernel"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not on_colab_widgets"],
        env=os.environ | {"PYTHONPATH": str(colab)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    check = "import ipywidgets; print(ipywidgets.__version__)"
    version = subprocess.run(
        [sys.executable, "-c", check], env=os.environ | {"PYTHONPATH": str(colab)}, capture_output=True, text=True
    )
    assert version.stdout.strip() == "7.7.1"
