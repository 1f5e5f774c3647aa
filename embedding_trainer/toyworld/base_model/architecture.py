"""The base model's parts: Stable Diffusion 1's structure at a tiny width.

An 8x-downsampling ``AutoencoderKL`` with 4 latent channels, a CLIP text encoder (quick_gelu, 77 positions, CLIP's
49408-token vocabulary and the real CLIP tokenizer, built offline) and a cross-attention ``UNet2DConditionModel``
on SD1's training schedule. Every UNet and VAE width is a multiple of 32 with 32-group norms, so
``tools/export_a1111.py`` writes it as a checkpoint the WebUI's ldm code builds.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import world
from .plan import Architecture

LATENT_FACTOR = 8


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

    from ...tools.clip_vocab import VOCAB_SIZE

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
    from ...tools.clip_vocab import END_TOKEN
    from ...tools.tiny_models import clip_tokenizer

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
