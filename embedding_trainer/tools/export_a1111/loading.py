"""Reading the model: a diffusers folder (safetensors, sharded or ``.bin`` weights) or in-memory components,
into one :class:`ModelParts`."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .common import ExportError, ModelParts
from .text_encoders import tokenizer_files


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


def load_model_parts(model: Any) -> ModelParts:
    """The state dicts and configs the exporter reads from ``model``: a diffusers folder, components (a pipeline,
    a mapping or an object with ``unet``, ``vae``, ``text_encoder(s)``, ``tokenizer(s)``, ``scheduler``), or
    :class:`ModelParts` as they are."""
    if isinstance(model, ModelParts):
        return model
    if isinstance(model, str | os.PathLike):
        folder = Path(model)
        if not folder.is_dir():
            raise ExportError(f"{model}: not a folder (give a diffusers model folder with model_index.json)")
        return _load_folder(folder)
    return _load_components(model)
