"""Diffusers weight names -> the ldm (SD1, SD2) / sgm (SDXL) names the WebUI's model code loads.

The UNet and VAE tables are derived from the two module structures; a Hugging Face CLIP text model becomes an
open_clip text tower where the host builds one. Every tensor lands exactly once, and a tensor no table knows is an
error: the WebUI's loader fills a missing weight with zeros, so a wrong name would give a dead layer. The mapping
and the constant tensors are explained in docs/export-a1111.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .checks import (
    check_family_consistency,
    check_open_clip_text,
    check_open_clip_tokenizer,
    check_scheduler,
    check_sdxl_text_encoders,
    check_unet,
    check_vae,
)
from .common import ExportError, Family, ModelParts, as_list

#: open_clip's initial CLIP logit scale (a parameter of the model the host builds; text encoding never uses it).
OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)


def convert_to_ldm(parts: ModelParts) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict: every UNet, VAE and text-encoder tensor under its ldm (SD1/SD2) or sgm (SDXL)
    name, plus the documented constants the host's modules need (docs/export-a1111.md)."""
    family = parts.family
    check_family_consistency(parts)
    check_scheduler(parts.scheduler_config, family)
    sections: list[tuple[str, dict[str, torch.Tensor]]] = [
        ("model.diffusion_model.", convert_unet(parts.unet, parts.unet_config, family)),
        ("first_stage_model.", convert_vae(parts.vae, parts.vae_config)),
    ]
    if family == "sd1":
        sections.append(("cond_stage_model.transformer.", convert_clip_text(parts.text_encoder)))
    elif family == "sd2":
        config = parts.text_encoder_config
        check_open_clip_text(config, "text encoder")
        check_open_clip_tokenizer(parts.tokenizer_files, "tokenizer")
        converted = convert_open_clip_text(parts.text_encoder, config, "text encoder")
        fillers = open_clip_fillers(
            config,
            identity_projection="text_projection" not in converted,
            pad_block=True,
            dtype=converted["token_embedding.weight"].dtype,
        )
        sections.append(("cond_stage_model.model.", {**converted, **fillers}))
    else:
        assert parts.text_encoder_2 is not None and parts.text_encoder_2_config is not None
        config = parts.text_encoder_2_config
        check_sdxl_text_encoders(parts)
        converted = convert_open_clip_text(parts.text_encoder_2, config, "text encoder 2")
        if "text_projection" not in converted:
            raise ExportError(
                "text encoder 2: no text_projection.weight; SDXL's second encoder must be a "
                "CLIPTextModelWithProjection (its pooled, projected output is part of the UNet's vector input)"
            )
        sections.append(("conditioner.embedders.0.transformer.", convert_clip_text(parts.text_encoder)))
        sections.append(
            (
                "conditioner.embedders.1.model.",
                {
                    **converted,
                    **open_clip_fillers(
                        config,
                        identity_projection=False,
                        pad_block=False,
                        dtype=converted["token_embedding.weight"].dtype,
                    ),
                },
            )
        )
    out: dict[str, torch.Tensor] = {}
    for prefix, converted_section in sections:
        for key, value in converted_section.items():
            out[prefix + key] = value
    return out


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
        raise ExportError(f"{what}: no ldm/sgm name for {len(unknown)} tensor(s): {shown}")
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


def unet_key_table(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers UNet module name -> ldm/sgm ``UNetModel`` module name (SD1, SD2 and SDXL share the layout; SDXL's
    ``add_embedding`` is sgm's ``label_emb``, the MLP over the pooled text and size embeddings)."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    layers = as_list(config.get("layers_per_block", 2), levels)
    table: dict[str, str] = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    if config.get("addition_embed_type") == "text_time":
        # sgm: label_emb = Sequential(Sequential(linear, SiLU, linear)) over the "vector" conditioning.
        table["add_embedding.linear_1"] = "label_emb.0.0"
        table["add_embedding.linear_2"] = "label_emb.0.2"

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


def convert_unet(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], family: Family = "sd1"
) -> dict[str, torch.Tensor]:
    check_unet(config, family)
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
    check_vae(config)
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
                f"text encoder: unexpected tensor {key} (the WebUI's CLIP embedder (SD1, SDXL's CLIP-L) is a plain "
                "CLIPTextModel; projection or vision weights have no place in it)"
            )
        if inner == "embeddings.position_ids":
            continue  # a buffer the host's transformers rebuilds itself; never a trained weight
        out["text_model." + inner] = value
    return out


#: Per-layer HF CLIP module -> OpenCLIP ``ResidualAttentionBlock`` module (q/k/v are concatenated separately).
_OPEN_CLIP_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


#: The parameters of one open_clip ``ResidualAttentionBlock`` and their shapes for a tower ``w`` wide.
_OPEN_CLIP_BLOCK_SHAPES = {
    "ln_1.weight": lambda w: (w,),
    "ln_1.bias": lambda w: (w,),
    "attn.in_proj_weight": lambda w: (3 * w, w),
    "attn.in_proj_bias": lambda w: (3 * w,),
    "attn.out_proj.weight": lambda w: (w, w),
    "attn.out_proj.bias": lambda w: (w,),
    "ln_2.weight": lambda w: (w,),
    "ln_2.bias": lambda w: (w,),
    "mlp.c_fc.weight": lambda w: (4 * w, w),
    "mlp.c_fc.bias": lambda w: (4 * w,),
    "mlp.c_proj.weight": lambda w: (w, 4 * w),
    "mlp.c_proj.bias": lambda w: (w,),
}


def open_clip_key_names(blocks: int, projection: bool = True) -> set[str]:
    """Every parameter name of an open_clip ``CLIP`` text tower with ``blocks`` transformer blocks, as the host
    builds it (the visual tower deleted); ``attn_mask`` is a non-persistent buffer and not among them."""
    names = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "logit_scale"}
    if projection:
        names.add("text_projection")
    names.update(f"transformer.resblocks.{n}.{name}" for n in range(blocks) for name in _OPEN_CLIP_BLOCK_SHAPES)
    return names


def convert_open_clip_text(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], what: str = "text encoder"
) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModel(WithProjection)`` weights -> the names of an open_clip ``CLIP`` text tower.

    q/k/v projections are concatenated (in that order) into ``attn.in_proj_weight``/``_bias``, as
    ``torch.nn.MultiheadAttention`` stores them; ``text_projection.weight`` ([proj, width], a Linear) becomes
    ``text_projection`` ([width, proj]: open_clip computes ``x @ text_projection``). ``logit_scale`` and, for a
    model without a projection, ``text_projection`` come from :func:`open_clip_fillers`.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []

    def put(key: str, value: torch.Tensor) -> None:
        if key in out:
            raise ExportError(f"{what}: two tensors map to {key} (a bug in the key map)")
        out[key] = value

    for key, value in state.items():
        if key == "text_projection.weight":
            put("text_projection", value.t())
            continue
        inner = key[len("text_model.") :] if key.startswith("text_model.") else key
        match = _HF_LAYER.fullmatch(inner)
        if inner == "embeddings.position_ids":
            continue  # a buffer, not a weight; open_clip has none
        elif inner == "embeddings.token_embedding.weight":
            put("token_embedding.weight", value)
        elif inner == "embeddings.position_embedding.weight":
            put("positional_embedding", value)
        elif inner in ("final_layer_norm.weight", "final_layer_norm.bias"):
            put("ln_final." + inner.rsplit(".", 1)[1], value)
        elif match and match[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(match[1]), match[3]), {})[match[2][len("self_attn.")]] = value
        elif match and match[2] in _OPEN_CLIP_BLOCK:
            put(f"transformer.resblocks.{match[1]}.{_OPEN_CLIP_BLOCK[match[2]]}.{match[3]}", value)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ExportError(f"{what}: no OpenCLIP name for {len(unknown)} tensor(s): {shown}")
    for (n, kind), found in sorted(qkv.items()):
        if sorted(found) != ["k", "q", "v"]:
            missing_parts = sorted({"q", "k", "v"} - set(found))
            raise ExportError(f"{what}: layer {n} has no {kind} for {'/'.join(missing_parts)} (q, k and v are needed)")
        put(f"transformer.resblocks.{n}.attn.in_proj_{kind}", torch.cat([found["q"], found["k"], found["v"]], 0))
    expected = open_clip_key_names(int(config["num_hidden_layers"]), "text_projection" in out) - {"logit_scale"}
    missing = sorted(expected - set(out))
    extra = sorted(set(out) - expected)
    if missing or extra:
        raise ExportError(
            f"{what}: the weights do not match the config's {config['num_hidden_layers']} layers "
            f"(missing {missing[:6]}, unexpected {extra[:6]})"
        )
    return out


def open_clip_fillers(
    config: Mapping[str, Any], *, identity_projection: bool, pad_block: bool, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The constant tensors an open_clip text tower needs beyond the diffusers weights (docs/export-a1111.md):
    ``logit_scale``; an identity ``text_projection`` when ``identity_projection`` (the encoder has none); when
    ``pad_block``, one all-zero block after the converted ones (SD2: the host's "penultimate" layer is then the
    diffusers encoder's last)."""
    width = int(config["hidden_size"])
    out = {"logit_scale": torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=dtype)}
    if identity_projection:
        out["text_projection"] = torch.eye(width, dtype=dtype)
    if pad_block:
        block = f"transformer.resblocks.{int(config['num_hidden_layers'])}."
        for name, shape in _OPEN_CLIP_BLOCK_SHAPES.items():
            out[block + name] = torch.zeros(shape(width), dtype=dtype)
    return out
