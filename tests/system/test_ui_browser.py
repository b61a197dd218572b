"""The Prefect UI, in a real browser (Debian's chromium, headless, driven by Playwright): a render's artifacts
page lists its progress, results, summary and contact sheet; the contact sheet shows as a picture and the
results as a table with the failed row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.system
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"


def _latest(port: int, key: str) -> str:
    """The id of the newest version of an artifact, from the API."""
    import httpx

    response = httpx.post(f"http://127.0.0.1:{port}/api/artifacts/filter", timeout=30,
                          json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1})
    response.raise_for_status()
    return response.json()[0]["id"]


def test_the_artifacts_of_a_render_show_in_the_ui(tmp_path, demo_dir, port):
    from playwright.sync_api import sync_playwright

    env = {**os.environ, "AVATAR_BATCH_STATE": str(tmp_path / "state")}
    env.pop("PREFECT_API_URL", None)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio")
    manifest = tmp_path / "lines.parquet"
    pd.DataFrame({"item_id": ["hello", "broken"], "portrait_uri": [str(demo_dir / "astronaut.png")] * 2,
                  "audio_uri": [str(demo_dir / "hello_en_us.wav"), str(broken)]}).to_parquet(manifest)
    avatar = str(BIN / "avatar-batch")
    subprocess.run([avatar, "server", "start", "--port", str(port)], env=env, check=True, timeout=180)
    try:
        done = subprocess.run([avatar, "render", str(manifest), "--output", str(tmp_path / "out")], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 1, done.stderr[-3000:]
        (link,) = [line.split("flow run: ", 1)[1] for line in done.stderr.splitlines() if "flow run: " in line]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(link.strip(), wait_until="networkidle")
            page.get_by_text("Artifacts", exact=True).first.click()
            for key in ("progress", "results", "summary", "contact-sheet"):
                page.get_by_text(f"render-lines-{key}").first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "artifacts.png"), full_page=True)

            page.get_by_text("render-lines-contact-sheet").first.click()
            page.wait_for_load_state("networkidle")
            image = page.locator("img[src^='data:image/jpeg']").first
            image.wait_for(timeout=30_000)
            assert image.evaluate("img => img.complete && img.naturalWidth") == 160, "the picture did not render"
            page.screenshot(path=str(tmp_path / "contact_sheet.png"))

            page.goto(f"http://127.0.0.1:{port}/artifacts/artifact/{_latest(port, 'render-lines-results')}",
                      wait_until="networkidle")
            page.get_by_text("broken", exact=True).wait_for(timeout=30_000)
            assert page.get_by_text("prepare_audio", exact=True).count() == 1
            assert page.get_by_text("UndecodableAudio", exact=False).count() >= 1
            page.screenshot(path=str(tmp_path / "results.png"))
            browser.close()
    finally:
        subprocess.run([avatar, "server", "stop"], env=env, check=False, timeout=120)
