"""What the exporter refuses, and why: what ldm / sgm (and the WebUI around them) cannot build, or would compute
differently from diffusers. Each refusal names the setting and, where there is one, the fix."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ...log import logger
from .common import ExportError, Family, ModelParts, as_list

#: ldm and sgm build every GroupNorm with this many groups (not configurable there).
LDM_NORM_GROUPS = 32
#: sgm's LegacyDDPMDiscretization defaults, which the WebUI uses for every SDXL model whatever its config says.
_SDXL_SCHEDULE = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}


def unsupported(what: str, message: str) -> ExportError:
    return ExportError(f"{what}: {message}; the WebUI's ldm/sgm model code cannot express this model")


def check_unet(config: Mapping[str, Any], family: Family = "sd1") -> None:
    expected = {
        "in_channels": 4,
        "out_channels": 4,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "class_embed_type": None,
        "addition_embed_type": "text_time" if family == "sdxl" else None,
        "act_fn": "silu",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default",
        "dual_cross_attention": False,
        "center_input_sample": False,
        "downsample_padding": 1,
        "encoder_hid_dim": None,
        "time_embedding_dim": None,
        "time_cond_proj_dim": None,
        "mid_block_scale_factor": 1,
        "resnet_out_scale_factor": 1.0,
    }
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise unsupported("UNet", f"{key} = {config[key]!r} ({family.upper()} needs {value!r})")
    if any(as_list(config.get("only_cross_attention", False), 1)):
        raise unsupported("UNet", "only_cross_attention")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != len(up):
        raise unsupported("UNet", "different numbers of down and up blocks")
    for d, u in zip(down, reversed(up)):
        if d.startswith("CrossAttn") != u.startswith("CrossAttn"):
            raise unsupported("UNet", f"attention at {d} but not at the matching {u} (ldm mirrors the two paths)")
    depth = transformer_depths(config)
    if family != "sdxl" and len(set(depth)) != 1:
        raise unsupported("UNet", f"transformer_layers_per_block = {depth} (the ldm SD1/SD2 UNet has one depth)")
    if family == "sdxl":
        if not isinstance(config.get("addition_time_embed_dim"), int):
            raise unsupported("UNet", "no addition_time_embed_dim (SDXL embeds the image sizes with it)")


def transformer_depths(config: Mapping[str, Any]) -> list[int]:
    """Transformer blocks per level (the mid block uses the last), as ldm's/sgm's ``transformer_depth``."""
    levels = len(config["down_block_types"])
    depth = as_list(config.get("transformer_layers_per_block", 1), levels)
    if any(not isinstance(d, int) for d in depth):
        raise unsupported("UNet", f"transformer_layers_per_block = {depth} (one depth per level is supported)")
    reverse = config.get("reverse_transformer_layers_per_block")
    if reverse is not None and list(as_list(reverse, levels)) != list(reversed(depth)):
        raise unsupported("UNet", f"reverse_transformer_layers_per_block = {reverse} (sgm mirrors the down depths)")
    return [int(d) for d in depth]


def check_vae(config: Mapping[str, Any]) -> None:
    channels = list(config["block_out_channels"])
    if len(channels) != 4:
        raise unsupported("VAE", f"{len(channels)} levels (the host assumes 8x smaller latents: 4 levels)")
    if any(c % channels[0] for c in channels):
        raise unsupported("VAE", f"block_out_channels {channels} are not multiples of the first")
    for key, value in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True)):
        if config.get(key, value) != value:
            raise unsupported("VAE", f"{key} = {config[key]!r}")
    if not config.get("mid_block_add_attention", True):
        raise unsupported("VAE", "no mid-block attention")
    kinds = set(config.get("down_block_types", ())) | set(config.get("up_block_types", ()))
    if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise unsupported("VAE", f"block types {sorted(kinds)}")


def check_open_clip_text(config: Mapping[str, Any], what: str) -> None:
    """What open_clip 2.20 (the WebUI's pin) can build as a text tower, checked on the HF config."""
    width = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    act = config.get("hidden_act", "gelu")
    problems = []
    if act not in ("gelu", "quick_gelu"):
        problems.append(f"hidden_act {act!r} (open_clip has gelu and quick_gelu)")
    if int(config.get("intermediate_size", 4 * width)) != 4 * width:
        problems.append(
            f"intermediate_size {config['intermediate_size']} is not 4 x hidden_size {width} (open_clip's text "
            f"MLP is always 4x wide: build the model with intermediate_size={4 * width}; make-tiny-model "
            "--webui-loadable does)"
        )
    if abs(float(config.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_eps {config['layer_norm_eps']} (open_clip uses 1e-5)")
    if int(config.get("max_position_embeddings", 77)) != 77:
        problems.append(
            f"max_position_embeddings {config['max_position_embeddings']} (the host feeds OpenCLIP exactly 77 tokens)"
        )
    if width % heads:
        problems.append(f"hidden_size {width} is not a multiple of num_attention_heads {heads}")
    if problems:
        raise ExportError(f"{what}: as an OpenCLIP text tower, " + "; ".join(problems))


def check_open_clip_tokenizer(files: Mapping[str, str] | None, what: str) -> None:
    """Warn when diffusers' tokenizer would give other ids than the host's (open_clip's BPE, padded with 0)."""
    if not files or "vocab.json" not in files:
        return
    vocab = json.loads(files["vocab.json"])
    config = json.loads(files.get("tokenizer_config.json", "{}"))
    pad = config.get("pad_token", "<|endoftext|>")
    pad = pad["content"] if isinstance(pad, dict) else pad
    ids = (len(vocab), vocab.get("<|startoftext|>"), vocab.get("<|endoftext|>"), vocab.get(pad))
    if ids[:3] != (49408, 49406, 49407):
        logger.warning(
            "warning: %s: not CLIP's vocabulary (%d entries, start/end %s/%s); the WebUI tokenizes OpenCLIP prompts "
            "with open_clip's own CLIP vocabulary, so its token ids would differ from this tokenizer's",
            what,
            *ids[:3],
        )
    elif ids[3] != 0:
        logger.warning(
            "warning: %s pads with %r (id %s); the WebUI pads OpenCLIP prompts with id 0 ('!'), as diffusers' SD2 and "
            "SDXL tokenizers do, so the host's conditioning would differ from diffusers' after the end token",
            what,
            pad,
            ids[3],
        )


def check_sdxl_text_encoders(parts: ModelParts) -> None:
    assert parts.text_encoder_2_config is not None
    layers = int(parts.text_encoder_config.get("num_hidden_layers", 12))
    if layers < 2:
        raise ExportError("text encoder: SDXL reads CLIP-L's hidden states before its last layer: it needs 2+ layers")
    check_open_clip_text(parts.text_encoder_2_config, "text encoder 2")
    check_open_clip_tokenizer(parts.tokenizer_2_files, "tokenizer 2")
    widths = int(parts.text_encoder_config["hidden_size"]) + int(parts.text_encoder_2_config["hidden_size"])
    context = parts.unet_config.get("cross_attention_dim")
    if context != widths:
        raise ExportError(
            f"UNet cross_attention_dim {context} != the two text encoders' widths together ({widths}); "
            "SDXL's UNet attends to both encoders' hidden states side by side"
        )


def check_family_consistency(parts: ModelParts) -> None:
    """Catch a text encoder / UNet pairing the host would build wrongly."""
    if parts.family == "sdxl":
        return
    if parts.unet_config.get("addition_embed_type") is not None:
        raise ExportError(
            f"{parts.source}: the UNet takes SDXL's added embeddings but there is one text encoder; an SDXL "
            "model needs text_encoder_2 (and tokenizer_2)"
        )
    width = int(parts.text_encoder_config.get("hidden_size", 0))
    context = parts.unet_config.get("cross_attention_dim", 768)
    context = context[0] if isinstance(context, list | tuple) and len(set(context)) == 1 else context
    if width and width != context:
        raise ExportError(f"UNet cross_attention_dim {context} != text encoder hidden_size {width}")


def check_scheduler(config: Mapping[str, Any], family: Family) -> None:
    schedule = ldm_schedule(config)
    if family != "sdxl":
        return  # ldm takes the schedule from the yaml
    got = {k: schedule[k] for k in _SDXL_SCHEDULE}
    same = all(abs(got[k] - v) < 1e-9 if isinstance(v, float) else got[k] == v for k, v in _SDXL_SCHEDULE.items())
    if not same:
        raise ExportError(
            f"scheduler: {got} is not SDXL's schedule {_SDXL_SCHEDULE}; the WebUI rebuilds every SDXL model's noise "
            "schedule from those defaults, so it would train and sample this model on another schedule"
        )


def check_norm_groups(parts: ModelParts, allow_mismatch: bool) -> None:
    groups = {
        "UNet": parts.unet_config.get("norm_num_groups", 32),
        "VAE": parts.vae_config.get("norm_num_groups", 32),
    }
    wrong = {k: v for k, v in groups.items() if v != LDM_NORM_GROUPS}
    if not wrong:
        return
    message = (
        f"{', '.join(f'{k} norm_num_groups={v}' for k, v in wrong.items())}: ldm/sgm (the WebUI's model code) builds "
        f"every GroupNorm with {LDM_NORM_GROUPS} groups, so the host would compute a different function (and cannot "
        f"build a layer whose width is not a multiple of {LDM_NORM_GROUPS})"
    )
    if not allow_mismatch:
        raise ExportError(
            message + "; use a model built with norm_num_groups=32 (make-tiny-model --webui-loadable), or "
            "allow_norm_group_mismatch=True (--allow-norm-group-mismatch) to write the weights anyway"
        )
    logger.warning("warning: %s", message)


def ldm_schedule(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers scheduler config as ldm's schedule settings; what ldm has no name for is refused."""
    schedule = config.get("beta_schedule", "scaled_linear")
    # ldm's "linear" squares a linear ramp of sqrt(beta): diffusers calls that "scaled_linear".
    names = {"scaled_linear": "linear", "linear": "sqrt_linear"}
    if schedule not in names:
        raise unsupported("scheduler", f"beta_schedule {schedule!r}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise unsupported("scheduler", f"prediction_type {prediction!r} (epsilon and v_prediction are supported)")
    if config.get("trained_betas") is not None:
        raise unsupported("scheduler", "explicit trained_betas")
    return {
        "beta_schedule": names[schedule],
        "linear_start": float(config.get("beta_start", 0.00085)),
        "linear_end": float(config.get("beta_end", 0.012)),
        "timesteps": int(config.get("num_train_timesteps", 1000)),
        "parameterization": "v" if prediction == "v_prediction" else "eps",
    }
