"""Starts a real WebUI for the opt-in tiers and the WebUI benchmark: a private data folder with this repository as
its only extension and a tiny exported SD1, SD2 or SDXL checkpoint, on a free loopback port. Not a test module.

SD2 and SDXL have OpenCLIP text encoders whose tiny architecture open_clip does not know: the exporter writes its
open_clip model config beside the checkpoint, and a test-only extension written into the data folder registers it
(``open_clip.add_model_config``) when the WebUI imports extension scripts, which it does before it loads the model.
That registration is test tooling, not part of the product's extension.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

WEBUI = os.environ.get("EMBTRAIN_WEBUI_DIR")
PYTHON = os.environ.get("EMBTRAIN_WEBUI_PYTHON")
ROOT = Path(__file__).resolve().parents[1]
MISSING = "set EMBTRAIN_WEBUI_DIR (a WebUI v1.10 checkout with its repositories) and EMBTRAIN_WEBUI_PYTHON"
#: The line the test-only extension prints once it has registered the tiny OpenCLIP architecture.
REGISTERED = "embtrain-test: registered open_clip config"

_REGISTER_SCRIPT = '''"""Test-only, written by embedding-trainer's tests/webui.py: register the tiny OpenCLIP
architecture of the exported checkpoint before the WebUI builds the model."""

import open_clip

open_clip.add_model_config({path!r})
print({message!r}, {path!r}, flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_name(family: str) -> str:
    return "embtrain-tiny" if family == "sd1" else f"embtrain-tiny-{family}"


class WebUIStartError(RuntimeError):
    """The WebUI exited or did not answer in time; the message ends with its log."""


def prepare_data_folder(
    data: Path,
    models: Path,
    family: str = "sd1",
    model: Path | None = None,
    extra_scripts: Mapping[str, str] | None = None,
) -> Path:
    """The WebUI's private data folder: this repository as an extension, the tiny checkpoint of ``family`` (or
    ``model``, a diffusers SD1 folder, exported), for SD2/SDXL the extension that registers the tiny OpenCLIP
    architecture, and ``extra_scripts`` (file name -> source) as one more tooling extension. Returns the
    checkpoint."""
    from embedding_trainer.tools.export_a1111 import export_a1111
    from embedding_trainer.tools.tiny_models import save_tiny_model

    (data / "extensions").mkdir(parents=True)
    (data / "extensions" / "embedding-trainer").symlink_to(ROOT, target_is_directory=True)
    if model is None:
        model = save_tiny_model(family, models / family, seed=0, webui_loadable=True)
    result = export_a1111(model, data / "models" / "Stable-diffusion" / checkpoint_name(family))
    if result.open_clip_config is not None:
        scripts = data / "extensions" / "embtrain-test-open-clip" / "scripts"
        scripts.mkdir(parents=True)
        (scripts / "embtrain_test_open_clip.py").write_text(
            _REGISTER_SCRIPT.format(path=str(result.open_clip_config.resolve()), message=REGISTERED),
            encoding="utf-8",
        )
    if extra_scripts:
        scripts = data / "extensions" / "embtrain-tooling" / "scripts"
        scripts.mkdir(parents=True)
        for file_name, source in extra_scripts.items():
            (scripts / file_name).write_text(source, encoding="utf-8")
    # Offline: the default live-preview method would download a model at the first preview.
    (data / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}), encoding="utf-8")
    return result.checkpoint


@contextlib.contextmanager
def running_webui(
    data: Path,
    models: Path,
    with_ui: bool,
    family: str = "sd1",
    extra_args: Sequence[str] = (),
    model: Path | None = None,
    extra_scripts: Mapping[str, str] | None = None,
    api_auth: str | None = None,
) -> Iterator[str]:
    """Yield the base URL of a WebUI (API only, or the full page too) once ``/embtrain/v1`` answers; raises
    ``WebUIStartError`` if it does not. ``api_auth`` ("user:password") starts it with ``--api-auth``."""
    checkpoint = prepare_data_folder(data, models, family, model, extra_scripts)
    host_args = ["--use-cpu", "all", "--no-half", "--precision", "full", "--ckpt", str(checkpoint)]
    with launched(WEBUI, PYTHON, data, with_ui, [*host_args, *extra_args], api_auth) as base:
        yield base


@contextlib.contextmanager
def launched(
    webui: str | None,
    python: str | None,
    data: Path,
    with_ui: bool,
    host_args: Sequence[str],
    api_auth: str | None = None,
) -> Iterator[str]:
    """Start the WebUI (A1111 or Forge) in ``webui`` with its data in ``data`` on a free loopback port, offline and
    without installing anything; yield its base URL once ``/embtrain/v1`` answers."""
    assert webui and python, MISSING
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")  # fmt: skip
    command = [
        python, "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
        "--skip-version-check", "--api", "--server-name", "127.0.0.1", "--port", str(port), "--no-download-sd-model",
        "--data-dir", str(data), *([] if with_ui else ["--nowebui"]), *host_args,
        *(["--api-auth", api_auth] if api_auth else []),
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with open(data / "webui.log", "wb") as log:
        process = subprocess.Popen(command, cwd=webui, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                # No request before start-up has finished: in UI mode the host adds its API middleware after the
                # server is already listening, and starlette refuses that once any request has been served.
                started = b"Startup time:" in (data / "webui.log").read_bytes()
                with contextlib.suppress(OSError):
                    if started:
                        probe = urllib.request.Request(base + "/embtrain/v1/runs")
                        if api_auth:
                            probe.add_header("Authorization", "Basic " + base64.b64encode(api_auth.encode()).decode())
                        with urllib.request.urlopen(probe, timeout=10) as response:
                            if response.status == 200:
                                break
                if process.poll() is not None or time.monotonic() > deadline:
                    log_tail = (data / "webui.log").read_text(errors="replace")[-4000:]
                    raise WebUIStartError("the WebUI did not start:\n" + log_tail)
                time.sleep(1)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    sys.stderr.write((data / "webui.log").read_text(errors="replace")[-2000:])
