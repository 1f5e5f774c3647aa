"""Opt-in: the extension inside a real Stable Diffusion WebUI Forge (2.x) on the CPU.

Set ``EMBTRAIN_FORGE_DIR`` (a Forge checkout with ``repositories/huggingface_guess``; tested: commit dfdcbab6 of
2025-06-26, version 2.0.1v1.10.1) and ``EMBTRAIN_FORGE_PYTHON`` (the Python that runs it). Forge recognises a
checkpoint by its UNet's layout and builds the text encoders and VAE from the full-size configs it ships, so each
test checkpoint (SD1, SD2, SDXL) has a UNet of the family's layout, as small as that allows, and full-size text
encoders and VAE with random weights (``forge_checkpoint`` in ``tests/webui.py``). For each, the test starts Forge
API-only with this repository as its extension, trains through ``/embtrain/v1``, and checks that every vector of
every encoder moved (Forge's weights are inference tensors and its transformer block adds in place: the adapter must
get gradients through anyway) and that txt2img uses the trigger at once (Forge's infotext names embeddings as
``TI: name``, without hashes; SDXL names it once per encoder).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from embedding_trainer.embedding_reading import load_embedding
from tests.helpers import make_images
from tests.webui import (
    CAT,
    FAMILIES,
    FORGE,
    FORGE_MISSING,
    FORGE_PYTHON,
    Client,
    assert_finished_for_the_model,
    forge_checkpoint,
    launched,
    wait_finished,
)

pytestmark = pytest.mark.skipif(not (FORGE and FORGE_PYTHON), reason=FORGE_MISSING)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def forge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    family = request.param
    data = tmp_path_factory.mktemp(f"forge-data-{family}")
    (data / "extensions").mkdir()
    (data / "extensions" / "embedding-trainer").symlink_to(ROOT, target_is_directory=True)
    models = data / "models" / "Stable-diffusion"
    checkpoint = forge_checkpoint(family, Path(FORGE), models / f"forge-{family}")
    (data / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}), encoding="utf-8")
    host_args = ["--always-cpu", "--clip-in-fp32", "--skip-python-version-check", "--ckpt-dir", str(models)]
    with launched(FORGE, FORGE_PYTHON, data, False, host_args) as base:
        client = Client(base)
        client.data = data
        client.checkpoint = checkpoint
        client.family = family
        yield client


def test_train_in_forge_and_use_the_trigger_at_once(forge: Client, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    make_images(tmp_path / "images", count=4)
    # SD1 with a preview in the middle: Forge generates it under inference_mode and may load weights anew, after
    # which the adapter must still get gradients. SD2 and SDXL (full-size OpenCLIP on the CPU) train 4 steps.
    steps = {"max_steps": 6, "preview_every": 3, "preview_steps": 2} if forge.family == "sd1" else {"max_steps": 4}
    body = {
        "name": "forgecat",
        "images": str(tmp_path / "images"),
        "resolution": 64,
        "batch_size": 2,
        "num_vectors": 2,
        "init_text": "cat",
        "weight_decay": 0.0,
        **steps,
    }
    status, reply = forge.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    run = wait_finished(forge, reply["id"], timeout=900)
    path = assert_finished_for_the_model(run, forge.family, forge.data / "embeddings" / "forgecat.safetensors")
    if forge.family == "sd1":
        assert run["preview_at_steps"][:1] == [3] and run["previews"], run["preview_at_steps"]

    # With no weight decay only a gradient moves a vector: Forge's model passed gradients to every one (SDXL: both
    # encoders').
    checkpoint = load_file(str(forge.checkpoint))
    trained = load_embedding(path).vectors
    for key, table in FAMILIES[forge.family].items():
        init = checkpoint[table][CAT].float()
        vectors = trained[key if forge.family == "sdxl" else "vec"]
        moved = (vectors - init).abs().amax(dim=1)
        print(
            f"forge {forge.family} {key}: max |trained - init| per vector {moved.tolist()}, {run['it_per_s']:.2f} it/s"
        )
        assert vectors.shape == (2, init.shape[0]) and (moved > 1e-6).all(), moved.tolist()

    status, reply = forge.request(
        "POST",
        "/sdapi/v1/txt2img",
        {
            "prompt": "a photo of forgecat",
            "steps": 2,
            "width": 64,
            "height": 64,
            "sampler_name": "Euler",
        },
    )
    assert status == 200, reply
    infotext = json.loads(reply["info"])["infotexts"][0]
    assert re.search(r'\bTI: "?forgecat\b', infotext), infotext  # SDXL: TI: "forgecat, forgecat" (once per encoder)
    assert "forgecat" in forge.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]


def test_errors_in_forge_reach_the_api(forge: Client) -> None:
    status, reply = forge.request("POST", "/embtrain/v1/runs", {"name": "x", "images": "y", "resolution": 70})
    assert status == 422 and reply["detail"][0]["field"] == "resolution"


def test_forges_progress_and_interrupt_follow_a_run(forge: Client, tmp_path: Path) -> None:
    """Forge's own progress report (what its progress bar reads) follows a run, and its Interrupt stops it with the
    vectors saved."""
    if forge.family != "sd1":
        pytest.skip("the job-state bridge is the same for every family; SD1 is the quick one")
    make_images(tmp_path / "images", count=4)
    body = {"name": "stopcat", "images": str(tmp_path / "images"), "resolution": 64, "max_steps": 100000}
    status, reply = forge.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    deadline = time.monotonic() + 300
    while forge.request("GET", f"/embtrain/v1/runs/{reply['id']}")[1]["step"] < 3:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.5)
    progress = forge.request("GET", "/sdapi/v1/progress?skip_current_image=true")[1]
    assert progress["progress"] > 0 and progress["state"]["sampling_steps"] == 100000, progress
    assert re.match(r"step \d+/100000, loss ", progress["textinfo"]), progress
    assert forge.request("POST", "/sdapi/v1/interrupt")[0] == 200
    run = wait_finished(forge, reply["id"], timeout=120)
    assert run["state"] == "stopped", run
    assert (forge.data / "embeddings" / "stopcat.safetensors").is_file()
