"""``export_a1111``: check, convert and write one model, all outputs or none."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ...log import logger
from .checks import check_norm_groups
from .common import ExportError, Family, usual_mode
from .configs import model_config_yaml
from .keys import convert_to_ldm
from .loading import load_model_parts
from .text_encoders import open_clip_arch, write_text_encoder_folder

TEXT_ENCODER_SUFFIX = "-text-encoder"
#: The open_clip model config beside the checkpoint; its stem (``NAME.open_clip``) is the arch name in the yaml.
OPEN_CLIP_SUFFIX = ".open_clip.json"
_LAYOUTS = {"sd1": "a1111-ldm-sd1", "sd2": "a1111-ldm-sd2", "sdxl": "a1111-sgm-sdxl"}


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

    from ...atomic_write import write_atomically

    paths = output_paths(out_path)
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{', '.join(map(str, existing))}: already exists; choose another output name or pass "
            "overwrite=True (--overwrite)"
        )
    parts = load_model_parts(model)
    family = parts.family
    check_norm_groups(parts, allow_norm_group_mismatch)
    state = convert_to_ldm(parts)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    arch, open_clip_json = open_clip_arch(parts, paths.open_clip_config)
    te_dir = paths.text_encoder_dir if family in ("sd1", "sdxl") else None
    yaml_text = model_config_yaml(parts, te_dir.resolve() if te_dir else None, arch)
    paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if te_dir is not None:
        write_text_encoder_folder(parts, te_dir, overwrite=overwrite, dtype=dtype)
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
    usual_mode(*written)
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
