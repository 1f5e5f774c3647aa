"""``render``: what an embedding draws on a diffusers model, as one labelled grid (a row per prompt, a column per
seed), so a user of the standalone trainer can check an embedding without writing Python.

The embedding files are read by this project's reader (every layout it understands, widths checked against the
model's text encoders) and handed to diffusers' own ``load_textual_inversion``, as a diffusers user would load them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..embedding_reading import load_embedding
from ..errors import EmbeddingFileError, HostError
from ..host import EncoderInfo
from ..trainer import resolve_device
from .drawing import label_font, wrap_text

LABEL_WIDTH = 320
HEADER_HEIGHT = 60


def load_pipeline(model: str | Path, device: torch.device) -> Any:
    """The diffusers pipeline in ``model`` (a local folder with ``model_index.json``), fp16 on CUDA, fp32 on the CPU."""
    from diffusers import DiffusionPipeline

    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise HostError(f"{folder} is not a diffusers model folder (no model_index.json); point --model at one")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None  # it would black out images of the user's own concept at random
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def add_embedding(pipe: Any, path: str | Path) -> str:
    """Load one embedding file into ``pipe`` under its trigger (the name stored in it, else the file stem)."""
    encoders = [(pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.text_encoder_2, pipe.tokenizer_2))
    widths = [int(encoder.get_input_embeddings().weight.shape[1]) for encoder, _ in encoders]
    keys = ("clip_l", "clip_g") if len(encoders) == 2 else ("clip_h" if widths[0] == 1024 else "clip_l",)
    data = load_embedding(path, tuple(EncoderInfo(key, width) for key, width in zip(keys, widths)))
    for key, (encoder, tokenizer) in zip(keys, encoders):
        pipe.load_textual_inversion(data.vectors[key], token=data.name, text_encoder=encoder, tokenizer=tokenizer)
    return data.name


def render_grid(
    model: str | Path,
    embeddings: Sequence[str | Path],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 25,
    guidance: float = 7.0,
    size: int | None = None,
    negative: str = "",
    device: str = "auto",
) -> Image.Image:
    """Draw every prompt with every seed after loading ``embeddings``; returns the labelled grid."""
    if not prompts or not seeds:
        raise HostError("give at least one --prompt and one seed")
    pipe = load_pipeline(model, resolve_device(device))
    triggers = [add_embedding(pipe, path) for path in embeddings]
    if not any(trigger in prompt for prompt in prompts for trigger in triggers):
        raise EmbeddingFileError(
            f"no prompt contains a trigger of the embeddings given ({', '.join(triggers)}); put it in a --prompt, "
            f"e.g. 'a photo of {triggers[0]}'"
        )
    rows = []
    for prompt in prompts:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        images = pipe(
            prompt=[prompt] * len(seeds),
            negative_prompt=[negative] * len(seeds) if negative else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            height=size,
            width=size,
        ).images
        rows.append((prompt, images))
    title = f"{Path(model).name}: {', '.join(triggers)} ({steps} steps, guidance {guidance})"
    return _grid(title, rows, seeds)


def _grid(title: str, rows: list[tuple[str, list[Image.Image]]], seeds: Sequence[int]) -> Image.Image:
    cell = rows[0][1][0].size[0]
    grid = Image.new("RGB", (LABEL_WIDTH + len(seeds) * cell, HEADER_HEIGHT + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((8, 8), title, fill="black", font=label_font(18))
    for column, seed in enumerate(seeds):
        draw.text((LABEL_WIDTH + column * cell + 6, 38), f"seed {seed}", fill="dimgray", font=label_font(14))
    for row, (prompt, images) in enumerate(rows):
        top = HEADER_HEIGHT + row * cell
        for line, text in enumerate(wrap_text(prompt, 34)):
            draw.text((8, top + 8 + 19 * line), text, fill="black", font=label_font(15))
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB"), (LABEL_WIDTH + column * cell, top))
    return grid
