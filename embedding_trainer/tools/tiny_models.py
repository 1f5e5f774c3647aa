"""Tiny random-weight SD1, SD2 (v-prediction) and SDXL models in the diffusers layout, built in code.

They have the real architectures' structure (cross-attention UNet, 8x VAE with 4 latent channels, CLIP text
encoders with the real CLIP tokenizer, SDXL's second encoder with pooled projection and size conditioning) at a
tiny width, so tests and the demo run in seconds on a CPU with nothing downloaded. The same seed gives the same
weights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..host import ModelFamily
from .clip_vocab import END_TOKEN, write_tokenizer_files

#: Token-embedding widths of the tiny encoders. Each differs so a mix-up of encoders fails loudly.
TINY_WIDTHS = {"sd1": {"clip_l": 32}, "sd2": {"clip_h": 48}, "sdxl": {"clip_l": 32, "clip_g": 64}}


@dataclass
class TinyComponents:
    family: ModelFamily
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any


def clip_tokenizer(pad_token: str) -> Any:
    """A real ``CLIPTokenizer`` over CLIP's own vocabulary (built offline), padding with ``pad_token``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="embtrain-tok-") as scratch:  # read whole by the constructor
        folder = write_tokenizer_files(Path(scratch))
        return CLIPTokenizer(
            str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
        )


def _text_encoder(width: int, openclip: bool, with_projection: bool, mlp_ratio: int = 2) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width * mlp_ratio,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if openclip else 49407,
    )
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    # Random layer norms (HF initialises them to exactly 1 / 0): a mean-0 output breaks hosts that rescale by it.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(torch.randn_like(module.weight) * 0.1)
                module.bias.add_(torch.randn_like(module.bias) * 0.1)
    return model


def _calibrate_latent_scale(vae: Any) -> None:
    """Set the VAE's scaling factor so latents have unit spread, as SD's 0.18215 was chosen for its VAE.

    A random VAE's latents are tiny (std ~0.05 after the standard factor), which would make every image look the
    same to the denoising loss and hide whether training learns anything.
    """
    generator = torch.Generator().manual_seed(1234)
    images = torch.rand(8, 3, 1, 1, generator=generator).expand(8, 3, 64, 64).clone()
    for i in range(8):  # a bright square at a random place on a flat background
        x, y = torch.randint(0, 40, (2,), generator=generator).tolist()
        images[i, :, y : y + 24, x : x + 24] = torch.rand(3, 1, 1, generator=generator)
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))


def build_tiny_components(family: ModelFamily, seed: int = 0, webui_loadable: bool = False) -> TinyComponents:
    """Tiny random components. ``webui_loadable``: what the WebUI's model code can build from the export
    (``export-a1111``): 32 normalisation groups everywhere (VAE 32 wide), the only group count ldm/sgm build, and
    OpenCLIP-style encoders (SD2's, SDXL's second) with MLPs 4x their width, the only ratio the WebUI's open_clip
    builds; a little slower. Every family's tokenizers already tokenize as the WebUI does: CLIP's vocabulary,
    padded with the end token for CLIP-L and with id 0 (``!``) for OpenCLIP encoders.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    groups = 32 if webui_loadable else 8
    openclip_mlp = 4 if webui_loadable else 2

    torch.manual_seed(seed)
    widths = TINY_WIDTHS[family]
    openclip = family == "sd2"
    if family == "sdxl":
        encoders = [_text_encoder(32, False, False), _text_encoder(64, True, True, openclip_mlp)]
        tokenizers = [clip_tokenizer(END_TOKEN), clip_tokenizer("!")]
    else:
        width = next(iter(widths.values()))
        encoders = [_text_encoder(width, openclip, False, openclip_mlp if openclip else 2)]
        tokenizers = [clip_tokenizer("!" if openclip else END_TOKEN)]
    cross_dim = sum(widths.values())
    unet_kwargs: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=groups,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
    )
    if family == "sdxl":
        unet_kwargs.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + widths["clip_g"],
        )
    else:
        unet_kwargs.update(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            use_linear_projection=family == "sd2",
        )
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32) if webui_loadable else (8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=groups,
        latent_channels=4,
        sample_size=64,
    )
    _calibrate_latent_scale(vae)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    )
    for model in (unet, vae, *encoders):
        model.eval()
    return TinyComponents(family, unet, vae, encoders, tokenizers, scheduler)


def save_components(components: TinyComponents, folder: str | Path) -> Path:
    """Write ``components`` as a diffusers-format model folder (model_index.json + one folder per part)."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = components.family == "sdxl"
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    components.unet.save_pretrained(folder / "unet")
    components.vae.save_pretrained(folder / "vae")
    components.scheduler.save_pretrained(folder / "scheduler")
    for i, (encoder, tokenizer) in enumerate(zip(components.text_encoders, components.tokenizers)):
        suffix = f"_{i + 1}" if i else ""
        encoder.save_pretrained(folder / f"text_encoder{suffix}")
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(encoder).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def save_tiny_model(family: ModelFamily, folder: str | Path, seed: int = 0, webui_loadable: bool = False) -> Path:
    return save_components(build_tiny_components(family, seed, webui_loadable), folder)
