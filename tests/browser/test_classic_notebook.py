"""End to end on Colab's widget stack, as close as this machine allows: the classic Jupyter Notebook 6.5.7 front end
with widgetsnbextension 3.6.10 (ipywidgets 7.7.1's JavaScript: the widget version Colab's front end runs) and a Python 3.13
kernel with ipykernel 6.17.1, IPython 7.34.0 and ipywidgets 7.7.1 (`make classic-env` builds .venv313), in headless
Chromium driven by Playwright, at 1280 px. Run All, then the panel used as a person would: the buttons on one row
and no sideways scrollbar, a seeded Markdown list shown as a list, Generate, Enter, typing at 5 ms per key then
Enter at once (three times, and while another cell keeps the kernel busy), a pasted three-line prompt shown with
its line breaks, a 200-character word kept inside its bubble, Regenerate, Stop, Continue, Edit of the first turn,
the "Enter: new line" switch, Export, Clear and Resume, each answer's own figures; and the browser console free of
errors. Screenshots in test-artifacts/ (ignored by git).

Widgets are found by what a person sees (placeholders, labels, button text and tooltips) and the panel's classes,
not by position."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from helpers.demo import inject_parameters
from tests.support.classic_notebook import running_classic_notebook
from tests.support.panel_page import too_wide

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PY313 = Path("/root/.pyenv/versions/3.13.0/bin/python3")  # the Makefile's PY313
CLASSIC_PYTHON = ROOT / ".venv313" / "bin" / "python"
# What Colab runs (googlecolab/backend-info, 2026-08), and the project's pin of llama-cpp-python.
STACK = {
    "python": "3.13",
    "notebook": "6.5.7",
    "widgetsnbextension": "3.6.10",
    "ipywidgets": "7.7.1",
    "ipykernel": "6.17.1",
    "IPython": "7.34.0",
    "llama_cpp": "0.3.35",
}
VERSIONS = (
    "import json, sys, importlib\n"
    f"names = {[name for name in STACK if name != 'python']!r}\n"
    "found = {n: importlib.import_module(n).__version__ for n in names}\n"
    "print('STACK ' + json.dumps({'python': '%d.%d' % sys.version_info[:2], **found}))"
)
SEEDED_ANSWER = "Three fruits:\n\n- apple\n- **pear**\n- plum"
BUSY_CELL = "import time\ntime.sleep(10 if globals().get('BUSY_RAN') else 0)\nBUSY_RAN = True"
FAST_QUESTIONS = ["What is the capital of France?", "Hello! Who are you?", "What is 2+2?"]
BUSY_QUESTION = "And what is the capital of Spain?"
PASTED = "Fix this code:\ndef add(a, b):\n    return a - b"
LONG_WORD = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 4 + "x" * 20  # 200 characters

pytestmark = pytest.mark.browser


@pytest.fixture
def classic(tmp_path):
    """The classic notebook serving a copy of the project notebook (Run All then ends with a seeded
    conversation, the kernel's versions printed and a cell that keeps the kernel busy when run again)."""
    if not CLASSIC_PYTHON.is_file():
        if not PY313.is_file():
            pytest.skip(f"no Python 3.13 at {PY313}: Colab's stack cannot be built here (make PY313=... classic-env)")
        pytest.fail(f"{CLASSIC_PYTHON} is missing: run `make test-browser` (or `make classic-env`), which builds it.")
    found = subprocess.run([str(CLASSIC_PYTHON), "-c", VERSIONS], capture_output=True, text=True, check=True).stdout
    assert json.loads(found.split("STACK ", 1)[1]) == STACK, f"{found}: rebuild it with `make classic-env`"
    nb = nbformat.read(ROOT / "llama2_textgen.ipynb", as_version=4)
    # INSTALL=False: never replace the environment's llama-cpp-python. Short answers keep the test quick.
    inject_parameters(nb, {"OFFLINE": True, "COMPARE_QUANTIZATIONS": False, "MAX_TOKENS": 24, "INSTALL": False})
    seeded = [{"role": "user", "content": "List three fruits."}, {"role": "assistant", "content": SEEDED_ANSWER}]
    nb.cells.append(nbformat.v4.new_code_cell(f"helpers.ui.live_panel(model).history = {seeded!r}"))
    nb.cells.append(nbformat.v4.new_code_cell(VERSIONS))
    nb.cells.append(nbformat.v4.new_code_cell(BUSY_CELL))
    nbformat.write(nb, tmp_path / "llama2_textgen.ipynb")
    (tmp_path / "helpers").symlink_to(ROOT / "helpers")
    with running_classic_notebook(CLASSIC_PYTHON, tmp_path, env={"PYTHONPATH": str(ROOT)}) as server:
        yield server, tmp_path


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    pytest.fail(f"{what}: not after {timeout} s")


def test_panel_on_colabs_widget_front_end(classic):
    server, folder = classic
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    console, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-sync",
            ],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 1600})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page = context.new_page()
        page.on("console", lambda m: console.append((m.type, m.text, m.location.get("url", ""))))
        page.on("pageerror", lambda e: console.append(("pageerror", str(e), "")))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto(server.notebook_url("llama2_textgen.ipynb"))
        page.locator("#notebook .cell").first.wait_for(timeout=90_000)
        page.wait_for_function(
            "() => window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel && Jupyter.notebook.kernel.is_connected()",
            timeout=120_000,
        )
        page.locator("#kernel_indicator_icon.kernel_idle_icon").wait_for(timeout=120_000)  # the kernel is ready
        # The front end is ipywidgets 7's (controls 1.5.0; ipywidgets 8's is 2.0.0), loaded by the nbextension.
        controls = page.evaluate(
            "() => requirejs.s.contexts._.defined['nbextensions/jupyter-js-widgets/extension'].JUPYTER_CONTROLS_VERSION"
        )
        assert controls == "1.5.0"

        page.locator("#celllink").click()  # Cell > Run All
        page.locator("#run_all_cells").click()
        started = time.monotonic()
        panel = page.locator(".llama2-textgen-panel")
        try:
            panel.wait_for(timeout=300_000)
            # the seeded conversation (a later cell) is shown, then the last cell has run: Run All has ended
            panel.locator(".llama2-textgen-transcript li").first.wait_for(timeout=120_000)
            busy = page.locator(".cell.code_cell", has_text="BUSY_RAN = True")
            wait_for(lambda: re.search(r"\[\d+\]", busy.locator(".input_prompt").inner_text()), 120, "Run All to end")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "classic-panel-missing.png"), full_page=True)
            raise
        print(f"Run All ended {time.monotonic() - started:.0f} s after it was pressed")
        stack = page.locator(".output_area", has_text="STACK ").inner_text().split("STACK ", 1)[1]
        assert json.loads(stack) == STACK  # the kernel the notebook ran in

        prompt = panel.get_by_placeholder(re.compile("^Ask something"))
        transcript = panel.locator(".llama2-textgen-transcript")
        stats = panel.locator(".llama2-textgen-stats")
        note = panel.locator(".llama2-textgen-note")
        prompt.scroll_into_view_if_needed()

        def button(name):
            """ipywidgets 7.7.1 gives a button its tooltip as title (an empty one without); its text is the
            description. A name matches the start of either."""
            by_title = panel.locator(f"button.jupyter-button[title^='{name}']")
            return by_title.or_(panel.locator("button.jupyter-button", has_text=re.compile(f"^{re.escape(name)}")))

        def users():
            return transcript.locator(".l2t-user .l2t-text").all_inner_texts()

        def answers():
            return transcript.locator(".l2t-assistant").all()

        def shot(name):
            panel.screenshot(path=str(ARTIFACTS / f"classic-{name}.png"))

        last = [""]

        def finished(timeout=180):
            """Until the stats line shows a new finished answer; that line."""

            def new_line():
                text = stats.inner_text()
                return text if "finish:" in text and text != last[0] else None

            last[0] = wait_for(new_line, timeout, "an answer")
            # the conversation is drawn after the stats line: until the answer shows its own figures
            wait_for(lambda: answers()[-1].locator(".l2t-answer-stats").count(), 30, "the answer's figures")
            return last[0]

        # Markdown: the seeded answer's list is a list, its bold text bold, raw markup gone.
        assert transcript.locator("ul > li").all_inner_texts() == ["apple", "pear", "plum"]
        assert transcript.locator("li strong").inner_text() == "pear"
        assert "**" not in transcript.inner_text()
        assert page.locator(".llama2-textgen-reopen").first.is_hidden()
        shot("seeded")

        # At 1280 px the buttons are on one row, and nothing is wider than its place (no sideways scrollbar).
        row = panel.locator(".widget-hbox", has=page.locator("button", has_text=re.compile("^Generate"))).first
        tops = {round(item.bounding_box()["y"]) for item in row.locator("> *").all()}
        assert len(tops) == 1, tops
        assert not too_wide(panel, "cell"), too_wide(panel, "cell")

        # Generate, then Enter: each sends the box's text and empties it.
        prompt.fill("Name a river.")
        button("Generate").click()
        finished()
        assert users()[-1] == "Name a river." and prompt.input_value() == ""
        prompt.fill("Name a mountain.")
        prompt.press("Enter")
        finished()
        assert users() == ["List three fruits.", "Name a river.", "Name a mountain."]
        assert prompt.input_value() == ""
        # Each new answer has its own figures under it (the seeded one has none).
        figures = transcript.locator(".l2t-answer-stats").all_inner_texts()
        assert len(figures) == 2 and all("tok" in f for f in figures), figures
        shot("conversation")

        # Exact sending on this front end: typed at 5 ms per key, Enter at once; three times.
        sent = []
        for question in FAST_QUESTIONS:
            prompt.press_sequentially(question, delay=5)
            prompt.press("Enter")
            finished()
            sent.append((users()[-1], prompt.input_value()))
        # ... and while another cell keeps the kernel busy (10 s): the prompt waits, neither lost nor cut.
        busy.locator(".CodeMirror").click()
        page.keyboard.press("Control+Enter")
        wait_for(lambda: "[*]" in busy.locator(".input_prompt").inner_text(), 30, "the busy cell to run")
        prompt.click()
        prompt.press_sequentially(BUSY_QUESTION, delay=5)
        prompt.press("Enter")
        finished(timeout=240)
        sent.append((users()[-1], prompt.input_value()))
        print("sent, box after:", sent)
        assert sent == [(q, "") for q in [*FAST_QUESTIONS, BUSY_QUESTION]]
        shot("fast-typing")

        # A pasted three-line prompt keeps its line breaks, in the box and in the conversation.
        page.evaluate("text => navigator.clipboard.writeText(text)", PASTED)
        prompt.click()
        page.keyboard.press("Control+V")
        assert prompt.input_value() == PASTED
        prompt.press("Control+End")
        prompt.press("Enter")
        finished()
        assert users()[-1] == PASTED and prompt.input_value() == ""
        shot("pasted")

        # A 200-character word stays inside its own bubble: every message in view, no sideways scrolling.
        question = f"Spell this word backwards: {LONG_WORD}"
        prompt.fill(question)
        prompt.press("Enter")
        finished()
        chat = transcript.locator(".l2t-chat").bounding_box()
        for bubble in transcript.locator(".l2t-msg").all():
            box = bubble.bounding_box()
            assert chat["x"] <= box["x"] and box["x"] + box["width"] <= chat["x"] + chat["width"] + 1, (box, chat)
        assert not too_wide(panel, "cell"), too_wide(panel, "cell")
        shot("long-word")

        # Regenerate: a new last answer in place of the old one.
        count = len(answers())
        button("Regenerate").click()
        finished()
        assert len(answers()) == count and users()[-1] == question

        # Stop mid-answer (room for 400 tokens), then Continue extends the stopped answer.
        panel.get_by_text("Settings:").click()
        max_tokens = panel.locator(".widget-inline-hbox", has_text="Max new tokens").locator("input")
        max_tokens.fill("400")
        max_tokens.press("Enter")
        prompt.fill("Write a long story about a cat who learns to sail.")
        prompt.press("Enter")
        story = transcript.locator(".l2t-assistant").nth(count)  # the new answer, once shown
        wait_for(lambda: story.count() and len(story.inner_text()) > 80, 240, "the answer to grow")
        button("Stop").click()
        assert "finish: cancelled" in finished()
        assert "stopped" in answers()[-1].locator(".l2t-finish").inner_text()
        shot("stopped")
        # Continue extends the stopped answer from where it ended (24 more tokens at most).
        max_tokens.fill("24")
        max_tokens.press("Enter")
        kept = answers()[-1].locator("p").first.inner_text()  # the stopped answer's first paragraph
        button("Continue").click()
        finished()
        assert len(answers()) == count + 1 and kept in answers()[-1].inner_text()

        # Edit the first turn: back in the box, the note says what sending drops; sending leaves one turn.
        panel.locator("select").filter(has=page.locator("option", has_text="1: ")).select_option(index=0)
        button("Edit").click()
        wait_for(lambda: prompt.input_value() == "List three fruits.", 20, "Edit to put the first turn in the box")
        wait_for(lambda: "drops" in note.inner_text(), 10, "the note on what Edit drops")
        shot("editing")
        prompt.fill("List three vegetables.")
        prompt.press("Enter")
        finished()
        assert users() == ["List three vegetables."] and len(answers()) == 1

        # The "Enter: new line" switch: Enter types a line break, Generate sends both lines.
        switch = button("Enter: new line")
        switch.click()
        prompt.click()
        prompt.press_sequentially("First line", delay=20)
        prompt.press("Enter")
        prompt.press_sequentially("second line", delay=20)
        time.sleep(1)
        assert prompt.input_value() == "First line\nsecond line" and len(users()) == 1
        button("Generate").click()
        finished()
        assert users()[-1] == "First line\nsecond line" and prompt.input_value() == ""
        switch.click()

        # Export: two files beside the notebook, named in the note; the stats line stays.
        shown = users()
        button("Export").click()
        saved = wait_for(lambda: re.search(r"Saved (\S+\.md)", note.inner_text()), 20, "Export's note").group(1)
        exported = (folder / saved).with_suffix(".json")
        assert exported.is_file() and "finish:" in stats.inner_text()
        # Clear, then Resume from the exported JSON: the same conversation is back.
        button("Clear").click()
        transcript.locator(".l2t-empty").wait_for(timeout=20_000)
        assert users() == []
        panel.locator(".widget-inline-hbox", has_text="Resume from").locator("input").fill(exported.name)
        button("Resume").click()
        wait_for(lambda: users() == shown, 20, "Resume to bring the conversation back")
        shot("resumed")

        # No widget (or other) errors in the browser console; only the Colab badge, on the web, is unreachable.
        errors = [
            (kind, text)
            for kind, text, url in console
            if kind in ("error", "pageerror")
            and not (text.startswith("Failed to load resource") and "127.0.0.1" not in url)
        ]
        (ARTIFACTS / "classic-console.log").write_text("\n".join(f"{k}: {t} {u}" for k, t, u in console))
        assert errors == [], errors
        assert all("127.0.0.1" not in url for url in failed), failed
        browser.close()
