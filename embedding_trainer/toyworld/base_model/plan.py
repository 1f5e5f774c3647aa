"""The settings that determine a base model's weights (:class:`Plan`), and the check that a checkpoint continues
only under the settings that made it. Why each default is what it is: embedding_trainer/toyworld/README.md."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ...errors import EmbeddingTrainerError

FORMAT_VERSION = 1


class BaseModelError(EmbeddingTrainerError):
    """A stage cannot run (missing earlier stage, changed settings under an existing checkpoint...)."""


@dataclass(frozen=True)
class Architecture:
    #: VAE widths per level, full resolution first. The second level's width sets the cost of the decoder's
    #: full-resolution upsampling conv, the most expensive layer: 32 there halves the VAE's time against 64.
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_layers: int = 1
    #: Initial bias of the posterior's log-variance. diffusers starts it at 0 (noise of std 1 on latents that are
    #: still tiny, which hides what the encoder learns); a low start lets reconstruction learn from the first step.
    vae_logvar_init: float = 0.0
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers: int = 1
    #: diffusers' ``attention_head_dim`` (for SD1-style UNets: the number of heads), the same at every level.
    unet_heads: int = 4


@dataclass(frozen=True)
class VaeTraining:
    """Defaults: what the short single-thread experiments chose (see the toy world's README)."""

    steps: int = 16000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    #: L1 between 8x8 average-pooled reconstruction and image: the colour of each latent cell.
    colour_weight: float = 1.0
    colour_pool: int = 8
    #: L1 between neighbouring pixels' differences: edges and textures.
    edge_weight: float = 1.0
    #: L1 between 8x8 averages of the gradient magnitudes along x, y and both diagonals: the kind and strength
    #: of a texture without its phase. Pixel L1 alone rewards a blur wherever the latent does not yet pin down a
    #: pattern's phase, so textures would be the last thing a short training learns.
    texture_weight: float = 8.0
    #: Pixels of the shape weigh ``1 + foreground_weight`` in the pixel, colour, edge and texture terms: shapes
    #: cover 5-35% of an image, and with a plain mean a small VAE learns the backgrounds first and then paints
    #: every shape in the average shape colour for a long time (the measured probe's "brownish orange").
    foreground_weight: float = 4.0
    #: On the KL divergence per latent element. Small: it only keeps the posterior from collapsing to a point.
    kl_weight: float = 1e-5
    #: Train on random ``crop``-pixel crops (0: whole images) for the first ``crop_fraction`` of the steps:
    #: the VAE is convolutional, and a 32 px crop costs a quarter of a 64 px image. The last steps see whole
    #: images (the mid-block attention then sees the 8x8 latents it will work on).
    crop: int = 32
    crop_fraction: float = 0.85


@dataclass(frozen=True)
class UnetTraining:
    steps: int = 12000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    #: Captions drawn per image (world.caption's wording, order and attribute dropout vary between them).
    caption_variants: int = 4
    #: Min-SNR loss weighting (Hang et al. 2023); 0 turns it off.
    min_snr_gamma: float = 5.0
    #: Latent cells under the shape weigh ``1 + foreground_weight`` in the denoising loss (normalised per image):
    #: the backgrounds are learnt at once, the shapes are what takes long. Each cell's optimum is unchanged.
    foreground_weight: float = 0.0
    #: Share of the batch whose timesteps are drawn from ``[0, low_noise_until)`` instead of all 1000: SD1's schedule
    #: was made for 64x64 latents, and on 8x8 latents most timesteps leave only colours and layout to predict;
    #: shapes and textures are decided at the less noisy end. Each timestep's optimum is unchanged.
    low_noise_share: float = 0.0
    low_noise_until: int = 500
    ema_decay: float = 0.999


@dataclass(frozen=True)
class Plan:
    """Everything that determines the weights (besides the machine's float arithmetic)."""

    seed: int = 0
    #: Rendered training images (both stages use the first ``images`` of the world's stream ``seed``).
    images: int = 40000
    arch: Architecture = field(default_factory=Architecture)
    vae: VaeTraining = field(default_factory=VaeTraining)
    unet: UnetTraining = field(default_factory=UnetTraining)

    @classmethod
    def quick(cls, seed: int = 0) -> Plan:
        """A few steps of each stage on a few images, for tests: the real architecture, not a useful model."""
        return cls(
            seed=seed,
            images=32,
            vae=VaeTraining(steps=3, batch=4, warmup=1),
            unet=UnetTraining(steps=3, batch=4, warmup=1, caption_variants=2),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in data["arch"].items()}
        return cls(
            seed=data["seed"],
            images=data["images"],
            arch=Architecture(**arch),
            vae=VaeTraining(**data["vae"]),
            unet=UnetTraining(**data["unet"]),
        )


def check_plan(state: dict[str, Any], plan: Plan, stage: str) -> None:
    """A checkpoint continues only under the settings that made it. Its own stage's step count may grow (a longer
    run); the VAE stage ignores the text encoder's and UNet's settings; the UNet stage needs the very same VAE."""
    saved, mine = state["plan"], plan.to_dict()

    def relevant(p: dict[str, Any], key: str) -> Any:
        value = p[key]
        if key == "arch" and stage == "vae":
            value = {k: v for k, v in value.items() if k.startswith("vae_")}
        if key == stage:
            value = {k: v for k, v in value.items() if k != "steps"}
        return value

    keys = ["seed", "images", "arch", "vae"] + (["unet"] if stage == "unet" else [])
    for key in keys:
        a, b = relevant(saved, key), relevant(mine, key)
        if isinstance(a, dict):  # settings added after the checkpoint was written count as their defaults
            b = {k: v for k, v in b.items() if k in a}
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            raise BaseModelError(
                f"{stage} checkpoint was made with {key}={a}, this run asks for {b}; use another --out folder "
                "or the same settings"
            )
