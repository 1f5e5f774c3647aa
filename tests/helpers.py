"""Helpers the tests share (import them: ``from tests.helpers import make_images``): generated image folders, short
run settings and CLI arguments."""

from __future__ import annotations

import random
from pathlib import Path


def make_images(folder: Path, count: int = 4, size: tuple[int, int] = (64, 64), seed: int = 0, captions: bool = True):
    """``count`` PNGs of a coloured square on a flat background, with caption files when asked."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
        side = min(size) // 2
        x, y = rng.randint(0, size[0] - side), rng.randint(0, size[1] - side)
        ImageDraw.Draw(image).rectangle((x, y, x + side, y + side), fill=(240, 140, 20))
        path = folder / f"{i:02d}.png"
        image.save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"square {i}, flat background", encoding="utf-8")
        paths.append(path)
    return paths


def run_fields(tmp_path: Path, **changes):
    """TrainConfig fields of a short CPU run on four generated images (written once per ``tmp_path``)."""
    images = tmp_path / "images"
    if not images.exists():
        make_images(images, count=4)
    values = dict(
        name="my-cat",
        images=str(images),
        resolution=64,
        max_steps=4,
        batch_size=2,
        output_dir=str(tmp_path / "out"),
        run_dir=str(tmp_path / "run"),
        device="cpu",
        template="subject_filewords",
    )
    values.update(changes)
    return values


def train_args(model: Path, images: Path, root: Path, *extra: str, steps: int = 3) -> list[str]:
    """``python -m embedding_trainer train`` arguments of a short run writing under ``root``; ``extra`` flags come
    last, so they override (argparse keeps the last value)."""
    return [
        "train",
        "--model",
        str(model),
        "--images",
        str(images),
        "--name",
        "my-cat",
        "--max-steps",
        str(steps),
        "--resolution",
        "64",
        "--output-dir",
        str(root / "out"),
        "--run-dir",
        str(root / "run"),
        *extra,
    ]
