"""Full-size SD1.5 and SDXL architectures with random weights, built from configs in code (nothing downloaded).

The shapes are those of the released models (UNet, CLIP text encoders, VAE), so a training step costs what it
costs on the real weights; the weights themselves are the libraries' default random initialisation. The UNet and
text encoders are built directly on the target device and cast to the compute dtype right after; the VAE (used
once per image to fill the latent cache) stays fp32, as ``DiffusersHost.from_pretrained`` keeps it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from embedding_trainer.standalone.clip_vocab import END_TOKEN, write_tokenizer_files
from embedding_trainer.standalone.tiny_models import TinyComponents, build_tiny_components

ARCHS = ("tiny", "tiny-xl", "sd15", "sdxl")

SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon",
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size/crop numbers x 256 + the pooled 1280
    norm_num_groups=32,
)

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)

#: CLIP ViT-L/14 text tower (SD1.x, and SDXL's first encoder).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
#: OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder, with its pooled projection).
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)


def tokenizer(pad_token: str) -> Any:
    """The real CLIP tokenizer (ids as CLIP's), written from the packaged merge list."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(Path(tempfile.mkdtemp(prefix="embtrain-bench-tok-")))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)


def _text_encoder(spec: dict[str, Any], with_projection: bool, pad_token_id: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=pad_token_id, **spec,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _cast(model: Any, dtype: torch.dtype) -> Any:
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    return model.to(dtype)


def build(arch: str, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyComponents:
    """Components for ``arch`` on ``device``: UNet and text encoders in ``dtype``, the VAE in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if arch in ("tiny", "tiny-xl"):
        parts = build_tiny_components("sdxl" if arch == "tiny-xl" else "sd1", seed)
        for model in (parts.unet, *parts.text_encoders):
            _cast(model.to(device), dtype)
        parts.vae.to(device)
        return parts
    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    sdxl = arch == "sdxl"
    # Parameters are created on the device (no CPU copy of a GPU model) and in the compute dtype (no fp32
    # transient: SDXL's UNet is 10 GB in fp32); the cast afterwards only catches what ignored the default.
    previous = torch.get_default_dtype()
    try:
        with torch.device(device):
            torch.set_default_dtype(dtype)
            unet = _cast(UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)), dtype)
            encoders = [_cast(_text_encoder(CLIP_L, False, 49407), dtype)]
            if sdxl:
                encoders.append(_cast(_text_encoder(CLIP_BIGG, True, 0), dtype))
            torch.set_default_dtype(torch.float32)
            vae = AutoencoderKL(**SD_VAE, sample_size=1024 if sdxl else 512,
                                scaling_factor=0.13025 if sdxl else 0.18215)
    finally:
        torch.set_default_dtype(previous)
    tokenizers = [tokenizer(END_TOKEN), tokenizer("!")] if sdxl else [tokenizer(END_TOKEN)]
    for model in (unet, vae, *encoders):
        model.eval()
    return TinyComponents("sdxl" if sdxl else "sd1", unet, vae, encoders, tokenizers, DDPMScheduler(**SCHEDULER))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
