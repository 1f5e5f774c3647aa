"""Starts a real WebUI for the opt-in tiers and the WebUI benchmark: a private data folder with this repository as
its only extension and a tiny exported SD1, SD2 or SDXL checkpoint, on a free loopback port. Not a test module.

It also holds what the real-host tests and ``benchmarks/webui_speed.py`` share to talk to a running WebUI or Forge:
the JSON client (``Client``), waiting for a run (``wait_finished``), reading an infotext's ``TI hashes``, and what
the exported checkpoints hold (``FAMILIES``, ``CAT``).

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
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

WEBUI = os.environ.get("EMBTRAIN_WEBUI_DIR")
PYTHON = os.environ.get("EMBTRAIN_WEBUI_PYTHON")
ROOT = Path(__file__).resolve().parents[1]
MISSING = "set EMBTRAIN_WEBUI_DIR (a WebUI v1.10 checkout with its repositories) and EMBTRAIN_WEBUI_PYTHON"
FORGE = os.environ.get("EMBTRAIN_FORGE_DIR")
FORGE_PYTHON = os.environ.get("EMBTRAIN_FORGE_PYTHON")
FORGE_MISSING = "set EMBTRAIN_FORGE_DIR (a Forge 2.x checkout) and EMBTRAIN_FORGE_PYTHON"
#: The line the test-only extension prints once it has registered the tiny OpenCLIP architecture.
REGISTERED = "embtrain-test: registered open_clip config"

_REGISTER_SCRIPT = '''"""Test-only, written by embedding-trainer's tests/webui.py: register the tiny OpenCLIP
architecture of the exported checkpoint before the WebUI builds the model."""

import open_clip

open_clip.add_model_config({path!r})
print({message!r}, {path!r}, flush=True)
'''


#: Per family and encoder key: the token-embedding table in the exported checkpoint (init_text's vectors' source).
FAMILIES = {
    "sd1": {"clip_l": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"},
    "sd2": {"clip_h": "cond_stage_model.model.token_embedding.weight"},
    "sdxl": {
        "clip_l": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "clip_g": "conditioner.embedders.1.model.token_embedding.weight",
    },
}
CAT = 2368  # CLIP's token id of "cat"


class Client:
    """JSON over HTTP to a WebUI's API (ours under ``/embtrain/v1``, the host's under ``/sdapi/v1``).

    ``request`` answers ``(status, body)`` for errors too, for tests that check them; ``call`` answers the body and
    raises on an HTTP error, for scripts that cannot go on after one."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def _send(self, method: str, path: str, body: Any, timeout: float) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def request(self, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
        status, raw = self._send(method, path, body, timeout)
        return status, json.loads(raw or b"null")

    def call(self, method: str, path: str, body: Any = None, timeout: float = 600) -> Any:
        status, raw = self._send(method, path, body, timeout)
        if status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {raw[:2000]!r}")
        return json.loads(raw or b"null")


def wait_finished(client: Client, run_id: str, timeout: float = 300, poll_s: float = 0.5) -> dict[str, Any]:
    """The run's record once it has ended (finished, stopped or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.request("GET", f"/embtrain/v1/runs/{run_id}")[1]
        if status["state"] in ("finished", "stopped", "failed"):
            return status
        time.sleep(poll_s)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


def assert_finished_for_the_model(run: dict[str, Any], family: str, embedding: Path) -> Path:
    """The run finished, its adapter saw the family, prediction type and encoders the checkpoint's config defines,
    and the embedding is where the host keeps embeddings; returns its path."""
    assert run["state"] == "finished", run["error"]
    assert run["model"]["family"] == family
    assert run["model"]["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")
    assert list(run["model"]["encoders"]) == list(FAMILIES[family])
    path = Path(run["result"]["embedding_path"])
    assert path == embedding and path.is_file()
    return path


def ti_hashes(text: str) -> list[str]:
    """The ``TI hashes`` entries of an infotext (SDXL lists an embedding once per text encoder)."""
    match = re.search(r'TI hashes: "([^"]*)"', text)
    return match[1].split(", ") if match else []


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


def forge_checkpoint(family: str, forge: Path, out: Path) -> Path:
    """A checkpoint Forge loads as SD1.5 or SDXL base. Forge recognises the family by the UNet's layout (SD1: 320
    channels; SDXL: 320 channels, 2 blocks per level, 0/2/10 transformer layers) and builds the text encoders and
    VAE from the full-size configs it ships; so the UNet is small where the layout allows (SD1 2 levels, SDXL 320
    channels on every level) and the rest full-size, all with random weights."""
    import pytest  # a test helper: skips the test where diffusers is missing
    import torch

    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from embedding_trainer.tools.export_a1111 import export_a1111

    repo = {
        "sd1": "runwayml/stable-diffusion-v1-5",
        "sd2": "stabilityai/stable-diffusion-2-1",
        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    }[family]
    configs = forge / "backend" / "huggingface" / repo
    torch.manual_seed(0)
    if family == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(320, 640),
            layers_per_block=1,
            cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
        )
        encoders = {"text_encoder": CLIPTextModel}
    elif family == "sd2":  # SD2.1's scheduler config is v-prediction; the exported yaml says so to Forge
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(320, 640),
            layers_per_block=1,
            cross_attention_dim=1024,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=5,
            use_linear_projection=True,
        )
        encoders = {"text_encoder": CLIPTextModel}
    else:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(320, 320, 320),
            layers_per_block=2,
            cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=5,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    parts: dict = {"unet": unet, "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))}
    for name, model_class in encoders.items():
        parts[name] = encoder = model_class(CLIPTextConfig.from_pretrained(configs / name))
        # A fresh LayerNorm has bias 0, so the encoder's output would average ~0 over a prompt; the WebUIs' emphasis
        # step divides by that mean, which then turns gradients to inf. Real CLIP's final norm has a bias.
        final_norm = next(m for n, m in encoder.named_modules() if n.endswith("final_layer_norm"))
        torch.nn.init.normal_(final_norm.bias, mean=0.1, std=0.2)
        tokenizer = name.replace("text_encoder", "tokenizer")
        parts[tokenizer] = CLIPTokenizer.from_pretrained(configs / tokenizer)
    parts["scheduler"] = EulerDiscreteScheduler.from_pretrained(configs / "scheduler")
    return export_a1111(parts, out, dtype=torch.float16).checkpoint


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
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1"
    )
    command = [
        python,
        "launch.py",
        "--skip-prepare-environment",
        "--skip-install",
        "--skip-torch-cuda-test",
        "--skip-version-check",
        "--api",
        "--server-name",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-download-sd-model",
        "--data-dir",
        str(data),
        *([] if with_ui else ["--nowebui"]),
        *host_args,
        *(["--api-auth", api_auth] if api_auth else []),
    ]
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
