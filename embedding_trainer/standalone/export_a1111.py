"""Export a diffusers-format SD1 model as a single-file checkpoint the AUTOMATIC1111 WebUI loads.

``export_a1111(model, "models/Stable-diffusion/tiny")`` writes three things side by side:

- ``tiny.safetensors``: every weight of the UNet, VAE and CLIP text encoder under the key names of the original
  latent-diffusion (ldm) code that the WebUI builds its model from (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.transformer.*``);
- ``tiny.yaml``: the ldm ``LatentDiffusion`` config of exactly this architecture (the WebUI uses a same-named
  ``.yaml`` beside a checkpoint as its config);
- ``tiny-text-encoder/``: the CLIP text model's config, weights and tokenizer files. The yaml's text-encoder
  ``version`` names this folder by its absolute path, so the host reads the tokenizer and the text model's config
  from disk instead of the model hub (it takes the text model's weights from the checkpoint). The weights in the
  folder are ``pytorch_model.bin``, not ``.safetensors``: the WebUI lists every ``*.safetensors`` below its
  checkpoint folder as a checkpoint of its own.

The key conversion is derived from the two module structures: diffusers' ``UNet2DConditionModel`` /
``AutoencoderKL`` blocks are walked in order and each module is given the name the matching ldm module has
(``input_blocks.N``, ``middle_block``, ``output_blocks.N``; ``encoder.down.N.block.M``, ``decoder.up.N``...).
Every source tensor must land exactly once; anything the map does not know is an error, never silently dropped.

Limits: SD1 layout only (one HF CLIP text encoder, epsilon prediction). ldm hard-codes 32 groups in every
GroupNorm, so a model built with another ``norm_num_groups`` is refused unless ``allow_norm_group_mismatch``
(its weights then map one to one, but the host computes a different function, and a layer whose width is not a
multiple of 32 stops the host from building the model at all). The host assumes latents 8x smaller than images,
so the VAE must have four levels. Moving the exported files elsewhere needs the yaml's ``version`` updated.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import EmbeddingTrainerError
from ..log import logger

#: ldm builds every GroupNorm with this many groups (not configurable there).
LDM_NORM_GROUPS = 32
TEXT_ENCODER_SUFFIX = "-text-encoder"


class ExportError(EmbeddingTrainerError):
    """The model cannot be written in the WebUI's checkpoint layout, or the output already exists."""


@dataclass
class ModelParts:
    """The state dicts and configs of one diffusers SD model, however they were given."""

    unet: dict[str, torch.Tensor]
    unet_config: dict[str, Any]
    vae: dict[str, torch.Tensor]
    vae_config: dict[str, Any]
    text_encoder: dict[str, torch.Tensor]
    text_encoder_config: dict[str, Any]
    tokenizer_files: dict[str, str]  # file name -> text (vocab.json, merges.txt, tokenizer_config.json...)
    scheduler_config: dict[str, Any]
    source: str


@dataclass
class ExportResult:
    checkpoint: Path
    config: Path
    text_encoder_dir: Path
    tensors: int


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def export_a1111(
    model: str | os.PathLike[str] | Any,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    allow_norm_group_mismatch: bool = False,
    dtype: torch.dtype | None = None,
) -> ExportResult:
    """Write ``model`` (a diffusers model folder, or components with ``unet``, ``vae``, ``text_encoder(s)``,
    ``tokenizer(s)`` and ``scheduler``) as ``<out>.safetensors`` + ``<out>.yaml`` + ``<out>-text-encoder/``.

    ``out_path`` may end in ``.safetensors`` or have no suffix. Returns every path written (``.checkpoint`` is the
    one the WebUI loads). Existing outputs are never replaced unless ``overwrite``; nothing is written when any
    check fails. ``dtype`` (e.g. ``torch.float16``) converts floating-point weights; by default they keep theirs.
    """
    from safetensors.torch import save as safetensors_save

    from ..embedding_file import write_atomically

    checkpoint, config_path, te_dir = output_paths(out_path)
    existing = [p for p in (checkpoint, config_path, te_dir) if p.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{', '.join(map(str, existing))}: already exists; choose another output name or pass "
            "overwrite=True (--overwrite)"
        )
    parts = _load_model(model)
    _check_family(parts)
    _check_norm_groups(parts, allow_norm_group_mismatch)
    state = convert_to_ldm(parts)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    yaml_text = ldm_config_yaml(parts, te_dir.resolve())
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    _write_text_encoder_folder(parts, te_dir, overwrite=overwrite, dtype=dtype)
    # One metadata entry: safetensors writes several in a random (per-process) order, which would give the same
    # model a different file hash, and so a different WebUI model hash, at every export.
    metadata = {"embtrain_export": json.dumps({"layout": "a1111-ldm-sd1", "source": parts.source}, sort_keys=True)}
    contiguous = {k: v.contiguous() for k, v in state.items()}
    write_atomically(checkpoint, lambda f: f.write(safetensors_save(contiguous, metadata)), overwrite)
    write_atomically(config_path, lambda f: f.write(yaml_text.encode("utf-8")), overwrite)
    _usual_mode(checkpoint, config_path)
    logger.info("wrote %s (%d tensors), %s and %s", checkpoint, len(state), config_path, te_dir)
    return ExportResult(checkpoint, config_path, te_dir, len(state))


def output_paths(out_path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(<out>.safetensors, <out>.yaml, <out>-text-encoder/)`` for ``out_path`` with or without the suffix."""
    out = Path(out_path)
    if out.suffix.lower() == ".safetensors":
        out = out.with_suffix("")
    elif out.suffix.lower() in (".ckpt", ".yaml", ".pt", ".bin"):
        raise ExportError(f"{out_path}: give the output as NAME or NAME.safetensors (the checkpoint is safetensors)")
    if not out.name:
        raise ExportError(f"{out_path}: give a file name for the checkpoint")
    return (
        out.with_name(out.name + ".safetensors"),
        out.with_name(out.name + ".yaml"),
        out.with_name(out.name + TEXT_ENCODER_SUFFIX),
    )


def convert_to_ldm(parts: ModelParts) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict: every UNet, VAE and text-encoder tensor under its ldm name."""
    out: dict[str, torch.Tensor] = {}
    for prefix, converted in (
        ("model.diffusion_model.", convert_unet(parts.unet, parts.unet_config)),
        ("first_stage_model.", convert_vae(parts.vae, parts.vae_config)),
        ("cond_stage_model.transformer.", convert_clip_text(parts.text_encoder)),
    ):
        for key, value in converted.items():
            out[prefix + key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Key maps


def _convert(
    state: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str, reshape_1x1: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Rename each key by the longest module prefix in ``table``; unknown keys and collisions are errors.

    ``reshape_1x1``: target module names whose Linear weights become 1x1 conv weights ([o, i] -> [o, i, 1, 1]).
    """
    reshape = set(reshape_1x1)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in table:
                target_module = table[module]
                new_key = ".".join([target_module, *parts[cut:]])
                break
        else:
            unknown.append(key)
            continue
        if target_module in reshape and parts[-1] == "weight" and value.ndim == 2:
            value = value[:, :, None, None]
        if new_key in out:
            raise ExportError(f"{what}: two tensors map to {new_key} (a bug in the key map)")
        out[new_key] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ExportError(f"{what}: no ldm name for {len(unknown)} tensor(s): {shown}")
    return out


_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TRANSFORMER = ("norm", "proj_in", "proj_out", "transformer_blocks")


def _as_list(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def unet_key_table(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers UNet module name -> ldm ``UNetModel`` module name, for the SD1/SD2 layout."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    layers = _as_list(config.get("layers_per_block", 2), levels)
    table: dict[str, str] = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }

    def resnet(src: str, dst: str) -> None:
        for a, b in _RESNET_UNET.items():
            table[f"{src}.{a}"] = f"{dst}.{b}"

    def transformer(src: str, dst: str) -> None:
        for name in _TRANSFORMER:
            table[f"{src}.{name}"] = f"{dst}.{name}"

    index = 1  # input_blocks.0 is conv_in
    for level, kind in enumerate(down_types):
        attention = kind.startswith("CrossAttn")
        for j in range(layers[level]):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0")
            if attention:
                transformer(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1")
            index += 1
        if level != levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    resnet("mid_block.resnets.0", "middle_block.0")
    transformer("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")

    index = 0
    up_layers = list(reversed(layers))
    for u, kind in enumerate(up_types):
        attention = kind.startswith("CrossAttn")
        for j in range(up_layers[u] + 1):
            resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{index}.0")
            if attention:
                transformer(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{index}.1")
            if u != levels - 1 and j == up_layers[u]:
                table[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    return table


def convert_unet(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    _check_unet(config)
    return _convert(state, unet_key_table(config), "UNet")


_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# diffusers' attention names (current, then the names older diffusers releases saved) -> ldm AttnBlock names.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def vae_key_table(config: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Diffusers ``AutoencoderKL`` module name -> ldm ``AutoencoderKL`` name, and the ldm modules stored as 1x1
    convs (the mid-block attention projections, which diffusers stores as Linear)."""
    levels = len(config["block_out_channels"])
    layers = int(config.get("layers_per_block", 2))
    table: dict[str, str] = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    convs: list[str] = []
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = f"{part}.conv_in"
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        table[f"{part}.conv_out"] = f"{part}.conv_out"
        for n in (0, 1):
            for a, b in _RESNET_VAE.items():
                table[f"{part}.mid_block.resnets.{n}.{a}"] = f"{part}.mid.block_{n + 1}.{b}"
        for a, b in _VAE_ATTENTION.items():
            table[f"{part}.mid_block.attentions.0.{a}"] = f"{part}.mid.attn_1.{b}"
            if b != "norm":
                convs.append(f"{part}.mid.attn_1.{b}")
    for level in range(levels):
        for j in range(layers):
            for a, b in _RESNET_VAE.items():
                table[f"encoder.down_blocks.{level}.resnets.{j}.{a}"] = f"encoder.down.{level}.block.{j}.{b}"
        if level != levels - 1:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
    for u in range(levels):  # diffusers runs up_blocks[0] first (lowest resolution); ldm names it up[levels - 1]
        level = levels - 1 - u
        for j in range(layers + 1):
            for a, b in _RESNET_VAE.items():
                table[f"decoder.up_blocks.{u}.resnets.{j}.{a}"] = f"decoder.up.{level}.block.{j}.{b}"
        if level != 0:
            table[f"decoder.up_blocks.{u}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return table, convs


def convert_vae(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    _check_vae(config)
    table, convs = vae_key_table(config)
    return _convert(state, table, "VAE", reshape_1x1=convs)


def convert_clip_text(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModel`` weights under the ``text_model.*`` names transformers 4.x uses (and the WebUI pins);
    transformers 5 saves them without the ``text_model.`` prefix."""
    out: dict[str, torch.Tensor] = {}
    allowed = re.compile(r"(embeddings|encoder|final_layer_norm)\.")
    for key, value in state.items():
        inner = key[len("text_model.") :] if key.startswith("text_model.") else key
        if not allowed.match(inner):
            raise ExportError(
                f"text encoder: unexpected tensor {key} (an SD1 checkpoint holds a plain CLIPTextModel; "
                "projection or vision weights have no place in it)"
            )
        if inner == "embeddings.position_ids":
            continue  # a buffer the host's transformers rebuilds itself; never a trained weight
        out["text_model." + inner] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checks of what ldm can express


def _unsupported(what: str, message: str) -> ExportError:
    return ExportError(f"{what}: {message}; the WebUI's SD1 (ldm) layout cannot express this model")


def _check_unet(config: Mapping[str, Any]) -> None:
    expected = {
        "in_channels": 4,
        "out_channels": 4,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "class_embed_type": None,
        "addition_embed_type": None,
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
        if key in config and config[key] != value:
            raise _unsupported("UNet", f"{key} = {config[key]!r} (ldm needs {value!r})")
    if any(_as_list(config.get("only_cross_attention", False), 1)):
        raise _unsupported("UNet", "only_cross_attention")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != len(up):
        raise _unsupported("UNet", "different numbers of down and up blocks")
    for d, u in zip(down, reversed(up)):
        if d.startswith("CrossAttn") != u.startswith("CrossAttn"):
            raise _unsupported("UNet", f"attention at {d} but not at the matching {u} (ldm mirrors the two paths)")
    depth = _as_list(config.get("transformer_layers_per_block", 1), len(down))
    if any(d != 1 for d in depth):
        raise _unsupported("UNet", f"transformer_layers_per_block = {depth} (the ldm SD1/SD2 UNet has depth 1)")


def _check_vae(config: Mapping[str, Any]) -> None:
    channels = list(config["block_out_channels"])
    if len(channels) != 4:
        raise _unsupported("VAE", f"{len(channels)} levels (the host assumes 8x smaller latents: 4 levels)")
    if any(c % channels[0] for c in channels):
        raise _unsupported("VAE", f"block_out_channels {channels} are not multiples of the first")
    for key, value in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True)):
        if config.get(key, value) != value:
            raise _unsupported("VAE", f"{key} = {config[key]!r}")
    if not config.get("mid_block_add_attention", True):
        raise _unsupported("VAE", "no mid-block attention")
    kinds = set(config.get("down_block_types", ())) | set(config.get("up_block_types", ()))
    if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise _unsupported("VAE", f"block types {sorted(kinds)}")


def _check_family(parts: ModelParts) -> None:
    signs = []
    if parts.scheduler_config.get("prediction_type", "epsilon") == "v_prediction":
        signs.append("v-prediction")
    if parts.unet_config.get("use_linear_projection"):
        signs.append("linear attention projections")
    if parts.text_encoder_config.get("hidden_act") == "gelu":
        signs.append("an OpenCLIP-style text encoder (gelu)")
    if signs:
        raise ExportError(
            f"{parts.source}: looks like an SD2 model ({', '.join(signs)}); only SD1 models can be exported to "
            "the WebUI's layout so far (SD2 needs the OpenCLIP key layout and an OpenCLIP architecture the host knows)"
        )


def _check_norm_groups(parts: ModelParts, allow_mismatch: bool) -> None:
    groups = {
        "UNet": parts.unet_config.get("norm_num_groups", 32),
        "VAE": parts.vae_config.get("norm_num_groups", 32),
    }
    wrong = {k: v for k, v in groups.items() if v != LDM_NORM_GROUPS}
    if not wrong:
        return
    message = (
        f"{', '.join(f'{k} norm_num_groups={v}' for k, v in wrong.items())}: ldm (the WebUI's model code) builds "
        f"every GroupNorm with {LDM_NORM_GROUPS} groups, so the host would compute a different function (and cannot "
        f"build a layer whose width is not a multiple of {LDM_NORM_GROUPS})"
    )
    if not allow_mismatch:
        raise ExportError(
            message + "; use a model built with norm_num_groups=32, or allow_norm_group_mismatch=True "
            "(--allow-norm-group-mismatch) to write the weights anyway"
        )
    logger.warning("warning: %s", message)


# ---------------------------------------------------------------------------------------------------------------
# The yaml config


def _heads(config: Mapping[str, Any]) -> tuple[int, int]:
    """(num_heads, num_head_channels) for ldm; one of them is -1."""
    channels = list(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _as_list(heads, len(channels))
    with_attention = [i for i, t in enumerate(config["down_block_types"]) if t.startswith("CrossAttn")]
    used = {heads[i] for i in with_attention} | {heads[-1]}  # the mid block uses the last level's count
    if len(used) == 1:
        return used.pop(), -1
    dims = {channels[i] // heads[i] for i in [*with_attention, len(channels) - 1]}
    if len(dims) == 1:
        return -1, dims.pop()
    raise _unsupported("UNet", f"attention heads {heads} are neither one count nor one width")


def _schedule(config: Mapping[str, Any]) -> dict[str, Any]:
    schedule = config.get("beta_schedule", "scaled_linear")
    # ldm's "linear" squares a linear ramp of sqrt(beta): diffusers calls that "scaled_linear".
    names = {"scaled_linear": "linear", "linear": "sqrt_linear"}
    if schedule not in names:
        raise _unsupported("scheduler", f"beta_schedule {schedule!r}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise _unsupported("scheduler", f"prediction_type {prediction!r} (only epsilon models are SD1)")
    if config.get("trained_betas") is not None:
        raise _unsupported("scheduler", "explicit trained_betas")
    return {
        "beta_schedule": names[schedule],
        "linear_start": float(config.get("beta_start", 0.00085)),
        "linear_end": float(config.get("beta_end", 0.012)),
        "timesteps": int(config.get("num_train_timesteps", 1000)),
        "parameterization": "eps",
    }


def ldm_config(parts: ModelParts, text_encoder_dir: Path) -> dict[str, Any]:
    """The ldm ``LatentDiffusion`` config of ``parts`` as nested dicts (what :func:`ldm_config_yaml` writes)."""
    unet, vae = parts.unet_config, parts.vae_config
    channels = list(unet["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise _unsupported("UNet", f"block_out_channels {channels} are not multiples of the first")
    num_heads, head_channels = _heads(unet)
    levels = len(channels)
    layers = _as_list(unet.get("layers_per_block", 2), levels)
    vae_channels = list(vae["block_out_channels"])
    context_dim = unet.get("cross_attention_dim", 768)
    if isinstance(context_dim, list | tuple):
        if len(set(context_dim)) != 1:
            raise _unsupported("UNet", f"cross_attention_dim {context_dim}")
        context_dim = context_dim[0]
    text_width = int(parts.text_encoder_config.get("hidden_size", 0))
    if text_width and text_width != context_dim:
        raise ExportError(f"UNet cross_attention_dim {context_dim} != text encoder hidden_size {text_width}")
    sample = int(unet.get("sample_size", 64) or 64)
    schedule = _schedule(parts.scheduler_config)
    unet_params: dict[str, Any] = {
        "image_size": sample,
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
        "transformer_depth": 1,
        "context_dim": int(context_dim),
        "use_checkpoint": False,
        "legacy": False,
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
                    "params": {
                        "embed_dim": int(vae.get("latent_channels", 4)),
                        "monitor": "val/rec_loss",
                        "ddconfig": {
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
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": str(text_encoder_dir)},
                },
            },
        }
    }


def ldm_config_yaml(parts: ModelParts, text_encoder_dir: Path) -> str:
    header = (
        "# ldm LatentDiffusion config written by embedding_trainer export-a1111\n"
        f"# source: {parts.source}\n"
        "# cond_stage_config.params.version is the local text-encoder folder (absolute path: update it if moved)\n"
    )
    return header + _yaml(ldm_config(parts, text_encoder_dir))


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        # YAML 1.1 (PyYAML, which OmegaConf uses) reads 1e-04 as a string: it needs the dot and a signed exponent.
        if "e" in text:
            mantissa, exponent = text.split("e")
            if "." not in mantissa:
                mantissa += ".0"
            if exponent[0] not in "+-":
                exponent = "+" + exponent
            text = f"{mantissa}e{exponent}"
        return text
    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML string


def _yaml(value: Any, indent: int = 0) -> str:
    pad = "  " * indent
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(item, indent + 1).rstrip("\n"))
        elif isinstance(item, list | tuple):
            lines.append(f"{pad}{key}: [{', '.join(_yaml_scalar(v) for v in item)}]")
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar(item)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The local text-encoder folder

_CLIP_TEXT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "dropout",
    "initializer_range",
    "initializer_factor",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def _text_encoder_config_json(config: Mapping[str, Any]) -> str:
    """A config that transformers 4.30 (the WebUI's pin) and 5.x both read as a ``CLIPTextConfig``."""
    if config.get("model_type") not in (None, "clip_text_model"):
        raise ExportError(f"text encoder: model_type {config.get('model_type')!r} is not a CLIP text model")
    out = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float32"}
    out.update({k: config[k] for k in _CLIP_TEXT_CONFIG_KEYS if k in config})
    return json.dumps(out, indent=2) + "\n"


def _write_text_encoder_folder(parts: ModelParts, folder: Path, *, overwrite: bool, dtype: torch.dtype | None) -> None:
    import io

    from ..embedding_file import write_atomically

    folder.mkdir(parents=True, exist_ok=True)
    weights = convert_clip_text(parts.text_encoder)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    buffer = io.BytesIO()
    torch.save({k: v.contiguous().clone() for k, v in weights.items()}, buffer)
    files = {"config.json": _text_encoder_config_json(parts.text_encoder_config).encode("utf-8")}
    files.update({name: text.encode("utf-8") for name, text in parts.tokenizer_files.items()})
    files["pytorch_model.bin"] = buffer.getvalue()
    for name, data in files.items():
        write_atomically(folder / name, lambda f, data=data: f.write(data), overwrite)
    _usual_mode(*(folder / name for name in files))


def _usual_mode(*paths: Path) -> None:
    """The atomic writer's temporary files are private (0600); give the outputs the mode a plain write would."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def tokenizer_files(folder: Path) -> dict[str, str]:
    """The slow ``CLIPTokenizer``'s files (``vocab.json``, ``merges.txt``) plus its config, from a tokenizer
    folder that has them or only a fast ``tokenizer.json`` (what transformers 5 saves)."""
    files: dict[str, str] = {}
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        files["vocab.json"] = (folder / "vocab.json").read_text(encoding="utf-8")
        files["merges.txt"] = (folder / "merges.txt").read_text(encoding="utf-8")
    elif (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
        if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
            raise ExportError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer (a CLIP tokenizer is expected)")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        files["vocab.json"] = json.dumps(model["vocab"], ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "\n".join(merges) + "\n"
    else:
        raise ExportError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {}
    for name, default in (
        ("bos_token", "<|startoftext|>"),
        ("eos_token", "<|endoftext|>"),
        ("unk_token", "<|endoftext|>"),
        ("pad_token", "<|endoftext|>"),
    ):
        value = config.get(name, default)
        special[name] = value["content"] if isinstance(value, dict) else value
    max_length = config.get("model_max_length", 77)
    files["tokenizer_config.json"] = json.dumps(
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": int(max_length) if isinstance(max_length, int) and max_length < 10**6 else 77,
            "do_lower_case": True,
            "errors": "replace",
            **special,
        },
        indent=2,
    )
    files["special_tokens_map.json"] = json.dumps(special, indent=2)
    return files


# ---------------------------------------------------------------------------------------------------------------
# Reading the model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (is this a diffusers model folder?)") from None


def _read_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state dict stored in ``folder`` as safetensors (single or sharded) or a torch ``.bin``."""
    from safetensors.torch import load_file

    for name in names:
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return dict(load_file(str(single)))
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(_read_json(index)["weight_map"].values())):
                state.update(load_file(str(folder / shard)))
            return state
    for candidate in [folder / f"{name}.bin" for name in names] + [folder / "pytorch_model.bin"]:
        if candidate.is_file():
            return dict(torch.load(candidate, map_location="cpu", weights_only=True))
    raise ExportError(f"{folder}: no weights ({' / '.join(n + '.safetensors' for n in names)} or .bin)")


def _load_folder(folder: Path) -> ModelParts:
    index = _read_json(folder / "model_index.json")
    if "text_encoder_2" in index:
        raise ExportError(f"{folder}: an SDXL model; only SD1 models can be exported to the WebUI's layout so far")
    te_config = _read_json(folder / "text_encoder" / "config.json")
    return ModelParts(
        unet=_read_weights(folder / "unet", ("diffusion_pytorch_model",)),
        unet_config=_read_json(folder / "unet" / "config.json"),
        vae=_read_weights(folder / "vae", ("diffusion_pytorch_model",)),
        vae_config=_read_json(folder / "vae" / "config.json"),
        text_encoder=_read_weights(folder / "text_encoder", ("model",)),
        text_encoder_config=te_config,
        tokenizer_files=tokenizer_files(folder / "tokenizer"),
        scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
        source=str(folder.resolve()),
    )


def _config_dict(obj: Any) -> dict[str, Any]:
    config = getattr(obj, "config", None)
    if config is None:
        raise ExportError(f"{type(obj).__name__}: has no config")
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(config)


def _cpu_state(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _load_components(components: Any) -> ModelParts:
    import tempfile

    def get(name: str) -> Any:
        if isinstance(components, Mapping):
            return components.get(name)
        return getattr(components, name, None)

    encoders = get("text_encoders") or ([get("text_encoder")] if get("text_encoder") is not None else [])
    tokenizers = get("tokenizers") or ([get("tokenizer")] if get("tokenizer") is not None else [])
    unet, vae, scheduler = get("unet"), get("vae"), get("scheduler")
    missing = [
        n
        for n, v in (
            ("unet", unet),
            ("vae", vae),
            ("text encoder", encoders),
            ("tokenizer", tokenizers),
            ("scheduler", scheduler),
        )
        if not v
    ]
    if missing:
        raise ExportError(f"components: missing {', '.join(missing)}")
    if len(encoders) != 1:
        raise ExportError(f"components: {len(encoders)} text encoders; only SD1 (one CLIP encoder) is supported")
    with tempfile.TemporaryDirectory(prefix="embtrain-tok-") as tmp:
        tokenizers[0].save_pretrained(tmp)
        tok_files = tokenizer_files(Path(tmp))
    return ModelParts(
        unet=_cpu_state(unet),
        unet_config=_config_dict(unet),
        vae=_cpu_state(vae),
        vae_config=_config_dict(vae),
        text_encoder=_cpu_state(encoders[0]),
        text_encoder_config=_config_dict(encoders[0]),
        tokenizer_files=tok_files,
        scheduler_config=_config_dict(scheduler),
        source=f"in-memory {type(components).__name__}",
    )


def _load_model(model: Any) -> ModelParts:
    if isinstance(model, ModelParts):
        return model
    if isinstance(model, str | os.PathLike):
        folder = Path(model)
        if not folder.is_dir():
            raise ExportError(f"{model}: not a folder (give a diffusers model folder with model_index.json)")
        return _load_folder(folder)
    return _load_components(model)


def load_model_parts(model: Any) -> ModelParts:
    """The state dicts and configs the exporter reads from ``model`` (for tests and tools)."""
    return _load_model(model)
