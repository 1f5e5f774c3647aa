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
from ..trainer import Callbacks, Trainer, prepare_run
from . import base_model, world
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
    "colour": ("a [name] shape", "a photo of a [name] shape", "a [name] object", "a picture of a [name] figure"),
    "background": (
        "a shape on a [name] background",
        "a photo of an object on a [name] background",
        "[name] background, a picture of a figure",
        "an image of a symbol, [name] background",
    ),
}


@dataclass(frozen=True)
class Method:
    """A way of training an embedding: ``TrainConfig`` fields over the per-run basics."""

    name: str
    fields: dict[str, Any]
    description: str
    #: The photos come with captions naming their other attributes (never the concept's), and the prompts append
    #: them (``[filewords]``): what a user who captions the photos, or an auto-captioner, gives the trainer.
    captions: bool = False
    #: With ``captions``: half the prompts put the caption before the trigger ("a photo of a [filewords] [name]"), as
    #: edit prompts put requested attributes before it.
    captions_first: bool = False


#: Our defaults: whatever ``TrainConfig`` defaults to (so the benchmark follows them when they change).
OUR_DEFAULTS = Method("ours", {}, "TrainConfig's defaults")
#: The same with one vector per token (the WebUI's default count): one vs several vectors.
OUR_DEFAULTS_1_VECTOR = Method("ours-1-vector", {"num_vectors": 1}, "TrainConfig's defaults with 1 vector")
#: The plain loop, none of the methods of the quality issue: the defaults before them (the ablation's base).
PLAIN = {
    "num_vectors": 4,
    "batch_size": 4,
    "learning_rate": "0.01",
    "lr_scale": "absolute",
    "lr_scheduler": "constant",
    "init_mode": "text",
    "init_text": "*",
    "norm_band": 0.0,
    "final_vectors": "last",
    "early_stop_patience": 0,
    "eval_every": 25,
    "min_snr_gamma": 0.0,
    "weight_decay": 0.0,
}
PLAIN_LOOP = Method("plain", PLAIN, "4 vectors, batch 4, absolute lr 0.01, init '*', last vectors (the old defaults)")
#: One method at a time on top of the plain loop, then all together (the ablation).
ABLATION = (
    PLAIN_LOOP,
    Method("+best-word", {**PLAIN, "init_mode": "best-word"}, "init: the candidate word with the lowest loss"),
    Method("+encoder-output", {**PLAIN, "init_mode": "encoder-output"}, "init: the encoder's output for '*'"),
    Method("+norm-band-1.5", {**PLAIN, "norm_band": 1.5}, "lengths within x1.5 of the prompt words' median"),
    Method("+norm-band-1", {**PLAIN, "norm_band": 1.0}, "lengths fixed at the prompt words' median"),
    Method("+table-lr", {**PLAIN, "lr_scale": "table", "learning_rate": "0.007"}, "lr 0.007 in table units"),
    Method("+best", {**PLAIN, "final_vectors": "best"}, "the file holds the best-scored vectors"),
    Method(
        "+best+early-stop",
        {**PLAIN, "final_vectors": "best", "early_stop_patience": 3},
        "the best-scored vectors; stop after 3 evaluations without improvement",
    ),
)
#: The WebUI's built-in trainer's defaults, reproduced with our loop.
WEBUI_DEFAULTS = Method(
    "webui-defaults",
    {**PLAIN, "learning_rate": "0.005", "batch_size": 1, "num_vectors": 1},
    "lr 0.005 constant, batch 1, init '*', 1 vector, no min-SNR (A1111's Train tab)",
)
#: diffusers' example script's recipe (its README's rate: 5e-4 x scale_lr at 4 images per step), with our loop:
#: one vector from one token, AdamW with weight decay 0.01, constant rate, the last vectors.
DIFFUSERS_EXAMPLE = Method(
    "diffusers-example",
    {**PLAIN, "learning_rate": "0.002", "num_vectors": 1, "weight_decay": 0.01},
    "lr 0.002 constant at batch 4, 1 vector, weight decay 0.01, init '*' (diffusers' textual_inversion.py README)",
)
METHODS = {m.name: m for m in (OUR_DEFAULTS, WEBUI_DEFAULTS, OUR_DEFAULTS_1_VECTOR, DIFFUSERS_EXAMPLE, *ABLATION)}


@dataclass
class Scores:
    """Judged rates of one embedding: the fraction of images that show what was asked, per prompt set.

    ``leakage``: in the edits, the share of (image, attribute the prompt does not ask for) where the image shows the
    photos' most common value of that attribute (a plain texture does not count: it is what an unasked texture is).
    """

    reconstruction: float
    editability: float
    images: int
    leakage: float = float("nan")
    held_out_loss: float = float("nan")  # the trainer's score of the judged vectors (nan: not evaluated)
    step: int = 0  # the run step of the judged vectors (the best one's for final_vectors best)


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
    steps_trained: int = 0  # less than the largest budget when the run stopped early
    init_choice: str = ""
    initial_loss: float = float("nan")  # the held-out score at step 0


@dataclass
class TrainedSnapshots:
    """What one training run gives the judges: the vectors a run of each budget would have written."""

    vectors: dict[int, dict[str, torch.Tensor]]  # budget -> vectors (0: the initial ones)
    steps: dict[int, int]  # budget -> the run step of those vectors
    scores: dict[int, float]  # run step -> held-out score (eval_every)
    train_s: float
    steps_per_s: float
    steps_trained: int
    init_choice: str
    config: TrainConfig


def concept_template(
    concept: world.HeldOutConcept, folder: Path, captions: bool = False, captions_first: bool = False
) -> Path:
    path = folder / f"template-{concept.kind}{'-filewords' if captions else ''}{'-first' if captions_first else ''}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{line}, [filewords]" if captions else line for line in TEMPLATES[concept.kind]]
    if captions and captions_first:
        lines += [line.replace("[name]", "[filewords] [name]") for line in TEMPLATES[concept.kind]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def photo_caption(scene: world.Scene, concept: world.HeldOutConcept) -> str:
    """A caption of a user photo naming its attributes other than the concept's: "red, striped, white background"."""
    free = [a for a in ("size", "colour", "texture", "shape", "background") if a not in concept.attributes]
    words = {
        "size": world.SIZE_WORDS[scene.size][0] if scene.size != "medium" else "",
        "colour": world.COLOUR_WORDS[scene.colour][0],
        "texture": world.TEXTURE_ADJECTIVES[scene.texture][-1],
        "shape": world.SHAPE_WORDS[scene.shape],
        "background": f"{world.BACKGROUND_WORDS[scene.background][0]} background",
    }
    return ", ".join(words[a] for a in free if words[a])


@contextlib.contextmanager
def concept_erased(
    concept: world.HeldOutConcept, encoders: Sequence[Any], tokenizer: Any, model_folder: Path = SHIPPED_MODEL
) -> Iterator[None]:
    """The concept's own ``erase`` words taken out of ``encoders`` (the judged model's and the trainer's) for the
    duration, as the shipped model's held-out words are for good; restored afterwards."""
    if not concept.erase:
        yield
        return
    initial = base_model.initial_text_encoder(model_folder)
    ids = torch.tensor(sorted(base_model.held_out_token_ids(tokenizer, concept.erase).values()))
    saved = [encoder.get_input_embeddings().weight[ids].detach().clone() for encoder in encoders]
    with torch.no_grad():
        for encoder in encoders:
            base_model.erase_held_out_words(encoder, tokenizer, initial, concept.erase)
    try:
        yield
    finally:
        # Each encoder's table as it is now: loading and unloading an embedding file resizes the table, which
        # replaces the tensor, so rows written into the one taken at the start would not reach the model.
        with torch.no_grad():
            for encoder, rows in zip(encoders, saved):
                table = encoder.get_input_embeddings().weight
                table[ids.to(table.device)] = rows.to(table)


def photo_main_values(concept: world.HeldOutConcept, photos: int, seed: int) -> dict[str, str]:
    """The most common value of each attribute the concept leaves free, over its user photos (when at least two
    photos share it; a plain texture is left out: it is what an image shows when no texture is asked for)."""
    scenes = world.user_photo_scenes(concept, photos, seed)
    main = {}
    for attribute in world.ATTRIBUTES:
        if attribute in concept.attributes:
            continue
        values = [getattr(scene, attribute) for scene in scenes]
        value = max(sorted(set(values)), key=values.count)
        if values.count(value) >= 2 and value != "solid":
            main[attribute] = value
    return main


def write_user_photos(
    concept: world.HeldOutConcept, folder: Path, count: int = 4, seed: int = 0, captions: bool = False
) -> list[Path]:
    """The concept's user photos as PNG files; with ``captions`` each gets a caption file (``photo_caption``),
    else none (the templates carry the prompts)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(world.user_photo_scenes(concept, count, seed)):
        path = folder / f"photo-{i:02d}.png"  # a neutral name: captions from file names must not name the concept
        world.render(scene).save(path)
        if captions:
            path.with_suffix(".txt").write_text(photo_caption(scene, concept), encoding="utf-8")
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
) -> TrainedSnapshots:
    """Train ``method`` on ``concept``'s user photos once, to the largest budget; for each budget (and 0: the initial
    vectors) keep the vectors a run with that ``max_steps`` would have written: with ``final_vectors best``, those of
    the best-scored evaluation up to there (step 0 excluded), and never past an early stop."""
    images = work / "photos"
    write_user_photos(concept, images, photos, seed, captions=method.captions)
    fields = {
        "name": TRIGGER,
        "images": str(images),
        "template": str(concept_template(concept, work, method.captions, method.captions_first)),
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
    kept: dict[int, dict[str, torch.Tensor]] = {}
    wanted = set(budgets)

    def on_step(step: int, vectors: dict[str, torch.Tensor]) -> None:
        if step in wanted or (config.eval_every and step % config.eval_every == 0):
            kept[step] = {k: v.detach().cpu().clone() for k, v in vectors.items()}

    callbacks = Callbacks(on_step=on_step, on_progress=on_progress)
    trainer = Trainer(prepare_run(config), host, callbacks)
    result = trainer.run()
    kept[0] = {k: v.detach().cpu().clone() for k, v in trainer.initial_vectors.items()}
    steps: dict[int, int] = {0: 0}
    for budget in budgets:
        end = min(budget, result.steps)
        step = end
        if config.final_vectors == "best":
            scored = [s for s in trainer.scores if 0 < s <= end]
            if scored:
                step = min(scored, key=lambda s: (trainer.scores[s], s))
        steps[budget] = step
    steps_per_s = result.steps / result.elapsed_s if result.elapsed_s > 0 else float("nan")
    return TrainedSnapshots(
        vectors={b: kept[s] for b, s in steps.items()},
        steps=steps,
        scores=dict(trainer.scores),
        train_s=result.elapsed_s,
        steps_per_s=steps_per_s,
        steps_trained=result.steps,
        init_choice=result.init_choice,
        config=config,
    )


@contextlib.contextmanager
def embedding_loaded(model: BaseModel, path: Path, trigger: str = TRIGGER) -> Iterator[Any]:
    """``model`` with the embedding file loaded by diffusers' ``load_textual_inversion`` (as users load it); yields
    a function that rewrites prompts for multi-vector embeddings. Unloaded afterwards."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    known = len(model.tokenizer)
    pipe.load_textual_inversion(str(path), token=trigger)
    # A multi-vector file adds "<trigger>", "<trigger>_1", ...; the prompt rewrite spells them out.
    added = model.tokenizer.convert_ids_to_tokens(list(range(known, len(model.tokenizer))))
    try:
        yield lambda prompts: [pipe.maybe_convert_prompt(p, model.tokenizer) for p in prompts]
    finally:
        pipe.unload_textual_inversion(tokens=added)


def score_embedding(model: BaseModel, judges: Any, concept: world.HeldOutConcept, path: Path, **judging: Any) -> Scores:
    """Judge images drawn with the embedding at ``path`` (``judge_prompts``, whose options ``judging`` are)."""
    with embedding_loaded(model, path) as convert:
        return judge_prompts(model, judges, concept, TRIGGER, convert, **judging)


def score_own_words(
    model: BaseModel, judges: Any, concept: world.HeldOutConcept, *, images_per_prompt: int = 4, seed: int = 0
) -> Scores:
    """The same judgement of the model as shipped with the concept's own words (``own_words``) in place of a
    trigger: how well the model draws and edits the concept when it has a word for it, a bound for a learned one."""
    if not concept.own_words:
        raise ValueError(f"{concept.name}: the shipped model has no words for it")
    return judge_prompts(
        model, judges, concept, concept.own_words, list, images_per_prompt=images_per_prompt, seed=seed
    )


def judge_prompts(
    model: BaseModel,
    judges: Any,
    concept: world.HeldOutConcept,
    placeholder: str,
    convert: Any,
    *,
    images_per_prompt: int = 4,
    edit_prompts: int = 8,
    seed: int = 0,
    sample_steps: int = 25,
    guidance: float = 4.0,
    photo_values: dict[str, str] | None = None,
) -> Scores:
    """Draw the concept's reconstruction and edit prompts with ``placeholder`` for the concept (``convert`` rewrites
    the prompt list first) and judge them: reconstruction and editability rates, and the leakage of
    ``photo_values`` (the photos' common attribute values, ``photo_main_values``) into the edits."""
    recon = world.reconstruction_prompts(concept, placeholder)
    edits = world.edit_cases(concept, placeholder, edit_prompts, seed=seed)
    cases = [(c, "recon") for c in recon] + [(c, "edit") for c in edits]
    prompts = [c.prompt for c, _ in cases for _ in range(images_per_prompt)]
    images = sample(model, convert(prompts), steps=sample_steps, guidance=guidance, seed=seed)
    hits: dict[str, list[bool]] = {"recon": [], "edit": []}
    leaks: list[bool] = []
    for index, (case, kind) in enumerate(cases):
        chunk = images[index * images_per_prompt : (index + 1) * images_per_prompt]
        verdicts = judges(chunk)
        judged = {k: v for k, v in case.expected.items() if k in judges.classes}  # e.g. no size judge
        shown = np.ones(len(chunk), dtype=bool)
        for attribute, value in judged.items():
            shown &= np.array([label == value for label in verdicts[attribute].labels])
        hits[kind].extend(bool(x) for x in shown)
        if kind == "edit":
            for attribute, value in (photo_values or {}).items():
                if attribute in judges.classes and attribute not in case.expected:
                    leaks.extend(label == value for label in verdicts[attribute].labels)
    leakage = float(np.mean(leaks)) if leaks else float("nan")
    return Scores(float(np.mean(hits["recon"])), float(np.mean(hits["edit"])), len(prompts), leakage)


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
    """Train once, then score the initial vectors and the vectors at each budget (with the concept's ``erase``
    words taken out of both text encoders meanwhile)."""
    encoders = [model.text_encoder, *host.text_encoders]
    with concept_erased(concept, encoders, model.tokenizer):
        trained = train_concept(host, concept, method, budgets, work, seed=seed, photos=photos, on_progress=on_progress)
        photo_values = photo_main_values(concept, photos, seed)
        scores: dict[int, Scores] = {}
        paths: dict[int, Path] = {}
        for budget in sorted(trained.vectors):
            path = work / "snapshots" / f"{TRIGGER}-{budget:05d}.safetensors"
            step = trained.steps[budget]
            save_embedding(EmbeddingData(TRIGGER, trained.vectors[budget], step=step), path, overwrite=True)
            paths[budget] = path
            judged = score_embedding(
                model,
                judges,
                concept,
                path,
                images_per_prompt=images_per_prompt,
                seed=seed,
                photo_values=photo_values,
            )
            judged.held_out_loss = trained.scores.get(step, float("nan"))
            judged.step = step
            scores[budget] = judged
    return ConceptRun(
        concept.name,
        method.name,
        seed,
        scores,
        trained.train_s,
        trained.steps_per_s,
        paths,
        steps_trained=trained.steps_trained,
        init_choice=trained.init_choice,
        initial_loss=trained.scores.get(0, float("nan")),
    )


def mean_and_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval over independent runs (seeds); 0 for one value."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, 0.0
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(n, 1.96)
    return mean, t95 * float(np.std(values, ddof=1)) / math.sqrt(n)
