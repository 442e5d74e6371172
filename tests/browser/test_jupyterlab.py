"""End to end: JupyterLab 4 and Notebook 7 on 127.0.0.1, the notebook run in headless Chromium (Debian's package, driven by
Playwright) with Run All, then the panel used without re-running anything, at 1280 px: the buttons on one row and no
sideways scrollbar, a seeded Markdown list shown as a list, turns sent with Generate and with Enter, the first of
three turns edited, each answer's own figures, typing at 5 ms per key then Enter at once (three times, and once
while another cell keeps the kernel busy) sending the whole text and emptying the box, a pasted three-line prompt
shown with its line breaks, a 200-character word kept inside its bubble, the answer seen growing, Regenerate, Stop
mid-answer and Stop while a long prompt is read. Screenshots are kept in test-artifacts/ (ignored by git)."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from helpers.demo import inject_parameters
from tests.support.panel_page import too_wide

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.browser


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEEDED_ANSWER = "Three fruits:\n\n- apple\n- **pear**\n- plum"
BUSY_CELL = "import time\ntime.sleep(8 if globals().get('BUSY_RAN') else 0)\nBUSY_RAN = True"
FAST_QUESTIONS = ["What is the capital of France?", "Hello! Who are you?", "What is 2+2?"]
PASTED = "Fix this code:\ndef add(a, b):\n    return a - b"
LONG_WORD = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 4 + "x" * 20  # 200 characters
APPS = {"jupyterlab": ("lab", "lab/tree"), "notebook7": ("notebook", "notebooks")}


@pytest.fixture(params=list(APPS))
def lab(request, tmp_path):
    """JupyterLab or Notebook 7 serving a copy of the notebook (autosave never touches the committed one)."""
    command, path = APPS[request.param]
    nb = nbformat.read(ROOT / "llama2_textgen.ipynb", as_version=4)
    # INSTALL=False: never replace the test environment's llama-cpp-python (a GPU host's plan may).
    inject_parameters(nb, {"OFFLINE": True, "COMPARE_QUANTIZATIONS": False, "MAX_TOKENS": 64, "INSTALL": False})
    # A conversation seeded through the panel's public API, as the last cell of Run All.
    seeded = [{"role": "user", "content": "List three fruits."}, {"role": "assistant", "content": SEEDED_ANSWER}]
    nb.cells.append(nbformat.v4.new_code_cell(f"helpers.ui.live_panel(model).history = {seeded!r}"))
    # A cell that keeps the kernel busy when run again (Run All runs it once, at once).
    nb.cells.append(nbformat.v4.new_code_cell(BUSY_CELL))
    nbformat.write(nb, tmp_path / "llama2_textgen.ipynb")
    (tmp_path / "helpers").symlink_to(ROOT / "helpers")
    port, token = free_port(), secrets.token_hex(16)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={tmp_path}",
            "--allow-root",
        ],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT), "JUPYTER_CONFIG_DIR": str(tmp_path / ".jupyter")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # the machine may be busy: a cold JupyterLab took over 90 s under load
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("JupyterLab did not start")
            time.sleep(0.5)
    yield f"{url}/{path}/llama2_textgen.ipynb?token={token}", f"{url}/api/sessions?token={token}", request.param
    server.terminate()
    server.wait(30)


def wait_for_idle_kernel(sessions_url, timeout=300):
    """Until the notebook's kernel reports idle (asked over the server's REST API, the same for both apps)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            sessions = json.load(urllib.request.urlopen(sessions_url, timeout=10))
        except OSError:  # a busy server can be slow to answer: ask again
            continue
        if sessions and sessions[0]["kernel"]["execution_state"] == "idle":
            return
        time.sleep(0.5)
    pytest.fail("the kernel did not start")


def test_panel_streams_and_stops_in_a_real_browser(lab):
    url, sessions_url, app = lab
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 1600})
        context.grant_permissions(
            ["clipboard-read", "clipboard-write"], origin=url.split("/lab")[0].split("/notebooks")[0]
        )
        page = context.new_page()
        errors = []
        page.on(
            "console", lambda m: errors.append(m.text) if m.type == "error" and "widget" in m.text.lower() else None
        )
        page.goto(url)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
        select_kernel = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
        try:  # a fresh JupyterLab may ask which kernel to start
            select_kernel.click(timeout=10_000)
        except PlaywrightTimeout:
            pass
        wait_for_idle_kernel(sessions_url)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()

        prompt = page.get_by_placeholder("Ask something...")
        try:
            prompt.wait_for(timeout=600_000)  # Run All on a busy 2-core machine
            # the seeded conversation (the last cell but one) is there: Run All has ended
            page.locator(".llama2-textgen-transcript li").first.wait_for(timeout=300_000)
        except PlaywrightTimeout:
            page.screenshot(path=str(ARTIFACTS / f"{app}-panel-missing.png"), full_page=True)
            raise
        wait_for_idle_kernel(sessions_url)
        prompt.scroll_into_view_if_needed()
        panel = page.locator(".llama2-textgen-panel")
        transcript = page.locator(".llama2-textgen-transcript")
        stats = page.locator(".llama2-textgen-stats")
        note = page.locator(".llama2-textgen-note")
        # A Markdown list is shown as a list, raw markup gone; the line for a saved copy is hidden while live.
        assert transcript.locator("ul > li").all_inner_texts() == ["apple", "pear", "plum"]
        assert transcript.locator("li strong").inner_text() == "pear"
        assert page.locator(".llama2-textgen-reopen").first.is_hidden()
        assert "offline fallback" in page.locator(".llama2-textgen-header").inner_text()

        def button(title):  # a widget button's title is its tooltip, or else its text
            return panel.locator(f"button.jupyter-button[title='{title}']")

        # The buttons on one row at 1280 px, and nothing wider than its place (no sideways scrollbar).
        row = panel.locator(".widget-hbox", has=page.locator("button[title='Generate']")).first
        items = row.locator(":scope > *").all()
        tops = {round(b.bounding_box()["y"]) for b in items}
        assert len(items) == 9 and len(tops) == 1, (len(items), tops)
        assert not too_wide(panel, "jp-Cell"), too_wide(panel, "jp-Cell")

        def users():
            return transcript.locator(".l2t-user .l2t-text").all_inner_texts()

        def messages():
            return [
                ("user" if "l2t-user" in (m.get_attribute("class") or "") else "assistant", m.inner_text())
                for m in transcript.locator(".l2t-msg").all()
            ]

        def wait_for_finish(seen_before, timeout=300):  # 0.3 tokens/s seen when the 2 cores were shared
            deadline = time.time() + timeout
            while time.time() < deadline:
                text = stats.inner_text()
                if "finish:" in text and text != seen_before:
                    return text
                time.sleep(0.2)
            page.screenshot(path=str(ARTIFACTS / f"{app}-panel-no-finish.png"), full_page=False)
            pytest.fail(f"no new stats line after {timeout} s: {stats.inner_text()!r}")

        # Turn 1 with the Generate button, turn 2 with Enter: both shown after the seeded turn, in order.
        prompt.fill("Name a river.")
        button("Generate").click()
        last = wait_for_finish("")
        if app == "jupyterlab" or app == "notebook7":  # ipywidgets 8: the keyboard is back in the box
            assert prompt.evaluate("e => document.activeElement === e")
        prompt.fill("Name a mountain.")
        prompt.press("Enter")
        last = wait_for_finish(last)
        shown = messages()
        assert [role for role, _ in shown] == ["user", "assistant"] * 3, shown
        assert users() == ["List three fruits.", "Name a river.", "Name a mountain."]
        assert prompt.input_value() == ""
        # Each new answer shows its own figures under it (the seeded one has none).
        figures = transcript.locator(".l2t-answer-stats")
        assert figures.count() == 2 and all("tokens" in t for t in figures.all_inner_texts())
        assert figures.last.is_visible()
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-conversation.png"), full_page=False)

        # Edit the first of the three turns: the note says what sending drops; then one turn, the new one.
        row.locator("select").select_option(index=0)
        button("Edit: the chosen message back in the box").click()
        wait_until(lambda: prompt.input_value() == "List three fruits.")
        note.filter(has_text="drops the 5 messages after it").wait_for(timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-editing.png"), full_page=False)
        prompt.fill("List three vegetables.")
        prompt.press("Enter")
        last = wait_for_finish(last)
        assert users() == ["List three vegetables."] and len(messages()) == 2

        # Typing at 5 ms per key, then Enter at once: the whole text is sent and the box is empty, three times.
        for question in FAST_QUESTIONS:
            prompt.press_sequentially(question, delay=5)
            prompt.press("Enter")
            last = wait_for_finish(last)
            assert users()[-1] == question and prompt.input_value() == "", (users(), prompt.input_value())
        # ... and while another cell keeps the kernel busy for 8 s: the prompt waits, neither lost nor cut.
        busy_cell = page.locator(".jp-Cell", has_text="BUSY_RAN = True").last
        busy_cell.locator(".cm-content").click()
        page.keyboard.press("Control+Enter")
        page.locator(".jp-Cell", has_text="BUSY_RAN = True").last.locator(".jp-InputPrompt", has_text="*").wait_for(
            timeout=10_000
        )
        prompt.click()
        prompt.press_sequentially("And what is the capital of Spain?", delay=5)
        prompt.press("Enter")
        last = wait_for_finish(last, timeout=180)
        assert users()[-1] == "And what is the capital of Spain?" and prompt.input_value() == ""
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-fast-typing.png"), full_page=False)

        # A pasted three-line prompt keeps its line breaks, in the box and in the conversation.
        page.evaluate("text => navigator.clipboard.writeText(text)", PASTED)
        prompt.click()
        page.keyboard.press("Control+V")
        assert prompt.input_value() == PASTED
        prompt.press("End")
        prompt.press("Control+End")
        prompt.press("Enter")
        last = wait_for_finish(last)
        assert users()[-1] == PASTED and prompt.input_value() == ""
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-pasted.png"), full_page=False)

        # A 200-character word stays inside its own bubble: every message in view, no sideways scrolling.
        prompt.fill(f"Spell this word backwards: {LONG_WORD}")
        prompt.press("Enter")
        last = wait_for_finish(last)
        chat = transcript.locator(".l2t-chat").bounding_box()
        for bubble in transcript.locator(".l2t-msg").all():
            box = bubble.bounding_box()
            assert chat["x"] <= box["x"] and box["x"] + box["width"] <= chat["x"] + chat["width"] + 1, (box, chat)
        assert not too_wide(panel, "jp-Cell"), too_wide(panel, "jp-Cell")
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-long-word.png"), full_page=False)

        # Regenerate: a new answer to the last prompt, in place of the old one.
        count = len(messages())
        button("Regenerate: a new answer").click()
        last = wait_for_finish(last)
        assert len(messages()) == count

        # Stop mid-answer: more tokens than the notebook's default, so there is time to press Stop.
        page.get_by_text("Settings: system prompt").click()
        max_tokens = page.locator(".widget-inline-hbox", has_text="Max new tokens").locator("input")
        max_tokens.fill("400")
        max_tokens.press("Enter")
        # The front end can hold a box's new value while an update of that box is unanswered, and Enter in the
        # prompt goes out at once: give the kernel the moment a person takes to move to the prompt (in a clean
        # run the story was cut at the old 64 tokens before Stop could be pressed).
        time.sleep(1.5)
        prompt.fill("Write a long story about a cat who learns to sail.")
        prompt.press("Enter")
        answer = transcript.locator(".l2t-msg").nth(count + 1)
        lengths = []
        deadline = time.time() + 90
        while time.time() < deadline and len(lengths) < 4:
            text = answer.inner_text() if answer.count() else ""
            if text and (not lengths or len(text) > lengths[-1]):
                lengths.append(len(text))
            time.sleep(0.15)
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-mid-answer.png"), full_page=False)
        assert len(lengths) >= 3 and lengths == sorted(lengths), lengths  # seen growing in the page
        button("Stop").click()
        stopped = wait_for_finish(last)
        assert "finish: cancelled" in stopped
        assert "stopped" in transcript.locator(".l2t-finish").last.inner_text()
        assert button("Generate").is_enabled() and button("Stop").is_disabled()
        assert float(button("Stop").evaluate("e => getComputedStyle(e).opacity")) < 0.6  # looks disabled

        # Stop while a long prompt is read: the progress is shown, and Stop works.
        prompt.fill("Summarise: " + "The tide rises and falls twice a day along the coast. " * 150)
        prompt.press("Enter")
        stats.filter(has_text=re.compile(r"reading the prompt: [1-9][\d,]* / [\d,]+ tokens")).wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-reading-prompt.png"), full_page=False)
        button("Stop").click()
        stats.filter(has_text="stopped while reading the prompt").wait_for(timeout=30_000)
        assert prompt.input_value().startswith("Summarise")  # the question is back in the box
        transcript.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-final.png"), full_page=False)
        assert errors == [], errors
        browser.close()


def wait_until(condition, timeout=30):
    """Until the kernel's answer to a click has reached the page."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "the page did not change"
        time.sleep(0.1)
