"""The training loop: trainable vectors + AdamW + the denoising loss, against any ``Host``.

Randomness is derived from ``(seed, micro-batch index)`` rather than carried in generator state, so a run resumed
from a save at step k draws exactly the data, noise and timesteps an uninterrupted run draws from step k on; a
save therefore only needs the vectors, the optimiser state, the grad-scaler state and the step.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import inspect
import io
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import TrainConfig
from .cpu_threads import ThreadSetup, ThreadTuner
from .dataset import RenderedSample, Sample, ScanResult, TrainingSet, scan_dataset
from .distributed import Processes
from .embedding_file import EmbeddingData, load_embedding, save_embedding, write_atomically
from .errors import ConfigError, EmbeddingFileError, TrainingError
from .host import Host, ImageInfo
from .initialization import (
    SD1_TABLE_SCALE,
    init_candidates,
    prompt_word_norm,
    random_vectors,
    table_scale,
    vectors_from_encoder_output,
    vectors_from_text,
)
from .log import logger
from .losses import add_noise, denoising_loss, min_snr_weights, prediction_target
from .run_state import STATE_SUFFIX, find_state, load_state, restore_optimizer, run_folder_of, save_state
from .schedules import learning_rate_at, parse_learning_rate
from .templates import AUTO_TEMPLATE, PromptBuilder, load_template, template_for

#: Fields that may differ between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "save_every",
        "keep_saves",
        "resume",
        "device",
        "overwrite",
        "output_dir",
        "write_pt",
        "write_card",
        "card_picture",
        "eval_every",
        "early_stop_patience",
        "final_vectors",
        "gradient_checkpointing",
        "run_dir",  # a resume works in the folder it was given (a run folder can be moved or copied)
    }
)

#: The columns of a run's ``loss.csv``.
LOSS_LOG_COLUMNS = ["step", "loss", "smoothed_loss", "learning_rate", "elapsed_s"]


@dataclass
class Progress:
    step: int  # optimiser steps done in this run
    total_steps: int
    epoch: int
    loss: float
    smoothed_loss: float
    learning_rate: float
    it_per_s: float
    eta_s: float
    elapsed_s: float


@dataclass
class TrainResult:
    embedding_path: Path
    run_dir: Path
    steps: int  # optimiser steps done in this run (resumed steps included)
    embedding_step: int  # the step stored in the file (an init file's steps included)
    final_loss: float
    smoothed_loss: float
    elapsed_s: float
    stopped: bool
    extra_paths: list[Path] = field(default_factory=list)
    resolution: int = 0  # the training resolution in pixels (the checkpoint's own when the config said 0)
    cpu_threads: ThreadSetup | None = None  # the CPU thread count the loop ran with, and why
    vectors_step: int = 0  # the run step whose vectors the file holds (the best evaluation's, or the last)
    held_out_loss: float | None = None  # the held-out score of those vectors, when evaluated
    early_stopped: bool = False  # the held-out score stopped improving (``early_stop_patience``)
    init_choice: str = ""  # the word ``init_mode best-word`` chose
    start_scores: list[float] = field(default_factory=list)  # ``starts``: each start's held-out score, in order
    chosen_start: int = 0  # the start carried on (1-based; 0: one start)


@dataclass
class _PendingStep:
    """A step whose loss is still on the device (not yet reported)."""

    step: int
    loss: torch.Tensor
    learning_rate: float
    elapsed_s: float


#: The held-out score (``eval_every``): micro-batches drawn with a seed of its own, so every evaluation of a run
#: sees the same images, prompts, noise and timesteps.
EVAL_BATCHES = 4
EVAL_SEED = 987654321
#: ``init_mode best-word`` ranks its candidates on micro-batches of another fixed seed (ranking on the score's own
#: views would flatter the chosen word's score at step 0).
INIT_RANK_SEED = 123456789
#: Every candidate is scored on a few micro-batches, the best few again on more (paired: the same views for all):
#: on the toy model two batches could not tell a related word from the noise between unrelated ones, eight could.
INIT_RANK_BATCHES = 4
INIT_FINALISTS = 8
INIT_FINAL_BATCHES = 16
#: An evaluation counts as an improvement (``early_stop_patience``) when it beats the best so far by this share.
EARLY_STOP_MIN_IMPROVEMENT = 0.002

#: Losses stay on the device between reports; a report (one transfer: a device synchronisation on CUDA) comes at
#: most this often, and at every save, stop and the end.
REPORT_INTERVAL_S = 0.25


@dataclass
class Callbacks:
    """Hooks a caller passes in. All are optional; exceptions raised in them stop the run.

    ``on_progress`` is called once for every step, in order, but in bursts at reports (see ``REPORT_INTERVAL_S``),
    so the loop never waits for the device to hand over a loss; ``on_step`` and ``should_stop`` come every step.
    """

    on_progress: Callable[[Progress], None] | None = None
    on_status: Callable[[str], None] | None = None  # phases: "scanning", "encoding latents 3/20", ...
    on_warning: Callable[[str], None] | None = None  # skipped images, a trigger the model knows, ...
    on_save: Callable[[Path, int], None] | None = None  # an embedding file written at a step
    on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None  # after each step (previews)
    on_evaluation: Callable[[int, float], None] | None = None  # the held-out score at a step (``eval_every``)
    on_init_choice: Callable[[str, dict[str, float]], None] | None = None  # best-word: the word and every loss
    should_stop: Callable[[], bool] | None = None


def output_path(config: TrainConfig) -> Path:
    return Path(config.output_dir) / f"{config.name}.safetensors"


def check_output_free(config: TrainConfig) -> None:
    """Refuse to start a run whose result would replace an existing file the user did not offer (cheap: call it
    before loading a model)."""
    path = output_path(config)
    if path.exists() and not (config.overwrite or config.resume):
        raise EmbeddingFileError(
            f"{path} already exists; choose another name or output_dir, or set overwrite (--overwrite) to replace it"
        )


def check_inputs(config: TrainConfig) -> tuple[PromptBuilder, ScanResult]:
    """The run's inputs, read without the model: the template's prompts and the scanned image folder, after checking
    the files to start from. Callers check them before a model is loaded or a run is queued; a run reads them again
    when it starts (files may change meanwhile). Raises ``DatasetError`` or ``ConfigError`` naming the field."""
    scan = scan_dataset(config.images, recursive=config.recursive, min_images=config.min_images)
    template = template_for(config.template, scan.captioned, len(scan.records))
    prompts = PromptBuilder(
        load_template(template), config.name, config.shuffle_tags, config.tag_dropout, template=template
    )
    if config.init_mode == "file" and not Path(config.init_file).is_file():
        raise ConfigError("init_file", f"'{config.init_file}' does not exist; give the path of an embedding file")
    if config.resume:
        find_state(config.resume)
    return prompts, scan


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError("device", f"{device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} was asked for but torch sees no CUDA GPU; use cpu or auto")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` picks bf16 (or fp16 on GPUs without bf16) on CUDA and fp32 elsewhere."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda" and not fp16_supported_on(device.type):
        raise ConfigError(
            "precision",
            f"fp16 needs a CUDA GPU, or torch 2.3 or newer for fp16 autocast and a grad scaler on the {device.type} "
            f"(this is torch {torch.__version__}); use fp32 or bf16",
        )
    return precision


@functools.cache
def fp16_supported_on(device_type: str) -> bool:
    """Whether this torch has fp16 autocast and a grad scaler for ``device_type`` (CPU: torch >= 2.3)."""
    if not (hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler")):
        return False
    try:
        torch.amp.GradScaler(device_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older versions warn and disable autocast for unsupported dtypes
            with torch.autocast(device_type, dtype=torch.float16):
                product = torch.ones(2, 2, device=device_type) @ torch.ones(2, 2, device=device_type)
    except (RuntimeError, ValueError, AssertionError):
        return False
    return product.dtype == torch.float16


COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _seeded(seed: int, purpose: str, index: int) -> int:
    """A 63-bit seed for one purpose at one micro-batch, independent of any generator's history."""
    digest = hashlib.blake2b(f"{seed}:{purpose}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class _CachedLatents:
    mean: torch.Tensor
    std: torch.Tensor  # zero unless latents are re-sampled every step
    mask: torch.Tensor | None
    info: ImageInfo


class Trainer:
    """One training run. ``Trainer(config, host, callbacks).run()`` returns a :class:`TrainResult`."""

    def __init__(
        self, config: TrainConfig, host: Host, callbacks: Callbacks | None = None, processes: Processes | None = None
    ):
        """``processes``: this process's place in a data-parallel run (``distributed``; default one process)."""
        config.require_for_training()
        self.processes = processes or Processes()
        # Resolution 0 means the checkpoint's own size; the config (its config.json, status and saves) says which.
        self.native_resolution = not config.resolution
        config = config.replace(resolution=config.resolution or host.default_resolution)
        self.config = config
        self.host = host
        self.callbacks = callbacks or Callbacks()
        self.device = host.device
        # A host whose weights already have a precision (the WebUI's fp16 model) decides what "auto" means.
        preferred = getattr(host, "preferred_precision", None)
        self.precision = resolve_precision(
            preferred if config.precision == "auto" and preferred else config.precision, self.device
        )
        self.run_dir = Path(config.effective_run_dir)
        self.output_path = output_path(config)
        self.alphas_cumprod = host.alphas_cumprod()
        num_timesteps = len(self.alphas_cumprod)
        if config.timestep_max >= num_timesteps:
            raise ConfigError(
                "timestep_max", f"{config.timestep_max} is past the model's last timestep {num_timesteps - 1}"
            )
        self.lr_schedule = parse_learning_rate(config.learning_rate)
        self.resolution = config.resolution
        self._status(f"checking the prompt template and scanning {config.images}")
        self.prompts, self.scan = check_inputs(config)
        if config.template.strip() == AUTO_TEMPLATE:
            why = "every image has" if self.prompts.uses_filewords else "not every image has"
            self._status(f"template auto: {self.prompts.template} ({why} a caption file)")
        self.data = TrainingSet(
            self.scan.records,
            resolution=self.resolution,
            buckets=config.buckets,
            crop=config.crop,
            flip=config.flip,
            repeats=config.repeats,
            use_alpha_mask=config.use_alpha_mask,
        )
        self.batches_per_epoch = self.data.batches_per_epoch(config.batch_size)
        self.warnings = self._plan_warnings()
        for text in self.warnings:
            self._warn(text)
        self.start_step = 0
        self.base_step = 0  # steps already stored in an init file
        self.scores: dict[int, float] = {}  # held-out score by step (``eval_every``)
        self.best_step: int | None = None  # the step with the lowest held-out score so far (step 0 excluded)
        self._best_vectors: dict[str, torch.Tensor] | None = None
        self._improved_at: int | None = None  # the last evaluation that beat the earlier ones by a margin
        self.early_stopped = False
        self.init_choice = ""
        self.start_scores: list[float] = []
        self.chosen_start = 0
        self._other_starts_steps = 0  # steps the starts not chosen trained (for the speed and the ETA)
        self.resume_state: dict[str, torch.Tensor] | None = None
        # Data-parallel: this process has been asked to stop; what the processes decided at the last step.
        self._stop_vote = self._stop_agreed = self._report_agreed = False
        self._last_report = 0.0  # when the last report was made (time.perf_counter)
        # lr_scale table: each encoder's rate is scaled by its table's typical coordinate, SD1's being 1x.
        self.lr_factors = {
            e.key: table_scale(host, e.key) / SD1_TABLE_SCALE if config.lr_scale == "table" else 1.0
            for e in host.encoders
        }
        # norm_band's centre: the median length of the words the prompts use (a small model's table is mostly
        # rows no caption ever trained, shorter than its real words; in a large model the two agree).
        self.word_norms = (
            {e.key: prompt_word_norm(host, e.key, self._prompt_words()) for e in host.encoders}
            if config.norm_band
            else {}
        )
        self.vectors = self._initial_vectors()
        self.initial_vectors = self.vectors  # what training starts from (best-word replaces it when the run starts)
        if self.processes.writes_files:  # the others would race process 0 for the same files
            self._remove_leftovers()  # a killed run's temporary files, before the folders are judged
            self._check_outputs()
        # Encoded latents per (image, flipped), kept on the device and reused across epochs.
        self.cache: dict[tuple[int, bool], _CachedLatents] = {}
        self._plan: list[list[Sample]] = []  # the batches of epoch ``_plan_epoch``
        self._plan_epoch = -1

    # -- set-up ------------------------------------------------------------------------------------------
    def _status(self, text: str) -> None:
        logger.info(text)
        if self.callbacks.on_status:
            self.callbacks.on_status(text)

    def _warn(self, text: str) -> None:
        """Something the user should know that does not stop the run (also in ``warnings`` and the header)."""
        if self.callbacks.on_warning:
            self.callbacks.on_warning(text)

    def _plan_warnings(self) -> list[str]:
        """What is questionable about this run before it starts: skipped files, a trigger the model knows."""
        warnings = [f"skipped {problem.path}: {problem.message}" for problem in self.scan.problems]
        processes, batch = self.processes.world_size, self.config.batch_size
        if processes > batch:
            warnings.append(
                f"batch_size {batch} over {processes} processes leaves {processes - batch} of them without images in "
                f"every batch; raise batch_size to at least {processes} or start fewer processes"
            )
        captioned, images = self.scan.captioned, len(self.scan.records)
        if captioned and not self.prompts.uses_filewords:
            if self.config.template.strip() == AUTO_TEMPLATE:
                unused = (
                    f"{captioned} of the {images} images have caption files; template auto uses captions only when "
                    f"every image has one (else file names would stand in), so they are not used: add caption files "
                    f"for the other {images - captioned}, or choose subject_filewords"
                )
            else:
                unused = (
                    f"{captioned} of the {images} images have caption files, but template '{self.config.template}' "
                    "has no [filewords], so they are not used; a _filewords template (subject_filewords, "
                    "style_filewords) puts them in the prompts, as auto does when every image has one"
                )
            warnings.append(
                f"{unused}. Captions that name what is NOT the concept (colour, background, pose, ...) keep those "
                "out of the embedding: on the toy model they raised editability from 0.73 to 0.91 "
                "(benchmarks/RESULTS.md)"
            )
        name = self.config.name
        if self.host.known_token_count(name) == 1:
            warnings.append(
                f"'{name}' is a word the model already knows; prompts that mean that word will now mean the "
                "embedding (a made-up name such as 'my-{name}' avoids this)"
            )
        return warnings

    def _initial_vectors(self) -> dict[str, torch.Tensor]:
        config = self.config
        if config.resume:
            state_path = find_state(config.resume)
            tensors, meta = load_state(state_path)
            saved = TrainConfig.from_dict(TrainConfig.saved_fields(meta["config"]))
            saved = saved.replace(resolution=saved.resolution or self.host.default_resolution)  # older saves: 0
            for f in TrainConfig.fields():
                if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name):
                    raise ConfigError(
                        f.name,
                        f"{getattr(config, f.name)!r} differs from the run being resumed ({getattr(saved, f.name)!r} "
                        f"in {state_path}); keep it, or start a new run without resume",
                    )
            self.start_step = int(meta["step"])
            self.base_step = int(meta["base_step"])
            if self.start_step >= config.max_steps:
                raise ConfigError(
                    "max_steps",
                    f"the run in {state_path} already did {self.start_step} steps; raise max_steps to train more",
                )
            self.resume_state = tensors
            self._resumed_from = state_path
            # Work in the folder given, wherever the run was first (its config.json, loss.csv and saves go there).
            self.run_dir = run_folder_of(state_path)
            self.config = config.replace(run_dir=str(self.run_dir))
            return {e.key: tensors[f"vectors.{e.key}"].clone() for e in self.host.encoders}
        if config.init_mode == "file":
            data = load_embedding(config.init_file, self.host.encoders)
            self.base_step = data.step
            return {k: v.to(torch.float32).clone() for k, v in data.vectors.items()}
        if config.init_mode == "random":
            return random_vectors(self.host, config.num_vectors, config.seed)
        if config.init_mode == "encoder-output":
            return vectors_from_encoder_output(self.host, config.init_text, config.num_vectors)
        return vectors_from_text(self.host, config.init_text, config.num_vectors)  # best-word: ranked in run()

    @property
    def _replaces_output(self) -> bool:
        """Overwrite asked for, or a resume replacing the embedding its own stopped run wrote (no other file)."""
        return self.config.overwrite or (bool(self.config.resume) and self._output_is_the_resumed_runs())

    def _output_is_the_resumed_runs(self) -> bool:
        if not self.output_path.exists():
            return True
        try:
            existing = load_embedding(self.output_path)
        except EmbeddingFileError:
            return False
        if existing.name != self.config.name:
            return False
        # The file holds the last vectors, or the best ones of a run that had done start_step steps.
        run_steps = existing.metadata.get("run_steps")
        return existing.step == self.base_step + self.start_step or run_steps == str(self.start_step)

    def _check_outputs(self) -> None:
        config = self.config
        check_output_free(config)
        if config.resume and not self._replaces_output:
            raise EmbeddingFileError(
                f"{self.output_path} already exists and is not the embedding the resumed run wrote when it stopped "
                f"(step {self.base_step + self.start_step}); set overwrite (--overwrite) to replace it, or choose "
                "another output_dir"
            )
        saves = self.run_dir / "saves"
        if not config.resume and saves.is_dir() and any(saves.iterdir()):
            if not config.overwrite:
                raise ConfigError(
                    "run_dir",
                    f"{self.run_dir} holds a previous run; resume it (resume={self.run_dir}), choose another "
                    "run_dir, or set overwrite (--overwrite) to start over",
                )
            shutil.rmtree(saves)

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def describe(self) -> str:
        """The run header: what will happen, stated before it happens."""
        c = self.config
        widths = " + ".join(f"{e.key} {e.width}" for e in self.host.encoders)
        size = f"{self.resolution}px" + (" (the model's own)" if self.native_resolution else "")
        size += " with aspect buckets" if c.buckets else f", {c.crop} crop"
        latents = f"cached ({c.latent_sampling})" if self.data.cacheable else "encoded every step (random crop)"
        lr = c.learning_rate if self.lr_schedule.is_piecewise else f"{c.learning_rate} {c.lr_scheduler}"
        if c.lr_scale == "table":
            lr += " in table units (" + ", ".join(f"{k} x{f:.3g}" for k, f in self.lr_factors.items()) + ")"
        init = f"resumed at step {self.start_step}" if c.resume else c.init_mode
        if not c.resume and c.init_mode in ("text", "encoder-output", "best-word"):
            init += f" '{c.init_text}'" + (" and other words, ranked by loss" if c.init_mode == "best-word" else "")
        scoring = "off"
        if c.eval_every:
            scoring = f"held-out loss every {c.eval_every} steps, file holds the {c.final_vectors} vectors"
            if c.early_stop_patience:
                scoring += f", stops after {c.early_stop_patience} evaluations without improvement"
        lines = [
            f"Training '{c.name}' on {self.host.model_name or 'the model'} ({self.host.family}, "
            f"{self.host.prediction_type})",
            f"  images:    {len(self.scan.records)} from {c.images}"
            + (f" ({len(self.scan.problems)} skipped)" if self.scan.problems else "")
            + f", x{c.repeats} repeats, {size}, latents {latents}",
            f"  vectors:   {self.num_vectors} x ({widths}), init {init}"
            + (f", length within x{c.norm_band:g} of the prompt words' median" if c.norm_band else ""),
            f"  steps:     {c.max_steps} (from {self.start_step}), batch {c.batch_size} x {c.grad_accum} accumulation,"
            f" {self.batches_per_epoch} batches per epoch",
            f"  optimiser: AdamW lr {lr}" + (f", warm-up {c.lr_warmup_steps}" if c.lr_warmup_steps else ""),
            f"  scoring:   {scoring}",
            f"  device:    {self.device}, {self.precision}"
            + (
                f", data-parallel over {self.processes.world_size} processes (each takes its share of every batch)"
                if self.processes.distributed
                else ""
            )
            + (", gradient checkpointing" if c.gradient_checkpointing else "")
            + (", VAE in RAM after caching" if c.vae_to_cpu else ""),
            f"  output:    {self.output_path} (run folder {self.run_dir})",
        ]
        lines.extend(f"  warning:   {text}" for text in self.warnings)
        return "\n".join(lines)

    # -- data ----------------------------------------------------------------------------------------------
    def _encode(self, rendered: list[RenderedSample]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([r.pixels for r in rendered]).to(self.device)
        with torch.no_grad():
            return self.host.encode_images(pixels)

    def _latent_mask(self, rendered: RenderedSample, latent_shape: torch.Size) -> torch.Tensor | None:
        if rendered.mask is None:
            return None
        mask = rendered.mask.unsqueeze(0).to(self.device, torch.float32)
        return torch.nn.functional.interpolate(mask, size=latent_shape[-2:], mode="area")[0]

    def _fill_cache(self) -> None:
        if not self.data.cacheable or self.cache:
            return
        keys = sorted(
            {(i, f) for i in range(len(self.scan.records)) for f in ((False, True) if self.config.flip else (False,))}
        )
        by_size: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for key in keys:
            by_size.setdefault(self.data.target_size(key[0]), []).append(key)
        done = 0
        generator = torch.Generator().manual_seed(_seeded(self.config.seed, "latent-once", 0))
        # On a GPU, one image per VAE call: four at 1024 px would make caching the run's memory peak (estimated for
        # SDXL: 16.7 GiB, against 8.4 for the step with checkpointing; benchmarks/RESULTS.md). RAM has room for four.
        per_call = 4 if self.device.type == "cpu" else 1
        for group in by_size.values():
            for start in range(0, len(group), per_call):
                chunk = group[start : start + per_call]
                rendered = [self.data.render(Sample(i, f, 0.5, 0.5)) for i, f in chunk]
                mean, std = self._encode(rendered)
                for j, (key, r) in enumerate(zip(chunk, rendered)):
                    m, s = mean[j], std[j]
                    if self.config.latent_sampling == "once":
                        noise = torch.randn(m.shape, generator=generator).to(m.device)
                        m, s = m + s * noise, torch.zeros_like(s)
                    elif self.config.latent_sampling == "deterministic":
                        s = torch.zeros_like(s)
                    self.cache[key] = _CachedLatents(m, s, self._latent_mask(r, m.shape), r.info)
                done += len(chunk)
                self._status(f"encoding latents {done}/{len(keys)}")

    def _batch(
        self, batch: list[Sample], share: slice, index: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[ImageInfo], list[str]]:
        """Latents, masks, image infos and prompts of this process's ``share`` of micro-batch ``index`` (all of it in
        one process): the rows the whole batch's draws give them."""
        rng = random.Random(_seeded(seed, "prompts", index))
        prompts = [self.prompts.build(self.data.caption(s.record_index), rng) for s in batch][share]
        samples = batch[share]
        rendered = [self.data.render(s) for s in samples] if not self.data.cacheable else None
        if rendered is None:
            entries = [self.cache[(s.record_index, s.flip)] for s in samples]
            infos = [e.info for e in entries]
            mean = torch.stack([e.mean for e in entries])
            std = torch.stack([e.std for e in entries])
            masks = [e.mask for e in entries]
        else:
            mean, std = self._encode(rendered)
            if self.config.latent_sampling == "deterministic":
                std = torch.zeros_like(std)
            infos = [r.info for r in rendered]
            masks = [self._latent_mask(r, mean.shape[1:]) for r in rendered]
        generator = torch.Generator().manual_seed(_seeded(seed, "latents", index))
        latents = mean + std * torch.randn((len(batch), *mean.shape[1:]), generator=generator)[share].to(self.device)
        mask = None
        if any(m is not None for m in masks):
            mask = torch.stack([m if m is not None else torch.ones_like(latents[0, :1]) for m in masks])
        return latents, mask, infos, prompts

    def _micro_batch(self, index: int) -> list[Sample]:
        epoch, position = divmod(index, self.batches_per_epoch)
        if self._plan_epoch != epoch:
            self._plan = self.data.epoch(epoch, self.config.batch_size, self.config.seed)
            self._plan_epoch = epoch
        return self._plan[position]

    # -- the step ------------------------------------------------------------------------------------------
    def _loss(self, index: int, leaves: dict[str, torch.Tensor], seed: int | None = None) -> torch.Tensor:
        """The loss of micro-batch ``index``; its data, noise and timesteps depend only on (seed, index)."""
        c = self.config
        seed = c.seed if seed is None else seed
        batch = self._micro_batch(index)
        share = self.processes.share(len(batch))
        if share.start == share.stop:  # data-parallel, a batch smaller than the processes: no rows here
            return sum(leaf.sum() for leaf in leaves.values()) * 0.0
        latents, mask, infos, prompts = self._batch(batch, share, index, seed)
        generator = torch.Generator().manual_seed(_seeded(seed, "noise", index))
        size = len(batch)
        noise = torch.randn((size, *latents.shape[1:]), generator=generator)[share]
        if c.noise_offset:
            offsets = torch.randn((size, latents.shape[1], 1, 1), generator=generator)[share]
            noise = noise + c.noise_offset * offsets
        timesteps = torch.randint(c.timestep_min, c.timestep_max + 1, (size,), generator=generator)[share]
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = add_noise(latents, noise, timesteps, self.alphas_cumprod)
        autocast = (
            torch.autocast(self.device.type, dtype=COMPUTE_DTYPES[self.precision])
            if self.precision != "fp32"
            else contextlib.nullcontext()
        )
        with autocast:
            conditioning = self.host.encode_prompts(prompts, c.name, leaves, infos)
            prediction = self.host.predict(noisy, timesteps, conditioning)
        target = prediction_target(latents, noise, timesteps, self.alphas_cumprod, self.host.prediction_type)
        weights = (
            min_snr_weights(timesteps, self.alphas_cumprod, c.min_snr_gamma, self.host.prediction_type)
            if c.min_snr_gamma
            else None
        )
        return denoising_loss(prediction, target, mask, weights, batch_size=size)

    def held_out_loss(
        self, vectors: dict[str, torch.Tensor], batches: int = EVAL_BATCHES, seed: int = EVAL_SEED
    ) -> float:
        """Mean loss of ``vectors`` over fixed micro-batches drawn with ``seed`` (not the training seed).

        The same seed gives the same images, prompts, noise and timesteps, so two vector sets compare fairly.
        """
        with self.host.training_session(False):
            self._fill_cache()
            leaves = {k: v.to(self.device, torch.float32) for k, v in vectors.items()}
            return self._held_out_loss(leaves, batches, seed)

    @torch.no_grad()
    def _held_out_loss(self, leaves: dict[str, torch.Tensor], batches: int, seed: int) -> float:
        total, error = torch.zeros((), device=self.device), None
        try:
            for index in range(batches):
                total = total + self._loss(index, leaves, seed).detach().float()
        except Exception as failure:  # noqa: BLE001 - raised again by sum_checked, in every process
            error = failure
        total = self.processes.sum_checked(total, error, "an evaluation")  # data-parallel: the shares add up
        return float(total) / batches  # one transfer per evaluation

    def _check_first_gradients(self, leaves: dict[str, torch.Tensor]) -> bool:
        """Stop with a reason if a vector got no usable gradient. Returns False to defer (fp16 overflow)."""
        for key, leaf in leaves.items():
            grad = leaf.grad
            if grad is None:
                raise TrainingError(_no_gradient_message(key))
            if not torch.isfinite(grad).all():
                if self.scaler is not None:
                    return False  # the scaler skips this step and lowers its scale; check again next step
                raise TrainingError(f"the '{key}' vectors received a NaN/inf gradient at the first step")
            if not grad.abs().sum() > 0:
                raise TrainingError(
                    f"the '{key}' vectors received an all-zero gradient: the model's output does not depend on "
                    f"the trigger '{self.config.name}' (is it in the prompts? does the model attend to text?). "
                    "Nothing would be trained."
                )
        return True

    def _scheduled_step(
        self, step: int, leaves: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, seed: int | None = None
    ) -> tuple[torch.Tensor, float]:
        """Set the schedule's rate for ``step`` (each encoder's group scaled by its factor) and take the step;
        returns its loss (on the device) and the rate."""
        c = self.config
        lr = learning_rate_at(step, self.lr_schedule, c.lr_scheduler, c.lr_warmup_steps, c.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        return self._optimizer_step(step, leaves, optimizer, seed), lr

    def _optimizer_step(
        self, step: int, leaves: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, seed: int | None = None
    ) -> torch.Tensor:
        """One optimiser step (``grad_accum`` micro-batches); returns its mean loss, a 0-d tensor on the device.

        Nothing here waits for the device but the first step's gradient check (and the fp16 grad scaler's overflow
        check where AdamW is not fused, i.e. off CUDA): losses and vectors are checked for NaN/inf at the next report
        (``_report``).
        """
        c = self.config
        optimizer.zero_grad(set_to_none=True)
        if not self.processes.distributed:
            total = self._accumulate_gradients(step, leaves, seed)
        else:  # every process learns whether the step failed anywhere (see Processes.sum_checked)
            try:
                total, error = self._accumulate_gradients(step, leaves, seed), None
            except Exception as failure:  # noqa: BLE001 - raised again below, in every process
                total, error = torch.zeros((), device=self.device), failure
            total = self._sum_over_processes(step, leaves, total, error)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clipping and the gradient check see true gradients
        if not self._gradients_checked:
            self._gradients_checked = self._check_first_gradients(leaves)
        params = list(leaves.values())
        if c.grad_clip == "norm":
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip_value)
        elif c.grad_clip == "value":
            torch.nn.utils.clip_grad_value_(params, c.grad_clip_value)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        self._project_norms(leaves)
        return total

    def _accumulate_gradients(
        self, step: int, leaves: dict[str, torch.Tensor], seed: int | None
    ) -> torch.Tensor:
        """Forward and backward over the step's ``grad_accum`` micro-batches (this process's share of each);
        returns the step's mean loss (this process's share of it), a 0-d tensor on the device."""
        c = self.config
        total = torch.zeros((), device=self.device)
        for micro in range(c.grad_accum):
            loss = self._loss(step * c.grad_accum + micro, leaves, seed)
            if not loss.requires_grad:
                raise TrainingError(_no_gradient_message(", ".join(leaves)))
            scaled = loss / c.grad_accum
            total = total + scaled.detach().float()
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        for key, leaf in leaves.items():
            if leaf.grad is None:
                raise TrainingError(_no_gradient_message(key))
        return total

    def _sum_over_processes(
        self, step: int, leaves: dict[str, torch.Tensor], total: torch.Tensor, error: BaseException | None
    ) -> torch.Tensor:
        """Data-parallel: one all-reduce per step sums every process's (still scaled) gradients and loss share, the
        stop votes, process 0's wish to report, and whether the step failed anywhere (then every process raises);
        returns the step's loss. Every process then holds the same gradients, takes the same step and makes the
        same decisions. Reading the flags waits for the step (on a GPU, one synchronisation per step)."""
        grads = [leaf.grad if leaf.grad is not None and error is None else None for leaf in leaves.values()]
        parts = [g.reshape(-1).float() if g is not None else torch.zeros(leaf.numel(), device=self.device)
                 for g, leaf in zip(grads, leaves.values())]  # fmt: skip
        report = self.processes.writes_files and time.perf_counter() - self._last_report >= REPORT_INTERVAL_S
        votes = torch.tensor([float(self._stop_vote), float(report)], device=self.device)
        buffer = torch.cat([*parts, total.float().reshape(1), votes])
        buffer = self.processes.sum_checked(buffer, error, f"step {step + 1}")
        offset = 0
        for grad in grads:
            assert grad is not None  # the step failed nowhere
            grad.copy_(buffer[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        stop, report = buffer[-2:].tolist()
        self._stop_agreed, self._report_agreed = stop > 0, report > 0
        return buffer[-3].clone()

    def _stop_asked(self) -> bool:
        """Whether to stop before the next step. Data-parallel: this process's vote travels with the next step's
        all-reduce, and every process stops once the summed votes of a step say so: all after the same step."""
        asked = bool(self.callbacks.should_stop and self.callbacks.should_stop())
        if not self.processes.distributed:
            return asked
        self._stop_vote = self._stop_vote or asked
        return self._stop_agreed

    def _report_due(self, now: float) -> bool:
        """Time for a report (``REPORT_INTERVAL_S``); data-parallel: when process 0's clock said so at the last step,
        so every process reports (and checks for NaN) at the same steps."""
        if self.processes.distributed:
            return self._report_agreed
        return now - self._last_report >= REPORT_INTERVAL_S

    @torch.no_grad()
    def _project_norms(self, leaves: dict[str, torch.Tensor]) -> None:
        """``norm_band``: scale each vector whose length left [median / band, median * band] back to the band's edge
        (on the device; no synchronisation)."""
        band = self.config.norm_band
        if not band:
            return
        for key, leaf in leaves.items():
            median = self.word_norms[key]
            norms = leaf.norm(dim=-1, keepdim=True)
            leaf.mul_(norms.clamp(median / band, median * band) / norms.clamp_min(1e-12))

    def _prompt_words(self) -> list[str]:
        """The template's lines and the captions, without the trigger and placeholders: words the model knows."""
        lines = [line.replace("[name]", " ").replace("[filewords]", " ") for line in self.prompts.lines]
        captions = [self.data.caption(i) for i in range(len(self.scan.records))]
        return [text for text in (*lines, *captions) if text.strip()]

    def _choose_init_word(self, leaves: dict[str, torch.Tensor]) -> None:
        """``init_mode best-word``: start from the candidate text with the lowest loss on fixed views of the images."""
        c = self.config
        candidates = init_candidates(c.init_text, self._prompt_words(), c.name)
        trials: dict[str, dict[str, torch.Tensor]] = {}
        for text in candidates:
            with contextlib.suppress(ConfigError):  # a text with no tokens in this tokenizer
                trials[text] = {
                    k: v.to(self.device) for k, v in vectors_from_text(self.host, text, c.num_vectors).items()
                }
                self._project_norms(trials[text])
        losses: dict[str, float] = {}
        for index, (text, trial) in enumerate(trials.items(), 1):
            self._status(f"ranking init words by loss on the images {index}/{len(trials)}")
            losses[text] = self._held_out_loss(trial, INIT_RANK_BATCHES, INIT_RANK_SEED)
        finalists = sorted(losses, key=losses.__getitem__)[:INIT_FINALISTS]
        for index, text in enumerate(finalists, 1):
            self._status(f"ranking the best {len(finalists)} init words again {index}/{len(finalists)}")
            losses[text] = self._held_out_loss(trials[text], INIT_FINAL_BATCHES, INIT_RANK_SEED)
        losses = {text: losses[text] for text in finalists}
        self.init_choice = min(losses, key=losses.__getitem__)
        _copy_into(leaves, trials[self.init_choice])
        others = ", ".join(f"'{t}' {losses[t]:.4g}" for t in sorted(losses, key=losses.__getitem__)[1:4])
        self._status(f"init: '{self.init_choice}', loss {losses[self.init_choice]:.4g} (next: {others})")
        if self.callbacks.on_init_choice:
            self.callbacks.on_init_choice(self.init_choice, losses)

    def _evaluate(self, step: int, leaves: dict[str, torch.Tensor], score: float | None = None) -> None:
        """Score the vectors (unless ``score`` is theirs already); keep the best ones (after step 0); stop early when
        the score has stalled."""
        if score is None:
            score = self._held_out_loss(leaves, EVAL_BATCHES, EVAL_SEED)
        self.scores[step] = score
        if self.callbacks.on_evaluation:
            self.callbacks.on_evaluation(step, score)
        if step == 0 or not math.isfinite(score):
            return
        if self.best_step is None or score < self.scores[self.best_step]:
            self.best_step = step
            self._best_vectors = {k: v.detach().clone() for k, v in leaves.items()}
        last = self._improved_at
        if last is None or score < self.scores[last] * (1.0 - EARLY_STOP_MIN_IMPROVEMENT):
            self._improved_at = step
            return
        patience = self.config.early_stop_patience
        if patience and sum(1 for s in self.scores if s > last) >= patience:
            self.early_stopped = True
            self._status(
                f"stopping early at step {step}: the held-out score has not improved for {patience} evaluations "
                f"(best {self.scores[self.best_step]:.4g} at step {self.best_step})"
            )

    def _train_starts(
        self, leaves: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, log: Any, loop_start: float
    ) -> tuple[int, bool]:
        """``starts``: train each start ``start_steps`` from the same vectors, each with its own draws of noise,
        timesteps and prompts (the first with the run's own seed, so it is what a one-start run does), and carry on
        with the one of lowest held-out score, its optimiser state included. Returns (step, stopped).

        Whether a run finds its concept can hinge on its random draws; with several vectors the held-out score
        mostly tells the starts that found it from those that did not (benchmarks/RESULTS.md, "same photos")."""
        c = self.config
        length = min(c.start_steps, c.max_steps)
        initial = {k: v.detach().clone() for k, v in leaves.items()}
        best: tuple[float, int, dict[str, torch.Tensor], dict[str, Any], Any, list[_PendingStep]] | None = None
        stopped = False
        for index in range(c.starts):
            seed = c.seed if index == 0 else _seeded(c.seed, "start", index)
            _copy_into(leaves, initial)
            optimizer.state.clear()  # each start has its own AdamW moments (and fp16 loss scale)
            self.scaler = _grad_scaler(self.device) if self.precision == "fp16" else None
            pending: list[_PendingStep] = []
            last_status = time.perf_counter()
            for step in range(length):
                if self._stop_asked():
                    stopped = True
                    break
                loss, lr = self._scheduled_step(step, leaves, optimizer, seed)
                now = time.perf_counter()
                pending.append(_PendingStep(step + 1, loss, lr, now - loop_start))
                if now - last_status >= REPORT_INTERVAL_S:
                    self._status(f"start {index + 1} of {c.starts}: step {step + 1}/{length}")
                    last_status = now
            if stopped and best is not None:
                break  # keep the best finished start
            score = self._held_out_loss(leaves, EVAL_BATCHES, EVAL_SEED)
            self.start_scores.append(score)
            self._status(f"start {index + 1} of {c.starts}: held-out score {score:.4g}")
            ranked = score if math.isfinite(score) else math.inf
            if best is None or ranked < best[0]:
                vectors = {k: v.detach().clone() for k, v in leaves.items()}
                best = (ranked, index, vectors, copy.deepcopy(optimizer.state_dict()), self.scaler, pending)
            if stopped:
                break
        assert best is not None  # at least one start ran (or was stopped, and is kept)
        _, index, vectors, state, self.scaler, pending = best
        _copy_into(leaves, vectors)
        optimizer.load_state_dict(state)
        self.chosen_start = index + 1
        done = pending[-1].step if pending else 0
        self._other_starts_steps = len(self.start_scores) * length - done if not stopped else 0
        if len(self.start_scores) > 1:
            others = ", ".join(f"{s:.4g}" for i, s in enumerate(self.start_scores) if i != index)
            self._status(
                f"carrying on with start {index + 1} of {len(self.start_scores)}: the lowest held-out score "
                f"{self.start_scores[index]:.4g} (the others: {others})"
            )
        # The chosen start's steps become the run's first steps, timed to end now: the other starts' time is spent
        # too, so the speed and the ETA count it.
        shift = time.perf_counter() - loop_start - pending[-1].elapsed_s if pending else 0.0
        pending = [dataclasses.replace(entry, elapsed_s=entry.elapsed_s + shift) for entry in pending]
        self._report(pending, leaves, log)
        if done and c.eval_every:
            self._evaluate(done, leaves, self.start_scores[index] if done == length else None)
        if done and self.callbacks.on_step:
            self.callbacks.on_step(done, {k: v.detach() for k, v in leaves.items()})
        return done, stopped

    def _open_loss_log(self) -> Any:
        """``loss.csv`` for appending. A resume first drops the rows past its step (a resume from an earlier save
        repeats those steps) and continues the elapsed time and the smoothed loss of the rows it keeps."""
        path = self.run_dir / "loss.csv"
        self._elapsed_before = 0.0
        if not self.processes.writes_files:
            return open(os.devnull, "w", newline="", encoding="utf-8")
        kept: list[list[str]] = []
        if self.config.resume and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            for row in rows[1:]:
                with contextlib.suppress(ValueError, IndexError):
                    if int(row[0]) <= self.start_step and len(row) == len(LOSS_LOG_COLUMNS):
                        kept.append(row)
            if kept:
                self._elapsed_before = float(kept[-1][4])
                self._smoothed = float(kept[-1][2])
                self._ema_weight = 1.0 - 0.98 ** len(kept)
        text = io.StringIO()
        csv.writer(text).writerows([LOSS_LOG_COLUMNS, *kept])
        write_atomically(path, lambda f: f.write(text.getvalue().encode("utf-8")), overwrite=True)
        return open(path, "a", newline="", encoding="utf-8")

    def _remove_leftovers(self) -> None:
        """Temporary files a killed run left behind (``write_atomically`` names them ``.<target>.<random>.tmp``)."""
        name = self.config.name
        places = {
            self.run_dir: (f".{name}", ".loss.csv.", ".config.json."),
            self.run_dir / "saves": (f".{name}",),
            self.output_path.parent: (f".{name}.safetensors.", f".{name}.pt."),
        }
        for folder, prefixes in places.items():
            if folder.is_dir():
                for leftover in folder.glob(".*.tmp"):
                    if leftover.name.startswith(prefixes):
                        with contextlib.suppress(OSError):
                            leftover.unlink()

    def _make_optimizer(self, leaves: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        c = self.config
        # On CUDA, fused AdamW is one kernel, and the fp16 grad scaler hands it the overflow flag on the device
        # (the unfused path reads that flag on the host every step: a synchronisation).
        fused = {"fused": True} if self.device.type == "cuda" and _adamw_has_fused() else {}
        # One group per encoder: lr_scale table gives each its own factor (SDXL's two tables differ in scale).
        groups = [{"params": [leaf], "lr_factor": self.lr_factors[key]} for key, leaf in leaves.items()]
        optimizer = torch.optim.AdamW(groups, lr=self.lr_schedule.base, weight_decay=c.weight_decay, **fused)
        self.scaler = _grad_scaler(self.device) if self.precision == "fp16" else None
        if self.resume_state is not None:
            restore_optimizer(optimizer, self.scaler, leaves, self.resume_state)
            self._status(f"resuming at step {self.start_step} from {self._resumed_from}")
        return optimizer

    def _report(self, pending: list[_PendingStep], leaves: dict[str, torch.Tensor], log: Any) -> None:
        """Hand the pending steps' losses to the host in one transfer, check them and the vectors, log them.

        On success the vectors become the last good ones. A NaN/inf loss or vector raises ``TrainingError`` naming
        the first bad step; the last good vectors are those of the previous report.
        """
        if not pending:
            return
        finite = torch.stack([torch.isfinite(v).all() for v in leaves.values()]).all()
        values = torch.cat([torch.stack([p.loss.float() for p in pending]), finite.float().reshape(1)]).tolist()
        losses, vectors_finite = values[:-1], values[-1] == 1.0
        first = pending[0].step
        for entry, loss in zip(pending, losses):
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss} at step {entry.step}; the last good vectors (step {self._good_step}) "
                    "are kept. Lower the learning rate, use fp32 or bf16, or check the images"
                )
        if not vectors_finite:
            raise TrainingError(
                f"the vectors became NaN/inf between steps {first} and {pending[-1].step}; the last good vectors "
                f"(step {self._good_step}) are kept. Lower the learning rate or enable gradient clipping"
            )
        self._good_vectors = {k: v.detach().clone() for k, v in leaves.items()}
        self._good_step = pending[-1].step
        c = self.config
        for entry, loss in zip(pending, losses):
            # Exponential moving average with bias correction, so early values are not pulled to 0.
            self._ema_weight = 0.98 * self._ema_weight + 0.02
            smoothed = loss if math.isnan(self._smoothed) else self._smoothed  # a resume continues its run's
            self._smoothed = smoothed + (loss - smoothed) * 0.02 / self._ema_weight
            self._last_loss = loss
            log.writerow(
                [entry.step, f"{loss:.6g}", f"{self._smoothed:.6g}", f"{entry.learning_rate:.6g}",
                 f"{self._elapsed_before + entry.elapsed_s:.3f}"]
            )  # fmt: skip
            if self.callbacks.on_progress:
                done = entry.step - self.start_step + self._other_starts_steps
                it_per_s = done / entry.elapsed_s if entry.elapsed_s > 0 else 0.0
                self.callbacks.on_progress(
                    Progress(
                        step=entry.step,
                        total_steps=c.max_steps,
                        epoch=(entry.step * c.grad_accum) // self.batches_per_epoch,
                        loss=loss,
                        smoothed_loss=self._smoothed,
                        learning_rate=entry.learning_rate,
                        it_per_s=it_per_s,
                        eta_s=(c.max_steps - entry.step) / it_per_s if it_per_s else float("inf"),
                        elapsed_s=entry.elapsed_s,
                    )
                )
        pending.clear()
        self._log_file.flush()  # a kill loses at most the rows since the last report

    def run(self) -> TrainResult:
        c = self.config
        if self.processes.writes_files:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(
                self.run_dir / "config.json", lambda f: f.write(c.to_json().encode("utf-8")), overwrite=True
            )
        leaves = {k: v.to(self.device).requires_grad_(True) for k, v in self.vectors.items()}
        optimizer = self._make_optimizer(leaves)
        # Device-side copies: no transfer to the CPU (a sync on CUDA) until a file is written.
        self._good_vectors = {k: v.detach().clone() for k, v in leaves.items()}
        self._good_step = self.start_step
        self._ema_weight = 0.0
        self._smoothed = self._last_loss = float("nan")
        step = self.start_step
        stopped = False
        started = time.perf_counter()
        self._gradients_checked = self.start_step > 0
        extra: list[Path] = []
        pending: list[_PendingStep] = []
        tuner = ThreadTuner(self.device)
        log_file = self._log_file = self._open_loss_log()
        with log_file, self.host.training_session(c.gradient_checkpointing):
            log = csv.writer(log_file)
            try:
                self._fill_cache()
                if c.vae_to_cpu:
                    self._status("moving the VAE to system RAM (every latent is cached)")
                    self.host.offload_image_encoder()
                if c.init_mode == "best-word" and not c.resume:
                    self._choose_init_word(leaves)
                self._project_norms(leaves)
                self.processes.check_identical(leaves, "the starting vectors")
                self._good_vectors = {k: v.detach().clone() for k, v in leaves.items()}
                self.initial_vectors = {k: v.detach().cpu().clone() for k, v in leaves.items()}
                if c.eval_every and step == 0:
                    self._evaluate(0, leaves)  # the baseline the chart and the best-vectors choice start from
                loop_start = self._last_report = time.perf_counter()
                if c.starts > 1 and step == 0:
                    step, stopped = self._train_starts(leaves, optimizer, log, loop_start)
                self._status("training")
                while step < c.max_steps and not self.early_stopped and not stopped:
                    if self._stop_asked():
                        stopped = True
                        break
                    loss, lr = self._scheduled_step(step, leaves, optimizer)
                    step += 1
                    now = time.perf_counter()
                    pending.append(_PendingStep(step, loss, lr, now - loop_start))  # this run's own time
                    tuner.after_step()
                    saving = bool(c.save_every and step % c.save_every == 0 and step < c.max_steps)
                    evaluating = bool(c.eval_every and (step % c.eval_every == 0 or step == c.max_steps))
                    if saving or evaluating or step == c.max_steps or self._report_due(now):
                        self._report(pending, leaves, log)  # an evaluation's score comes after its step's loss
                        self._last_report = now
                    if evaluating:
                        self._evaluate(step, leaves)
                    if self.callbacks.on_step:
                        self.callbacks.on_step(step, {k: v.detach() for k, v in leaves.items()})
                    if saving:
                        self._check_processes_agree(leaves, optimizer, f"the save at step {step}")
                        self._save_intermediate(step, self._good_vectors, optimizer)
                self._report(pending, leaves, log)  # a stop leaves steps to report
                self._check_processes_agree(leaves, optimizer, f"the end of the run (step {step})")
            except BaseException as error:
                raise self._failed(error, step) from error
            finally:
                tuner.restore()
        last_good = self._good_vectors
        if stopped or step < c.max_steps:
            # A stopped run can be resumed: keep its full state beside the embedding.
            extra.append(self._save_intermediate(step, last_good, optimizer, keep_all=True))
        replace = self._replaces_output
        final, final_step = last_good, step
        if c.final_vectors == "best" and self._best_vectors is not None and self.best_step is not None:
            final, final_step = self._best_vectors, self.best_step
            if final_step != step:
                self._status(
                    f"the file holds step {final_step}'s vectors: the best held-out score of {len(self.scores)} "
                    "evaluations (final_vectors best)"
                )
        path = self._write_embedding(self.output_path, final, final_step, overwrite=replace, run_steps=step)
        if c.write_pt:
            extra.append(
                self._write_embedding(path.with_suffix(".pt"), final, final_step, overwrite=replace, run_steps=step)
            )
        if c.write_card:
            extra.append(self._write_card(final, final_step, run_steps=step))
        self.vectors = {k: v.cpu() for k, v in final.items()}
        return TrainResult(
            embedding_path=path,
            run_dir=self.run_dir,
            steps=step,
            embedding_step=self.base_step + step,
            final_loss=self._last_loss,
            smoothed_loss=self._smoothed,
            elapsed_s=time.perf_counter() - started,
            stopped=stopped,
            extra_paths=extra,
            resolution=self.resolution,
            cpu_threads=tuner.setup,
            vectors_step=final_step,
            held_out_loss=self.scores.get(final_step),
            early_stopped=self.early_stopped,
            init_choice=self.init_choice,
            start_scores=list(self.start_scores),
            chosen_start=self.chosen_start,
        )

    def _check_processes_agree(
        self, leaves: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, when: str
    ) -> None:
        """Data-parallel: the vectors and AdamW's moments must be the same in every bit on every process."""
        if not self.processes.distributed:
            return
        tensors = {f"vectors.{k}": v for k, v in leaves.items()}
        for key, leaf in leaves.items():
            for name, value in optimizer.state.get(leaf, {}).items():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    tensors[f"optimizer.{key}.{name}"] = value
        self.processes.check_identical(tensors, when)

    def _failed(self, error: BaseException, step: int) -> BaseException:
        """Keep the last good vectors on disk and say where they are (``step``: the steps done when it failed)."""
        saved = self._save_last_good(self._good_step, self._good_vectors)
        if isinstance(error, KeyboardInterrupt):
            return error
        where = f"\nLast good embedding (step {self._good_step}): {saved}"
        if not self.processes.writes_files:
            where = f"\n(process 0 keeps the files; this is process {self.processes.rank})"
        if isinstance(error, TrainingError):
            return type(error)(f"{error}{where}")  # LostProcessesError stays one
        if _is_out_of_memory(error):
            c = self.config
            return TrainingError(
                f"the device ran out of memory at step {step + 1} (batch_size {c.batch_size} at {self.resolution} "
                f"px). Lower batch_size and raise grad_accum to keep the same images per step (e.g. batch_size "
                f"{max(1, c.batch_size // 2)}, grad_accum {c.grad_accum * 2}), or turn on gradient_checkpointing "
                f"or vae_to_cpu. ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}){where}"
            )
        return TrainingError(f"training failed at step {step + 1}: {type(error).__name__}: {error}{where}")

    # -- files ------------------------------------------------------------------------------------------------
    def _embedding(self, vectors: dict[str, torch.Tensor], step: int, run_steps: int | None = None) -> EmbeddingData:
        """``step``: the run step of ``vectors``; ``run_steps``: the steps the run had done (later, for the best
        vectors at the end of a run)."""
        meta = {
            "base_model_name": self.host.model_name,
            "family": self.host.family,
            "prediction_type": self.host.prediction_type,
            "trainer": f"embedding_trainer {__version__}",
            "run_steps": str(step if run_steps is None else run_steps),
            "vectors_step": str(step),
            "settings": self.config.to_json(),
        }
        if step in self.scores:
            meta["held_out_loss"] = f"{self.scores[step]:.6g}"  # the score of these very vectors
        if self.init_choice:
            meta["init_choice"] = self.init_choice
        if self.chosen_start:
            scores = ", ".join(f"{score:.6g}" for score in self.start_scores)
            meta["starts"] = f"start {self.chosen_start} of {len(self.start_scores)} (held-out scores {scores})"
        return EmbeddingData(name=self.config.name, vectors=vectors, step=self.base_step + step, metadata=meta)

    def _write_embedding(
        self,
        path: Path,
        vectors: dict[str, torch.Tensor],
        step: int,
        overwrite: bool,
        picture: Any = None,
        run_steps: int | None = None,
    ) -> Path:
        if not self.processes.writes_files:
            return path
        data = self._embedding(vectors, step, run_steps)
        written = save_embedding(data, path, overwrite=overwrite, picture=picture)
        if self.callbacks.on_save:
            self.callbacks.on_save(written, step)
        return written

    def _write_card(self, vectors: dict[str, torch.Tensor], step: int, run_steps: int | None = None) -> Path:
        """The WebUI's picture card in the run folder (not the embeddings folder, where the WebUI would load it as a
        second embedding with the same trigger), showing ``card_picture``, else the first preview, else a tile."""
        from PIL import Image

        if not self.processes.writes_files:
            return self.run_dir / f"{self.config.name}.png"
        previews = sorted((self.run_dir / "previews").glob("*.png"))
        source = self.config.card_picture or (str(previews[0]) if previews else "")
        picture = None
        if source:
            try:
                with Image.open(source) as opened:
                    picture = opened.convert("RGB")
            except OSError as e:
                self._warn(f"card_picture {source} cannot be read ({e}); the card shows a plain tile")
        return self._write_embedding(self.run_dir / f"{self.config.name}.png", vectors, step, True, picture, run_steps)

    def _save_last_good(self, step: int, vectors: dict[str, torch.Tensor]) -> Path:
        return self._write_embedding(self.run_dir / f"{self.config.name}-last-good.safetensors", vectors, step, True)

    def _save_intermediate(
        self, step: int, vectors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, keep_all: bool = False
    ) -> Path:
        saves = self.run_dir / "saves"
        stem = f"{self.config.name}-{step:06d}"
        if not self.processes.writes_files:
            return saves / f"{stem}{STATE_SUFFIX}"
        self._write_embedding(saves / f"{stem}.safetensors", vectors, step, overwrite=True)
        state_path = saves / f"{stem}{STATE_SUFFIX}"
        save_state(state_path, vectors, optimizer, self.scaler, step, self.base_step, self.config.to_json())
        if not self._log_file.closed:  # the loss rows up to this save survive a kill, as the save does
            self._log_file.flush()
            os.fsync(self._log_file.fileno())
        if self.config.keep_saves and not keep_all:
            states = sorted(saves.glob(f"{self.config.name}-*{STATE_SUFFIX}"))
            for old in states[: -self.config.keep_saves]:
                old.unlink(missing_ok=True)
                old.with_name(old.name.replace(STATE_SUFFIX, ".safetensors")).unlink(missing_ok=True)
        return state_path


@torch.no_grad()
def _copy_into(leaves: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor]) -> None:
    """Overwrite the trained tensors in place (the optimiser holds them) with ``vectors``."""
    for key, leaf in leaves.items():
        leaf.copy_(vectors[key])


def _grad_scaler(device: torch.device) -> torch.cuda.amp.GradScaler:
    # torch >= 2.3 has the device-generic class (CUDA and CPU); 2.1 (the WebUI's pin) only the CUDA one.
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def _adamw_has_fused() -> bool:
    return "fused" in inspect.signature(torch.optim.AdamW).parameters


def _no_gradient_message(key: str) -> str:
    return (
        f"the '{key}' vectors received no gradient: the host did not connect them to the loss "
        "(for SDXL in the WebUI its text embedders must be trainable during the step). Nothing was trained."
    )


def train(config: TrainConfig, host: Host, callbacks: Callbacks | None = None) -> TrainResult:
    """Train an embedding as ``config`` says on ``host``; see :class:`Trainer`."""
    return Trainer(config, host, callbacks).run()


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's ``OutOfMemoryError`` (a RuntimeError) or the plain RuntimeError other backends raise."""
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
