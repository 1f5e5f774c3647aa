"""The run log: each step's loss, the smoothed loss and the rate in ``loss.csv`` and to ``on_progress``, reported in
bursts (one transfer from the device per report), with the NaN/inf checks that decide which vectors are good."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic_write import write_atomically
from ..config import TrainConfig
from ..errors import TrainingError
from .events import Callbacks, Progress

#: The columns of a run's ``loss.csv``.
LOSS_LOG_COLUMNS = ["step", "loss", "smoothed_loss", "learning_rate", "elapsed_s"]


@dataclass
class PendingStep:
    """A step whose loss is still on the device (not yet reported)."""

    step: int
    loss: torch.Tensor
    learning_rate: float
    elapsed_s: float


class RunLog:
    """One run's ``loss.csv`` (opened for appending; a resume first drops the rows past its step, as a resume from an
    earlier save repeats those steps, and continues the elapsed time and smoothed loss of the rows it keeps), the
    progress reports, and the last good vectors (those of the last report that found the loss and vectors finite).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        start_step: int,
        batches_per_epoch: int,
        vectors: dict[str, torch.Tensor],
        writes_files: bool,
        callbacks: Callbacks,
    ):
        self.config = config
        self.start_step = start_step
        self.batches_per_epoch = batches_per_epoch
        self.callbacks = callbacks
        self.writes_files = writes_files
        # Device-side copies: no transfer to the CPU (a sync on CUDA) until a file is written.
        self.good_vectors = {k: v.detach().clone() for k, v in vectors.items()}
        self.good_step = start_step
        self.ema_weight = 0.0
        self.smoothed = self.last_loss = float("nan")
        self.elapsed_before = 0.0  # a resumed run's time before it
        self.other_starts_steps = 0  # steps the starts not chosen trained (for the speed and the ETA)
        if writes_files:
            self.file = self._open(run_dir / "loss.csv")
        else:  # process 0 keeps the log
            self.file = open(os.devnull, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed by the run
        self.writer = csv.writer(self.file)

    def _open(self, path: Path) -> Any:
        kept: list[list[str]] = []
        if self.config.resume and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            for row in rows[1:]:
                with contextlib.suppress(ValueError, IndexError):
                    if int(row[0]) <= self.start_step and len(row) == len(LOSS_LOG_COLUMNS):
                        kept.append(row)
            if kept:
                self.elapsed_before = float(kept[-1][4])
                self.smoothed = float(kept[-1][2])
                self.ema_weight = 1.0 - 0.98 ** len(kept)
        text = io.StringIO()
        csv.writer(text).writerows([LOSS_LOG_COLUMNS, *kept])
        write_atomically(path, lambda f: f.write(text.getvalue().encode("utf-8")), overwrite=True)
        return open(path, "a", newline="", encoding="utf-8")

    def keep_good(self, vectors: dict[str, torch.Tensor]) -> None:
        """``vectors`` are good as they are (the run's starting vectors)."""
        self.good_vectors = {k: v.detach().clone() for k, v in vectors.items()}

    def sync(self) -> None:
        """The rows so far survive a kill (called at saves, as the save does)."""
        if self.writes_files and not self.file.closed:  # (the others log to os.devnull, which cannot fsync)
            self.file.flush()
            os.fsync(self.file.fileno())

    def report(self, pending: list[PendingStep], vectors: dict[str, torch.Tensor]) -> None:
        """Hand the pending steps' losses to the host in one transfer, check them and the vectors, log them.

        On success the vectors become the last good ones. A NaN/inf loss or vector raises ``TrainingError`` naming
        the first bad step; the last good vectors are those of the previous report.
        """
        if not pending:
            return
        finite = torch.stack([torch.isfinite(v).all() for v in vectors.values()]).all()
        values = torch.cat([torch.stack([p.loss.float() for p in pending]), finite.float().reshape(1)]).tolist()
        losses, vectors_finite = values[:-1], values[-1] == 1.0
        first = pending[0].step
        for entry, loss in zip(pending, losses):
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss} at step {entry.step}; the last good vectors (step {self.good_step}) "
                    "are kept. Lower the learning rate, use fp32 or bf16, or check the images"
                )
        if not vectors_finite:
            raise TrainingError(
                f"the vectors became NaN/inf between steps {first} and {pending[-1].step}; the last good vectors "
                f"(step {self.good_step}) are kept. Lower the learning rate or enable gradient clipping"
            )
        self.good_vectors = {k: v.detach().clone() for k, v in vectors.items()}
        self.good_step = pending[-1].step
        c = self.config
        for entry, loss in zip(pending, losses):
            # Exponential moving average with bias correction, so early values are not pulled to 0.
            self.ema_weight = 0.98 * self.ema_weight + 0.02
            smoothed = loss if math.isnan(self.smoothed) else self.smoothed  # a resume continues its run's
            self.smoothed = smoothed + (loss - smoothed) * 0.02 / self.ema_weight
            self.last_loss = loss
            self.writer.writerow(
                [
                    entry.step,
                    f"{loss:.6g}",
                    f"{self.smoothed:.6g}",
                    f"{entry.learning_rate:.6g}",
                    f"{self.elapsed_before + entry.elapsed_s:.3f}",
                ]
            )
            if self.callbacks.on_progress:
                done = entry.step - self.start_step + self.other_starts_steps
                it_per_s = done / entry.elapsed_s if entry.elapsed_s > 0 else 0.0
                self.callbacks.on_progress(
                    Progress(
                        step=entry.step,
                        total_steps=c.max_steps,
                        epoch=(entry.step * c.grad_accum) // self.batches_per_epoch,
                        loss=loss,
                        smoothed_loss=self.smoothed,
                        learning_rate=entry.learning_rate,
                        it_per_s=it_per_s,
                        eta_s=(c.max_steps - entry.step) / it_per_s if it_per_s else float("inf"),
                        elapsed_s=entry.elapsed_s,
                    )
                )
        pending.clear()
        self.file.flush()  # a kill loses at most the rows since the last report
