"""The trainer: trainable vectors + AdamW + the denoising loss, against any ``Host``.

A run is prepared once, then trained on its model::

    prepared = prepare_run(config)                  # checks, reads the images (decoded once), the output rules
    result = Trainer(prepared, host, callbacks).run()

``Trainer`` composes parts with one job each: ``preflight`` (inputs, output rules, device and precision, resume
compatibility), ``objective`` (latent cache, batches, the loss), ``step`` (accumulation, clipping, grad scaler,
AdamW, norm band, the data-parallel sum), ``scoring`` (held-out score, early stop, best-word, starts), ``run_log``
(loss.csv, smoothing, reports, NaN checks) and ``outputs`` (files, cards, leftovers, failure messages); ``loop``
runs the steps. A save needs only the vectors, the optimiser state, the grad-scaler state and the step: every
random draw comes from ``(seed, micro-batch index)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..atomic_write import write_atomically
from ..config import TrainConfig
from ..dataset import ScanResult, TrainingSet
from ..host import Host
from ..initialization import SD1_TABLE_SCALE, prompt_word_norm, table_scale
from ..templates import AUTO_TEMPLATE, PromptBuilder
from .events import Callbacks, Progress, TrainResult
from .loop import RunLoop
from .objective import Objective
from .outputs import Outputs, remove_leftovers
from .preflight import (
    COMPUTE_DTYPES,
    RESUMABLE_CHANGES,
    Placement,
    PreparedRun,
    check_output_free,
    check_outputs,
    fp16_supported_on,
    output_path,
    plan_on_model,
    prepare_run,
    resolve_device,
    resolve_precision,
    run_warnings,
)
from .run_log import LOSS_LOG_COLUMNS, RunLog
from .scoring import EVAL_BATCHES, EVAL_SEED, Scoring, initial_vectors, prompt_words
from .step import Stepper

__all__ = [
    "COMPUTE_DTYPES",
    "EVAL_BATCHES",
    "EVAL_SEED",
    "LOSS_LOG_COLUMNS",
    "REPORT_INTERVAL_S",
    "RESUMABLE_CHANGES",
    "Callbacks",
    "Placement",
    "PreparedRun",
    "Progress",
    "TrainResult",
    "Trainer",
    "check_output_free",
    "fp16_supported_on",
    "output_path",
    "prepare_run",
    "resolve_device",
    "resolve_precision",
    "train",
]

#: Losses stay on the device between reports; a report (one transfer: a device synchronisation on CUDA) comes at
#: most this often, and at every save, stop and the end. (Read when a run starts.)
REPORT_INTERVAL_S = 0.25


class Trainer:
    """One training run: ``Trainer(prepare_run(config), host, callbacks).run()`` returns a :class:`TrainResult`.

    Building it resolves the prepared run on the model (resolution, device and precision, a resumed run's
    compatibility), makes the initial vectors, warns about what is questionable and applies the output rules; it
    reads no image again. ``run`` may be called again (a benchmark re-times a run); each call trains from
    ``vectors`` anew, reusing the latent cache.
    """

    def __init__(self, prepared: PreparedRun, host: Host, callbacks: Callbacks | None = None):
        self.prepared = prepared
        self.host = host
        self.callbacks = callbacks = callbacks or Callbacks()
        self.processes = prepared.processes
        self.plan = plan = plan_on_model(prepared, host)
        self.config = c = plan.config
        if c.template.strip() == AUTO_TEMPLATE:
            why = "every image has" if self.prompts.uses_filewords else "not every image has"
            callbacks.status(f"template auto: {self.prompts.template} ({why} a caption file)")
        self.data = TrainingSet(
            self.scan.records,
            resolution=c.resolution,
            buckets=c.buckets,
            crop=c.crop,
            flip=c.flip,
            repeats=c.repeats,
            use_alpha_mask=c.use_alpha_mask,
            decoded=self.scan.pixels,  # what the scan decoded: each image is decoded once per run
        )
        self.objective = Objective(c, host, self.data, self.prompts, self.precision, self.processes, callbacks)
        self.warnings = run_warnings(prepared, host)
        for text in self.warnings:
            callbacks.warn(text)
        # lr_scale table: each encoder's rate is scaled by its table's typical coordinate, SD1's being 1x.
        self.lr_factors = {
            e.key: table_scale(host, e.key) / SD1_TABLE_SCALE if c.lr_scale == "table" else 1.0 for e in host.encoders
        }
        # norm_band's centre: the median length of the words the prompts use (a small model's table is mostly
        # rows no caption ever trained, shorter than its real words; in a large model the two agree).
        words = self._prompt_words() if c.norm_band else []
        self.word_norms = {e.key: prompt_word_norm(host, e.key, words) for e in host.encoders} if c.norm_band else {}
        self.vectors, base_step = initial_vectors(c, host, plan.resume)
        self.initial_vectors = self.vectors  # what training starts from (best-word replaces it when the run starts)
        self.scoring = Scoring(c, self.objective, callbacks)
        self.outputs = Outputs(
            c, host, self.run_dir, self.output_path, base_step, self.processes, callbacks, self.scoring.notes
        )
        if self.processes.writes_files:  # the others would race process 0 for the same files
            remove_leftovers(c, self.run_dir, self.output_path)  # a killed run's files, before the folders are judged
            check_outputs(plan)
        self.stepper: Stepper | None = None  # the last run's vectors, optimiser and grad scaler

    # -- what the parts decided -----------------------------------------------------------------------------------
    @property
    def scan(self) -> ScanResult:
        return self.prepared.scan

    @property
    def prompts(self) -> PromptBuilder:
        return self.prepared.prompts

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    @property
    def output_path(self) -> Path:
        return self.plan.output_path

    @property
    def start_step(self) -> int:
        return self.plan.start_step

    @property
    def device(self) -> torch.device:
        return self.host.device

    @property
    def precision(self) -> str:
        return self.plan.placement.precision

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def scores(self) -> dict[int, float]:
        return self.scoring.scores

    @property
    def scaler(self) -> torch.cuda.amp.GradScaler | None:
        return self.stepper.scaler if self.stepper else None

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def _prompt_words(self) -> list[str]:
        return prompt_words(self.prompts, [record.caption for record in self.scan.records])

    def describe(self) -> str:
        """The run header: what will happen, stated before it happens."""
        c = self.config
        widths = " + ".join(f"{e.key} {e.width}" for e in self.host.encoders)
        size = f"{self.resolution}px" + (" (the model's own)" if self.plan.native_resolution else "")
        size += " with aspect buckets" if c.buckets else f", {c.crop} crop"
        latents = f"cached ({c.latent_sampling})" if self.data.cacheable else "encoded every step (random crop)"
        lr = c.learning_rate if self.prepared.lr_schedule.is_piecewise else f"{c.learning_rate} {c.lr_scheduler}"
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
        processes = self.processes
        lines = [
            f"Training '{c.name}' on {self.host.model_name or 'the model'} ({self.host.family}, "
            f"{self.host.prediction_type})",
            f"  images:    {len(self.scan.records)} from {c.images}"
            + (f" ({len(self.scan.problems)} skipped)" if self.scan.problems else "")
            + f", x{c.repeats} repeats, {size}, latents {latents}",
            f"  vectors:   {self.num_vectors} x ({widths}), init {init}"
            + (f", length within x{c.norm_band:g} of the prompt words' median" if c.norm_band else ""),
            f"  steps:     {c.max_steps} (from {self.start_step}), batch {c.batch_size} x {c.grad_accum} accumulation,"
            f" {self.objective.batches_per_epoch} batches per epoch",
            f"  optimiser: AdamW lr {lr}" + (f", warm-up {c.lr_warmup_steps}" if c.lr_warmup_steps else ""),
            f"  scoring:   {scoring}",
            f"  device:    {self.device}, {self.precision}"
            + (
                f", data-parallel over {processes.world_size} processes (each takes its share of every batch)"
                if processes.distributed
                else ""
            )
            + (", gradient checkpointing" if c.gradient_checkpointing else "")
            + (", VAE in RAM after caching" if c.vae_to_cpu else ""),
            f"  output:    {self.output_path} (run folder {self.run_dir})",
        ]
        lines.extend(f"  warning:   {text}" for text in self.warnings)
        return "\n".join(lines)

    # -- running ------------------------------------------------------------------------------------------------
    def held_out_loss(
        self, vectors: dict[str, torch.Tensor], batches: int = EVAL_BATCHES, seed: int = EVAL_SEED
    ) -> float:
        """Mean loss of ``vectors`` over fixed micro-batches drawn with ``seed`` (not the training seed).

        The same seed gives the same images, prompts, noise and timesteps, so two vector sets compare fairly.
        """
        with self.host.training_session(False):
            self.objective.fill_cache()
            leaves = {k: v.to(self.device, torch.float32) for k, v in vectors.items()}
            return self.objective.held_out_loss(leaves, batches, seed)

    def run(self) -> TrainResult:
        c, plan, writes_files = self.config, self.plan, self.processes.writes_files
        if writes_files:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(
                self.run_dir / "config.json", lambda f: f.write(c.to_json().encode("utf-8")), overwrite=True
            )
        resume = plan.resume
        self.stepper = stepper = Stepper(
            c,
            self.objective,
            self.vectors,
            self.prepared.lr_schedule,
            self.lr_factors,
            self.word_norms,
            self.precision,
            self.processes,
            REPORT_INTERVAL_S,
            self.start_step,
            resume.tensors if resume else None,
        )
        if resume is not None:
            self.callbacks.status(f"resuming at step {self.start_step} from {resume.path}")
        started = time.perf_counter()
        log = RunLog(
            c,
            self.run_dir,
            self.start_step,
            self.objective.batches_per_epoch,
            stepper.leaves,
            writes_files,
            self.callbacks,
        )
        loop = RunLoop(
            c,
            self.host,
            self.objective,
            self.scoring,
            stepper,
            log,
            self.outputs,
            self.callbacks,
            self.processes,
            self.start_step,
            self._prompt_words() if c.init_mode == "best-word" else [],
        )
        try:
            stopped = loop.run()
        finally:
            self.initial_vectors = loop.initial_vectors or self.initial_vectors
        step, extra = loop.step, []
        if stopped or step < c.max_steps:
            # A stopped run can be resumed: keep its full state beside the embedding.
            extra.append(self.outputs.save_intermediate(step, log.good_vectors, stepper.optimizer, stepper.scaler))
        final, final_step = self.scoring.final(log.good_vectors, step)
        path, files = self.outputs.write_result(final, final_step, step, plan.replaces_output)
        self.vectors = {k: v.cpu() for k, v in final.items()}
        return TrainResult(
            embedding_path=path,
            run_dir=self.run_dir,
            steps=step,
            embedding_step=self.outputs.base_step + step,
            final_loss=log.last_loss,
            smoothed_loss=log.smoothed,
            elapsed_s=time.perf_counter() - started,
            stopped=stopped,
            extra_paths=extra + files,
            resolution=self.resolution,
            cpu_threads=loop.tuner.setup,
            vectors_step=final_step,
            held_out_loss=self.scores.get(final_step),
            early_stopped=self.scoring.early_stopped,
            init_choice=self.scoring.init_choice,
            start_scores=list(self.scoring.start_scores),
            chosen_start=self.scoring.chosen_start,
        )


def train(config: TrainConfig, host: Host, callbacks: Callbacks | None = None) -> TrainResult:
    """Train an embedding as ``config`` says on ``host``: prepare the run, then train it (see :class:`Trainer`)."""
    return Trainer(prepare_run(config), host, callbacks).run()
