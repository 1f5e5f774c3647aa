"""Opt-in: the Embedding Trainer tab in a real AUTOMATIC1111 WebUI (full UI, CPU), driven by headless Chromium.

Needs ``EMBTRAIN_WEBUI_DIR`` and ``EMBTRAIN_WEBUI_PYTHON`` (as ``test_webui_integration.py``), the ``playwright``
Python package and a Chromium (``EMBTRAIN_CHROMIUM``, default ``/usr/bin/chromium``; ``playwright install`` is not
needed). The tests fill the tab, start short runs with previews, wait for the result summary, check the loss chart,
the preview gallery, the trigger-name warnings and Stop during a live run, and leave screenshots in their tmp folders.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from embedding_trainer.config import TrainConfig
from embedding_trainer.embedding_file import EmbeddingData, save_embedding
from tests.helpers import make_images
from tests.webui import FORGE, FORGE_PYTHON, MISSING, PYTHON, WEBUI, forge_checkpoint, launched, running_webui

CHROMIUM = os.environ.get("EMBTRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    not ((WEBUI and PYTHON) or (FORGE and FORGE_PYTHON)) or sync_playwright is None or not os.path.isfile(CHROMIUM),
    reason="set EMBTRAIN_WEBUI_DIR and EMBTRAIN_WEBUI_PYTHON (or EMBTRAIN_FORGE_DIR and EMBTRAIN_FORGE_PYTHON), "
    "and install playwright and a Chromium",
)


@pytest.fixture(scope="module")
def webui_ui(tmp_path_factory: pytest.TempPathFactory):
    if not (WEBUI and PYTHON):
        pytest.skip(MISSING)
    data = tmp_path_factory.mktemp("webui-ui-data")
    with running_webui(data, tmp_path_factory.mktemp("tiny"), with_ui=True) as base:
        yield base, data


@pytest.fixture(scope="module")
def forge_ui(tmp_path_factory: pytest.TempPathFactory):
    """Forge (gradio 4) with its full page, on an SD1 checkpoint it recognises (see test_forge_integration.py)."""
    if not (FORGE and FORGE_PYTHON):
        pytest.skip("set EMBTRAIN_FORGE_DIR and EMBTRAIN_FORGE_PYTHON")
    data = tmp_path_factory.mktemp("forge-ui-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "embedding-trainer").symlink_to(Path(__file__).resolve().parents[2])
    models = data / "models" / "Stable-diffusion"
    forge_checkpoint("sd1", Path(FORGE), models / "forge-sd1")
    (data / "config.json").write_text('{"show_progress_type": "Approx cheap"}', encoding="utf-8")
    # With --data-dir elsewhere, Forge's gradio 4 serves files only from the data folder unless told: its own
    # script.js would be refused (403) and no page script would run.
    host_args = [
        "--always-cpu",
        "--clip-in-fp32",
        "--skip-python-version-check",
        "--ckpt-dir",
        str(models),
        "--gradio-allowed-path",
        str(FORGE),
    ]
    with launched(FORGE, FORGE_PYTHON, data, True, host_args) as base:
        yield base, data


@pytest.fixture(params=["a1111", "forge"])
def tab_host(request: pytest.FixtureRequest) -> tuple[str, Path, str]:
    """The tab in A1111 and in Forge: (base URL, data folder, the resolution the page fills in on load: the tiny
    A1111 checkpoint's config says 64 px; Forge's models carry no such config, and before its lazy first load the
    tab shows the usual 512)."""
    if request.param == "a1111":
        return (*request.getfixturevalue("webui_ui"), "64")
    return (*request.getfixturevalue("forge_ui"), "512")


def _fill(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(value)
    field.dispatch_event("input")
    field.blur()


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def open_tab(page: Any, base: str) -> None:
    """Load the WebUI's page (again) and open the Embedding Trainer tab."""
    page.goto(base, timeout=180_000)
    page.locator("#tabs button", has_text="Embedding Trainer").first.click(timeout=180_000)
    page.locator("#embtrain_name").first.wait_for(timeout=30_000)


@contextlib.contextmanager
def tab_page(base: str, screenshot: Path) -> Iterator[Any]:
    """The Embedding Trainer tab in a fresh headless Chromium; a screenshot is left at ``screenshot`` either way."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            open_tab(page, base)
            try:
                yield page
            finally:
                page.screenshot(path=str(screenshot), full_page=True)
                sys.stderr.write(f"screenshot: {screenshot}\n")
        finally:
            browser.close()


def _wait_js(page, condition: str, what: str, timeout: float = 180_000) -> None:
    try:
        page.wait_for_function(condition, timeout=timeout)
    except Exception:
        status = page.locator("#embtrain_status").first.inner_text()
        result = page.locator("#embtrain_result").first.inner_html()
        raise AssertionError(f"{what}; status: {status}; result: {result}") from None


def test_train_from_the_tab_with_previews(tab_host, tmp_path):
    base, data, resolution = tab_host
    make_images(tmp_path / "images", count=4)
    with tab_page(base, tmp_path / "embtrain-tab.png") as page:
        # The checkpoint's own resolution (the tiny SD1's config: 8 latent pixels, so 64 px) is filled in when the
        # page loads; the learning rate is the default for every family (in table units).
        _wait_js(
            page,
            f"() => gradioApp().querySelector('#embtrain_resolution input').value === '{resolution}'",
            "no default",
        )
        assert _value(page, "embtrain_learning_rate") == TrainConfig().learning_rate
        assert _value(page, "embtrain_init_mode") == TrainConfig().init_mode
        _fill(page, "embtrain_name", "uicat")
        _fill(page, "embtrain_init_text", "cat")
        _fill(page, "embtrain_images", str(tmp_path / "images"))
        _fill(page, "embtrain_max_steps", "15")
        _fill(page, "embtrain_batch_size", "2")
        _fill(page, "embtrain_resolution", "64")
        _fill(page, "embtrain_learning_rate", "0.05")  # vectors that move enough to change the picture
        _fill(page, "embtrain_preview_every", "5")
        _fill(page, "embtrain_preview_steps", "4")
        page.locator("#embtrain_check").click()
        page.locator("#embtrain_dataset_report", has_text="4 usable image(s)").first.wait_for(timeout=60_000)
        page.locator("#embtrain_start").click()
        _wait_js(
            page,
            "() => gradioApp().querySelector('#embtrain_result').innerText.includes('uicat.safetensors')",
            "no result",
        )
        _wait_js(
            page,
            "() => Number(gradioApp().getElementById('embtrain_loss_canvas').dataset.points) >= 15",
            "no chart",
            timeout=30_000,
        )
        # Previews at steps 5, 10 and 15, served by the API and decoded by the browser.
        _wait_js(
            page,
            """() => {
            const images = gradioApp().querySelectorAll('#embtrain_previews img');
            return images.length === 3 && Array.from(images).every(i => i.complete && i.naturalWidth === 64);
        }""",
            "no previews",
            timeout=30_000,
        )
        captions = page.locator("#embtrain_previews figcaption").all_inner_texts()
        points = int(page.locator("#embtrain_loss_canvas").get_attribute("data-points") or 0)
        summary = page.locator("#embtrain_result").first.inner_text()
        errors = page.errors
    assert "uicat.safetensors" in summary and "Final loss" in summary and "64 px" in summary, summary
    assert points == 15 and captions == ["step 5", "step 10", "step 15"]
    assert (data / "embeddings" / "uicat.safetensors").is_file()
    previews = sorted(p.name for p in (data / "embtrain-runs" / "uicat" / "previews").iterdir())
    assert previews == ["uicat-step000005.png", "uicat-step000010.png", "uicat-step000015.png"]
    # Same seed and prompt: only the vectors differ, so identical images would mean stale conditioning.
    pixels = [Image.open(data / "embtrain-runs" / "uicat" / "previews" / name).tobytes() for name in previews]
    assert len(set(pixels)) == 3
    assert not list((data / "embeddings").glob("*.png"))
    assert not [e for e in errors if "embtrain" in e.lower()], errors


def test_name_warnings_and_stop_during_a_live_run(tab_host, tmp_path):
    base, data, _ = tab_host
    make_images(tmp_path / "images", count=4)
    save_embedding(EmbeddingData("taken", {"clip_l": torch.zeros(1, 32)}), data / "embeddings" / "taken.safetensors")
    with tab_page(base, tmp_path / "embtrain-stop.png") as page:
        _fill(page, "embtrain_name", "taken")
        page.locator("#embtrain_name_check", has_text="already exists").first.wait_for(timeout=30_000)
        _fill(page, "embtrain_name", "cat")  # one token the tokenizer knows
        page.locator("#embtrain_name_check", has_text="single token").first.wait_for(timeout=30_000)
        _fill(page, "embtrain_name", "stopcat-ti")
        _wait_js(
            page,
            "() => gradioApp().querySelector('#embtrain_name_check').innerText.trim() === ''",
            "warnings left for a free name",
            timeout=30_000,
        )
        _fill(page, "embtrain_images", str(tmp_path / "images"))
        _fill(page, "embtrain_max_steps", "100000")
        _fill(page, "embtrain_resolution", "64")
        page.locator("#embtrain_start").click()
        _wait_js(
            page, "() => Number(gradioApp().getElementById('embtrain_loss_canvas').dataset.points) >= 3", "no progress"
        )
        page.locator("#embtrain_stop").click()
        _wait_js(
            page,
            "() => gradioApp().querySelector('#embtrain_result').innerText.includes('stopcat-ti')",
            "no result after Stop",
        )
        summary = page.locator("#embtrain_result").first.inner_text()
    assert "stopped" in summary, summary
    assert (data / "embeddings" / "stopcat-ti.safetensors").is_file()


def test_an_sdxl_checkpoint_gets_sdxl_defaults_on_page_load(tmp_path):
    with running_webui(tmp_path / "data", tmp_path / "tiny", with_ui=True, family="sdxl") as base:
        with tab_page(base, tmp_path / "embtrain-sdxl.png") as page:
            _wait_js(
                page,
                "() => gradioApp().querySelector('#embtrain_resolution input').value === '1024'",
                "no SDXL default resolution",
                timeout=60_000,
            )
            learning_rate = _value(page, "embtrain_learning_rate")
    assert learning_rate == TrainConfig().learning_rate  # in table units: the same rate for every family


def _chart(page: Any) -> dict[str, str]:
    return page.evaluate("() => Object.assign({}, gradioApp().getElementById('embtrain_loss_canvas').dataset)")


def _runs(page: Any) -> dict[str, Any]:
    return page.evaluate("() => fetch('./embtrain/v1/runs').then(r => r.json())")


def test_the_chart_follows_the_run_this_page_started_and_an_api_run_on_load(webui_ui, tmp_path):
    """Two runs from the tab in a row, the page reloaded between them: each is charted as its own, during and after.
    Then a run started through the API is followed live when the page loads."""
    base, data = webui_ui
    make_images(tmp_path / "images", count=4)
    with tab_page(base, tmp_path / "embtrain-chart.png") as page:
        for name, steps in (("chartone", 12), ("charttwo", 150)):
            if name == "charttwo":
                open_tab(page, base)  # a reload: the page knows nothing of the first run but what the API says
            _fill(page, "embtrain_name", name)
            _fill(page, "embtrain_images", str(tmp_path / "images"))
            _fill(page, "embtrain_max_steps", str(steps))
            page.locator("#embtrain_start").click()
            if name == "charttwo":  # during the run: its own id, not the finished first run's
                _wait_js(
                    page,
                    "() => gradioApp().getElementById('embtrain_loss_canvas').dataset.state === 'running'",
                    "the second run is not charted while it runs",
                )
                assert _chart(page)["run"] == _runs(page)["active_id"]
            result = f"() => gradioApp().querySelector('#embtrain_result').innerText.includes('{name}.safetensors')"
            _wait_js(page, result, f"no result for {name}")
            run_id = next(r["id"] for r in _runs(page)["runs"] if r["name"] == name)
            _wait_js(
                page,
                f"""() => {{
                const d = gradioApp().getElementById('embtrain_loss_canvas').dataset;
                return d.run === '{run_id}' && d.state === 'finished' && Number(d.points) === {steps}
                    && Number(d.scores) >= 1;
            }}""",
                f"the chart does not show {name} finished with {steps} points and its held-out score",
            )

        # A run started through the API (another client) is followed live on page load.
        started = page.evaluate(
            """(images) => fetch('./embtrain/v1/runs', {method: 'POST',
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({name: 'apicat', images: images, max_steps: 100000})}).then(r => r.json())""",
            str(tmp_path / "images"),
        )
        open_tab(page, base)
        _wait_js(
            page,
            f"""() => {{
            const d = gradioApp().getElementById('embtrain_loss_canvas').dataset;
            return d.run === '{started["id"]}' && d.state === 'running' && Number(d.points) >= 3;
        }}""",
            "the API's run is not followed on page load",
        )
        page.evaluate(f"() => fetch('./embtrain/v1/runs/{started['id']}/stop', {{method: 'POST'}})")
        _wait_js(
            page,
            "() => gradioApp().getElementById('embtrain_loss_canvas').dataset.state === 'stopped'",
            "the followed run's end is not charted",
        )
        errors = page.errors
    assert not [e for e in errors if "embtrain" in e.lower()], errors
