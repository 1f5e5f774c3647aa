"""Full-size SD1.5, SD2.1 and SDXL architectures with random weights, built from configs in code (nothing downloaded).

The shapes are those of the released models (UNet, CLIP text encoders, VAE), so a training step costs what it
costs on the real weights; the weights themselves are the libraries' default random initialisation. The UNet and
text encoders are built directly on the target device and cast to the compute dtype right after; the VAE (used
once per image to fill the latent cache) stays fp32, as ``DiffusersHost.from_pretrained`` keeps it. Built on the
meta device, nothing is allocated (``benchmarks/training_step.py`` turns such models into fake tensors for the
memory estimate).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from embedding_trainer.host import ModelFamily
from embedding_trainer.tools.clip_vocab import END_TOKEN, write_tokenizer_files
from embedding_trainer.tools.tiny_models import TinyComponents, build_tiny_components

#: The architectures :func:`build` makes (``RESOLUTION`` has each one's native size).
ARCHS = ("tiny", "tiny-xl", "sd15", "sd21", "sdxl")

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)

# The configs below hold the fields of the published config.json files that shape the model; each file's other
# fields equal the library's defaults (diffusers' UNet2DConditionModel / AutoencoderKL, transformers' CLIPTextConfig),
# except SDXL's "upcast_attention": null (acts as the default false) and the text encoders' token ids (_text_encoder).

#: runwayml/stable-diffusion-v1-5 unet/config.json
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

#: stabilityai/stable-diffusion-2-1 unet/config.json (768 px, v-prediction): SD1.5's blocks with OpenCLIP-H's
#: 1024-wide cross-attention, 64-channel heads and linear projections.
SD21_UNET = dict(
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
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

#: vae/config.json of all three (SDXL's differs only in scaling_factor 0.13025 and force_upcast).
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

#: OpenAI CLIP ViT-L/14 text tower: SD1.5's text_encoder/config.json and SDXL's text_encoder/config.json.
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
#: OpenCLIP ViT-H/14 text tower as SD2.1 ships it: stabilityai/stable-diffusion-2-1 text_encoder/config.json
#: (23 of its 24 layers: SD2 conditions on the penultimate layer).
CLIP_H = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
#: OpenCLIP ViT-bigG/14 text tower with its pooled projection: SDXL's text_encoder_2/config.json.
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)


@dataclasses.dataclass(frozen=True)
class Encoder:
    config: dict[str, Any]
    with_projection: bool  # SDXL's second encoder (pooled projection)
    pad_token: str  # CLIP-L pads with the end token, OpenCLIP encoders with "!" (id 0), as the released tokenizers


@dataclasses.dataclass(frozen=True)
class Arch:
    family: ModelFamily
    unet: dict[str, Any]
    encoders: tuple[Encoder, ...]
    resolution: int  # the model's native training resolution (the VAE's sample_size)
    vae_scaling_factor: float = 0.18215
    prediction_type: str = "epsilon"


_CLIP_L = Encoder(CLIP_L, False, END_TOKEN)
FULL_SIZE = {
    "sd15": Arch("sd1", SD15_UNET, (_CLIP_L,), 512),
    "sd21": Arch("sd2", SD21_UNET, (Encoder(CLIP_H, False, "!"),), 768, prediction_type="v_prediction"),
    "sdxl": Arch("sdxl", SDXL_UNET, (_CLIP_L, Encoder(CLIP_BIGG, True, "!")), 1024, vae_scaling_factor=0.13025),
}
#: Each architecture's native resolution in pixels (the tiny ones: what tiny_models' VAE is built for).
RESOLUTION = {"tiny": 64, "tiny-xl": 64, **{name: arch.resolution for name, arch in FULL_SIZE.items()}}


@functools.cache
def _tokenizer_files() -> Path:
    return write_tokenizer_files(Path(tempfile.mkdtemp(prefix="embtrain-bench-tok-")))


def tokenizer(pad_token: str) -> Any:
    """The real CLIP tokenizer (ids as CLIP's), written from the packaged merge list."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_files()
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def _text_encoder(spec: dict[str, Any], with_projection: bool, pad_token_id: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # The released text_encoder configs say bos 0, eos 2, pad 1 (stale ids: transformers then pools at the argmax of
    # the ids, the same end token); these are the ids the tokenizer really uses. Neither changes the parameters.
    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        **spec,
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
    if arch not in FULL_SIZE:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(RESOLUTION)}")
    spec = FULL_SIZE[arch]
    torch.manual_seed(seed)
    tokenizers = [tokenizer(e.pad_token) for e in spec.encoders]
    # Parameters are created on the device (no CPU copy of a GPU model) and in the compute dtype (no fp32
    # transient: SDXL's UNet is 10 GB in fp32); the cast afterwards only catches what ignored the default.
    previous = torch.get_default_dtype()
    try:
        with torch.device(device):
            torch.set_default_dtype(dtype)
            unet = _cast(UNet2DConditionModel(**spec.unet), dtype)
            encoders = [
                _cast(_text_encoder(e.config, e.with_projection, t.pad_token_id), dtype)
                for e, t in zip(spec.encoders, tokenizers, strict=True)
            ]
            torch.set_default_dtype(torch.float32)
            vae = AutoencoderKL(**SD_VAE, sample_size=spec.resolution, scaling_factor=spec.vae_scaling_factor)
    finally:
        torch.set_default_dtype(previous)
    for model in (unet, vae, *encoders):
        model.eval()
    scheduler = DDPMScheduler(**dict(SCHEDULER, prediction_type=spec.prediction_type))
    return TinyComponents(spec.family, unet, vae, encoders, tokenizers, scheduler)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
