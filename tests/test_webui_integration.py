"""Opt-in: the extension inside a real AUTOMATIC1111 WebUI (v1.10.x) on the CPU, with a tiny exported checkpoint.

Set ``EMBTRAIN_WEBUI_DIR`` (a WebUI checkout whose ``repositories/`` are in place) and ``EMBTRAIN_WEBUI_PYTHON``
(the Python that runs it). The test starts the WebUI API-only on a free loopback port with a private data folder
(this repository linked in as its only extension, the checkpoint in its models folder), trains through
``/embtrain/v1``, and checks the host: ``GET /sdapi/v1/embeddings`` lists the embedding and a txt2img whose
prompt uses the trigger reports it in ``TI hashes`` with the file's hash, also after a forced reload.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import make_images

from embedding_trainer.embedding_file import file_sha256

WEBUI = os.environ.get("EMBTRAIN_WEBUI_DIR")
PYTHON = os.environ.get("EMBTRAIN_WEBUI_PYTHON")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (WEBUI and PYTHON),
    reason="set EMBTRAIN_WEBUI_DIR (a WebUI v1.10 checkout with its repositories) and EMBTRAIN_WEBUI_PYTHON",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")


@pytest.fixture(scope="module")
def webui(tmp_path_factory: pytest.TempPathFactory):
    from embedding_trainer.standalone.export_a1111 import export_a1111_checkpoint
    from embedding_trainer.standalone.tiny_models import save_tiny_model

    data = tmp_path_factory.mktemp("webui-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "embedding-trainer").symlink_to(ROOT, target_is_directory=True)
    model = save_tiny_model("sd1", tmp_path_factory.mktemp("tiny") / "sd1", seed=0, webui_loadable=True)
    checkpoint = export_a1111_checkpoint(model, data / "models" / "Stable-diffusion" / "embtrain-tiny")
    # Offline: the default live-preview method would download a model at the first preview.
    (data / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}), encoding="utf-8")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    command = [
        PYTHON, "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
        "--skip-version-check", "--use-cpu", "all", "--no-half", "--precision", "full", "--api", "--nowebui",
        "--server-name", "127.0.0.1", "--port", str(port), "--no-download-sd-model", "--data-dir", str(data),
        "--ckpt", str(checkpoint),
    ]  # fmt: skip
    log = open(data / "webui.log", "wb")
    process = subprocess.Popen(command, cwd=WEBUI, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(port)
    deadline = time.monotonic() + 240
    while True:
        try:
            if client.request("GET", "/embtrain/v1/runs")[0] == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the WebUI did not start:\n" + (data / "webui.log").read_text(errors="replace")[-4000:])
        time.sleep(1)
    client.data = data
    yield client
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
    sys.stderr.write((data / "webui.log").read_text(errors="replace")[-2000:])


def wait_finished(client: Client, run_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.request("GET", f"/embtrain/v1/runs/{run_id}")[1]
        if status["state"] in ("finished", "stopped", "failed"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


def infotext(client: Client, prompt: str) -> str:
    status, reply = client.request(
        "POST", "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    )
    assert status == 200, reply
    return json.loads(reply["info"])["infotexts"][0]


def test_train_through_the_api_and_use_the_trigger_at_once(webui, tmp_path):
    make_images(tmp_path / "images", count=4)
    body = {"name": "itcat", "images": str(tmp_path / "images"), "max_steps": 12, "resolution": 64,
            "batch_size": 2, "num_vectors": 2, "init_text": "cat"}  # fmt: skip
    status, reply = webui.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    run = wait_finished(webui, reply["id"])
    assert run["state"] == "finished", run["error"]
    path = Path(run["result"]["embedding_path"])
    assert path == webui.data / "embeddings" / "itcat.safetensors" and path.is_file()
    assert not Path(run["result"]["run_dir"]).is_relative_to(webui.data / "embeddings")
    loaded = webui.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]
    assert loaded["itcat"]["vectors"] == 2 and loaded["itcat"]["step"] == 12
    expected = f'TI hashes: "itcat: {file_sha256(path)[:12]}"'
    assert expected in infotext(webui, "a photo of itcat")
    # A forced reload reads the same result from disk.
    assert webui.request("POST", "/sdapi/v1/refresh-embeddings")[0] == 200
    assert "itcat" in webui.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]
    assert expected in infotext(webui, "itcat on a table")


def test_errors_reach_the_api(webui, tmp_path):
    status, reply = webui.request("POST", "/embtrain/v1/runs", {"name": "x", "images": "y", "resolution": 70})
    assert status == 422 and reply["detail"][0]["field"] == "resolution"
    status, reply = webui.request("POST", "/embtrain/v1/runs", {"name": "nofolder", "images": str(tmp_path / "no")})
    assert status == 200
    run = wait_finished(webui, reply["id"])
    assert run["state"] == "failed" and "does not exist" in run["error"]


def test_checkpointing_and_stop_on_the_real_host(webui, tmp_path):
    make_images(tmp_path / "images", count=4)
    body = {"name": "itstop", "images": str(tmp_path / "images"), "max_steps": 100000, "resolution": 64,
            "gradient_checkpointing": True}  # fmt: skip
    status, reply = webui.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    deadline = time.monotonic() + 120
    while webui.request("GET", f"/embtrain/v1/runs/{reply['id']}")[1]["step"] < 3:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.2)
    assert webui.request("POST", "/embtrain/v1/stop")[0] == 200
    run = wait_finished(webui, reply["id"])
    assert run["state"] == "stopped" and run["step"] >= 3
    assert Path(run["result"]["embedding_path"]).is_file()
    assert "itstop" in webui.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]
