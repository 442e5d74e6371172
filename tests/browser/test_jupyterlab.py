"""End to end: JupyterLab 4 and Notebook 7 on 127.0.0.1, the notebook run in headless Chromium (Debian's package, driven by
Playwright), a prompt typed in the panel, Generate clicked, the answer seen growing, Stop clicked.
Screenshots are kept in test-artifacts/."""

import json
import os
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

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.browser


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APPS = {"jupyterlab": ("lab", "lab/tree"), "notebook7": ("notebook", "notebooks")}


@pytest.fixture(params=list(APPS))
def lab(request, tmp_path):
    """JupyterLab or Notebook 7 serving a copy of the notebook (autosave never touches the committed one)."""
    command, path = APPS[request.param]
    nb = nbformat.read(ROOT / "llama2_textgen.ipynb", as_version=4)
    inject_parameters(nb, {"OFFLINE": True, "COMPARE_QUANTIZATIONS": False, "MAX_TOKENS": 64})
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
    deadline = time.time() + 90
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


def wait_for_idle_kernel(sessions_url, timeout=90):
    """Until the notebook's kernel reports idle (asked over the server's REST API, the same for both apps)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        sessions = json.load(urllib.request.urlopen(sessions_url, timeout=5))
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
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
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
            prompt.wait_for(timeout=120_000)
        except PlaywrightTimeout:
            page.screenshot(path=str(ARTIFACTS / f"{app}-panel-missing.png"), full_page=True)
            raise
        prompt.scroll_into_view_if_needed()
        page.locator(".llama2-textgen-stats").wait_for(state="attached")
        # Settings: more tokens than the notebook's default, so there is time to press Stop.
        page.get_by_text("System prompt and sampling").click()
        max_tokens = page.locator(".widget-inline-hbox", has_text="Max tokens").locator("input")
        max_tokens.fill("400")
        max_tokens.press("Enter")
        prompt.fill("Write a long story about a cat who learns to sail.")
        page.get_by_role("button", name="Generate").click()

        answer = page.locator(".llama2-textgen-answer pre")
        lengths = []
        deadline = time.time() + 60
        while time.time() < deadline and len(lengths) < 4:
            text = answer.inner_text()
            if text and (not lengths or len(text) > lengths[-1]):
                lengths.append(len(text))
            time.sleep(0.15)
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-mid-answer.png"), full_page=False)
        assert len(lengths) >= 3 and lengths == sorted(lengths), lengths  # seen growing in the page

        page.get_by_role("button", name="Stop").click()
        stats = page.locator(".llama2-textgen-stats")
        stats.filter(has_text="finish:").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / f"{app}-panel-stopped.png"), full_page=False)
        assert "finish: cancelled" in stats.inner_text()
        assert page.get_by_role("button", name="Generate").is_enabled()
        browser.close()
