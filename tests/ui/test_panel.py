"""The chat panel driven in plain Python (set values, click, send the browser's messages), with the real small
model; and the Markdown rendering, checked by parsing the HTML it gives."""

import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers.generation import generate
from helpers.settings import PRESETS, GenerationSettings
from helpers.ui import build_ui, fallback_note, quant_picker
from helpers.ui.markdown import render_markdown


class Tree(HTMLParser):
    """The elements of an HTML fragment as (tag, attrs, text inside), in document order; and every text."""

    def __init__(self, markup):
        super().__init__(convert_charrefs=True)
        self.elements, self.open, self.texts = [], [], []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), ""]
        self.elements.append(element)
        if tag not in ("br", "hr", "img", "input"):
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data):
        self.texts.append(data)
        for element in self.open:
            element[2] += data

    def tags(self, name):
        return [e for e in self.elements if e[0] == name]

    def of_class(self, name):
        return [e for e in self.elements if name in e[1].get("class", "").split()]


def messages_shown(p):
    """(role, text) of each message in the transcript, in the order shown."""
    tree = Tree(p.transcript.value)
    shown = []
    for _tag, attrs, text in tree.of_class("l2t-msg"):
        role = "user" if "l2t-user" in attrs["class"] else "assistant"
        name = "You" if role == "user" else "Assistant"
        shown.append((role, text.split(name, 1)[1]))
    return shown


def squash(text):
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture
def panel(smol):
    ui = build_ui(smol, system_prompt="You are a helpful assistant.")
    p = ui.panel
    p.clear()  # the panel of the test before hands its conversation over (re-running the cell): start afresh
    p.controls["max_tokens"].value = 40
    p.seed.value = "5"
    p.cache_prompt.value = False  # each answer comparable token for token with a fresh generate()
    return p


def finish(p):
    """Wait for the panel's generation (generously: this machine's two cores are often shared)."""
    p.wait(900)
    assert not p.thread.is_alive()


def send(p, text):
    p.prompt.value = text
    p.generate_button.click()
    finish(p)


def browser_sends(p, value):
    """The message the browser sends when the prompt box's text changes (ipywidgets 7 and 8 alike)."""
    p.prompt._handle_msg(
        {"content": {"data": {"method": "update", "state": {"value": value}, "buffer_paths": []}}, "buffers": []}
    )


def wait_for_thread(p, timeout=10):
    deadline = time.time() + timeout
    while p.thread is None:
        assert time.time() < deadline, "no generation started"
        time.sleep(0.01)


# --- generating -----------------------------------------------------------------------------------


def test_generate_streams_the_same_answer_as_the_core(panel, smol):
    panel.prompt.value = "Name three rivers."
    panel.generate_button.click()
    assert panel.generate_button.disabled and not panel.stop_button.disabled
    assert panel.stop_button.button_style == "warning"
    assert panel.prompt.value == ""  # the question moved into the conversation at once
    finish(panel)
    assert panel.stop_button.disabled and panel.stop_button.button_style == ""  # grey, not an orange button
    expected = generate(
        smol,
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three rivers."},
        ],
        panel.settings(),
    )
    assert panel.history[-1]["content"] == expected.text
    assert [role for role, _ in messages_shown(panel)] == ["user", "assistant"]
    assert squash(messages_shown(panel)[0][1]) == "Name three rivers."
    # the answer as rendered Markdown: its words, in order, without the markup
    assert squash(messages_shown(panel)[1][1]).startswith(squash(re.sub(r"[*#`_]", "", expected.text))[:30])
    assert "tokens/s" in panel.stats.value and panel.error.value == ""
    stats = panel.last_stats
    (under,) = Tree(panel.transcript.value).of_class("l2t-answer-stats")  # the answer's own figures, under it
    assert f"{stats.completion_tokens} tokens · {stats.tokens_per_second:.1f} tokens/s" in under[2]
    assert panel.history[-1]["stats"]["completion_tokens"] == stats.completion_tokens
    assert not panel.generate_button.disabled and panel.stop_button.disabled
    stats = panel.last_stats
    assert panel.context_bar.value == stats.prompt_tokens + stats.completion_tokens
    assert panel.context_bar.max == smol.n_ctx() == panel.controls["max_tokens"].range[1]


def test_the_conversation_grows_in_batches_and_in_order(panel):
    from helpers.ui.panel import FLUSH_SECONDS

    values, times = [], []
    panel.transcript.observe(lambda change: (values.append(change["new"]), times.append(time.perf_counter())), "value")
    panel.controls["max_tokens"].value = 120
    send(panel, "Write a long story about a lighthouse.")
    assert Tree(values[0]).of_class("l2t-user") and not Tree(values[0]).of_class("l2t-assistant")  # the question first
    streamed = times[1:-1]  # between the question and the finished conversation
    assert len(streamed) >= 3
    assert min(b - a for a, b in zip(streamed, streamed[1:])) >= 0.8 * FLUSH_SECONDS  # at most every ~100 ms
    lengths = [len("".join(Tree(v).texts)) for v in values[1:-1]]
    assert lengths == sorted(lengths)


def test_stop_mid_generation_marks_the_answer(panel):
    panel.controls["max_tokens"].value = 400
    panel.prompt.value = "Count from one to two hundred, in words."
    panel.generate_button.click()
    deadline = time.time() + 30
    while len(messages_shown(panel)) < 2 or len(messages_shown(panel)[1][1]) < 30:
        assert time.time() < deadline
        time.sleep(0.01)
    panel.stop_button.click()
    finish(panel)
    assert panel.last_stats.finish_reason == "cancelled"
    assert panel.last_stats.completion_tokens < 400
    assert panel.history[-1]["finish"] == "cancelled"
    assert Tree(panel.transcript.value).of_class("l2t-finish")[0][2].startswith("stopped")
    assert not panel.generate_button.disabled and not panel.continue_button.disabled


def test_two_turns_in_order_and_the_follow_up_uses_the_history(panel, smol):
    send(panel, "My name is Ada. Say hello.")
    first_answer = panel.history[-1]["content"]
    panel.prompt.value = "What is my name?"
    messages = panel.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == first_answer
    panel.generate_button.click()
    finish(panel)
    assert [m["role"] for m in panel.history] == ["user", "assistant", "user", "assistant"]
    shown = messages_shown(panel)
    assert [role for role, _ in shown] == ["user", "assistant", "user", "assistant"]
    assert [squash(shown[0][1]), squash(shown[2][1])] == ["My name is Ada. Say hello.", "What is my name?"]
    assert panel.last_stats.prompt_tokens > len(smol.tokenize(first_answer))


def test_enter_in_the_prompt_box_sends_the_whole_text(panel):
    """Fast typing: the browser merges keystrokes into fewer updates; Enter's line break comes last, with them."""
    for value in ("W", "What is the capital of Fr", "What is the capital of France?\n"):
        browser_sends(panel, value)
    assert panel.thread is not None and panel.prompt.value == ""
    browser_sends(panel, "What is the capital of France?\nAnd wh")  # typed after Enter, before the box emptied
    assert panel.prompt.value == "And wh"
    finish(panel)
    assert [m["role"] for m in panel.history] == ["user", "assistant"]
    assert panel.history[0]["content"] == "What is the capital of France?"


def test_a_pasted_multi_line_prompt_keeps_its_line_breaks_token_for_token(panel, smol):
    panel.cache_prompt.value = True  # the KV cache then holds the prompt's tokens, to compare
    pasted = "Fix this code:\ndef add(a, b):\n    return a - b"
    browser_sends(panel, pasted)  # a paste: one update with all its lines
    assert panel.thread is None and panel.prompt.value == pasted
    browser_sends(panel, pasted + "\n")  # then Enter
    finish(panel)
    assert panel.history[0]["content"] == pasted
    expected = smol.encode_chat([{"role": "system", "content": "You are a helpful assistant."}, panel.history[0]])
    assert smol.cached_tokens()[: panel.last_stats.prompt_tokens] == expected
    (text,) = Tree(panel.transcript.value).of_class("l2t-text")
    assert text[2] == pasted  # shown with its line breaks (the bubble keeps them: white-space: pre-wrap)


def test_enter_again_after_a_refused_send_sends_and_keeps_the_text():
    """No model: Enter is refused with the reason shown and the box keeps its text; Enter again on the same
    text is handled the same way, not taken for the echo of a prompt that went out (which emptied the box)."""
    ui = build_ui(None)
    for _ in range(2):
        browser_sends(ui.panel, "hi")
        browser_sends(ui.panel, "hi\n")
        assert ui.panel.prompt.value == "hi" and ui.panel.error.value


def test_enter_types_a_line_break_when_switched_and_generate_sends(panel):
    panel.newline_mode.value = True
    browser_sends(panel, "First line\n")
    browser_sends(panel, "First line\nSecond line")
    assert panel.thread is None and panel.prompt.value == "First line\nSecond line"
    panel.generate_button.click()  # right after the browser sent the text: read once the box is quiet
    browser_sends(panel, "First line\nSecond line!")  # the last letter, held back by the front end
    wait_for_thread(panel)
    finish(panel)
    assert panel.history[0]["content"] == "First line\nSecond line!" and panel.prompt.value == ""


def test_enter_while_an_answer_is_written_keeps_the_prompt(panel):
    panel.controls["max_tokens"].value = 200
    panel.prompt.value = "Count from one to fifty, in words."
    panel.generate_button.click()
    browser_sends(panel, "Next question\n")
    assert panel.prompt.value == "Next question" and "press Enter again" in panel.note.value
    finish(panel)
    browser_sends(panel, "Next question\n")
    finish(panel)
    assert [m["content"] for m in panel.history[::2]] == ["Count from one to fifty, in words.", "Next question"]


def test_stop_while_the_prompt_is_read(panel):
    panel.prompt.value = "Summarise: " + "The tide rises and falls twice a day along the coast. " * 140
    seen = []
    panel.stats.observe(lambda change: seen.append(change["new"]), names="value")
    panel.generate_button.click()
    deadline = time.time() + 60
    while not any(re.search(r"reading the prompt: [1-9][\d,]* / [1-9],\d{3} tokens", v) for v in seen):
        assert time.time() < deadline
        time.sleep(0.01)
    panel.stop_button.click()
    clicked = time.perf_counter()
    finish(panel)
    stats = panel.last_stats
    assert stats.finish_reason == "cancelled" and stats.completion_tokens == 0
    assert 0 < stats.prompt_read < stats.prompt_tokens  # stopped in the middle of the prompt
    assert time.perf_counter() - clicked < 5  # reading the whole prompt takes about 7 s here
    assert "stopped while reading the prompt" in panel.stats.value and "tokens/s" not in panel.stats.value
    assert panel.history == [] and panel.prompt.value.startswith("Summarise")  # the question back in the box
    assert not panel.generate_button.disabled and panel.stop_button.disabled


def test_follow_up_reports_the_prompt_cache(panel):
    panel.cache_prompt.value = True
    send(panel, "My name is Ada. Say hello.")
    send(panel, "What is my name?")
    assert panel.last_stats.cached_tokens > 20 and "from cache" in panel.stats.value


def test_double_click_starts_one_generation(panel):
    panel.prompt.value = "Say something."
    panel.generate_button.click()
    thread = panel.thread
    panel.generate_button.click()
    assert panel.start() is False and panel.regenerate() is False and panel.thread is thread
    finish(panel)
    assert len(panel.history) == 2


def test_error_inside_generation_keeps_the_conversation(panel):
    send(panel, "Say hi.")
    before = list(panel.history)
    shown = messages_shown(panel)
    send(panel, "word " * 5000)  # longer than the 4096-token context
    assert "exceeds the context" in panel.error.value
    assert panel.history == before and messages_shown(panel) == shown
    assert panel.prompt.value.startswith("word word")
    assert not panel.generate_button.disabled


# --- Regenerate, Continue, Edit, Clear, Export ---------------------------------------------------------


def test_regenerate_replaces_the_last_answer(panel, smol):
    send(panel, "Name a colour.")
    first, dialog = panel.history[-1]["content"], panel.messages()[:1] + panel.messages()[1:2]
    panel.regenerate_button.click()
    finish(panel)
    assert [m["role"] for m in panel.history] == ["user", "assistant"]
    # The seed is fixed (5) and the cache off: the same answer again, as generate() gives it.
    expected = generate(smol, dialog, panel.settings())
    assert panel.history[-1]["content"] == expected.text == first
    # Random seed: each regeneration has a seed of its own.
    panel.seed.value = ""
    seeds = []
    for _ in range(2):
        panel.regenerate_button.click()
        finish(panel)
        seeds.append(panel.last_stats.seed)
    assert seeds[0] != seeds[1] and len(panel.history) == 2


def test_continue_extends_a_cut_answer(panel, smol):
    greedy = {"temperature": 0.0}
    for name, value in greedy.items():
        panel.controls[name].value = value
    panel.controls["max_tokens"].value = 12
    send(panel, "Write a short poem about the sea.")
    cut = panel.history[-1]
    assert cut["finish"] == "length"
    assert "length limit" in Tree(panel.transcript.value).of_class("l2t-finish")[0][2]
    panel.continue_button.click()
    finish(panel)
    longer = panel.history[-1]["content"]
    assert len(panel.history) == 2 and longer.startswith(cut["content"].rstrip()) and len(longer) > len(cut["content"])
    assert panel.last_stats.completion_tokens > 1
    # Greedy decoding: 12 + 12 tokens continue as one answer of 24 would (the answer text, re-encoded, is the
    # same tokens the model produced; batched evaluation can round differently, so compare the start).
    dialog = panel.messages()[:2]
    whole = generate(smol, dialog, panel.settings().replace(max_tokens=24))
    assert longer[: len(cut["content"]) + 8] == whole.text[: len(cut["content"]) + 8]


def test_continue_prompt_is_the_turn_left_open(llama2_tiny_path):
    """With the Llama 2 template the continuation's prompt is Meta's encoding of the finished turn without
    its closing: BOS [INST] user [/INST] answer, no trailing space, no EOS."""
    from helpers.engine.loading import load_model, unload_model
    from helpers.templates import llama2_pair_tokens

    model = load_model(llama2_tiny_path, n_ctx=256)
    try:
        p = build_ui(model).panel
        p.controls["max_tokens"].value = 1
        p.cache_prompt.value = True
        p.history = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon"}]
        p.continue_button.click()
        finish(p)
        closed = llama2_pair_tokens(model, "Tell me a story.", "Once upon")  # BOS ... answer, " ", EOS
        prompt = model.cached_tokens()[: p.last_stats.prompt_tokens]
        assert prompt == closed[:-2] or prompt == closed[:-1]  # the space before EOS may merge into no token
        assert prompt[-1] == model.tokenize("Once upon")[-1]
    finally:
        unload_model()


def test_edit_puts_the_last_prompt_back(panel):
    send(panel, "Say hi.")
    send(panel, "Say bye.")
    panel.edit_button.click()  # the chooser starts at the last message
    assert panel.prompt.value == "Say bye." and len(panel.history) == 4
    assert "sending replaces it and drops the 1 message after it." in panel.note.value
    assert Tree(panel.transcript.value).of_class("l2t-editing")[0][2].startswith("You (editing)")
    panel.edit_button.click()  # again: keep it as it is
    assert panel.conversation.editing is None and not Tree(panel.transcript.value).of_class("l2t-editing")


def test_edit_turn_k_of_n_replaces_it_and_reuses_the_cache_before_it(panel, smol):
    panel.cache_prompt.value = True
    for question in ("My name is Ada.", "Name a colour.", "Name a fruit."):
        send(panel, question)
    first_two = panel.history[:2]
    assert [label for label, _ in panel.edit_choice.options][1] == "2: Name a colour."
    panel.edit_choice.value = panel.edit_choice.options[1][1]
    panel.edit_button.click()
    assert panel.prompt.value == "Name a colour." and "drops the 3 messages after it" in panel.note.value
    before = smol.cached_tokens()
    prompt = smol.encode_chat(panel.messages("Name a tree."))
    common = next((i for i, (a, b) in enumerate(zip(before, prompt)) if a != b), min(len(before), len(prompt)))
    send(panel, "Name a tree.")
    assert panel.history[:2] == first_two and len(panel.history) == 4
    assert panel.history[2]["content"] == "Name a tree." and panel.note.value == ""
    assert panel.last_stats.prompt_tokens == len(prompt)
    assert panel.last_stats.cached_tokens == min(common, len(prompt) - 1) > len(smol.encode_chat(first_two[:1])) - 3


def test_resume_an_export_and_continue_it(panel, smol, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    send(panel, "My name is Ada.")
    path = panel.export().with_suffix(".json")
    newer = build_ui(None, system_prompt="something else").panel  # another panel (no model: nothing to retire)
    newer.resume_path.value = str(path)
    newer.resume_button.click()
    assert newer.history == panel.history and newer.system.value == "You are a helpful assistant."
    assert (
        newer.conversation.system_prompt == "You are a helpful assistant." and "Resumed 2 messages" in newer.note.value
    )
    # a hostile file is refused with the reason, and the conversation shown stays as it was
    shown = newer.transcript.value
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "user", "content": "<script>alert(1)</script>", "onload": 1}]}')
    assert newer.resume(bad) is False and "Message 0 must be" in newer.error.value
    assert newer.history == panel.history and newer.transcript.value == shown
    # resumed into a panel with the model: the next turn is asked after the resumed ones
    panel.clear()
    assert panel.resume(path) is True
    send(panel, "What is my name?")
    assert [m["content"] for m in panel.history[::2]] == ["My name is Ada.", "What is my name?"]


def test_clear_and_export(panel, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert panel.export() is None and "Nothing to export" in panel.error.value and not list(tmp_path.iterdir())
    send(panel, "Name a fruit.")
    panel.export_button.click()
    path = panel.last_export
    assert path.parent == tmp_path and str(path) in panel.note.value
    assert "tokens/s" in panel.stats.value  # the last answer's figures stay
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["messages"][1:] == panel.history  # each answer with its finish reason and figures
    assert record["messages"][2]["stats"]["completion_tokens"] == panel.last_stats.completion_tokens
    assert record["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert record["settings"]["seed"] == 5
    markdown = path.read_text()
    assert "Name a fruit." in markdown and panel.history[-1]["content"] in markdown
    panel.clear_button.click()
    assert panel.history == [] and panel.stats.value == "" and messages_shown(panel) == []
    assert panel.regenerate_button.disabled and panel.continue_button.disabled and panel.edit_button.disabled


def test_clear_while_reading_the_prompt_clears_the_cancelled_prompt_too(panel):
    panel.prompt.value = "Summarise: " + "the river runs past the old mill and on to the sea. " * 60
    panel.generate_button.click()
    deadline = time.time() + 60
    while "reading the prompt:" not in panel.stats.value:  # the engine's progress: the prompt is being read
        assert time.time() < deadline
        time.sleep(0.01)
    panel.clear_button.click()
    assert panel.last_stats is None or panel.last_stats.finish_reason == "cancelled"
    assert panel.history == [] and panel.prompt.value == "" and panel.context_bar.value == 0


# --- one live panel per model, an unusable model ---------------------------------------------------------


def test_a_new_panel_for_the_model_retires_the_old_one(panel, smol):
    panel.controls["max_tokens"].value = 400
    panel.prompt.value = "Count from one to two hundred, in words."
    panel.generate_button.click()
    deadline = time.time() + 30
    while len(messages_shown(panel)) < 2:
        assert time.time() < deadline
        time.sleep(0.01)
    newer = build_ui(smol).panel
    assert not panel.thread.is_alive() and panel.last_stats.finish_reason == "cancelled"
    assert "no longer live" in panel.note.value
    assert all(b.disabled for b in (panel.generate_button, panel.stop_button, panel.regenerate_button))
    assert panel.start() is False and not panel.thread.is_alive()
    # the conversation comes along (the stopped answer included), and the new panel says so
    assert newer.history == panel.history and len(newer.history) == 2 and "carried over" in newer.note.value
    newer.controls["max_tokens"].value = 8
    send(newer, "Hi")
    assert len(newer.history) == 4 and newer.history[:2] == panel.history


def test_generate_says_at_once_when_the_model_is_gone(smol_path):
    from helpers.engine.loading import load_model, unload_model

    p = build_ui(load_model(smol_path)).panel
    unload_model()
    p.prompt.value = "Hello"
    p.generate_button.click()
    assert p.thread is None and "unloaded" in p.error.value and "load cell" in p.error.value
    assert not p.generate_button.disabled and p.prompt.value == "Hello"


# --- the settings controls -------------------------------------------------------------------------------


def test_controls_are_bounded_and_labelled(panel, smol):
    max_tokens = panel.controls["max_tokens"]
    assert (max_tokens.description, max_tokens.range) == ("Max new tokens", (1, smol.n_ctx()))
    max_tokens.value = 0
    assert max_tokens.value == 1 and "Max new tokens: 0 is outside 1 to 4,096; set to 1." in panel.note.value
    max_tokens.value = 10**6
    assert max_tokens.value == smol.n_ctx() and "1,000,000 is outside" in panel.note.value
    assert panel.controls["top_p"].min > 0  # top p = 0 is not allowed
    panel.controls["temperature"].value = 99  # ipywidgets sets it to the slider's end, as the browser does
    assert panel.controls["temperature"].value == 2.0
    assert "Temperature: set to 2, its maximum (a value beyond it is set to 2)." in panel.note.value
    panel.controls["temperature"].value = 0.7
    panel.controls["top_k"].value = -5
    assert "Top k: set to 0, its minimum" in panel.note.value
    panel.controls["top_k"].value = 40
    assert (panel.system.description, panel.stop_strings.description) == ("System prompt", "Stop strings")
    assert panel.stop_button.description == "Stop" and panel.stop_strings.description != "Stop"
    panel.seed.value = "abc"
    panel.prompt.value = "Hello"
    panel.generate_button.click()
    assert "Seed must be a whole number" in panel.error.value and panel.thread is None
    assert panel.prompt.value == "Hello" and not panel.generate_button.disabled
    panel.seed.value = "7"
    panel.controls["max_tokens"].value = 8
    send(panel, "Hello")
    assert panel.error.value == "" and len(panel.history) == 2


def test_presets_show_custom_once_a_control_differs(panel):
    assert panel.preset.value == "Balanced"
    panel.preset.value = "Precise"
    assert panel.settings().temperature == PRESETS["Precise"].temperature
    panel.controls["temperature"].value = 0.9
    assert panel.preset.value == "Custom" and panel.settings().temperature == 0.9
    panel.controls["temperature"].value = PRESETS["Precise"].temperature
    assert panel.preset.value == "Precise"
    panel.preset.value = "Creative"
    assert panel.settings().replace(max_tokens=512, seed=None, cache_prompt=True) == PRESETS["Creative"]


def test_settings_from_controls():
    settings = GenerationSettings(max_tokens=7, seed=3, stop=("###",), cache_prompt=False, temperature=0.3)
    p = build_ui(None, settings=settings).panel
    assert p.settings() == settings and p.preset.value == "Custom"
    p.prompt.value = "Hello"
    p.generate_button.click()
    assert "No model" in p.error.value


def test_a_saved_notebook_shows_a_line_before_the_widget():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()  # display() as in a notebook's kernel
    widget = build_ui(None)
    with capture_output() as captured:
        from IPython.display import display

        display(widget)
    first, second = (output.data for output in captured.outputs)
    assert "Run the cells" in first["text/html"] and "application/vnd.jupyter.widget-view+json" not in first
    assert second["application/vnd.jupyter.widget-view+json"]["model_id"] == widget.model_id
    assert ".llama2-textgen-reopen {display: none}" in widget.panel.transcript.value  # hidden while live


def test_the_header_names_the_model_and_the_offline_fallback(panel, smol_path):
    assert smol_path.name in panel.header.value and "offline fallback" in panel.header.value
    assert "(no model)" in build_ui(None).panel.header.value


def test_the_system_prompt_is_shown_on_top_and_edited_in_one_place(panel):
    system = Tree(panel.transcript.value).of_class("l2t-system")
    assert system[0][2] == "System prompt: You are a helpful assistant."
    panel.system.value = "Answer in French. " * 10  # long: one line, the rest unfolded on a click
    (details,) = Tree(panel.transcript.value).tags("details")
    assert panel.messages("Hi")[0]["content"] == "Answer in French. " * 10
    assert Tree(panel.transcript.value).tags("summary")[0][2].endswith("…")


def test_quant_picker_says_when_the_offline_model_is_used(smol_path):
    picker = quant_picker("llama-2-7b-chat")
    assert fallback_note("/models/llama-2-7b-chat.Q4_K_M.gguf", picker) == "" and not picker.disabled
    note = fallback_note(smol_path, picker)
    assert "offline fallback" in note and "Q4_K_M" in note and "ChatML" in note and picker.disabled


def test_quant_picker_labels_sizes():
    picker = quant_picker("llama-2-7b-chat")
    assert picker.value == "Q4_K_M"
    assert any("4.08 GB file" in label for label, _ in picker.options)
    with pytest.raises(ValueError, match="available"):
        quant_picker("llama-2-7b-chat", "Q9")


# --- Markdown, safely ------------------------------------------------------------------------------------

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '<a href="javascript:alert(1)">click</a>',
    "[click](javascript:alert(1))",
    "[click](JavaScript:alert(1))",
    "[click](  javascript:alert(1) )",
    "[click](&#106;avascript:alert(1))",
    "[click](vbscript:msgbox(1))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![x](javascript:alert(1))",
    "![x](https://example.com/track.png)",
    '<div onmouseover="alert(1)">hover</div>',
    "<iframe src=https://example.com></iframe>",
    "```\n</code></pre><script>alert(1)</script>\n```",
    '[x](https://example.com "title\\" onmouseover=\\"alert(1)")',
    "<style>body {display: none}</style>",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_markdown_runs_nothing(text):
    tree = Tree(render_markdown(text))
    allowed = {"p", "a", "pre", "code", "em", "strong"}
    assert {e[0] for e in tree.elements} <= allowed
    for tag, attrs, _ in tree.elements:
        assert not [name for name in attrs if name.startswith("on")]
        href = attrs.get("href", "")
        assert re.match(r"https?://", href) if href else True
        assert tag != "img"
    raw = "".join(tree.texts)
    if "<" in text.split("```")[0] or "```" in text:  # raw HTML comes back as the text it was
        assert "<" in raw


def test_markdown_lists_tables_and_code():
    text = (
        "Intro with *emphasis* and **bold**.\n\n"
        "- one\n- two\n- three\n\n"
        "1. first\n2. second\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\n"
        "```python\nprint('x')  # a long line " + "x" * 200 + "\n```\n"
    )
    tree = Tree(render_markdown(text))
    assert [e[2] for e in tree.elements if e[0] == "li"] == ["one", "two", "three", "first", "second"]
    assert [e[0] for e in tree.elements if e[0] in ("ul", "ol")] == ["ul", "ol"]
    assert [e[2] for e in tree.tags("th")] == ["a", "b"] and [e[2] for e in tree.tags("td")] == ["1", "2", "3", "4"]
    (code,) = [e for e in tree.tags("code") if "language-python" in e[1].get("class", "")]
    assert code[2].startswith("print('x')") and "x" * 200 in code[2]
    assert [e[2] for e in tree.tags("em")] == ["emphasis"] and [e[2] for e in tree.tags("strong")] == ["bold"]


def test_conversation_styles_wrap_prose_and_scroll_code():
    from helpers.ui.transcript import STYLE

    assert re.search(r"\.l2t-chat \{[^}]*overflow-wrap: anywhere; word-break: normal", STYLE)  # a long word too
    assert re.search(r"\.l2t-msg pre \{[^}]*overflow-x: auto; white-space: pre", STYLE)


def test_panel_on_colab_widgets():
    """Everything above again with ipywidgets 7.7.1 and ipykernel 6, as Colab has them."""
    colab = Path(__file__).resolve().parents[1] / "data" / "colab-kernel"
    assert colab.is_dir(), "run `make test`, which installs tests/data/colab-kernel"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not on_colab_widgets"],
        env=os.environ | {"PYTHONPATH": str(colab)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    check = "import ipywidgets; print(ipywidgets.__version__)"
    version = subprocess.run(
        [sys.executable, "-c", check], env=os.environ | {"PYTHONPATH": str(colab)}, capture_output=True, text=True
    )
    assert version.stdout.strip() == "7.7.1"
