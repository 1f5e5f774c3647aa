"""What every part of the exporter shares: the model as read (:class:`ModelParts`), the error, and the file mode."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ...errors import EmbeddingTrainerError

Family = Literal["sd1", "sd2", "sdxl"]


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


def as_list(value: Any, n: int) -> list[Any]:
    """A per-level diffusers setting as a list: itself when it is one, else ``n`` copies."""
    return list(value) if isinstance(value, list | tuple) else [value] * n


def usual_mode(*paths: Path) -> None:
    """The atomic writer's temporary files are private (0600); give the outputs the mode a plain write would."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)
