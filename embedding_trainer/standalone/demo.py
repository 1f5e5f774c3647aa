"""The README's first command: a short end-to-end run on generated images with a tiny model, on any CPU.

It writes a tiny random-weight SD1-layout model, draws a few "photos" of a made-up object (an orange ring with
a dark centre on different backgrounds), trains an embedding for it with the CLI's own code path, and reports
the loss on held-out noise before and after training. The tiny model is random, so the images it would draw
are noise: this shows the machinery end to end, not image quality (the shipped toy model does that).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..config import TrainConfig
from ..log import logger

BACKGROUNDS = {"blue": (40, 70, 160), "green": (50, 130, 60), "grey": (120, 120, 120), "white": (235, 235, 235)}


def draw_concept_images(folder: Path, count: int = 6, size: int = 64, seed: int = 0) -> list[Path]:
    """Draw ``count`` images of the demo object with a caption file each; deterministic from ``seed``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name, colour = list(BACKGROUNDS.items())[i % len(BACKGROUNDS)]
        image = Image.new("RGB", (size, size), colour)
        draw = ImageDraw.Draw(image)
        radius = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(240, 140, 20))
        inner = radius // 2
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=(30, 20, 10))
        path = folder / f"{i:02d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"on a {name} background", encoding="utf-8")
        paths.append(path)
    return paths


def run_demo(out: Path, steps: int = 150, overwrite: bool = False) -> None:
    from .cli import run_training
    from .tiny_models import save_tiny_model

    model = out / "tiny-sd1"
    if not (model / "model_index.json").is_file():
        logger.info("writing a tiny SD1-layout model to %s", model)
        save_tiny_model("sd1", model, seed=0)
    images = draw_concept_images(out / "images")
    logger.info("drew %d training images in %s", len(images), images[0].parent)
    config = TrainConfig(
        name="demo-ring",
        images=str(out / "images"),
        init_text="ring",
        num_vectors=2,
        template="subject_filewords",
        resolution=64,
        flip=True,
        max_steps=steps,
        batch_size=2,
        learning_rate="0.01",
        lr_scheduler="cosine",
        output_dir=str(out / "embeddings"),
        run_dir=str(out / "runs" / "demo-ring"),
        save_every=max(1, steps // 3),
        overwrite=overwrite,
        device="cpu",
    )
    trainer, result = run_training(config, str(model))
    from ..embedding_file import format_inspection, inspect_embedding
    from ..initialization import vectors_from_text

    # The same held-out noise, timesteps and prompts for both: a fair before/after comparison.
    before = trainer.held_out_loss(vectors_from_text(trainer.host, config.init_text, config.num_vectors))
    after = trainer.held_out_loss(trainer.vectors)
    logger.info("held-out loss: %.4f with the initial vectors, %.4f after training", before, after)
    logger.info("\n%s", format_inspection(inspect_embedding(result.embedding_path)))
