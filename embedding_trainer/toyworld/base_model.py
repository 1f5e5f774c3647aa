"""A small SD1-layout base model trained from scratch on the toy world, in stages that resume.

The model has Stable Diffusion 1's structure at a tiny width: an 8x-downsampling ``AutoencoderKL`` with 4 latent
channels (four levels), a CLIP text encoder (quick_gelu, 77 positions, CLIP's 49408-token vocabulary and the real
CLIP tokenizer, built offline from ``tools/clip_vocab.py``) and a cross-attention ``UNet2DConditionModel``.
Every UNet and VAE width is a multiple of 32 with 32-group norms, so ``tools/export_a1111.py`` writes it as a
checkpoint the WebUI's ldm code builds.

Training (see :func:`train`) runs in stages, each checkpointed under ``<out>/state`` so that a later call continues
where the last one stopped:

1. ``vae``: the autoencoder on rendered world images, with a pixel L1 loss, an L1 on 8x8-pooled colours (the colour
   of each latent cell: without it a small VAE first learns one brownish average colour and is slow to leave it), an
   L1 on image gradients (edges and textures) and a small KL term. Its latent scale is then calibrated so scaled
   latents have unit standard deviation, as SD's 0.18215 was chosen for its VAE.
2. ``unet``: the text encoder and UNet together on latents that the frozen VAE encodes once (their posterior means
   and standard deviations are cached, a fresh latent is drawn each step), epsilon prediction on SD1's scaled-linear
   schedule, captions redrawn from several variants per image and dropped 10% of the time (classifier-free
   guidance), min-SNR-5 loss weighting (Hang et al. 2023) and an EMA of the weights, which is what gets saved.

The saved model's text encoder then forgets the held-out concepts' words (:func:`erase_held_out_words`): their token
rows go back to their initial random values, so the UNet can draw a heart but no word asks for one (see world.py).

Everything is a function of the seed and the step: the data order, crops, noise and caption choices of step ``s``
come from a generator seeded with ``(seed, stage, s)``, so a run that stops and resumes gives the weights of one that
does not (on the same machine and thread count: float reductions may differ between thread counts). Stage lengths are
set in steps, never in time: ``minutes`` only stops a stage early, to be continued later.

The finished model (``<out>/model``) is a diffusers folder written by the project's ``save_components``, weights in
fp16, with ``training_record.json`` saying how long each stage took and on what.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EmbeddingTrainerError
from ..log import logger
from . import world

FORMAT_VERSION = 1
#: Offset of the evaluation images' indices: they never overlap the training images (index < this).
EVAL_INDEX_OFFSET = 10_000_000
LATENT_FACTOR = 8


class BaseModelError(EmbeddingTrainerError):
    """A stage cannot run (missing earlier stage, changed settings under an existing checkpoint...)."""


# ---------------------------------------------------------------------------------------------------------------
# Settings


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


# ---------------------------------------------------------------------------------------------------------------
# Components


def build_vae(arch: Architecture, seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
        block_out_channels=tuple(arch.vae_channels),
        layers_per_block=arch.vae_layers,
        norm_num_groups=32,
        latent_channels=4,
        sample_size=world.IMAGE_SIZE,
    )
    with torch.no_grad():
        vae.quant_conv.bias[4:] += arch.vae_logvar_init  # quant_conv's output is (mean, logvar) per latent channel
    return vae


def build_text_encoder(arch: Architecture, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..tools.clip_vocab import VOCAB_SIZE

    torch.manual_seed(seed + 1)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=arch.text_width,
        intermediate_size=arch.text_width * 4,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=arch.text_width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet(arch: Architecture, seed: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 2)
    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // LATENT_FACTOR,
        in_channels=4,
        out_channels=4,
        # Cross-attention at every level: at 8x8 latents every level is small, and words must reach all of them.
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=tuple(arch.unet_channels),
        layers_per_block=arch.unet_layers,
        norm_num_groups=32,
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.unet_heads,
    )


def build_tokenizer() -> Any:
    from ..tools.clip_vocab import END_TOKEN
    from ..tools.tiny_models import clip_tokenizer

    return clip_tokenizer(END_TOKEN)  # SD1 pads with the end token, as the WebUI does


def scheduler_config() -> dict[str, Any]:
    """SD1's training schedule (what ldm's yaml calls ``linear`` 0.00085..0.012 over 1000 steps)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "steps_offset": 1,
    }


def build_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config())


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(arch: Architecture, seed: int = 0) -> dict[str, dict[str, int]]:
    """Parameters and fp16 bytes of each component of ``arch``."""
    parts = {
        "vae": build_vae(arch, seed),
        "text_encoder": build_text_encoder(arch, seed),
        "unet": build_unet(arch, seed),
    }
    return {k: {"params": parameter_count(m), "fp16_bytes": 2 * parameter_count(m)} for k, m in parts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Data


def _render_range(args: tuple[int, int, int]) -> np.ndarray:
    seed, start, stop = args
    out = np.empty((stop - start, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    for i, index in enumerate(range(start, stop)):
        out[i] = np.asarray(world.render(world.example(seed, index)[0]))
    return out


def render_images(seed: int, start: int, count: int, workers: int = 1) -> np.ndarray:
    """Images ``start .. start+count`` of the captioned world ``seed`` as uint8 ``[count, 64, 64, 3]``."""
    if workers <= 1 or count < 2000:
        return _render_range((seed, start, start + count))
    from concurrent.futures import ProcessPoolExecutor

    chunk = 1000
    jobs = [(seed, s, min(s + chunk, start + count)) for s in range(start, start + count, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_render_range, jobs)))


def training_images(plan: Plan, state_dir: Path, workers: int = 1) -> np.ndarray:
    """The plan's training images, rendered once and cached in ``state_dir``."""
    path = state_dir / f"images-seed{plan.seed}-n{plan.images}.npy"
    if path.is_file():
        images = np.load(path)
        # A cache rendered by an older world.py would silently train on the old drawings: spot-check a few.
        probe = [0, len(images) // 2, len(images) - 1]
        if all(np.array_equal(images[i], _render_range((plan.seed, i, i + 1))[0]) for i in probe):
            return images
        logger.info("%s was rendered by a different world.py: rendering again", path)
    started = time.monotonic()
    images = render_images(plan.seed, 0, plan.images, workers)
    _save_atomically(path, lambda p: np.save(p, images))
    logger.info("rendered %d training images in %.0f s", plan.images, time.monotonic() - started)
    return images


def caption_variants(seed: int, index: int, count: int) -> list[str]:
    """``count`` captions of image ``index``: the first is world.example's own, the others are redrawn from streams
    of their own (wording, order and attribute dropout vary)."""
    scene, text = world.example(seed, index)
    return [text] + [world.caption(scene, np.random.default_rng([seed, index, v, 271828])) for v in range(1, count)]


def training_captions(plan: Plan) -> list[list[str]]:
    """``captions[i][v]``: variant ``v`` of image ``i``'s caption."""
    return [caption_variants(plan.seed, i, plan.unet.caption_variants) for i in range(plan.images)]


def tokenize(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[len(texts), 77]``, padded with the end token as SD1 (and the WebUI) do."""
    return tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of one step: a function of (seed, stage, step) only, so resuming repeats the same draws."""
    mixed = np.random.SeedSequence([seed, sum(map(ord, stage)), step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_atomically(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)


def _torch_save(obj: Any, path: Path) -> None:
    _save_atomically(path, lambda p: torch.save(obj, p))


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def machine_description(device: torch.device, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers
        import transformers

        info["diffusers"], info["transformers"] = str(diffusers.__version__), str(transformers.__version__)
    except ImportError:
        pass
    return info


class _Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay (1 + n) / (10 + n)."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


@dataclass
class StageResult:
    stage: str
    done: bool
    step: int
    steps: int
    seconds: float  # training time of this stage over all calls so far
    last_loss: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: VAE


def vae_losses(
    rec: torch.Tensor, x: torch.Tensor, kl: torch.Tensor, cfg: VaeTraining, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The VAE's loss and its parts. ``weight`` ``[N, 1, H, W]``: per-pixel weights of the pixel and colour terms."""
    if weight is None:
        weight = torch.ones_like(x[:, :1])
    pixel = ((rec - x).abs() * weight).sum() / (weight.sum() * x.shape[1])
    if cfg.colour_weight:
        pool = cfg.colour_pool
        cell_weight = F.avg_pool2d(weight, pool)
        cells = (F.avg_pool2d(rec, pool) - F.avg_pool2d(x, pool)).abs() * cell_weight
        colour = cells.sum() / (cell_weight.sum() * x.shape[1])
    else:
        colour = rec.new_zeros(())
    if cfg.edge_weight:
        # Differences between neighbours: edges and the shapes' textures (weighted like the pixels).
        dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
        dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
        wx, wy = weight[..., :, 1:], weight[..., 1:, :]
        edges = (dx.abs() * wx).sum() / (wx.sum() * x.shape[1]) + (dy.abs() * wy).sum() / (wy.sum() * x.shape[1])
    else:
        edges = rec.new_zeros(())
    texture = texture_statistics_loss(rec, x, weight) if cfg.texture_weight else rec.new_zeros(())
    total = pixel + cfg.colour_weight * colour + cfg.edge_weight * edges + cfg.texture_weight * texture
    total = total + cfg.kl_weight * kl
    parts = {
        "loss": total.item(),
        "pixel": pixel.item(),
        "colour": colour.item(),
        "edge": edges.item(),
        "texture": texture.item(),
        "kl": kl.item(),
    }
    return total, parts


def _gradient_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``[N, 4*C, H-1, W-1]``: absolute differences along x, y and the two diagonals."""
    a, b, c, d = x[..., :-1, :-1], x[..., :-1, 1:], x[..., 1:, :-1], x[..., 1:, 1:]
    return torch.cat([(b - a).abs(), (c - a).abs(), (d - a).abs(), (c - b).abs()], dim=1)


def texture_statistics_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pool: int = 8) -> torch.Tensor:
    """L1 between ``pool``-pixel averages of directional gradient magnitudes (phase-blind texture statistics)."""
    w = F.avg_pool2d(weight[..., 1:, 1:], pool, ceil_mode=True)
    stats_rec = F.avg_pool2d(_gradient_magnitudes(rec), pool, ceil_mode=True)
    stats_x = F.avg_pool2d(_gradient_magnitudes(x), pool, ceil_mode=True)
    return ((stats_rec - stats_x).abs() * w).sum() / (w.sum() * stats_x.shape[1])


def foreground(x: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """``[N, 1, H, W]``: 1 where an image in [-1, 1] differs from its corner pixel, which in the toy world is always
    background (shapes keep a margin from the border)."""
    return ((x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > threshold).to(x.dtype)


def _crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    top, left = torch.randint(0, x.shape[-1] - size + 1, (2,), generator=generator).tolist()
    return x[..., top : top + size, left : left + size]


@torch.no_grad()
def calibrate_scaling_factor(vae: Any, images: np.ndarray, device: torch.device, count: int = 2048) -> float:
    """1 / std of the VAE's latents over ``count`` images: scaled latents then have unit spread."""
    latents = []
    for start in range(0, min(count, len(images)), 256):
        x = to_model_range(images[start : min(start + 256, count)]).to(device)
        latents.append(vae.encode(x).latent_dist.mean.float().cpu())
    return round(1.0 / float(torch.cat(latents).std()), 5)


def train_vae(
    plan: Plan,
    out: Path,
    *,
    minutes: float | None = None,
    device: torch.device | str = "cpu",
    workers: int = 1,
    log_every: int = 50,
    save_every: int = 500,
    stop_after: int | None = None,
) -> StageResult:
    """Train (or continue training) the VAE; stops after ``plan.vae.steps`` steps, after ``minutes``, or at step
    ``stop_after`` (tests: a stage that stops and resumes must give the weights of one that does not)."""
    device = torch.device(device)
    cfg = plan.vae
    state_dir = out / "state"
    path = state_dir / "vae.pt"
    vae = build_vae(plan.arch, plan.seed).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, seconds, prep_seconds, history = 0, 0.0, 0.0, []
    if path.is_file():
        state = _torch_load(path)
        _check_plan(state, plan, "vae")
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds, history = state["step"], state["seconds"], state["history"]
        prep_seconds = state.get("prep_seconds", 0.0)
    if step >= cfg.steps:
        return StageResult("vae", True, step, cfg.steps, seconds, history[-1]["loss"] if history else None)
    prep_started = time.monotonic()
    images = training_images(plan, state_dir, workers)
    prep_seconds += time.monotonic() - prep_started
    tensor_images = torch.from_numpy(images)

    def save() -> None:
        state = {
            "version": FORMAT_VERSION,
            "plan": plan.to_dict(),
            "model": vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "seconds": seconds + time.monotonic() - started,
            "prep_seconds": prep_seconds,
            "history": history,
            "scaling_factor": float(vae.config.scaling_factor),
            "machine": machine_description(device, torch.get_num_threads()),
        }
        _torch_save(state, path)

    logger.info(
        "vae: step %d of %d, batch %d, lr %g, %d params, device %s, %d threads",
        step, cfg.steps, cfg.batch, cfg.lr, parameter_count(vae), device, torch.get_num_threads(),
    )  # fmt: skip
    vae.train()
    started = time.monotonic()
    window: list[dict[str, float]] = []
    window_start, window_step = started, step
    while step < cfg.steps:
        if minutes is not None and time.monotonic() - started > minutes * 60:
            break
        if stop_after is not None and step >= stop_after:
            break
        generator = _step_generator(plan.seed, "vae", step)
        index = torch.randint(0, len(images), (cfg.batch,), generator=generator)
        x = to_model_range(tensor_images[index])
        x = torch.cat([x, 1 + cfg.foreground_weight * foreground(x)], dim=1)  # crop image and weights together
        if cfg.crop and step < cfg.crop_fraction * cfg.steps:
            x = _crop(x, cfg.crop, generator)
        x, weight = x[:, :3], x[:, 3:]
        noise = torch.randn((x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), generator=generator)
        x, weight, noise = x.to(device), weight.to(device), noise.to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup)
        posterior = vae.encode(x).latent_dist
        latent = posterior.mean + posterior.std * noise
        rec = vae.decode(latent).sample
        kl = posterior.kl().mean() / latent[0].numel()
        loss, parts = vae_losses(rec, x, kl, cfg, weight)
        if not math.isfinite(parts["loss"]):
            raise BaseModelError(f"vae: loss is {parts['loss']} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(parts)
        if step % log_every == 0 or step == cfg.steps:
            now = time.monotonic()
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            rate = (step - window_step) / max(1e-9, now - window_start)
            history.append({"step": step, **mean, "steps_per_s": rate})
            logger.info(
                "vae %d/%d loss %.4f (pixel %.4f colour %.4f edge %.4f texture %.4f kl %.3g) %.2f steps/s %.0f img/s",
                step, cfg.steps, mean["loss"], mean["pixel"], mean["colour"], mean["edge"], mean["texture"], mean["kl"],
                rate, rate * cfg.batch,
            )  # fmt: skip
            window, window_start, window_step = [], now, step
        if step % save_every == 0:
            save()
    seconds += time.monotonic() - started
    started = time.monotonic()  # save() adds the time since ``started``: none from here on
    vae.eval()
    if step >= cfg.steps:
        vae.register_to_config(scaling_factor=calibrate_scaling_factor(vae, images, device))
        logger.info("vae: done in %.1f min; latent scaling factor %.5f", seconds / 60, vae.config.scaling_factor)
    save()
    return StageResult("vae", step >= cfg.steps, step, cfg.steps, seconds, history[-1]["loss"] if history else None)


def load_trained_vae(plan: Plan, out: Path, require_done: bool = True) -> Any:
    path = out / "state" / "vae.pt"
    if not path.is_file():
        raise BaseModelError(f"{path}: no VAE checkpoint; run the vae stage first (--stage vae)")
    state = _torch_load(path)
    _check_plan(state, plan, "vae")
    if require_done and state["step"] < plan.vae.steps:
        raise BaseModelError(
            f"{path}: the VAE has trained {state['step']} of {plan.vae.steps} steps; finish the vae stage first"
        )
    vae = build_vae(plan.arch, plan.seed)
    vae.load_state_dict(state["model"])
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    return vae.eval()


def _check_plan(state: dict[str, Any], plan: Plan, stage: str) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: text encoder + UNet


@torch.no_grad()
def encode_latents(vae: Any, images: np.ndarray, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, ...]:
    """Posterior means and standard deviations ``[N, 4, 8, 8]`` (unscaled), and the share of each latent cell that
    the shape covers ``[N, 1, 8, 8]``, fp32 on the CPU."""
    means, stds, shares = [], [], []
    for start in range(0, len(images), batch):
        x = to_model_range(images[start : start + batch])
        posterior = vae.encode(x.to(device)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        shares.append(F.avg_pool2d(foreground(x), LATENT_FACTOR))
    return torch.cat(means), torch.cat(stds), torch.cat(shares)


def cached_latents(plan: Plan, out: Path, device: torch.device, workers: int = 1) -> dict[str, Any]:
    path = out / "state" / "latents.pt"
    if path.is_file():
        cache = _torch_load(path)
        if _same_latent_plan(cache["plan"], plan) and "foreground" in cache:
            return cache
    vae = load_trained_vae(plan, out).to(device)
    images = training_images(plan, out / "state", workers)
    started = time.monotonic()
    mean, std, share = encode_latents(vae, images, device)
    cache = {
        "plan": plan.to_dict(),
        "mean": mean,
        "std": std,
        "foreground": share,
        "scaling_factor": float(vae.config.scaling_factor),
    }
    _torch_save(cache, path)
    logger.info("encoded %d latents in %.0f s", len(images), time.monotonic() - started)
    return cache


def _same_latent_plan(saved: dict[str, Any], plan: Plan) -> bool:
    """Whether latents cached under ``saved`` are those of ``plan`` (same images, same VAE)."""

    def key(p: dict[str, Any]) -> str:
        vae_arch = {k: v for k, v in p["arch"].items() if k.startswith("vae_")}
        return json.dumps([p["seed"], p["images"], vae_arch, p["vae"]], sort_keys=True)

    return key(saved) == key(plan.to_dict())


def train_unet(
    plan: Plan,
    out: Path,
    *,
    minutes: float | None = None,
    device: torch.device | str = "cpu",
    workers: int = 1,
    log_every: int = 50,
    save_every: int = 1000,
    stop_after: int | None = None,
) -> StageResult:
    """Train (or continue training) the text encoder and UNet on the frozen VAE's latents (stopping as
    :func:`train_vae`)."""
    device = torch.device(device)
    cfg = plan.unet
    path = out / "state" / "unet.pt"
    unet = build_unet(plan.arch, plan.seed).to(device)
    text_encoder = build_text_encoder(plan.arch, plan.seed).to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    # No weight decay: the 49k token rows the captions never use must keep their initial norms (the trainer's
    # embedding initialisation and norm statistics read the vocabulary).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = _Ema([unet, text_encoder], cfg.ema_decay)
    step, seconds, prep_seconds, history = 0, 0.0, 0.0, []
    if path.is_file():
        state = _torch_load(path)
        _check_plan(state, plan, "unet")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        step, seconds, history = state["step"], state["seconds"], state["history"]
        prep_seconds = state.get("prep_seconds", 0.0)
    if step >= cfg.steps:
        return StageResult("unet", True, step, cfg.steps, seconds, history[-1]["loss"] if history else None)

    prep_started = time.monotonic()
    latents = cached_latents(plan, out, device, workers)
    mean, std, scale = latents["mean"], latents["std"], latents["scaling_factor"]
    cell_weight = 1 + cfg.foreground_weight * latents["foreground"]
    cell_weight = cell_weight / cell_weight.mean(dim=(1, 2, 3), keepdim=True)
    tokenizer = build_tokenizer()
    captions = training_captions(plan)
    unique = sorted({c for variants in captions for c in variants} | {""})
    row = {text: i for i, text in enumerate(unique)}
    token_table = tokenize(tokenizer, unique)
    caption_rows = torch.tensor([[row[c] for c in variants] for variants in captions])
    empty_row = row[""]
    alphas_cumprod = build_scheduler().alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr if cfg.min_snr_gamma else torch.ones_like(snr)
    prep_seconds += time.monotonic() - prep_started

    def save() -> None:
        state = {
            "version": FORMAT_VERSION,
            "plan": plan.to_dict(),
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "step": step,
            "seconds": seconds + time.monotonic() - started,
            "prep_seconds": prep_seconds,
            "history": history,
            "machine": machine_description(device, torch.get_num_threads()),
        }
        _torch_save(state, path)

    logger.info(
        "unet: step %d of %d, batch %d, lr %g, UNet %d + text encoder %d params, %d images x %d captions "
        "(%d distinct), device %s, %d threads",
        step, cfg.steps, cfg.batch, cfg.lr, parameter_count(unet), parameter_count(text_encoder), len(captions),
        cfg.caption_variants, len(unique), device, torch.get_num_threads(),
    )  # fmt: skip
    unet.train()
    text_encoder.train()
    started = time.monotonic()
    window: list[float] = []
    window_start, window_step = started, step
    while step < cfg.steps:
        if minutes is not None and time.monotonic() - started > minutes * 60:
            break
        if stop_after is not None and step >= stop_after:
            break
        generator = _step_generator(plan.seed, "unet", step)
        index = torch.randint(0, len(mean), (cfg.batch,), generator=generator)
        variant = torch.randint(0, cfg.caption_variants, (cfg.batch,), generator=generator)
        dropped = torch.rand(cfg.batch, generator=generator) < cfg.caption_dropout
        rows = torch.where(dropped, torch.full_like(variant, empty_row), caption_rows[index, variant])
        latent = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scale
        noise = torch.randn(latent.shape, generator=generator)
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch,), generator=generator)
        if cfg.low_noise_share:
            low = torch.randint(0, cfg.low_noise_until, (cfg.batch,), generator=generator)
            t = torch.where(torch.rand(cfg.batch, generator=generator) < cfg.low_noise_share, low, t)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latent + (1 - a).sqrt() * noise
        ids, noisy, noise, t_dev = token_table[rows].to(device), noisy.to(device), noise.to(device), t.to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup)
        context = text_encoder(ids)[0]
        prediction = unet(noisy, t_dev, encoder_hidden_states=context).sample
        squared = (prediction.float() - noise).pow(2)
        per_sample = (squared * cell_weight[index].to(device)).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t].to(device)).mean()
        if not math.isfinite(loss.item()):
            raise BaseModelError(f"unet: loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        step += 1
        window.append(squared.mean().item())  # the plain MSE, comparable between settings
        if step % log_every == 0 or step == cfg.steps:
            now = time.monotonic()
            rate = (step - window_step) / max(1e-9, now - window_start)
            mse = sum(window) / len(window)
            history.append({"step": step, "loss": mse, "steps_per_s": rate})
            logger.info("unet %d/%d mse %.4f %.2f steps/s %.0f samples/s", step, cfg.steps, mse, rate, rate * cfg.batch)
            window, window_start, window_step = [], now, step
        if step % save_every == 0:
            save()
    seconds += time.monotonic() - started
    started = time.monotonic()
    save()
    return StageResult("unet", step >= cfg.steps, step, cfg.steps, seconds, history[-1]["loss"] if history else None)


# ---------------------------------------------------------------------------------------------------------------
# The finished model


@dataclass
class BaseModel:
    """The trained parts, ready to sample (fp32, eval mode)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]

    def to(self, device: torch.device | str) -> BaseModel:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def trained_model(
    plan: Plan, out: Path, use_ema: bool = True, require_done: bool = True, erase_held_out: bool = True
) -> BaseModel:
    """The model from the stage checkpoints (the EMA weights unless ``use_ema`` is false), its text encoder without
    the held-out words unless ``erase_held_out`` is false (to measure what the UNet learnt to draw for them)."""
    vae = load_trained_vae(plan, out)
    path = out / "state" / "unet.pt"
    if not path.is_file():
        raise BaseModelError(f"{path}: no UNet checkpoint; run the unet stage first (--stage unet)")
    state = _torch_load(path)
    _check_plan(state, plan, "unet")
    if require_done and state["step"] < plan.unet.steps:
        raise BaseModelError(f"{path}: {state['step']} of {plan.unet.steps} UNet steps done; finish the unet stage")
    unet, text_encoder = build_unet(plan.arch, plan.seed), build_text_encoder(plan.arch, plan.seed)
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    if use_ema:
        ema = _Ema([unet, text_encoder], plan.unet.ema_decay)
        ema.load_state_dict(state["ema"])
        ema.copy_to()
    tokenizer = build_tokenizer()
    if erase_held_out:
        erase_held_out_words(text_encoder, tokenizer, build_text_encoder(plan.arch, plan.seed))
    return BaseModel(unet.eval(), vae, text_encoder.eval(), tokenizer, scheduler_config())


def held_out_token_ids(tokenizer: Any, words: Sequence[str] | None = None) -> dict[str, int]:
    """The token id of each held-out word (default: ``world.held_out_words()``); each must be one CLIP token that no
    other caption word uses."""
    ids = {}
    for word in world.held_out_words() if words is None else words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise BaseModelError(f"held-out word {word!r} is {len(tokens)} CLIP tokens; held-out words must be one")
        ids[word] = tokens[0]
    others = set(world.caption_vocabulary()) - set(ids)
    shared = set(ids.values()) & {t for w in others for t in tokenizer(w, add_special_tokens=False)["input_ids"]}
    if shared:
        raise BaseModelError(f"held-out token ids {sorted(shared)} are also used by other caption words")
    return ids


@torch.no_grad()
def erase_held_out_words(
    text_encoder: Any, tokenizer: Any, initial_encoder: Any, words: Sequence[str] | None = None
) -> dict[str, int]:
    """Put the held-out words' token rows of ``text_encoder`` back to ``initial_encoder``'s (the same architecture
    and seed before training): they become like the ~49k tokens the captions never used, and the model keeps what it
    learnt to draw but loses the words for it. ``words``: other words than the shipped held-out ones (the learning
    benchmark erases one more per concept). Returns the erased ids."""
    ids = held_out_token_ids(tokenizer, words)
    rows = torch.tensor(sorted(ids.values()))
    table = text_encoder.get_input_embeddings().weight
    table[rows] = initial_encoder.get_input_embeddings().weight[rows].to(table)
    return ids


def initial_text_encoder(folder: str | Path) -> Any:
    """The text encoder of a saved model's plan before training (its held-out rows are these rows)."""
    record = json.loads((Path(folder) / "training_record.json").read_text(encoding="utf-8"))
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in record["plan"]["arch"].items()}
    return build_text_encoder(Architecture(**arch), int(record["plan"]["seed"]))


def save_model(model: BaseModel, folder: Path, record: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a diffusers folder (``save_components``), weights in fp16, plus ``training_record.json``."""
    import copy

    from ..tools.export_a1111 import tokenizer_files
    from ..tools.tiny_models import TinyComponents, save_components

    def half(module: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(module).cpu().half()

    text_encoder = half(model.text_encoder)
    components = TinyComponents(
        "sd1", half(model.unet), half(model.vae), [text_encoder], [model.tokenizer], build_scheduler()
    )
    save_components(components, folder)
    # The slow tokenizer's files, which every transformers version reads (5.x writes only tokenizer.json, which
    # transformers 4.30, the WebUI's pin, cannot read with CLIPTokenizer); they are smaller too.
    tokenizer_folder = folder / "tokenizer"
    files = tokenizer_files(tokenizer_folder)
    for stale in tokenizer_folder.iterdir():
        stale.unlink()
    for name, text in files.items():
        (tokenizer_folder / name).write_text(text, encoding="utf-8")
    text_folder = folder / "text_encoder"
    if not any(text_folder.glob("*.safetensors")):  # transformers < 4.35 writes pytorch_model.bin by default
        text_encoder.save_pretrained(text_folder, safe_serialization=True)
        for stale in text_folder.glob("pytorch_model*.bin"):
            stale.unlink()
    _portable_text_encoder_keys(text_folder / "model.safetensors")
    if record is not None:
        (folder / "training_record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return folder


def _portable_text_encoder_keys(path: Path) -> None:
    """Store the CLIP text model under the ``text_model.`` key names that every transformers version reads:
    transformers 5 saves them without the prefix, and transformers 4.30 (the WebUI's pin) would then silently
    start from random weights."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    if all(key.startswith("text_model.") for key in state):
        return
    state = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()}
    save_file(state, path, metadata={"format": "pt"})


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> BaseModel:
    """Load a saved base model folder in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    model = BaseModel(
        UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval(),
        AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
        CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval(),
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        {k: v for k, v in config.items() if not k.startswith("_")},
    )
    return model.to(device)


def folder_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample(
    model: BaseModel,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    batch_size: int = 64,
    negative_prompt: str = "",
) -> np.ndarray:
    """DDIM with classifier-free guidance: uint8 images ``[len(prompts), 64, 64, 3]``.

    Image ``i``'s starting noise depends on ``seed`` and ``i`` only, so a prompt list's images do not change with
    the batch size.
    """
    from diffusers import DDIMScheduler

    device = model.device
    scheduler = DDIMScheduler.from_config({**model.scheduler_config, "set_alpha_to_one": False})
    scale = float(model.vae.config.scaling_factor)
    size = world.IMAGE_SIZE // LATENT_FACTOR
    out = []
    uncond_ids = tokenize(model.tokenizer, [negative_prompt]).to(device)
    uncond = model.text_encoder(uncond_ids)[0]
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        n = len(chunk)
        noise = torch.stack(
            [torch.randn((4, size, size), generator=torch.Generator().manual_seed(seed * 100_003 + start + i))
             for i in range(n)]
        ).to(device)  # fmt: skip
        cond = model.text_encoder(tokenize(model.tokenizer, chunk).to(device))[0]
        context = torch.cat([uncond.expand(n, -1, -1), cond])
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            both = model.unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
            eps_uncond, eps_cond = both.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        out.append(to_uint8(model.vae.decode(latents / scale).sample))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation

JUDGED = ("shape", "colour", "background", "texture")


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    expected: dict[str, str]


def evaluation_prompts(
    n: int, seed: int = 0, exclude: set[str] | frozenset[str] = frozenset(), held_out: bool = False
) -> list[PromptCase]:
    """``n`` prompts that name shape, colour, background and texture (every wording the captions use), none of them
    in ``exclude`` (the training captions), with the attributes they ask for: regular classes only, or with
    ``held_out`` each with a held-out shape or texture (named by the words the shipped model has forgotten)."""
    every = world.CaptionDropout(shape=0.0, colour=0.0, background=0.0, texture=0.0)
    rng = np.random.default_rng([seed, 4343 if held_out else 4242])
    cases: list[PromptCase] = []
    seen: set[str] = set()
    for _ in range(200 * n):
        if len(cases) == n:
            break
        scene = world.sample_scene(rng, uniform=True, include_held_out=held_out)
        shows_held_out = scene.shape in world.HELD_OUT_SHAPES or scene.texture in world.HELD_OUT_TEXTURES
        text = world.caption(scene, rng, every)
        if text in exclude or text in seen or shows_held_out != held_out:
            continue
        seen.add(text)
        expected = scene.attributes()
        if "small" not in text and "large" not in text and "big" not in text and "medium" not in text:
            expected.pop("size")
        cases.append(PromptCase(text, expected))
    return cases


def judge_images(images: np.ndarray) -> list[dict[str, str]] | None:
    """What the toy world's trained judges (``judges.py``) see in each image; None when their weights are missing."""
    try:
        from . import judges

        trained = judges.load_judges()
    except (ImportError, OSError, ValueError) as error:
        logger.info("no trained judges (%s); judging reconstructions only by re-rendering", error)
        return None
    verdicts = trained(images)
    return [{name: verdict.labels[i] for name, verdict in verdicts.items()} for i in range(len(images))]


def counterfactual_judge(image: np.ndarray, scene: world.Scene, attributes: Sequence[str] = JUDGED) -> dict[str, str]:
    """For an image aligned with ``scene`` (a VAE reconstruction): for each attribute, the class whose rendering of
    the same scene (same position, size, rotation, tones, texture phase) is nearest in pixels. Needs no trained
    judge, and fails exactly when the reconstruction is nearer to another class's image than to its own."""
    result = {}
    target = image.astype(np.float32)
    for attribute in attributes:
        best, best_distance = "", math.inf
        for value in world.CLASSES[attribute]:
            other = world.render(dataclasses.replace(scene, **{attribute: value}))
            distance = float(np.square(np.asarray(other, dtype=np.float32) - target).sum())
            if distance < best_distance:
                best, best_distance = value, distance
        result[attribute] = best
    return result


def accuracy(predicted: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]) -> dict[str, float]:
    keys = sorted({k for e in expected for k in e}, key=lambda k: world.ATTRIBUTES.index(k))
    result = {}
    for key in keys:
        pairs = [(p.get(key), e[key]) for p, e in zip(predicted, expected) if key in e]
        result[key] = sum(p == e for p, e in pairs) / len(pairs)
    return result


@torch.no_grad()
def evaluate_vae(vae: Any, n: int = 128, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Reconstruct ``n`` held-back images (never trained on) and judge the reconstructions.

    Returns per-attribute accuracies of the counterfactual judge (``counterfactual``), of the trained judges
    when ``judges.py`` provides them (``judges``, and ``judges_on_originals`` for reference), and the mean absolute
    error in 0..255 units.
    """
    scenes = [world.example(seed, EVAL_INDEX_OFFSET + i)[0] for i in range(n)]
    originals = np.stack([np.asarray(world.render(s)) for s in scenes])
    vae = vae.to(device).eval()
    x = to_model_range(originals).to(device)
    rec = to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample)
    expected = [{k: s.attributes()[k] for k in JUDGED} for s in scenes]
    result: dict[str, Any] = {
        "images": n,
        "mae": float(np.abs(rec.astype(np.float32) - originals).mean()),
        "counterfactual": accuracy([counterfactual_judge(r, s) for r, s in zip(rec, scenes)], expected),
    }
    judged = judge_images(rec)
    if judged is not None:
        result["judges"] = accuracy(judged, expected)
        result["judges_on_originals"] = accuracy(judge_images(originals) or [], expected)
    result["reconstructions"] = rec
    result["originals"] = originals
    return result


def evaluate_samples(
    model: BaseModel,
    n: int = 64,
    *,
    exclude: set[str] | frozenset[str] = frozenset(),
    seed: int = 0,
    steps: int = 25,
    guidance: float = 4.0,
    held_out: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` prompts not seen verbatim in training and judge them (per attribute); ``held_out``: prompts
    that name held-out classes (:func:`evaluation_prompts`)."""
    cases = evaluation_prompts(n, seed, exclude, held_out)
    images = sample(model, [c.prompt for c in cases], steps=steps, guidance=guidance, seed=seed)
    result: dict[str, Any] = {"prompts": [c.prompt for c in cases], "images": images}
    judged = judge_images(images)
    if judged is not None:
        result["judges"] = accuracy(judged, [c.expected for c in cases])
        if held_out:
            result["held_out_classes"] = held_out_rates(judged, [c.expected for c in cases])
    return result


def held_out_rates(predicted: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]) -> dict[str, float]:
    """For each held-out class: the share of the images asked to show it that the judges say show it."""
    rates = {}
    for attribute, classes in world.HELD_OUT.items():
        for name in classes:
            asked = [p.get(attribute) == name for p, e in zip(predicted, expected) if e.get(attribute) == name]
            if asked:
                rates[name] = sum(asked) / len(asked)
    return rates


def image_grid(images: np.ndarray, columns: int = 8) -> Any:
    """A PIL image of ``images`` in rows of ``columns``."""
    from PIL import Image

    n = len(images)
    rows = max(1, math.ceil(n / columns))
    size = images.shape[1]
    grid = np.full((rows * size, columns * size, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
    return Image.fromarray(grid)


# ---------------------------------------------------------------------------------------------------------------
# All stages


def train(
    plan: Plan,
    out: str | Path,
    *,
    stage: str = "all",
    minutes: float | None = None,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run ``stage`` (``vae``, ``unet`` or ``all``), each stage for at most ``minutes``, and write ``<out>/model``
    when both stages are done. Returns a summary (stage results, model folder if written)."""
    if stage not in ("vae", "unet", "all"):
        raise BaseModelError(f"stage {stage!r}: expected vae, unet or all")
    out = Path(out)
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    workers = max(1, threads)
    results: dict[str, StageResult] = {}
    if stage in ("vae", "all"):
        results["vae"] = train_vae(plan, out, minutes=minutes, device=device, workers=workers, stop_after=stop_after)
        if not results["vae"].done:
            return _summary(results, None)
    if stage in ("unet", "all"):
        results["unet"] = train_unet(plan, out, minutes=minutes, device=device, workers=workers, stop_after=stop_after)
        if not results["unet"].done:
            return _summary(results, None)
    vae_state = _torch_load(out / "state" / "vae.pt")
    unet_state = _torch_load(out / "state" / "unet.pt") if (out / "state" / "unet.pt").is_file() else None
    if unet_state is None or unet_state["step"] < plan.unet.steps or vae_state["step"] < plan.vae.steps:
        return _summary(results, None)
    model = trained_model(plan, out)
    record = {
        "format_version": FORMAT_VERSION,
        "plan": plan.to_dict(),
        "stages": {
            name: {
                "steps": st["step"],
                "minutes": round(st["seconds"] / 60, 2),
                "data_minutes": round(st.get("prep_seconds", 0.0) / 60, 2),
                "machine": st.get("machine"),
            }
            for name, st in (("vae", vae_state), ("unet", unet_state))
        },
        "final_losses": {"vae": vae_state["history"][-1:], "unet": unet_state["history"][-1:]},
        "scaling_factor": float(model.vae.config.scaling_factor),
        "erased_words": held_out_token_ids(model.tokenizer),
        "note": "minutes: the training steps; data_minutes: rendering images (vae) or encoding latents and "
        "tokenizing captions (unet); machine: the one that ran the stage's last steps; erased_words: held-out words "
        "(token ids) in the captions whose text-encoder rows were put back to their initial values",
    }
    folder = save_model(model, out / "model", record)
    return _summary(results, folder)


def _summary(results: dict[str, StageResult], folder: Path | None) -> dict[str, Any]:
    return {"stages": {k: dataclasses.asdict(v) for k, v in results.items()}, "model": str(folder) if folder else None}
