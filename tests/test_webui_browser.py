"""Opt-in: the Embedding Trainer tab in a real AUTOMATIC1111 WebUI (full UI, CPU), driven by headless Chromium.

Needs ``EMBTRAIN_WEBUI_DIR`` and ``EMBTRAIN_WEBUI_PYTHON`` (as ``test_webui_integration.py``), the ``playwright``
Python package and a Chromium (``EMBTRAIN_CHROMIUM``, default ``/usr/bin/chromium``; ``playwright install`` is not
needed). The test fills the tab, starts a short run, waits for the result summary, checks that the loss chart was
drawn and leaves a screenshot in its tmp folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import make_images

WEBUI = os.environ.get("EMBTRAIN_WEBUI_DIR")
PYTHON = os.environ.get("EMBTRAIN_WEBUI_PYTHON")
CHROMIUM = os.environ.get("EMBTRAIN_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui_ui(tmp_path_factory: pytest.TempPathFactory):
    from embedding_trainer.standalone.export_a1111 import export_a1111_checkpoint
    from embedding_trainer.standalone.tiny_models import save_tiny_model

    data = tmp_path_factory.mktemp("webui-ui-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "embedding-trainer").symlink_to(ROOT, target_is_directory=True)
    model = save_tiny_model("sd1", tmp_path_factory.mktemp("tiny") / "sd1", seed=0, webui_loadable=True)
    checkpoint = export_a1111_checkpoint(model, data / "models" / "Stable-diffusion" / "embtrain-tiny")
    (data / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}), encoding="utf-8")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    command = [
        PYTHON, "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
        "--skip-version-check", "--use-cpu", "all", "--no-half", "--precision", "full", "--api",
        "--server-name", "127.0.0.1", "--port", str(port), "--no-download-sd-model", "--data-dir", str(data),
        "--ckpt", str(checkpoint),
    ]  # fmt: skip
    log = open(data / "webui.log", "wb")
    process = subprocess.Popen(command, cwd=WEBUI, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(base + "/embtrain/v1/runs", timeout=10) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the WebUI did not start:\n" + (data / "webui.log").read_text(errors="replace")[-4000:])
        time.sleep(1)
    yield base, data
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()
    sys.stderr.write((data / "webui.log").read_text(errors="replace")[-3000:])


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
