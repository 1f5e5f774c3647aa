"""What a run tells its caller: the hooks it calls (``Callbacks``), the progress it reports and the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cpu_threads import ThreadSetup
from ..log import logger


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

    def status(self, text: str) -> None:
        """A phase of the run: logged, and passed to ``on_status``."""
        logger.info(text)
        if self.on_status:
            self.on_status(text)

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the run (also in ``warnings`` and the header)."""
        if self.on_warning:
            self.on_warning(text)
