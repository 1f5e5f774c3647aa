"""Evaluating the base model: prompts it never saw, judged by the toy world's trained judges (``judges.py``), and
VAE reconstructions judged by re-rendering each scene with every class."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...log import logger
from .. import world
from .data import to_model_range, to_uint8
from .io import BaseModel
from .sampling import sample

JUDGED = ("shape", "colour", "background", "texture")
#: Offset of the evaluation images' indices: they never overlap the training images (index < this).
EVAL_INDEX_OFFSET = 10_000_000


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    expected: dict[str, str]


def evaluation_prompts(
    n: int, seed: int = 0, exclude: set[str] | frozenset[str] = frozenset(), held_out: bool = False
) -> list[PromptCase]:
    """``n`` prompts that name shape, colour, background and texture (every wording the captions use), none of them
    in ``exclude`` (the training captions), with the attributes they ask for: regular classes only, or with
    ``held_out`` each with a held-out shape or texture (named by the words the shipped model has forgotten)."""
    every = world.CaptionDropout(shape=0.0, colour=0.0, background=0.0, texture=0.0)
    rng = np.random.default_rng([seed, 4343 if held_out else 4242])
    cases: list[PromptCase] = []
    seen: set[str] = set()
    for _ in range(200 * n):
        if len(cases) == n:
            break
        scene = world.sample_scene(rng, uniform=True, include_held_out=held_out)
        shows_held_out = scene.shape in world.HELD_OUT_SHAPES or scene.texture in world.HELD_OUT_TEXTURES
        text = world.caption(scene, rng, every)
        if text in exclude or text in seen or shows_held_out != held_out:
            continue
        seen.add(text)
        expected = scene.attributes()
        if "small" not in text and "large" not in text and "big" not in text and "medium" not in text:
            expected.pop("size")
        cases.append(PromptCase(text, expected))
    return cases


def judge_images(images: np.ndarray) -> list[dict[str, str]] | None:
    """What the toy world's trained judges (``judges.py``) see in each image; None when their weights are missing."""
    try:
        from .. import judges

        trained = judges.load_judges()
    except (ImportError, OSError, ValueError) as error:
        logger.info("no trained judges (%s); judging reconstructions only by re-rendering", error)
        return None
    verdicts = trained(images)
    return [{name: verdict.labels[i] for name, verdict in verdicts.items()} for i in range(len(images))]


def counterfactual_judge(image: np.ndarray, scene: world.Scene, attributes: Sequence[str] = JUDGED) -> dict[str, str]:
    """For an image aligned with ``scene`` (a VAE reconstruction): for each attribute, the class whose rendering of
    the same scene (same position, size, rotation, tones, texture phase) is nearest in pixels. Needs no trained
    judge, and fails exactly when the reconstruction is nearer to another class's image than to its own."""
    result = {}
    target = image.astype(np.float32)
    for attribute in attributes:
        best, best_distance = "", math.inf
        for value in world.CLASSES[attribute]:
            other = world.render(dataclasses.replace(scene, **{attribute: value}))
            distance = float(np.square(np.asarray(other, dtype=np.float32) - target).sum())
            if distance < best_distance:
                best, best_distance = value, distance
        result[attribute] = best
    return result


def accuracy(predicted: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]) -> dict[str, float]:
    keys = sorted({k for e in expected for k in e}, key=lambda k: world.ATTRIBUTES.index(k))
    result = {}
    for key in keys:
        pairs = [(p.get(key), e[key]) for p, e in zip(predicted, expected) if key in e]
        result[key] = sum(p == e for p, e in pairs) / len(pairs)
    return result


@torch.no_grad()
def evaluate_vae(vae: Any, n: int = 128, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Reconstruct ``n`` held-back images (never trained on) and judge the reconstructions.

    Returns per-attribute accuracies of the counterfactual judge (``counterfactual``), of the trained judges
    when ``judges.py`` provides them (``judges``, and ``judges_on_originals`` for reference), and the mean absolute
    error in 0..255 units.
    """
    scenes = [world.example(seed, EVAL_INDEX_OFFSET + i)[0] for i in range(n)]
    originals = np.stack([np.asarray(world.render(s)) for s in scenes])
    vae = vae.to(device).eval()
    x = to_model_range(originals).to(device)
    rec = to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample)
    expected = [{k: s.attributes()[k] for k in JUDGED} for s in scenes]
    result: dict[str, Any] = {
        "images": n,
        "mae": float(np.abs(rec.astype(np.float32) - originals).mean()),
        "counterfactual": accuracy([counterfactual_judge(r, s) for r, s in zip(rec, scenes)], expected),
    }
    judged = judge_images(rec)
    if judged is not None:
        result["judges"] = accuracy(judged, expected)
        result["judges_on_originals"] = accuracy(judge_images(originals) or [], expected)
    result["reconstructions"] = rec
    result["originals"] = originals
    return result


def evaluate_samples(
    model: BaseModel,
    n: int = 64,
    *,
    exclude: set[str] | frozenset[str] = frozenset(),
    seed: int = 0,
    steps: int = 25,
    guidance: float = 4.0,
    held_out: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` prompts not seen verbatim in training and judge them (per attribute); ``held_out``: prompts
    that name held-out classes (:func:`evaluation_prompts`)."""
    cases = evaluation_prompts(n, seed, exclude, held_out)
    images = sample(model, [c.prompt for c in cases], steps=steps, guidance=guidance, seed=seed)
    result: dict[str, Any] = {"prompts": [c.prompt for c in cases], "images": images}
    judged = judge_images(images)
    if judged is not None:
        result["judges"] = accuracy(judged, [c.expected for c in cases])
        if held_out:
            result["held_out_classes"] = held_out_rates(judged, [c.expected for c in cases])
    return result


def held_out_rates(predicted: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]) -> dict[str, float]:
    """For each held-out class: the share of the images asked to show it that the judges say show it."""
    rates = {}
    for attribute, classes in world.HELD_OUT.items():
        for name in classes:
            asked = [p.get(attribute) == name for p, e in zip(predicted, expected) if e.get(attribute) == name]
            if asked:
                rates[name] = sum(asked) / len(asked)
    return rates


def image_grid(images: np.ndarray, columns: int = 8) -> Any:
    """A PIL image of ``images`` in rows of ``columns``."""
    from PIL import Image

    n = len(images)
    rows = max(1, math.ceil(n / columns))
    size = images.shape[1]
    grid = np.full((rows * size, columns * size, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
    return Image.fromarray(grid)
