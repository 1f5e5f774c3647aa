"""Opt-in: the Embedding Trainer tab in a real AUTOMATIC1111 WebUI (full UI, CPU), driven by headless Chromium.

Needs ``EMBTRAIN_WEBUI_DIR`` and ``EMBTRAIN_WEBUI_PYTHON`` (as ``test_webui_integration.py``), the ``playwright``
Python package and a Chromium (``EMBTRAIN_CHROMIUM``, default ``/usr/bin/chromium``; ``playwright install`` is not
needed). The test fills the tab, starts a short run, waits for the result summary, checks that the loss chart was
drawn and leaves a screenshot in its tmp folder.
"""

from __future__ import annotations

import os
import sys

import pytest
from conftest import make_images
from webui_launcher import PYTHON, WEBUI, running_webui

CHROMIUM = os.environ.get("EMBTRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    not (WEBUI and PYTHON and sync_playwright is not None and os.path.isfile(CHROMIUM)),
    reason="set EMBTRAIN_WEBUI_DIR and EMBTRAIN_WEBUI_PYTHON, and install playwright and a Chromium",
)


@pytest.fixture(scope="module")
def webui_ui(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("webui-ui-data")
    with running_webui(data, tmp_path_factory.mktemp("tiny"), with_ui=True) as base:
        yield base, data


def _fill(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(value)
    field.dispatch_event("input")
    field.blur()


def test_train_from_the_tab(webui_ui, tmp_path):
    base, data = webui_ui
    make_images(tmp_path / "images", count=4)
    screenshot = tmp_path / "embtrain-tab.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base, timeout=180_000)
            page.locator("#tabs button", has_text="Embedding Trainer").first.click(timeout=180_000)
            page.locator("#embtrain_name").first.wait_for(timeout=30_000)
            _fill(page, "embtrain_name", "uicat")
            _fill(page, "embtrain_init_text", "cat")
            _fill(page, "embtrain_images", str(tmp_path / "images"))
            _fill(page, "embtrain_max_steps", "15")
            _fill(page, "embtrain_batch_size", "2")
            _fill(page, "embtrain_resolution", "64")
            page.locator("#embtrain_check").click()
            page.locator("#embtrain_dataset_report", has_text="4 usable image(s)").first.wait_for(timeout=60_000)
            page.locator("#embtrain_start").click()
            try:
                page.wait_for_function(
                    "() => gradioApp().querySelector('#embtrain_result').innerText.includes('uicat.safetensors')",
                    timeout=180_000,
                )
            except Exception:
                page.screenshot(path=str(screenshot), full_page=True)
                raise AssertionError(
                    f"no result; screenshot {screenshot}; result: "
                    + page.locator("#embtrain_result").first.inner_html()
                ) from None
            canvas = page.locator("#embtrain_loss_canvas")
            page.wait_for_function(
                "() => Number(gradioApp().getElementById('embtrain_loss_canvas').dataset.points) >= 15",
                timeout=30_000,
            )
            points = int(canvas.get_attribute("data-points") or 0)
            summary = page.locator("#embtrain_result").first.inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    sys.stderr.write(f"screenshot: {screenshot}\n")
    assert "uicat.safetensors" in summary and "Final loss" in summary, summary
    assert points == 15
    assert (data / "embeddings" / "uicat.safetensors").is_file()
    assert not [e for e in errors if "embtrain" in e.lower()], errors
