"""Export a diffusers-format SD1, SD2 or SDXL model as a single-file checkpoint the AUTOMATIC1111 WebUI loads.

``export_a1111(model, "models/Stable-diffusion/tiny")`` writes, side by side:

- ``tiny.safetensors``: every weight under the key names of the model code the WebUI builds from the yaml. SD1 and
  SD2 use the original latent-diffusion (ldm) layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
  (VAE), and ``cond_stage_model.transformer.*`` (SD1: a Hugging Face ``CLIPTextModel``) or ``cond_stage_model.model.*``
  (SD2: an OpenCLIP text tower). SDXL uses the generative-models (sgm) layout: the same UNet and VAE prefixes
  (the UNet also has ``label_emb``, the size/pooled-text "vector" input), ``conditioner.embedders.0.transformer.*``
  (CLIP-L, Hugging Face names) and ``conditioner.embedders.1.model.*`` (OpenCLIP-G, with ``text_projection``);
- ``tiny.yaml``: the ldm ``LatentDiffusion`` (SD1/SD2) or sgm ``DiffusionEngine`` (SDXL) config of exactly this
  architecture (the WebUI uses a same-named ``.yaml`` beside a checkpoint as its config). SD2 and SDXL get
  ``parameterization: "v"`` / sgm's ``VScaling`` when the scheduler's ``prediction_type`` is ``v_prediction``: the
  WebUI takes v-prediction from the config, not from the weights;
- ``tiny-text-encoder/`` (SD1, and SDXL's CLIP-L): the CLIP text model's config, weights and tokenizer files. The
  yaml names this folder by its absolute path, so the host reads the tokenizer and the text model's config from
  disk instead of the model hub (it takes the text model's weights from the checkpoint). The weights in the folder
  are ``pytorch_model.bin``, not ``.safetensors``: the WebUI lists every ``*.safetensors`` below its checkpoint
  folder as a checkpoint of its own;
- ``tiny.open_clip.json`` (SD2, and SDXL's OpenCLIP-G): the open_clip model config of the OpenCLIP text encoder.
  The host builds that encoder with ``open_clip.create_model_and_transforms(arch)``, and open_clip only knows its
  own architectures by name. An encoder that is exactly the text tower of ``ViT-H-14`` (SD2) or ``ViT-bigG-14``
  (SDXL) uses that name and needs no file. Any other size gets the arch name ``tiny.open_clip`` (the file's stem),
  and that file must be registered in the WebUI's process before the model loads:
  ``open_clip.add_model_config("…/tiny.open_clip.json")``, e.g. from an extension script (the WebUI imports
  extension scripts before it loads the model). The exporter only writes the file; Embedding Trainer's extension
  does not register it.

Key conversion. The UNet and VAE maps are derived from the two module structures: diffusers'
``UNet2DConditionModel`` / ``AutoencoderKL`` blocks are walked in order and each module is given the name the
matching ldm/sgm module has (``input_blocks.N``, ``middle_block``, ``output_blocks.N``; ``encoder.down.N.block.M``,
``decoder.up.N``...); SDXL's ``add_embedding.linear_1/2`` become ``label_emb.0.0/0.2``. A Hugging Face CLIP text
model becomes an OpenCLIP text tower by: ``q_proj``/``k_proj``/``v_proj`` concatenated into
``attn.in_proj_weight``/``in_proj_bias``; ``self_attn.out_proj`` -> ``attn.out_proj``; ``mlp.fc1``/``fc2`` ->
``mlp.c_fc``/``c_proj``; ``layer_norm1``/``2`` -> ``ln_1``/``ln_2``; ``final_layer_norm`` -> ``ln_final``;
``token_embedding``; ``position_embedding.weight`` -> ``positional_embedding``; ``text_projection.weight``
(a Linear, ``[proj, width]``) -> ``text_projection`` transposed (open_clip multiplies ``x @ text_projection``).
Every source tensor lands exactly once; anything a map does not know is an error, never silently dropped (the
WebUI's loader silently fills a missing Linear/Conv weight with zeros, so a wrong key would give a dead layer).

Tensors that are not in the diffusers model and are written as documented constants, so that the host finds every
parameter of the modules it builds: ``logit_scale`` (open_clip's initial ``log(1/0.07)``; never used for text);
SD2's ``text_projection`` (an identity: diffusers' SD2 text encoder has no projection and the ldm embedder never
pools); and SD2's last OpenCLIP block, all zeros. The WebUI's SD2 config reads the OpenCLIP tower's penultimate
layer (``layer: "penultimate"``, then ``ln_final``), which is what diffusers' SD2 text encoder computes with its
last layer already cut off; so the exported tower has one block more than the diffusers encoder, and that block is
never run. (A diffusers SD2 with 23 layers of width 1024 thus becomes exactly ``ViT-H-14``'s 24-block text tower.)
SDXL reads CLIP-L's hidden states before its last layer (``layer: "hidden"``) and OpenCLIP-G's penultimate layer
plus the pooled, projected end token, as diffusers' SDXL pipeline does.

Tokenizers. The WebUI tokenizes OpenCLIP prompts with open_clip's own BPE (the same merges as CLIP's) and pads
after the end token with id 0, the ``!`` token; diffusers' SD2 and SDXL-2 tokenizers pad with ``!`` too. A tokenizer
that pads with another token still exports, with a warning: the host's conditioning would differ from diffusers'.

Limits: ldm and sgm hard-code 32 groups in every GroupNorm, so a model built with another ``norm_num_groups`` is
refused unless ``allow_norm_group_mismatch`` (its weights then map one to one, but the host computes a different
function, and a layer whose width is not a multiple of 32 stops the host from building the model at all). The host
assumes latents 8x smaller than images, so the VAE must have four levels. open_clip 2.20 (the WebUI's pin) builds
text MLPs four times as wide as the model and uses LayerNorm eps 1e-5, so an OpenCLIP encoder must have
``intermediate_size == 4 * hidden_size``. The WebUI rebuilds SDXL's noise schedule with sgm's defaults (scaled
linear, 0.00085 to 0.012, 1000 steps), so an SDXL with another schedule is refused. Moving the exported files
elsewhere needs the yaml's ``version`` updated; renaming them needs the OpenCLIP ``arch`` and the json's name to
stay equal.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from ..errors import EmbeddingTrainerError
from ..log import logger

Family = Literal["sd1", "sd2", "sdxl"]

#: ldm and sgm build every GroupNorm with this many groups (not configurable there).
LDM_NORM_GROUPS = 32
TEXT_ENCODER_SUFFIX = "-text-encoder"
#: The open_clip model config beside the checkpoint; its stem (``NAME.open_clip``) is the arch name in the yaml.
OPEN_CLIP_SUFFIX = ".open_clip.json"
#: open_clip's initial CLIP logit scale (a parameter of the model the host builds; text encoding never uses it).
OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)
#: The text towers of the open_clip architectures SD2 and SDXL use: (embed_dim, width, heads, layers).
BUILTIN_OPEN_CLIP_ARCHS = {"ViT-H-14": (1024, 1024, 16, 24), "ViT-bigG-14": (1280, 1280, 20, 32)}
#: The smallest vision tower open_clip builds: the host deletes it right after building the model.
_TINY_VISION = {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 32}
#: sgm's LegacyDDPMDiscretization defaults, which the WebUI uses for every SDXL model whatever its config says.
_SDXL_SCHEDULE = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
_LAYOUTS = {"sd1": "a1111-ldm-sd1", "sd2": "a1111-ldm-sd2", "sdxl": "a1111-sgm-sdxl"}


class ExportError(EmbeddingTrainerError):
    """The model cannot be written in the WebUI's checkpoint layout, or the output already exists."""


@dataclass
class ModelParts:
    """The state dicts and configs of one diffusers SD model, however they were given.

    ``text_encoder`` is SD1's CLIP, SD2's OpenCLIP-H-style encoder or SDXL's CLIP-L; ``text_encoder_2`` is SDXL's
    OpenCLIP-G-style encoder (with its projection) and ``None`` for SD1/SD2.
    """

    unet: dict[str, torch.Tensor]
    unet_config: dict[str, Any]
    vae: dict[str, torch.Tensor]
    vae_config: dict[str, Any]
    text_encoder: dict[str, torch.Tensor]
    text_encoder_config: dict[str, Any]
    tokenizer_files: dict[str, str]  # file name -> text (vocab.json, merges.txt, tokenizer_config.json...)
    scheduler_config: dict[str, Any]
    source: str
    text_encoder_2: dict[str, torch.Tensor] | None = None
    text_encoder_2_config: dict[str, Any] | None = None
    tokenizer_2_files: dict[str, str] | None = None

    @property
    def family(self) -> Family:
        """SDXL with two text encoders; SD2 when the one encoder is OpenCLIP-style (gelu); SD1 otherwise."""
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if self.text_encoder_config.get("hidden_act") == "gelu" else "sd1"


class OutputPaths(NamedTuple):
    checkpoint: Path
    config: Path
    text_encoder_dir: Path
    open_clip_config: Path


@dataclass
class ExportResult:
    checkpoint: Path
    config: Path
    text_encoder_dir: Path | None  # SD1 and SDXL (CLIP-L); None for SD2
    tensors: int
    family: Family = "sd1"
    #: The open_clip arch name in the yaml (SD2/SDXL), and the config file that defines it when it is not built in.
    open_clip_arch: str | None = None
    open_clip_config: Path | None = None


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
    """Write ``model`` (a diffusers SD1, SD2 or SDXL folder, or components with ``unet``, ``vae``,
    ``text_encoder(s)``, ``tokenizer(s)`` and ``scheduler``) as ``<out>.safetensors`` + ``<out>.yaml``, plus
    ``<out>-text-encoder/`` (SD1, SDXL) and ``<out>.open_clip.json`` (SD2, SDXL, unless a built-in open_clip arch).

    ``out_path`` may end in ``.safetensors`` or have no suffix. Returns every path written (``.checkpoint`` is the
    one the WebUI loads). Existing outputs are never replaced unless ``overwrite``; nothing is written when any
    check fails. ``dtype`` (e.g. ``torch.float16``) converts floating-point weights; by default they keep theirs.
    """
    from safetensors.torch import save as safetensors_save

    from ..embedding_file import write_atomically

    paths = output_paths(out_path)
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{', '.join(map(str, existing))}: already exists; choose another output name or pass "
            "overwrite=True (--overwrite)"
        )
    parts = _load_model(model)
    family = parts.family
    _check_norm_groups(parts, allow_norm_group_mismatch)
    state = convert_to_ldm(parts)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    arch, open_clip_json = open_clip_arch(parts, paths.open_clip_config)
    te_dir = paths.text_encoder_dir if family in ("sd1", "sdxl") else None
    yaml_text = model_config_yaml(parts, te_dir.resolve() if te_dir else None, arch)
    paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if te_dir is not None:
        _write_text_encoder_folder(parts, te_dir, overwrite=overwrite, dtype=dtype)
    written = [paths.checkpoint, paths.config]
    if open_clip_json is not None:
        text = json.dumps(open_clip_json, indent=2) + "\n"
        write_atomically(paths.open_clip_config, lambda f: f.write(text.encode("utf-8")), overwrite)
        written.append(paths.open_clip_config)
    # One metadata entry: safetensors writes several in a random (per-process) order, which would give the same
    # model a different file hash, and so a different WebUI model hash, at every export.
    metadata = {"embtrain_export": json.dumps({"layout": _LAYOUTS[family], "source": parts.source}, sort_keys=True)}
    contiguous = {k: v.contiguous() for k, v in state.items()}
    write_atomically(paths.checkpoint, lambda f: f.write(safetensors_save(contiguous, metadata)), overwrite)
    write_atomically(paths.config, lambda f: f.write(yaml_text.encode("utf-8")), overwrite)
    _usual_mode(*written)
    logger.info(
        "wrote %s (%s, %d tensors), %s%s%s",
        paths.checkpoint,
        family.upper(),
        len(state),
        paths.config,
        f" and {te_dir}" if te_dir else "",
        f" and {paths.open_clip_config}" if open_clip_json else "",
    )
    if open_clip_json is not None:
        logger.info(
            "the OpenCLIP text encoder is the custom open_clip arch %r: the WebUI must run "
            "open_clip.add_model_config(%r) before it loads this checkpoint (e.g. in an extension script)",
            arch,
            str(paths.open_clip_config.resolve()),
        )
    return ExportResult(
        paths.checkpoint,
        paths.config,
        te_dir,
        len(state),
        family,
        arch,
        paths.open_clip_config if open_clip_json is not None else None,
    )


def output_paths(out_path: str | os.PathLike[str]) -> OutputPaths:
    """``<out>.safetensors``, ``<out>.yaml``, ``<out>-text-encoder/`` and ``<out>.open_clip.json`` for
    ``out_path`` with or without the suffix (which of the last two are written depends on the family)."""
    out = Path(out_path)
    if out.suffix.lower() == ".safetensors":
        out = out.with_suffix("")
    elif out.suffix.lower() in (".ckpt", ".yaml", ".pt", ".bin", ".json"):
        raise ExportError(f"{out_path}: give the output as NAME or NAME.safetensors (the checkpoint is safetensors)")
    if not out.name:
        raise ExportError(f"{out_path}: give a file name for the checkpoint")
    return OutputPaths(
        out.with_name(out.name + ".safetensors"),
        out.with_name(out.name + ".yaml"),
        out.with_name(out.name + TEXT_ENCODER_SUFFIX),
        out.with_name(out.name + OPEN_CLIP_SUFFIX),
    )


def convert_to_ldm(parts: ModelParts) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict: every UNet, VAE and text-encoder tensor under its ldm (SD1/SD2) or sgm (SDXL)
    name, plus the documented constants the host's modules need (see the module docstring)."""
    family = parts.family
    _check_family_consistency(parts)
    _check_scheduler(parts.scheduler_config, family)
    sections: list[tuple[str, dict[str, torch.Tensor]]] = [
        ("model.diffusion_model.", convert_unet(parts.unet, parts.unet_config, family)),
        ("first_stage_model.", convert_vae(parts.vae, parts.vae_config)),
    ]
    if family == "sd1":
        sections.append(("cond_stage_model.transformer.", convert_clip_text(parts.text_encoder)))
    elif family == "sd2":
        config = parts.text_encoder_config
        _check_open_clip_text(config, "text encoder")
        _check_open_clip_tokenizer(parts.tokenizer_files, "tokenizer")
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
        _check_sdxl_text_encoders(parts)
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


def _as_list(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def unet_key_table(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers UNet module name -> ldm/sgm ``UNetModel`` module name (SD1, SD2 and SDXL share the layout; SDXL's
    ``add_embedding`` is sgm's ``label_emb``, the MLP over the pooled text and size embeddings)."""
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
    _check_unet(config, family)
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
    """The constant tensors an open_clip text tower needs beyond the diffusers weights (module docstring):
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


def open_clip_model_config(config: Mapping[str, Any], blocks: int, embed_dim: int) -> dict[str, Any]:
    """The open_clip model config (the JSON ``open_clip.add_model_config`` reads) of the text tower the host builds
    for this HF text config, with ``blocks`` transformer blocks; its vision tower is a minimal placeholder."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": config.get("hidden_act") == "quick_gelu",
        "vision_cfg": dict(_TINY_VISION),
        "text_cfg": {
            "context_length": int(config.get("max_position_embeddings", 77)),
            "vocab_size": int(config.get("vocab_size", 49408)),
            "width": int(config["hidden_size"]),
            "heads": int(config["num_attention_heads"]),
            "layers": blocks,
        },
    }


def open_clip_arch(parts: ModelParts, json_path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """The arch name the yaml gives the host's OpenCLIP embedder, and the model config to write at ``json_path``
    (``None`` when the encoder is exactly a built-in open_clip text tower, or there is no OpenCLIP encoder)."""
    family = parts.family
    if family == "sd1":
        return None, None
    if family == "sd2":
        config, state = parts.text_encoder_config, parts.text_encoder
        blocks = int(config["num_hidden_layers"]) + 1  # + the never-run pad block (module docstring)
    else:
        assert parts.text_encoder_2_config is not None and parts.text_encoder_2 is not None
        config, state = parts.text_encoder_2_config, parts.text_encoder_2
        blocks = int(config["num_hidden_layers"])
    projection = state.get("text_projection.weight")
    embed_dim = int(projection.shape[0]) if projection is not None else int(config["hidden_size"])
    model_config = open_clip_model_config(config, blocks, embed_dim)
    text = model_config["text_cfg"]
    for name, (dim, width, heads, layers) in BUILTIN_OPEN_CLIP_ARCHS.items():
        if (
            (embed_dim, text["width"], text["heads"], text["layers"]) == (dim, width, heads, layers)
            and not model_config["quick_gelu"]
            and (text["context_length"], text["vocab_size"]) == (77, 49408)
        ):
            return name, None
    return json_path.name[: -len(".json")], model_config


# ---------------------------------------------------------------------------------------------------------------
# Checks of what ldm / sgm (and the WebUI around them) can express


def _unsupported(what: str, message: str) -> ExportError:
    return ExportError(f"{what}: {message}; the WebUI's ldm/sgm model code cannot express this model")


def _check_unet(config: Mapping[str, Any], family: Family = "sd1") -> None:
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
            raise _unsupported("UNet", f"{key} = {config[key]!r} ({family.upper()} needs {value!r})")
    if any(_as_list(config.get("only_cross_attention", False), 1)):
        raise _unsupported("UNet", "only_cross_attention")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != len(up):
        raise _unsupported("UNet", "different numbers of down and up blocks")
    for d, u in zip(down, reversed(up)):
        if d.startswith("CrossAttn") != u.startswith("CrossAttn"):
            raise _unsupported("UNet", f"attention at {d} but not at the matching {u} (ldm mirrors the two paths)")
    depth = transformer_depths(config)
    if family != "sdxl" and len(set(depth)) != 1:
        raise _unsupported("UNet", f"transformer_layers_per_block = {depth} (the ldm SD1/SD2 UNet has one depth)")
    if family == "sdxl":
        if not isinstance(config.get("addition_time_embed_dim"), int):
            raise _unsupported("UNet", "no addition_time_embed_dim (SDXL embeds the image sizes with it)")


def transformer_depths(config: Mapping[str, Any]) -> list[int]:
    """Transformer blocks per level (the mid block uses the last), as ldm's/sgm's ``transformer_depth``."""
    levels = len(config["down_block_types"])
    depth = _as_list(config.get("transformer_layers_per_block", 1), levels)
    if any(not isinstance(d, int) for d in depth):
        raise _unsupported("UNet", f"transformer_layers_per_block = {depth} (one depth per level is supported)")
    reverse = config.get("reverse_transformer_layers_per_block")
    if reverse is not None and list(_as_list(reverse, levels)) != list(reversed(depth)):
        raise _unsupported("UNet", f"reverse_transformer_layers_per_block = {reverse} (sgm mirrors the down depths)")
    return [int(d) for d in depth]


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


def _check_open_clip_text(config: Mapping[str, Any], what: str) -> None:
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


def _check_open_clip_tokenizer(files: Mapping[str, str] | None, what: str) -> None:
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


def _check_sdxl_text_encoders(parts: ModelParts) -> None:
    assert parts.text_encoder_2_config is not None
    layers = int(parts.text_encoder_config.get("num_hidden_layers", 12))
    if layers < 2:
        raise ExportError("text encoder: SDXL reads CLIP-L's hidden states before its last layer: it needs 2+ layers")
    _check_open_clip_text(parts.text_encoder_2_config, "text encoder 2")
    _check_open_clip_tokenizer(parts.tokenizer_2_files, "tokenizer 2")
    widths = int(parts.text_encoder_config["hidden_size"]) + int(parts.text_encoder_2_config["hidden_size"])
    context = parts.unet_config.get("cross_attention_dim")
    if context != widths:
        raise ExportError(
            f"UNet cross_attention_dim {context} != the two text encoders' widths together ({widths}); "
            "SDXL's UNet attends to both encoders' hidden states side by side"
        )


def _check_family_consistency(parts: ModelParts) -> None:
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


def _check_scheduler(config: Mapping[str, Any], family: Family) -> None:
    schedule = _schedule(config)
    if family != "sdxl":
        return  # ldm takes the schedule from the yaml
    got = {k: schedule[k] for k in _SDXL_SCHEDULE}
    same = all(abs(got[k] - v) < 1e-9 if isinstance(v, float) else got[k] == v for k, v in _SDXL_SCHEDULE.items())
    if not same:
        raise ExportError(
            f"scheduler: {got} is not SDXL's schedule {_SDXL_SCHEDULE}; the WebUI rebuilds every SDXL model's noise "
            "schedule from those defaults, so it would train and sample this model on another schedule"
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


# ---------------------------------------------------------------------------------------------------------------
# The yaml config


def _heads(config: Mapping[str, Any]) -> tuple[int, int]:
    """(num_heads, num_head_channels) for ldm/sgm; one of them is -1."""
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
    if prediction not in ("epsilon", "v_prediction"):
        raise _unsupported("scheduler", f"prediction_type {prediction!r} (epsilon and v_prediction are supported)")
    if config.get("trained_betas") is not None:
        raise _unsupported("scheduler", "explicit trained_betas")
    return {
        "beta_schedule": names[schedule],
        "linear_start": float(config.get("beta_start", 0.00085)),
        "linear_end": float(config.get("beta_end", 0.012)),
        "timesteps": int(config.get("num_train_timesteps", 1000)),
        "parameterization": "v" if prediction == "v_prediction" else "eps",
    }


def _unet_params(parts: ModelParts) -> dict[str, Any]:
    """The ``UNetModel`` params ldm and sgm share."""
    unet = parts.unet_config
    channels = list(unet["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise _unsupported("UNet", f"block_out_channels {channels} are not multiples of the first")
    num_heads, head_channels = _heads(unet)
    layers = _as_list(unet.get("layers_per_block", 2), len(channels))
    context_dim = unet.get("cross_attention_dim", 768)
    if isinstance(context_dim, list | tuple):
        if len(set(context_dim)) != 1:
            raise _unsupported("UNet", f"cross_attention_dim {context_dim}")
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
    _check_family_consistency(parts)
    if family == "sdxl":
        return _sgm_config(parts, text_encoder_dir, open_clip_arch)
    unet, vae = parts.unet_config, parts.vae_config
    sample = int(unet.get("sample_size", 64) or 64)
    schedule = _schedule(parts.scheduler_config)
    unet_params = {"image_size": sample, **_unet_params(parts), "transformer_depth": transformer_depths(unet)[0]}
    if family == "sd1":
        cond_stage = {
            "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": str(_required(text_encoder_dir, "text_encoder_dir"))},
        }
    else:
        # version null: no pretrained download, ever (the weights are in the checkpoint). "penultimate": see the
        # module docstring (the exported tower has one never-run block more than the diffusers encoder).
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
    schedule = _schedule(parts.scheduler_config)
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
        raise _unsupported(
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
    return header + _yaml(model_config(parts, text_encoder_dir, open_clip_arch))


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


def _yaml(value: Mapping[str, Any], indent: int = 0) -> str:
    """Block-style YAML of nested dicts, lists of scalars (flow style) and lists of dicts (sgm's emb_models)."""
    pad = "  " * indent
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(item, indent + 1).rstrip("\n"))
        elif isinstance(item, list | tuple) and item and all(isinstance(v, dict) for v in item):
            lines.append(f"{pad}{key}:")
            for entry in item:
                body = _yaml(entry, indent + 2).rstrip("\n").split("\n")
                lines.append(f"{pad}  - {body[0].lstrip()}")
                lines.extend(body[1:])
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
    if (folder / "special_tokens_map.json").is_file():  # overrides the config (transformers 4.x saves both)
        config.update(json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8")))
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
    second = bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None
    return ModelParts(
        unet=_read_weights(folder / "unet", ("diffusion_pytorch_model",)),
        unet_config=_read_json(folder / "unet" / "config.json"),
        vae=_read_weights(folder / "vae", ("diffusion_pytorch_model",)),
        vae_config=_read_json(folder / "vae" / "config.json"),
        text_encoder=_read_weights(folder / "text_encoder", ("model",)),
        text_encoder_config=_read_json(folder / "text_encoder" / "config.json"),
        tokenizer_files=tokenizer_files(folder / "tokenizer"),
        scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
        source=str(folder.resolve()),
        text_encoder_2=_read_weights(folder / "text_encoder_2", ("model",)) if second else None,
        text_encoder_2_config=_read_json(folder / "text_encoder_2" / "config.json") if second else None,
        tokenizer_2_files=tokenizer_files(folder / "tokenizer_2") if second else None,
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

    def listed(many: str, one: str) -> list[Any]:
        if get(many):
            return list(get(many))
        found = [get(one), get(one + "_2")]
        return [x for x in found if x is not None]

    encoders, tokenizers = listed("text_encoders", "text_encoder"), listed("tokenizers", "tokenizer")
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
    if len(encoders) not in (1, 2) or len(tokenizers) != len(encoders):
        raise ExportError(
            f"components: {len(encoders)} text encoders and {len(tokenizers)} tokenizers; SD1/SD2 have one of each, "
            "SDXL two"
        )
    files = []
    for tokenizer in tokenizers:
        with tempfile.TemporaryDirectory(prefix="embtrain-tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            files.append(tokenizer_files(Path(tmp)))
    sdxl = len(encoders) == 2
    return ModelParts(
        unet=_cpu_state(unet),
        unet_config=_config_dict(unet),
        vae=_cpu_state(vae),
        vae_config=_config_dict(vae),
        text_encoder=_cpu_state(encoders[0]),
        text_encoder_config=_config_dict(encoders[0]),
        tokenizer_files=files[0],
        scheduler_config=_config_dict(scheduler),
        source=f"in-memory {type(components).__name__}",
        text_encoder_2=_cpu_state(encoders[1]) if sdxl else None,
        text_encoder_2_config=_config_dict(encoders[1]) if sdxl else None,
        tokenizer_2_files=files[1] if sdxl else None,
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
