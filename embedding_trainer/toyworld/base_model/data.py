"""The training data from the toy world: rendered images (cached), their caption variants, token ids, and the
frozen VAE's latents that the UNet stage trains on (cached)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...log import logger
from .. import world
from .architecture import LATENT_FACTOR
from .io import load_trained_vae, save_atomically, torch_load, torch_save
from .plan import Plan


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
    save_atomically(path, lambda f: np.save(f, images))
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


def foreground(x: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """``[N, 1, H, W]``: 1 where an image in [-1, 1] differs from its corner pixel, which in the toy world is always
    background (shapes keep a margin from the border)."""
    return ((x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > threshold).to(x.dtype)


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
    """The trained VAE's latents of the plan's images, encoded once and cached in ``<out>/state``."""
    path = out / "state" / "latents.pt"
    if path.is_file():
        cache = torch_load(path)
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
    torch_save(cache, path)
    logger.info("encoded %d latents in %.0f s", len(images), time.monotonic() - started)
    return cache


def _same_latent_plan(saved: dict[str, Any], plan: Plan) -> bool:
    """Whether latents cached under ``saved`` are those of ``plan`` (same images, same VAE)."""

    def key(p: dict[str, Any]) -> str:
        vae_arch = {k: v for k, v in p["arch"].items() if k.startswith("vae_")}
        return json.dumps([p["seed"], p["images"], vae_arch, p["vae"]], sort_keys=True)

    return key(saved) == key(plan.to_dict())
