"""Opt-in: the extension inside a real AUTOMATIC1111 WebUI (v1.10.x) on the CPU, with tiny exported SD1, SD2
(v-prediction) and SDXL checkpoints.

Set ``EMBTRAIN_WEBUI_DIR`` (a WebUI checkout whose ``repositories/`` are in place) and ``EMBTRAIN_WEBUI_PYTHON``
(the Python that runs it). For each family the tests start one WebUI, API-only, on a free loopback port with a
private data folder (this repository linked in as its extension, the checkpoint in its models folder, and for
SD2/SDXL a test-only extension that registers the tiny OpenCLIP architecture), train through ``/embtrain/v1``, and
check the host: ``GET /sdapi/v1/embeddings`` lists the embedding with the model's width (SDXL: CLIP-L + OpenCLIP-G),
every trained vector moved away from its initial value (the real host gave it a nonzero gradient: SDXL's
conditioner gives none unless the adapter makes its text embedders trainable), and a txt2img whose prompt uses the
trigger reports it in ``TI hashes`` with the file's hash, also after a forced reload.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from embedding_trainer.embedding_file import EmbeddingData, file_sha256, save_embedding
from embedding_trainer.embedding_reading import load_embedding
from tests.helpers import make_images
from tests.webui import (
    CAT,
    FAMILIES,
    MISSING,
    PYTHON,
    REGISTERED,
    WEBUI,
    Client,
    assert_finished_for_the_model,
    checkpoint_name,
    running_webui,
    ti_hashes,
    wait_finished,
)

pytestmark = pytest.mark.skipif(not (WEBUI and PYTHON), reason=MISSING)


@pytest.fixture(scope="module", params=list(FAMILIES))
def webui(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One WebUI per family for the whole module (pytest runs every test of one family before the next)."""
    family = request.param
    data = tmp_path_factory.mktemp(f"webui-data-{family}")
    with running_webui(data, tmp_path_factory.mktemp("tiny"), with_ui=False, family=family) as base:
        client = Client(base)
        client.data = data
        client.family = family
        client.checkpoint = data / "models" / "Stable-diffusion" / f"{checkpoint_name(family)}.safetensors"
        yield client


def infotext(client: Client, prompt: str) -> str:
    status, reply = client.request(
        "POST", "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    )
    assert status == 200, reply
    return json.loads(reply["info"])["infotexts"][0]


def test_the_host_loaded_the_family(webui):
    """The WebUI built the tiny model of this family (SD2/SDXL: after the test extension registered the OpenCLIP
    architecture) and the extension sees it."""
    log = (webui.data / "webui.log").read_text(errors="replace")
    assert (REGISTERED in log) == (webui.family != "sd1"), log[-3000:]
    models = webui.request("GET", "/sdapi/v1/sd-models")[1]
    assert [m["model_name"] for m in models] == [checkpoint_name(webui.family)]


def test_train_through_the_api_and_use_the_trigger_at_once(webui, tmp_path):
    from safetensors.torch import load_file

    make_images(tmp_path / "images", count=4)
    body = {
        "name": "itcat",
        "images": str(tmp_path / "images"),
        "max_steps": 12,
        "resolution": 64,
        "batch_size": 2,
        "num_vectors": 2,
        "init_text": "cat",
        "weight_decay": 0.0,
    }
    status, reply = webui.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    run = wait_finished(webui, reply["id"])
    path = assert_finished_for_the_model(run, webui.family, webui.data / "embeddings" / "itcat.safetensors")
    assert not Path(run["result"]["run_dir"]).is_relative_to(webui.data / "embeddings")

    # Every vector of every encoder moved away from init_text's token row. With no weight decay only a gradient
    # moves it, so the real host connected each encoder's vectors to the loss (SDXL: both of them).
    token_tables = FAMILIES[webui.family]
    checkpoint = load_file(str(webui.checkpoint))
    trained = load_embedding(path).vectors
    keys = list(token_tables) if webui.family == "sdxl" else ["vec"]
    assert sorted(trained) == sorted(keys)
    widths = {}
    for key, table in token_tables.items():
        vectors = trained[key if webui.family == "sdxl" else "vec"]
        init = checkpoint[table][CAT]
        widths[key] = init.shape[0]
        assert vectors.shape == (2, init.shape[0]) and torch.isfinite(vectors).all()
        moved = (vectors - init).abs().amax(dim=1)
        print(f"{webui.family} {key}: max |trained - init| per vector {moved.tolist()}")
        assert (moved > 1e-6).all(), f"{webui.family} {key}: vectors did not move ({moved.tolist()})"

    loaded = webui.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]
    assert loaded["itcat"]["vectors"] == 2 and loaded["itcat"]["step"] == 12
    assert loaded["itcat"]["shape"] == sum(widths.values())  # SDXL: CLIP-L + OpenCLIP-G widths (768 + 1280 real)
    expected = f"itcat: {file_sha256(path)[:12]}"
    hashes = ti_hashes(infotext(webui, "a photo of itcat"))
    print(f"{webui.family}: embeddings entry {loaded['itcat']}, TI hashes {hashes}")
    assert hashes and set(hashes) == {expected}, hashes
    # A forced reload reads the same result from disk.
    assert webui.request("POST", "/sdapi/v1/refresh-embeddings")[0] == 200
    assert "itcat" in webui.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]
    assert set(ti_hashes(infotext(webui, "itcat on a table"))) == {expected}


def test_errors_reach_the_api(webui, tmp_path):
    status, reply = webui.request("POST", "/embtrain/v1/runs", {"name": "x", "images": "y", "resolution": 70})
    assert status == 422 and reply["detail"][0]["field"] == "resolution"
    # What can be checked before queueing is refused at once, naming the field.
    status, reply = webui.request("POST", "/embtrain/v1/runs", {"name": "nofolder", "images": str(tmp_path / "no")})
    assert status == 422 and reply["detail"][0]["field"] == "images", reply
    # What only the model can tell fails inside the run, and the error reaches the API: an init file of the wrong width.
    make_images(tmp_path / "images", count=4)
    save_embedding(EmbeddingData("odd", {"clip_l": torch.zeros(1, 17)}), tmp_path / "odd.safetensors")
    body = {
        "name": "oddinit",
        "images": str(tmp_path / "images"),
        "resolution": 64,
        "init_mode": "file",
        "init_file": str(tmp_path / "odd.safetensors"),
    }
    status, reply = webui.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    run = wait_finished(webui, reply["id"])
    assert run["state"] == "failed" and "17" in run["error"] and run["error_type"] == "EmbeddingFileError", run


def test_quality_options_on_the_real_host(webui, tmp_path):
    """best-word ranks words through the host's own embedders, encoder-output reads its text encoders' outputs, and
    the scores, the best vectors and the table-scaled rate reach the API and the file."""
    from safetensors.torch import load_file

    make_images(tmp_path / "images", count=4)
    common = {
        "images": str(tmp_path / "images"),
        "resolution": 64,
        "batch_size": 2,
        "eval_every": 2,
        "norm_band": 1.5,
        "final_vectors": "best",
    }
    status, reply = webui.request(
        "POST",
        "/embtrain/v1/runs",
        {**common, "name": "itbest", "max_steps": 4, "init_mode": "best-word", "starts": 2, "start_steps": 2},
    )
    assert status == 200, reply
    run = wait_finished(webui, reply["id"])
    assert run["state"] == "finished", run["error"]
    assert run["result"]["init_choice"] and run["result"]["vectors_step"] in (2, 4), run["result"]
    assert [point[0] for point in run["held_out_history"]] == [0, 2, 4]
    scores = run["result"]["start_scores"]
    assert len(scores) == 2 and scores[run["result"]["chosen_start"] - 1] == min(scores)
    data = load_embedding(run["result"]["embedding_path"])
    assert data.metadata["init_choice"] == run["result"]["init_choice"]
    assert data.metadata["starts"].startswith(f"start {run['result']['chosen_start']} of 2")
    assert float(data.metadata["held_out_loss"]) == pytest.approx(run["result"]["held_out_loss"], rel=1e-5)

    # One tiny step from the encoder's output for "cat": far from the token row of "cat" in every encoder.
    body = {
        **common,
        "name": "itcross",
        "max_steps": 1,
        "init_mode": "encoder-output",
        "init_text": "cat",
        "num_vectors": 1,
        "learning_rate": "1e-6",
        "norm_band": 0.0,
    }
    status, reply = webui.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    run = wait_finished(webui, reply["id"])
    assert run["state"] == "finished", run["error"]
    checkpoint = load_file(str(webui.checkpoint))
    trained = load_embedding(run["result"]["embedding_path"]).vectors
    for key, table in FAMILIES[webui.family].items():
        vector = trained[key if webui.family == "sdxl" else "vec"][0]
        assert (vector - checkpoint[table][CAT].float()).norm() > 0.5 * checkpoint[table][CAT].float().norm(), key
        assert torch.isfinite(vector).all()


def test_checkpointing_and_stop_on_the_real_host(webui, tmp_path):
    make_images(tmp_path / "images", count=4)
    # Random init reads the host's token-embedding tables (the OpenCLIP ones for SD2/SDXL).
    body = {
        "name": "itstop",
        "images": str(tmp_path / "images"),
        "max_steps": 100000,
        "resolution": 64,
        "gradient_checkpointing": True,
        "init_mode": "random",
    }
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


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_medvram_previews_and_vae_in_ram(family, tmp_path):
    """--medvram swaps modules between RAM and the device in forward hooks; a run lifts them for its duration
    (UNet and text encoders together, the VAE only to encode or preview) and puts them back, so generations after
    the run still work."""
    make_images(tmp_path / "images", count=4, captions=False)  # captions the template ignores would be a warning
    data = tmp_path / "data"
    with running_webui(data, tmp_path / "tiny", with_ui=False, family=family, extra_args=["--medvram"]) as base:
        client = Client(base)
        body = {
            "name": "medcat",
            "images": str(tmp_path / "images"),
            "max_steps": 6,
            "resolution": 64,
            "vae_to_cpu": True,
            "gradient_checkpointing": True,
            "preview_every": 3,
            "preview_steps": 2,
        }
        status, reply = client.request("POST", "/embtrain/v1/runs", body)
        assert status == 200, reply
        run = wait_finished(client, reply["id"])
        assert run["state"] == "finished" and not run["warnings"], (run["error"], run["warnings"])
        assert run["preview_at_steps"] == [3, 6]
        assert all(Path(p).is_file() for p in run["preview_paths"])
        path = Path(run["result"]["embedding_path"])
        assert f"medcat: {file_sha256(path)[:12]}" in infotext(client, "a photo of medcat")
    assert "medvram" in (data / "webui.log").read_text(errors="replace")


def test_api_auth_and_early_checks_as_a_client_of_the_real_host_sees_them(tmp_path: Path) -> None:
    """With ``--api-auth`` every route asks for the credentials. The host reshapes every HTTP error raised in a route
    or dependency into its own body and drops the ``WWW-Authenticate`` header; the README says so. A bad folder is
    refused at submission (422, naming the field), and our own JSON error bodies pass through unchanged."""

    def call(base: str, credentials: str | None, body: Any = None) -> tuple[int, dict[str, str], Any]:
        method = "POST" if body is not None else "GET"
        request = urllib.request.Request(
            base + "/embtrain/v1/runs", method=method, data=json.dumps(body).encode() if body is not None else None
        )
        request.add_header("Content-Type", "application/json")
        if credentials:
            request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())

    with running_webui(tmp_path / "data", tmp_path / "tiny", with_ui=False, api_auth="alice:s3cret") as base:
        missing = call(base, None)
        wrong = call(base, "alice:nope")
        listed = call(base, "alice:s3cret")
        bad_folder = call(base, "alice:s3cret", {"name": "authcat", "images": str(tmp_path / "nowhere")})
    assert missing[0] == 401 and missing[2] == {
        "error": "HTTPException",
        "detail": "Authentication required",
        "body": "",
        "errors": "",
    }
    assert wrong[0] == 401 and wrong[2]["detail"] == "Incorrect username or password"
    assert "www-authenticate" not in {k.lower() for k in missing[1]}
    assert listed[0] == 200 and listed[2]["runs"] == []
    assert bad_folder[0] == 422 and bad_folder[2]["detail"][0]["field"] == "images"


_THEIR_CARD = """
import sys
import torch
from PIL import Image, PngImagePlugin
from modules.textual_inversion.image_embedding import embedding_to_b64, insert_image_data_embed

vec = torch.load(sys.argv[1])
data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "theircard", "step": 7}
card = insert_image_data_embed(Image.new("RGB", (64, 64), (90, 90, 90)), data)
info = PngImagePlugin.PngInfo()
info.add_text("sd-ti-embedding", embedding_to_b64(data))
card.save(sys.argv[2], pnginfo=info)
card.save(sys.argv[3])  # the bands alone
"""


def test_picture_cards_load_both_ways(webui, tmp_path: Path) -> None:
    """Our card loads in the WebUI's embedding loader, and the WebUI's own cards (text chunk, or bands alone) load
    in ours with the same vectors."""
    if webui.family != "sd1":
        pytest.skip("the WebUI writes cards only for single-encoder embeddings")
    width = 32  # the tiny SD1's CLIP width
    ours = torch.randn(2, width, generator=torch.Generator().manual_seed(5))
    picture = Image.new("RGB", (64, 64), (30, 60, 200))
    save_embedding(
        EmbeddingData("ourcard", {"clip_l": ours}, step=3), webui.data / "embeddings" / "ourcard.png", picture=picture
    )
    assert webui.request("POST", "/sdapi/v1/refresh-embeddings")[0] == 200
    loaded = webui.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]
    assert loaded["ourcard"]["vectors"] == 2 and loaded["ourcard"]["shape"] == width and loaded["ourcard"]["step"] == 3

    torch.save(ours * 2, tmp_path / "vec.pt")
    text_card, band_card = tmp_path / "theircard.png", tmp_path / "theircard-bands.png"
    subprocess.run(
        [PYTHON, "-c", _THEIR_CARD, str(tmp_path / "vec.pt"), str(text_card), str(band_card)],
        cwd=WEBUI,
        check=True,
        timeout=300,
    )
    for card in (text_card, band_card):
        data = load_embedding(card)
        assert (data.name, data.step, data.layout) == ("theircard", 7, "webui_card")
        assert torch.equal(data.vectors["vec"], ours * 2)
