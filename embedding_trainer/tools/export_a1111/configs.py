"""The yaml beside the checkpoint: the ldm ``LatentDiffusion`` (SD1, SD2) or sgm ``DiffusionEngine`` (SDXL) config
of exactly this architecture, which the WebUI builds the model from (v-prediction included)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checks import check_family_consistency, ldm_schedule, transformer_depths, unsupported
from .common import ExportError, ModelParts, as_list
from .text_encoders import BUILTIN_OPEN_CLIP_ARCHS


def _heads(config: Mapping[str, Any]) -> tuple[int, int]:
    """(num_heads, num_head_channels) for ldm/sgm; one of them is -1."""
    channels = list(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = as_list(heads, len(channels))
    with_attention = [i for i, t in enumerate(config["down_block_types"]) if t.startswith("CrossAttn")]
    used = {heads[i] for i in with_attention} | {heads[-1]}  # the mid block uses the last level's count
    if len(used) == 1:
        return used.pop(), -1
    dims = {channels[i] // heads[i] for i in [*with_attention, len(channels) - 1]}
    if len(dims) == 1:
        return -1, dims.pop()
    raise unsupported("UNet", f"attention heads {heads} are neither one count nor one width")


def _unet_params(parts: ModelParts) -> dict[str, Any]:
    """The ``UNetModel`` params ldm and sgm share."""
    unet = parts.unet_config
    channels = list(unet["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise unsupported("UNet", f"block_out_channels {channels} are not multiples of the first")
    num_heads, head_channels = _heads(unet)
    layers = as_list(unet.get("layers_per_block", 2), len(channels))
    context_dim = unet.get("cross_attention_dim", 768)
    if isinstance(context_dim, list | tuple):
        if len(set(context_dim)) != 1:
            raise unsupported("UNet", f"cross_attention_dim {context_dim}")
        context_dim = context_dim[0]
    return {
        "in_channels": int(unet.get("in_channels", 4)),
        "out_channels": int(unet.get("out_channels", 4)),
        "model_channels": base,
        "attention_resolutions": [2**i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")],
        "num_res_blocks": layers[0] if len(set(layers)) == 1 else layers,
        "channel_mult": [c // base for c in channels],
        "num_heads": num_heads,
        "num_head_channels": head_channels,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(unet.get("use_linear_projection", False)),
        "context_dim": int(context_dim),
        "use_checkpoint": False,
        "legacy": False,
    }


def _first_stage_params(parts: ModelParts, attn_type: str | None) -> dict[str, Any]:
    vae = parts.vae_config
    vae_channels = list(vae["block_out_channels"])
    ddconfig: dict[str, Any] = {"attn_type": attn_type} if attn_type else {}
    ddconfig.update(
        {
            "double_z": True,
            "z_channels": int(vae.get("latent_channels", 4)),
            "resolution": int(vae.get("sample_size", 256) or 256),
            "in_channels": int(vae.get("in_channels", 3)),
            "out_ch": int(vae.get("out_channels", 3)),
            "ch": vae_channels[0],
            "ch_mult": [c // vae_channels[0] for c in vae_channels],
            "num_res_blocks": int(vae.get("layers_per_block", 2)),
            "attn_resolutions": [],
            "dropout": 0.0,
        }
    )
    return {
        "embed_dim": int(vae.get("latent_channels", 4)),
        "monitor": "val/rec_loss",
        "ddconfig": ddconfig,
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def model_config(parts: ModelParts, text_encoder_dir: Path | None, open_clip_arch: str | None) -> dict[str, Any]:
    """The ldm ``LatentDiffusion`` (SD1/SD2) or sgm ``DiffusionEngine`` (SDXL) config of ``parts`` as nested dicts
    (what :func:`model_config_yaml` writes). ``text_encoder_dir``: the local CLIP folder (SD1, SDXL);
    ``open_clip_arch``: the OpenCLIP encoder's open_clip model name (SD2, SDXL)."""
    family = parts.family
    check_family_consistency(parts)
    if family == "sdxl":
        return _sgm_config(parts, text_encoder_dir, open_clip_arch)
    unet, vae = parts.unet_config, parts.vae_config
    sample = int(unet.get("sample_size", 64) or 64)
    schedule = ldm_schedule(parts.scheduler_config)
    unet_params = {"image_size": sample, **_unet_params(parts), "transformer_depth": transformer_depths(unet)[0]}
    if family == "sd1":
        cond_stage = {
            "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": str(_required(text_encoder_dir, "text_encoder_dir"))},
        }
    else:
        # version null: no pretrained download, ever (the weights are in the checkpoint). "penultimate": see
        # docs/export-a1111.md (the exported tower has one never-run block more than the diffusers encoder).
        cond_stage = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {
                "arch": _required(open_clip_arch, "open_clip_arch"),
                "version": None,
                "freeze": True,
                "layer": "penultimate",
            },
        }
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": schedule["linear_start"],
                "linear_end": schedule["linear_end"],
                "beta_schedule": schedule["beta_schedule"],
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": schedule["timesteps"],
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": sample,
                "channels": int(vae.get("latent_channels", 4)),
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": float(vae.get("scaling_factor", 0.18215)),
                "use_ema": False,
                "parameterization": schedule["parameterization"],
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": _first_stage_params(parts, None),
                },
                "cond_stage_config": cond_stage,
            },
        }
    }


def _sgm_config(parts: ModelParts, text_encoder_dir: Path | None, open_clip_arch: str | None) -> dict[str, Any]:
    unet, vae = parts.unet_config, parts.vae_config
    schedule = ldm_schedule(parts.scheduler_config)
    v = schedule["parameterization"] == "v"
    denoiser = "sgm.modules.diffusionmodules."
    size_dim = int(unet["addition_time_embed_dim"])
    clip_l_layers = int(parts.text_encoder_config.get("num_hidden_layers", 12))
    # sgm asserts |layer_idx| <= 12; hidden_states[layers - 1] and [-2] are the same tensor.
    layer_idx = clip_l_layers - 1 if clip_l_layers - 1 <= 12 else -2

    def size_embedder(key: str) -> dict[str, Any]:
        return {
            "is_trainable": False,
            "input_key": key,
            "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": size_dim},
        }

    emb_models = [
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {
                "version": str(_required(text_encoder_dir, "text_encoder_dir")),
                "layer": "hidden",
                "layer_idx": layer_idx,
            },
        },
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
            "params": {
                "arch": _required(open_clip_arch, "open_clip_arch"),
                "version": None,
                "freeze": True,
                "layer": "penultimate",
                "always_return_pooled": True,
                "legacy": False,
            },
        },
        size_embedder("original_size_as_tuple"),
        size_embedder("crop_coords_top_left"),
        size_embedder("target_size_as_tuple"),
    ]
    network = {
        "adm_in_channels": int(unet.get("projection_class_embeddings_input_dim") or 0),
        "num_classes": "sequential",
        **_unet_params(parts),
        "transformer_depth": transformer_depths(unet),
        "spatial_transformer_attn_type": "softmax",
    }
    pooled = int(_required(parts.text_encoder_2, "text_encoder_2")["text_projection.weight"].shape[0])
    if network["adm_in_channels"] != pooled + 6 * size_dim:
        raise unsupported(
            "UNet",
            f"projection_class_embeddings_input_dim {network['adm_in_channels']} != pooled text {pooled} + "
            f"6 x addition_time_embed_dim {size_dim} (sgm's vector: pooled text, original size, crop, target size)",
        )
    return {
        "model": {
            "target": "sgm.models.diffusion.DiffusionEngine",
            "params": {
                "scale_factor": float(vae.get("scaling_factor", 0.13025)),
                "disable_first_stage_autocast": True,
                "denoiser_config": {
                    "target": denoiser + "denoiser.DiscreteDenoiser",
                    "params": {
                        "num_idx": schedule["timesteps"],
                        "weighting_config": {
                            "target": denoiser
                            + ("denoiser_weighting.VWeighting" if v else "denoiser_weighting.EpsWeighting")
                        },
                        "scaling_config": {
                            "target": denoiser + ("denoiser_scaling.VScaling" if v else "denoiser_scaling.EpsScaling")
                        },
                        "discretization_config": {
                            "target": denoiser + "discretizer.LegacyDDPMDiscretization",
                            "params": {
                                "linear_start": schedule["linear_start"],
                                "linear_end": schedule["linear_end"],
                                "num_timesteps": schedule["timesteps"],
                            },
                        },
                    },
                },
                "network_config": {"target": denoiser + "openaimodel.UNetModel", "params": network},
                "conditioner_config": {
                    "target": "sgm.modules.GeneralConditioner",
                    "params": {"emb_models": emb_models},
                },
                "first_stage_config": {
                    "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                    "params": _first_stage_params(parts, "vanilla"),
                },
            },
        }
    }


def _required(value: Any, name: str) -> Any:
    if value is None:
        raise ExportError(f"{name} is needed for this model family (a bug in the exporter)")
    return value


def model_config_yaml(parts: ModelParts, text_encoder_dir: Path | None, open_clip_arch: str | None) -> str:
    """:func:`model_config` as the yaml the WebUI reads beside the checkpoint, under a few comment lines that say
    where it came from and what must follow the files when they move."""
    import yaml  # PyYAML comes with diffusers and huggingface_hub; only the export needs it, not importing the package

    code = "sgm DiffusionEngine" if parts.family == "sdxl" else "ldm LatentDiffusion"
    notes = []
    if text_encoder_dir is not None:
        notes.append(
            "# the CLIP embedder's version is the local text-encoder folder (absolute path: update it if moved)"
        )
    if open_clip_arch is not None and open_clip_arch not in BUILTIN_OPEN_CLIP_ARCHS:
        notes.append(
            f"# the OpenCLIP arch {open_clip_arch} is defined by {open_clip_arch}.json beside this file: "
            "the WebUI must register it first (open_clip.add_model_config)"
        )
    header = (
        f"# {code} config ({parts.family.upper()}) written by embedding_trainer export-a1111\n"
        f"# source: {parts.source}\n" + "".join(n + "\n" for n in notes)
    )
    # Keys in the order ldm's own configs use; one line per value (no wrapping), so a moved folder's path can be
    # edited or replaced as one line; ASCII only, whatever encoding the reader assumes.
    body = yaml.safe_dump(
        model_config(parts, text_encoder_dir, open_clip_arch),
        sort_keys=False,
        default_flow_style=False,
        width=1 << 16,
        allow_unicode=False,
    )
    return header + body
