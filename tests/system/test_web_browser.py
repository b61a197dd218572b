"""The producers' page in a real browser (Debian's chromium, headless, through Playwright): upload the demo portrait
and a WAV, render with `preview` through the job API, and the result plays in the page."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import API_TOKENS, free_port

from flows.local_server import stop_process

pytestmark = pytest.mark.system
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def web(job_api, tmp_path):
    url, _, _ = job_api
    port = free_port()
    env = {**os.environ, "AVATAR_BATCH_WEB_TOKEN": API_TOKENS["studio-a"]}
    page = subprocess.Popen([str(BIN / "avatar-batch"), "web", "--port", str(port), "--api-url", url], env=env,
                            stdout=(tmp_path / "web.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    try:
        while True:
            try:
                if httpx.get(address, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert page.poll() is None and time.monotonic() < deadline, (tmp_path / "web.log").read_text()
            time.sleep(0.5)
        yield address
    finally:
        stop_process(page.pid)
        page.wait(timeout=30)


def test_a_line_uploaded_in_the_page_renders_and_plays(web, demo_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.goto(web)
        page.locator("#portrait input[type=file]").set_input_files(str(demo_dir / "astronaut.png"))
        page.locator("#audio input[type=file]").set_input_files(str(demo_dir / "hello_en_us.wav"))
        page.wait_for_timeout(1500)  # the uploads reach the page's server
        page.locator("#render").click()
        video = page.locator("#result video")
        video.wait_for(state="attached", timeout=240_000)
        page.wait_for_function("() => { const v = document.querySelector('#result video');"
                               " return v && v.currentSrc && v.readyState >= 1 && v.duration > 1; }", timeout=60_000)
        duration = page.evaluate("() => document.querySelector('#result video').duration")
        status = page.locator("#status").inner_text()
        page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
        page.screenshot(path="/tmp/avatar-web.png", full_page=True)
        browser.close()
    assert duration > 1 and "Completed" in status, status
