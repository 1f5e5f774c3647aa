"""Opt-in: the extension inside a real AUTOMATIC1111 WebUI (v1.10.x) on the CPU, with a tiny exported checkpoint.

Set ``EMBTRAIN_WEBUI_DIR`` (a WebUI checkout whose ``repositories/`` are in place) and ``EMBTRAIN_WEBUI_PYTHON``
(the Python that runs it). The test starts the WebUI API-only on a free loopback port with a private data folder
(this repository linked in as its only extension, the checkpoint in its models folder), trains through
``/embtrain/v1``, and checks the host: ``GET /sdapi/v1/embeddings`` lists the embedding and a txt2img whose
prompt uses the trigger reports it in ``TI hashes`` with the file's hash, also after a forced reload.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import make_images
from webui_launcher import MISSING, PYTHON, WEBUI, running_webui

from embedding_trainer.embedding_file import file_sha256

pytestmark = pytest.mark.skipif(not (WEBUI and PYTHON), reason=MISSING)


class Client:
    def __init__(self, base: str):
        self.base = base

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
    data = tmp_path_factory.mktemp("webui-data")
    with running_webui(data, tmp_path_factory.mktemp("tiny"), with_ui=False) as base:
        client = Client(base)
        client.data = data
        yield client


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
