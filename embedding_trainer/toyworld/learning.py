"""Textual inversion on the toy world's base model, judged: does an embedding capture a held-out concept, and does
it compose?

One evaluation of a concept goes: draw the concept's "user photos" (``world.user_photos``), train an embedding on
them with the project's own trainer and the diffusers host (the trainer never sees the concept's word), load the
embedding FILE with diffusers' own ``load_textual_inversion`` (the loader users have), sample images with it, and
let the judges say whether each image shows the concept:

- reconstruction: prompts such as "a photo of a <x>" must show the concept;
- editability: new compositions ("a <x> in blue on a white background") must show the concept AND every requested
  attribute.

Intermediate vectors are taken at several step budgets within one run, so a budget curve costs one training run.
The benchmark (``benchmarks/learning.py``), the demo and the learning test use this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..embedding_file import EmbeddingData, save_embedding
from ..trainer import Callbacks, Progress, Trainer
from . import world
from .base_model import BaseModel, sample

#: The trained base model that ships with the project (a diffusers folder, fp16 weights).
SHIPPED_MODEL = Path(__file__).with_name("weights") / "base-model"
#: The trigger word: a made-up token that names no attribute of the world (the concept's word stays unseen).
TRIGGER = "zyx-thing"
#: Prompt templates for training, by concept kind, in the world's caption language.
TEMPLATES = {
    "object": (
        "a photo of a [name]",
        "a [name]",
        "a picture of a [name]",
        "an image of a [name]",
        "a drawing of a [name]",
    ),
    "texture": ("a [name] shape", "a photo of a [name] shape", "a [name] object", "a picture of a [name] figure"),
}


@dataclass(frozen=True)
class Method:
    """A way of training an embedding: ``TrainConfig`` fields over the per-run basics."""

    name: str
    fields: dict[str, Any]
    description: str


#: Our defaults: whatever ``TrainConfig`` defaults to (so the benchmark follows them when they change).
OUR_DEFAULTS = Method("ours", {}, "TrainConfig's defaults")
#: The same with one vector per token (the WebUI's default count): one vs several vectors.
OUR_DEFAULTS_1_VECTOR = Method("ours-1-vector", {"num_vectors": 1}, "TrainConfig's defaults with 1 vector")
#: The WebUI's built-in trainer's defaults, reproduced with our loop.
WEBUI_DEFAULTS = Method(
    "webui-defaults",
    {"learning_rate": "0.005", "lr_scheduler": "constant", "batch_size": 1, "grad_accum": 1, "init_text": "*",
     "num_vectors": 1, "min_snr_gamma": 0.0},
    "lr 0.005 constant, batch 1, init '*', 1 vector, no min-SNR (A1111's Train tab)",
)  # fmt: skip
METHODS = {m.name: m for m in (OUR_DEFAULTS, WEBUI_DEFAULTS, OUR_DEFAULTS_1_VECTOR)}


@dataclass
class Scores:
    """Judged rates of one embedding: the fraction of images that show what was asked, per prompt set."""

    reconstruction: float
    editability: float
    images: int


@dataclass
class ConceptRun:
    """One training run of one method on one concept with one seed, scored at each step budget."""

    concept: str
    method: str
    seed: int
    scores: dict[int, Scores]  # step budget -> scores (0: the initial vectors)
    train_s: float
    steps_per_s: float
    embedding_paths: dict[int, Path] = field(default_factory=dict)


def concept_template(concept: world.HeldOutConcept, folder: Path) -> Path:
    path = folder / f"template-{concept.kind}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(TEMPLATES[concept.kind]) + "\n", encoding="utf-8")
    return path


def write_user_photos(concept: world.HeldOutConcept, folder: Path, count: int = 4, seed: int = 0) -> list[Path]:
    """The concept's user photos as PNG files (no captions: the templates carry the prompts)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(world.user_photos(concept, count, seed)):
        path = folder / f"{concept.name}-{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def train_concept(
    host: Any,
    concept: world.HeldOutConcept,
    method: Method,
    budgets: Sequence[int],
    work: Path,
    *,
    seed: int = 0,
    photos: int = 4,
    on_progress: Any = None,
) -> tuple[dict[int, dict[str, torch.Tensor]], float, float, TrainConfig]:
    """Train ``method`` on ``concept``'s user photos up to the largest budget; returns the vectors at 0 (initial)
    and at every budget, the training time, steps/s and the config used."""
    images = work / "photos"
    write_user_photos(concept, images, photos, seed)
    fields = {
        "name": TRIGGER,
        "images": str(images),
        "template": str(concept_template(concept, work)),
        "resolution": world.IMAGE_SIZE,
        "max_steps": max(budgets),
        "seed": seed,
        "output_dir": str(work / "embeddings"),
        "run_dir": str(work / "run"),
        "overwrite": True,
        "device": str(host.device),
        **method.fields,
    }
    config = TrainConfig(**fields)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    wanted = set(budgets)

    def on_step(step: int, vectors: dict[str, torch.Tensor]) -> None:
        if step in wanted:
            snapshots[step] = {k: v.detach().cpu().clone() for k, v in vectors.items()}

    def progress(p: Progress) -> None:
        if on_progress is not None:
            on_progress(p)

    trainer = Trainer(config, host, Callbacks(on_step=on_step, on_progress=progress))
    snapshots[0] = {k: v.detach().cpu().clone() for k, v in trainer.vectors.items()}
    result = trainer.run()
    steps_per_s = result.steps / result.elapsed_s if result.elapsed_s > 0 else float("nan")
    return snapshots, result.elapsed_s, steps_per_s, config


@contextlib.contextmanager
def embedding_loaded(model: BaseModel, path: Path, trigger: str = TRIGGER) -> Iterator[Any]:
    """``model`` with the embedding file loaded by diffusers' ``load_textual_inversion`` (as users load it); yields
    a function that rewrites prompts for multi-vector embeddings. Unloaded afterwards."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    known = len(model.tokenizer)
    pipe.load_textual_inversion(str(path), token=trigger)
    # A multi-vector file adds "<trigger>", "<trigger>_1", ...; the prompt rewrite spells them out.
    added = model.tokenizer.convert_ids_to_tokens(list(range(known, len(model.tokenizer))))
    try:
        yield lambda prompts: [pipe.maybe_convert_prompt(p, model.tokenizer) for p in prompts]
    finally:
        pipe.unload_textual_inversion(tokens=added)


def score_embedding(
    model: BaseModel,
    judges: Any,
    concept: world.HeldOutConcept,
    path: Path,
    *,
    images_per_prompt: int = 4,
    edit_prompts: int = 8,
    seed: int = 0,
    sample_steps: int = 25,
    guidance: float = 4.0,
) -> Scores:
    """Judge images drawn with the embedding at ``path``: reconstruction and editability rates."""
    recon = world.reconstruction_prompts(concept, TRIGGER)
    edits = world.edit_cases(concept, TRIGGER, edit_prompts, seed=seed)
    cases = [(c, "recon") for c in recon] + [(c, "edit") for c in edits]
    prompts = [c.prompt for c, _ in cases for _ in range(images_per_prompt)]
    with embedding_loaded(model, path) as convert:
        images = sample(model, convert(prompts), steps=sample_steps, guidance=guidance, seed=seed)
    hits: dict[str, list[bool]] = {"recon": [], "edit": []}
    for index, (case, kind) in enumerate(cases):
        chunk = images[index * images_per_prompt : (index + 1) * images_per_prompt]
        judged = {k: v for k, v in case.expected.items() if k in judges.classes}  # e.g. no size judge
        hits[kind].extend(bool(x) for x in judges.shows(chunk, judged))
    return Scores(float(np.mean(hits["recon"])), float(np.mean(hits["edit"])), len(prompts))


def evaluate_concept(
    model: BaseModel,
    host: Any,
    judges: Any,
    concept: world.HeldOutConcept,
    method: Method,
    budgets: Sequence[int],
    work: Path,
    *,
    seed: int = 0,
    photos: int = 4,
    images_per_prompt: int = 4,
    on_progress: Any = None,
) -> ConceptRun:
    """Train once, then score the initial vectors and the vectors at each budget."""
    snapshots, train_s, steps_per_s, config = train_concept(
        host, concept, method, budgets, work, seed=seed, photos=photos, on_progress=on_progress
    )
    scores: dict[int, Scores] = {}
    paths: dict[int, Path] = {}
    for step in sorted(snapshots):
        path = work / "snapshots" / f"{TRIGGER}-{step:05d}.safetensors"
        save_embedding(EmbeddingData(TRIGGER, snapshots[step], step=step), path, overwrite=True)
        paths[step] = path
        scores[step] = score_embedding(model, judges, concept, path, images_per_prompt=images_per_prompt, seed=seed)
    return ConceptRun(concept.name, method.name, seed, scores, train_s, steps_per_s, paths)


def mean_and_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval over independent runs (seeds); 0 for one value."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, 0.0
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(n, 1.96)
    return mean, t95 * float(np.std(values, ddof=1)) / math.sqrt(n)
