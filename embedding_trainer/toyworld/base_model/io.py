"""Files of the base model: the stage checkpoints under ``<out>/state`` and the finished model, a diffusers folder
written by the project's ``save_components`` (weights in fp16, with ``training_record.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from ...atomic_write import write_atomically
from .architecture import build_scheduler, build_vae
from .plan import BaseModelError, Plan, check_plan


def save_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """A stage's file replaced whole (a killed stage leaves the previous checkpoint readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, write, overwrite=True)


def torch_save(obj: Any, path: Path) -> None:
    save_atomically(path, lambda f: torch.save(obj, f))


def torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class BaseModel:
    """The trained parts, ready to sample (fp32, eval mode)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]

    def to(self, device: torch.device | str) -> BaseModel:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def load_trained_vae(plan: Plan, out: Path, require_done: bool = True) -> Any:
    """The VAE of the vae stage's checkpoint, with its calibrated latent scale."""
    path = out / "state" / "vae.pt"
    if not path.is_file():
        raise BaseModelError(f"{path}: no VAE checkpoint; run the vae stage first (--stage vae)")
    state = torch_load(path)
    check_plan(state, plan, "vae")
    if require_done and state["step"] < plan.vae.steps:
        raise BaseModelError(
            f"{path}: the VAE has trained {state['step']} of {plan.vae.steps} steps; finish the vae stage first"
        )
    vae = build_vae(plan.arch, plan.seed)
    vae.load_state_dict(state["model"])
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    return vae.eval()


def save_model(model: BaseModel, folder: Path, record: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a diffusers folder (``save_components``), weights in fp16, plus ``training_record.json``."""
    import copy

    from ...tools.export_a1111 import tokenizer_files
    from ...tools.tiny_models import TinyComponents, save_components

    def half(module: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(module).cpu().half()

    text_encoder = half(model.text_encoder)
    components = TinyComponents(
        "sd1", half(model.unet), half(model.vae), [text_encoder], [model.tokenizer], build_scheduler()
    )
    save_components(components, folder)
    # The slow tokenizer's files, which every transformers version reads (5.x writes only tokenizer.json, which
    # transformers 4.30, the WebUI's pin, cannot read with CLIPTokenizer); they are smaller too.
    tokenizer_folder = folder / "tokenizer"
    files = tokenizer_files(tokenizer_folder)
    for stale in tokenizer_folder.iterdir():
        stale.unlink()
    for name, text in files.items():
        (tokenizer_folder / name).write_text(text, encoding="utf-8")
    text_folder = folder / "text_encoder"
    if not any(text_folder.glob("*.safetensors")):  # transformers < 4.35 writes pytorch_model.bin by default
        text_encoder.save_pretrained(text_folder, safe_serialization=True)
        for stale in text_folder.glob("pytorch_model*.bin"):
            stale.unlink()
    _portable_text_encoder_keys(text_folder / "model.safetensors")
    if record is not None:
        (folder / "training_record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return folder


def _portable_text_encoder_keys(path: Path) -> None:
    """Store the CLIP text model under the ``text_model.`` key names that every transformers version reads:
    transformers 5 saves them without the prefix, and transformers 4.30 (the WebUI's pin) would then silently
    start from random weights."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    if all(key.startswith("text_model.") for key in state):
        return
    state = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()}
    save_file(state, path, metadata={"format": "pt"})


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> BaseModel:
    """Load a saved base model folder in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    model = BaseModel(
        UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval(),
        AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
        CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval(),
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        {k: v for k, v in config.items() if not k.startswith("_")},
    )
    return model.to(device)


def folder_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
