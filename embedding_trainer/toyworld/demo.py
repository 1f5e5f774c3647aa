"""The README's main command: teach the shipped toy model a concept it has no word for, and show it.

``python -m embedding_trainer demo`` takes the toy model that ships with the project, draws four "user photos" of a
held-out concept (by default a heart: the model can draw hearts, but its text encoder has no word for them), trains
an embedding for it with the command line's own code path (progress bar included), and writes into the output
folder:

- ``embeddings/<trigger>.safetensors``: the embedding;
- ``grid.png``: the user photos, then images drawn with the trigger before training (the initial vectors) and
  after, then two new compositions after training ("a <x> in blue on a white background"...);
- ``scores.json``: the judges' verdicts before and after: how often images show the concept (reconstruction) and
  the concept with the requested attributes (editability).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..config import TrainConfig
from ..embedding_file import EmbeddingData, save_embedding
from ..log import logger
from . import learning, world
from .base_model import load_model, sample

CELL = 128  # pixels per image in the grid (the world's 64 px images, doubled)
LABEL_WIDTH = 300


def run_demo(
    out: Path,
    *,
    concept: str = "heart",
    steps: int = 150,
    seed: int = 0,
    model: Path = learning.SHIPPED_MODEL,
    overwrite: bool = False,
) -> dict[str, object]:
    from ..initialization import vectors_from_text
    from ..standalone.cli import run_training
    from .judges import load_judges

    if not (Path(model) / "model_index.json").is_file():
        raise FileNotFoundError(f"{model}: no toy model there (model_index.json is missing)")
    held_out = world.HELD_OUT_CONCEPTS[concept]
    photos = learning.write_user_photos(held_out, out / "photos", count=4, seed=seed)
    logger.info("drew %d photos of the held-out concept '%s' in %s", len(photos), concept, photos[0].parent)
    config = TrainConfig(
        name=learning.TRIGGER,
        images=str(out / "photos"),
        template=str(learning.concept_template(held_out, out)),
        resolution=world.IMAGE_SIZE,
        max_steps=steps,
        seed=seed,
        output_dir=str(out / "embeddings"),
        run_dir=str(out / "run"),
        overwrite=overwrite,
        device="cpu",
    )
    trainer, result = run_training(config, str(model))
    before_path = out / "before" / f"{learning.TRIGGER}.safetensors"
    before = vectors_from_text(trainer.host, config.init_text, config.num_vectors)
    save_embedding(EmbeddingData(learning.TRIGGER, before, step=0), before_path, overwrite=True)

    base = load_model(model)
    judges = load_judges()
    scores = {
        "before": learning.score_embedding(base, judges, held_out, before_path, seed=seed),
        "after": learning.score_embedding(base, judges, held_out, result.embedding_path, seed=seed),
    }
    grid = out / "grid.png"
    draw_grid(base, held_out, photos, before_path, result.embedding_path, seed).save(grid)
    report = {
        "concept": concept,
        "description": held_out.description,
        "trigger": learning.TRIGGER,
        "steps": result.steps,
        "train_seconds": round(result.elapsed_s, 1),
        "embedding": str(result.embedding_path),
        "grid": str(grid),
        "scores": {k: asdict(v) for k, v in scores.items()},
    }
    (out / "scores.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "judged '%s': reconstruction %.0f%% -> %.0f%%, editability %.0f%% -> %.0f%% (before -> after %d steps)",
        concept, 100 * scores["before"].reconstruction, 100 * scores["after"].reconstruction,
        100 * scores["before"].editability, 100 * scores["after"].editability, result.steps,
    )  # fmt: skip
    logger.info("wrote %s, %s and %s", result.embedding_path, grid, out / "scores.json")
    return report


def draw_grid(
    model: object, concept: world.HeldOutConcept, photos: list[Path], before: Path, after: Path, seed: int
) -> Image.Image:
    """Rows: the photos; the trigger before and after training; two new compositions after training."""
    columns = len(photos)
    trigger = learning.TRIGGER
    first = world.reconstruction_prompts(concept, trigger)[0].prompt
    edits = [case.prompt for case in world.edit_cases(concept, trigger, 2, seed=seed)]
    rows: list[tuple[str, np.ndarray]] = [("user photos (training images)", _load(photos))]
    for label, path, prompt in (("before", before, first), ("after", after, first)):
        rows.append((f"{label}: {prompt}", _draw(model, path, [prompt] * columns, seed)))
    for prompt in edits:
        rows.append((f"after: {prompt}", _draw(model, after, [prompt] * columns, seed)))
    grid = Image.new("RGB", (LABEL_WIDTH + columns * CELL, len(rows) * CELL), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        for line, text in enumerate(_wrap(label, 40)):
            draw.text((8, r * CELL + 8 + 14 * line), text, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray(image).resize((CELL, CELL), Image.NEAREST)
            grid.paste(tile, (LABEL_WIDTH + c * CELL, r * CELL))
    return grid


def _draw(model: object, path: Path, prompts: list[str], seed: int) -> np.ndarray:
    with learning.embedding_loaded(model, path) as convert:  # type: ignore[arg-type]
        return sample(model, convert(prompts), seed=seed)  # type: ignore[arg-type]


def _load(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]
