"""Training really learns: a planted concept that a hidden vector v* explains is recovered from another start.

A tiny v-prediction model is taught (in the test, in a few seconds) three colour concepts: two through real words
("alpha", "beta") and one only through a hidden vector v* spliced in place of the word "sks". Textual inversion
then trains "sks" from the init text "*" on images of the third concept. On held-out noise and timesteps the loss
must fall most of the way from the initial vector's loss to v*'s loss. A broken gradient path cannot pass this.

The random VAE barely separates colours in latent space, so this host encodes images with a fixed 8x average
pooling instead (RGB + grey = 4 latent channels): what is tested is the trainer, not the VAE.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from embedding_trainer.config import TrainConfig
from embedding_trainer.host import ImageInfo
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.losses import add_noise, prediction_target
from embedding_trainer.tools.tiny_models import build_tiny_components
from embedding_trainer.trainer import Trainer, prepare_run

pytestmark = [pytest.mark.compat, pytest.mark.slow]  # teaches a tiny model its concepts first (about 30 s)

PRETRAIN_STEPS, SEED = 250, 1
COLOURS = {"alpha": (220, 40, 40), "beta": (40, 60, 220), "sks": (40, 200, 60)}


class PoolingHost(DiffusersHost):
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.nn.functional.avg_pool2d(pixels.float().to(self.device), 8)
        latents = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * 1.5
        return latents, torch.zeros_like(latents)


def concept_images(colour: tuple[int, int, int], count: int, seed: int) -> list[Image.Image]:
    """A field of the concept's colour (slightly varied) with a small square of its complement."""
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (64, 64), tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in colour))
        side = rng.randint(8, 16)
        x, y = rng.randint(0, 64 - side), rng.randint(0, 64 - side)
        ImageDraw.Draw(image).rectangle((x, y, x + side, y + side), fill=tuple(255 - c for c in colour))
        images.append(image)
    return images


def pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1).float() / 127.5 - 1 for i in images])


def build_planted() -> tuple[PoolingHost, dict[str, torch.Tensor]]:
    torch.manual_seed(SEED)
    parts = build_tiny_components("sd2", seed=SEED)  # v-prediction: the x0 part of the target makes text matter
    host = PoolingHost(
        family="sd2",
        unet=parts.unet,
        vae=parts.vae,
        text_encoders=parts.text_encoders,
        tokenizers=parts.tokenizers,
        scheduler_config=dict(parts.scheduler.config),
    )
    vocab = host.vocabulary("clip_h")
    generator = torch.Generator().manual_seed(1)
    v_star = {"clip_h": vocab.mean(0) + vocab.std(0) * torch.randn(1, vocab.shape[1], generator=generator)}
    latents = {k: host.encode_images(pixels(concept_images(c, 16, i)))[0] for i, (k, c) in enumerate(COLOURS.items())}
    size = [ImageInfo((64, 64), (0, 0), (64, 64))]
    with torch.no_grad():
        conditions = {k: host.encode_prompts([k], "sks", v_star, size).hidden_states for k in COLOURS}
    alphas = host.alphas_cumprod()
    unet = parts.unet
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    rng = random.Random(SEED)
    for _ in range(PRETRAIN_STEPS):
        names = [rng.choice(list(COLOURS)) for _ in range(16)]
        x0 = torch.stack([latents[k][rng.randrange(16)] for k in names])
        t = torch.randint(0, 1000, (16,))
        noise = torch.randn_like(x0)
        prediction = unet(
            add_noise(x0, noise, t, alphas), t, encoder_hidden_states=torch.cat([conditions[k] for k in names])
        ).sample
        loss = ((prediction - prediction_target(x0, noise, t, alphas, "v_prediction")) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    unet.requires_grad_(False)
    return host, v_star


@pytest.fixture(scope="module")
def planted() -> tuple[PoolingHost, dict[str, torch.Tensor]]:
    return build_planted()


def test_training_recovers_most_of_a_planted_concept(tmp_path: Path, planted):
    host, v_star = planted
    folder = tmp_path / "sks"
    folder.mkdir()
    for i, image in enumerate(concept_images(COLOURS["sks"], 6, 99)):
        image.save(folder / f"{i}.png")
    template = tmp_path / "bare.txt"
    template.write_text("[name]\n", encoding="utf-8")
    config = TrainConfig(
        name="sks",
        images=str(folder),
        template=str(template),
        resolution=64,
        max_steps=100,
        batch_size=4,
        learning_rate="0.02",
        output_dir=str(tmp_path / "out"),
        run_dir=str(tmp_path / "run"),
        device="cpu",
    )
    trainer = Trainer(prepare_run(config), host)
    loss_init = trainer.held_out_loss(trainer.vectors, batches=16)
    loss_star = trainer.held_out_loss(v_star, batches=16)
    # The concept must be planted for real: v* explains the images far better than the init vector.
    assert loss_star < 0.6 * loss_init, (loss_init, loss_star)
    trainer.run()
    loss_trained = trainer.held_out_loss(trainer.vectors, batches=16)
    recovered = (loss_init - loss_trained) / (loss_init - loss_star)
    assert recovered > 0.8, f"init {loss_init:.4f}, v* {loss_star:.4f}, trained {loss_trained:.4f}"
