"""Sampling the base model: DDIM with classifier-free guidance, the settings the WebUI's sampler uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import world
from .architecture import LATENT_FACTOR
from .data import to_uint8, tokenize
from .io import BaseModel


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
            [
                torch.randn((4, size, size), generator=torch.Generator().manual_seed(seed * 100_003 + start + i))
                for i in range(n)
            ]
        ).to(device)
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
