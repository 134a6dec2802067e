"""Debian's Chromium, driven by Playwright: upload a real photo on the page and see its caption.

Needs /usr/bin/chromium (`apt-get install chromium chromium-driver`; .ci/run installs it) and
../shared/data/coco_mini; skips cleanly without either. The screenshot lands in
outputs/screenshots/browser.png.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright  # a declared dev dependency: its absence is a broken install

from conftest import ROOT
from test_serve import captioner, server  # noqa: F401 - fixtures: the app under uvicorn on a free port

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [  # headless and offline: no sandbox in containers, no GPU, no calls home
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOT = ROOT / "outputs" / "screenshots" / "browser.png"


def test_upload_a_photo_and_see_its_caption(server, captioner, coco_mini):  # noqa: F811
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: apt-get install chromium chromium-driver")

    photo = sorted((coco_mini / "images" / "val2017").glob("*.jpg"))[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 900})
            page.goto(server)
            page.set_input_files("#file", str(photo))
            page.wait_for_function(
                "() => { const t = document.getElementById('caption').textContent;"
                " return (t && !t.startsWith('captioning')) || document.getElementById('error').textContent; }",
                timeout=120_000,
            )
            assert page.text_content("#error") == ""
            caption = page.text_content("#caption")
            assert caption == captioner.caption(photo)
            assert "ms" in page.text_content("#latency")
            size = page.evaluate("() => [document.getElementById('preview').naturalWidth, document.getElementById('preview').clientHeight]")
            assert size[0] > 0 and size[1] > 100  # the photo is shown
            assert page.locator("#slots button").count() == captioner.module.hparams.prefix_length + 1  # overlay slots
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
    print(f"screenshot: {SCREENSHOT} (caption: {caption!r})")
