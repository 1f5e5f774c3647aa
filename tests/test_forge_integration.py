"""Opt-in: the extension inside a real Stable Diffusion WebUI Forge (2.x) on the CPU.

Set ``EMBTRAIN_FORGE_DIR`` (a Forge checkout with ``repositories/huggingface_guess``; tested: commit dfdcbab6 of
2025-06-26, version 2.0.1v1.10.1) and ``EMBTRAIN_FORGE_PYTHON`` (the Python that runs it). Forge recognises a
checkpoint by its UNet's layout and builds the text encoder and VAE from the full-size configs it ships, so the test
checkpoint is an SD1 one with a small UNet of SD1's layout (320 channels, 2 levels) and full-size CLIP-L and VAE
with random weights: Forge loads it as SD1.5. The test starts Forge API-only with this repository as its extension,
trains through ``/embtrain/v1``, and checks that every vector moved (Forge's weights are inference tensors and its
transformer block adds in place: the adapter must get gradients through anyway) and that txt2img uses the trigger
at once (Forge's infotext names embeddings as ``TI: name``, without hashes).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import make_images
from test_webui_integration import Client, wait_finished
from webui_launcher import launched

from embedding_trainer.embedding_file import load_embedding

FORGE = os.environ.get("EMBTRAIN_FORGE_DIR")
FORGE_PYTHON = os.environ.get("EMBTRAIN_FORGE_PYTHON")
pytestmark = pytest.mark.skipif(
    not (FORGE and FORGE_PYTHON), reason="set EMBTRAIN_FORGE_DIR (a Forge 2.x checkout) and EMBTRAIN_FORGE_PYTHON"
)
ROOT = Path(__file__).resolve().parents[1]
CAT = 2368  # CLIP's token id of "cat"
TOKEN_TABLE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def forge_sd1_checkpoint(forge: Path, out: Path) -> Path:
    """An SD1 checkpoint Forge loads as SD1.5: a small UNet of SD1's layout, full-size CLIP-L and VAE."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from embedding_trainer.standalone.export_a1111 import export_a1111

    configs = forge / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    # A fresh LayerNorm has bias 0, so the encoder's output would average ~0 over a prompt; the WebUIs' emphasis
    # step divides by that mean, which then turns gradients to inf. Real CLIP's final norm has a bias.
    final_norm = next(m for name, m in text_encoder.named_modules() if name.endswith("final_layer_norm"))
    torch.nn.init.normal_(final_norm.bias, mean=0.1, std=0.2)
    parts = {
        "unet": unet,
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(configs / "tokenizer"),
        "scheduler": DDPMScheduler.from_pretrained(configs / "scheduler"),
    }
    return export_a1111(parts, out, dtype=torch.float16).checkpoint


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("forge-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "embedding-trainer").symlink_to(ROOT, target_is_directory=True)
    models = data / "models" / "Stable-diffusion"
    checkpoint = forge_sd1_checkpoint(Path(FORGE), models / "forge-sd1")
    (data / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}), encoding="utf-8")
    host_args = ["--always-cpu", "--clip-in-fp32", "--skip-python-version-check", "--ckpt-dir", str(models)]
    with launched(FORGE, FORGE_PYTHON, data, False, host_args) as base:
        client = Client(base)
        client.data = data
        client.checkpoint = checkpoint
        yield client


def test_train_sd1_in_forge_and_use_the_trigger_at_once(forge: Client, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    make_images(tmp_path / "images", count=4)
    # A preview in the middle: Forge generates it under inference_mode and may load weights anew, after which the
    # adapter must still get gradients.
    body = {"name": "forgecat", "images": str(tmp_path / "images"), "max_steps": 6, "resolution": 64,
            "batch_size": 2, "num_vectors": 2, "init_text": "cat", "weight_decay": 0.0,
            "preview_every": 3, "preview_steps": 2}  # fmt: skip
    status, reply = forge.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    run = wait_finished(forge, reply["id"], timeout=600)
    assert run["state"] == "finished", run["error"]
    assert run["model"]["family"] == "sd1" and run["model"]["prediction_type"] == "epsilon"
    path = Path(run["result"]["embedding_path"])
    assert path == forge.data / "embeddings" / "forgecat.safetensors" and path.is_file()
    assert run["preview_at_steps"][:1] == [3] and run["previews"], run["preview_at_steps"]

    # With no weight decay only a gradient moves a vector: Forge's model passed gradients to every one.
    init = load_file(str(forge.checkpoint))[TOKEN_TABLE][CAT].float()
    vectors = load_embedding(path).vectors["vec"]
    moved = (vectors - init).abs().amax(dim=1)
    print(f"forge sd1: max |trained - init| per vector {moved.tolist()}, {run['it_per_s']:.2f} it/s")
    assert vectors.shape == (2, 768) and (moved > 1e-6).all(), moved.tolist()

    status, reply = forge.request("POST", "/sdapi/v1/txt2img", {
        "prompt": "a photo of forgecat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
    })  # fmt: skip
    assert status == 200, reply
    infotext = json.loads(reply["info"])["infotexts"][0]
    assert re.search(r"\bTI: forgecat\b", infotext), infotext
    assert "forgecat" in forge.request("GET", "/sdapi/v1/embeddings")[1]["loaded"]


def test_errors_in_forge_reach_the_api(forge: Client) -> None:
    status, reply = forge.request("POST", "/embtrain/v1/runs", {"name": "x", "images": "y", "resolution": 70})
    assert status == 422 and reply["detail"][0]["field"] == "resolution"
