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
from ..tools.drawing import label_font, wrap_text
from ..toyworld import learning, world
from ..toyworld.base_model import load_model, sample
from .driver import run_training

CELL = 128  # pixels per image in the grid (the world's 64 px images, doubled)
LABEL_WIDTH = 340
TITLE_HEIGHT = 56
#: Marks a folder as the demo's own: a second demo run there replaces what the first one wrote.
MARKER = ".embtrain-demo"


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
    from ..toyworld.judges import load_judges
    from ..trainer import check_output_free

    if not (Path(model) / "model_index.json").is_file():
        raise FileNotFoundError(f"{model}: no toy model there (model_index.json is missing)")
    held_out = world.HELD_OUT_CONCEPTS[concept]
    # A folder a previous demo wrote (its marker is there) is the demo's own: this run replaces its results.
    overwrite = overwrite or (out / MARKER).is_file()
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
    check_output_free(config)  # before anything is drawn into a folder that is not the demo's
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `python -m embedding_trainer demo`; a demo run here replaces its results\n")
    photos = learning.write_user_photos(held_out, out / "photos", count=4, seed=seed)
    logger.info("drew %d photos of the held-out concept '%s' in %s", len(photos), concept, photos[0].parent)
    trainer, result = run_training(config, str(model))
    before_path = out / "before" / f"{learning.TRIGGER}.safetensors"
    before = vectors_from_text(trainer.host, config.init_text, config.num_vectors)
    save_embedding(EmbeddingData(learning.TRIGGER, before, step=0), before_path, overwrite=True)

    base = load_model(model)
    judges = load_judges()
    scores = {}
    for when, path in (("before", before_path), ("after", result.embedding_path)):
        logger.info("judging %s training: drawing 40 images with the trigger and asking the judges", when)
        scores[when] = learning.score_embedding(base, judges, held_out, path, seed=seed)
    grid = out / "grid.png"
    logger.info("drawing %s", grid)
    draw_grid(base, judges, held_out, photos, before_path, result.embedding_path, seed, result.steps).save(grid)
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
        concept,
        100 * scores["before"].reconstruction,
        100 * scores["after"].reconstruction,
        100 * scores["before"].editability,
        100 * scores["after"].editability,
        result.steps,
    )
    logger.info("wrote %s, %s and %s", result.embedding_path, grid, out / "scores.json")
    return report


def draw_grid(
    model: object,
    judges: object,
    concept: world.HeldOutConcept,
    photos: list[Path],
    before: Path,
    after: Path,
    seed: int,
    steps: int,
) -> Image.Image:
    """A title, then rows: the photos; the trigger before and after training; two new compositions after training.
    Each row says what it is and the judges' verdict on it (how many images show what the row asks for)."""
    columns = len(photos)
    trigger = learning.TRIGGER
    first = world.reconstruction_prompts(concept, trigger)[0]
    edits = world.edit_cases(concept, trigger, 2, seed=seed)
    rows: list[tuple[str, np.ndarray, dict[str, str]]] = [
        ("the user's photos (training images)", _load(photos), first.expected)
    ]
    for label, path in (("before training", before), (f"after {steps} steps", after)):
        drawn = _draw(model, path, [first.prompt] * columns, seed)
        rows.append((f'{label}: "{first.prompt}"', drawn, first.expected))
    for case in edits:
        rows.append((f'after: "{case.prompt}"', _draw(model, after, [case.prompt] * columns, seed), case.expected))
    grid = Image.new("RGB", (LABEL_WIDTH + columns * CELL, TITLE_HEIGHT + len(rows) * CELL), "white")
    draw = ImageDraw.Draw(grid)
    title = f"Embedding Trainer demo: '{trigger}' learns the toy world's {concept.name} from {columns} photos"
    draw.text((10, 8), title, fill="black", font=label_font(20))
    draw.text(
        (10, 34),
        "right of each label: what the toy model draws; the verdict is the judges'",
        fill="dimgray",
        font=label_font(14),
    )
    row_font = label_font(15)
    for r, (label, images, expected) in enumerate(rows):
        top = TITLE_HEIGHT + r * CELL
        judged = {k: v for k, v in expected.items() if k in getattr(judges, "classes", {})}
        hits = int(np.sum(judges.shows(images, judged))) if judged else 0  # type: ignore[attr-defined]
        wanted = ", ".join(f"{k} {v}" for k, v in judged.items())
        label_lines = wrap_text(label, 36)
        verdict = wrap_text(f"judges: {hits}/{len(images)} show {wanted}", 36)
        verdict_colour = "darkgreen" if hits == len(images) else "firebrick"
        for line, text in enumerate([*label_lines, *verdict]):
            colour = "black" if line < len(label_lines) else verdict_colour
            draw.text((8, top + 8 + 19 * line), text, fill=colour, font=row_font)
        for c, image in enumerate(images):
            tile = Image.fromarray(image).resize((CELL, CELL), Image.NEAREST)
            grid.paste(tile, (LABEL_WIDTH + c * CELL, top))
    return grid


def _draw(model: object, path: Path, prompts: list[str], seed: int) -> np.ndarray:
    with learning.embedding_loaded(model, path) as convert:  # type: ignore[arg-type]
        return sample(model, convert(prompts), seed=seed)  # type: ignore[arg-type]


def _load(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
