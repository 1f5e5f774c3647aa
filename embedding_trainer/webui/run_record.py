"""The record of one run, from queued to finished, stopped or failed, and its JSON shape.

``RunRecord.to_dict`` is what ``GET /embtrain/v1/runs/{id}`` answers (the API adds the preview URLs) and what the tab
shows. The record takes no lock of its own: ``RunManager`` changes it only under its lock, through the methods here
that turn the trainer's reports (progress, result, error) into the record's fields.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import TrainConfig
from ..errors import EmbeddingTrainerError
from ..host import Host
from ..trainer import Progress, TrainResult
from .run_options import PreviewOptions

#: Loss points kept per run (the newest); enough for a chart, bounded for long runs.
LOSS_HISTORY_POINTS = 2000
STATES = ("queued", "running", "finished", "stopped", "failed")
ACTIVE_STATES = frozenset({"queued", "running"})


@dataclass
class RunRecord:
    """Everything known about one run. Mutated only under the manager's lock."""

    id: str
    config: TrainConfig
    preview: PreviewOptions = field(default_factory=PreviewOptions)
    state: str = "queued"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    learning_rate: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    status_text: str = "queued: waiting for the GPU"
    error: str | None = None
    error_type: str | None = None
    error_field: str | None = None
    result: dict[str, Any] | None = None
    model: dict[str, Any] | None = None  # what the run trains on: name, family, prediction type, encoders
    previews: list[tuple[int, str]] = field(default_factory=list)  # (step, image file)
    warnings: list[str] = field(default_factory=list)
    loss_history: deque[tuple[int, float, float]] = field(default_factory=lambda: deque(maxlen=LOSS_HISTORY_POINTS))
    stop_requested: bool = False
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    task_id: str | None = None  # the WebUI task that started it (the tab's page follows its own run by this id)
    cpu_threads: str | None = None  # the CPU thread setup of the run's loop, and why (None: not decided yet)
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out score), ``eval_every``
    ended: threading.Event = field(default_factory=threading.Event, repr=False)  # set once the run is over

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self, history: bool = True) -> dict[str, Any]:
        """A JSON-ready copy (non-finite numbers become ``None``); ``history`` adds the loss points."""
        end = self.finished_at if self.finished_at is not None else time.time()
        data: dict[str, Any] = {
            "id": self.id,
            "name": self.config.name,
            "state": self.state,
            "active": self.active,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "loss": self.loss,
            "smoothed_loss": self.smoothed_loss,
            "learning_rate": self.learning_rate,
            "it_per_s": self.it_per_s,
            "eta_s": self.eta_s,
            "elapsed_s": end - self.started_at if self.started_at is not None else None,
            "status_text": self.status_text,
            "error": self.error,
            "error_type": self.error_type,
            "error_field": self.error_field,
            "result": dict(self.result) if self.result is not None else None,
            "model": dict(self.model) if self.model is not None else None,
            "previews": [path for _, path in self.previews],
            "preview_at_steps": [step for step, _ in self.previews],
            **self.preview.to_dict(),
            "warnings": list(self.warnings),
            "resolution": self.config.resolution or None,  # 0 until the run has resolved the checkpoint's own
            "task_id": self.task_id,
            "cpu_threads": self.cpu_threads,
            "held_out_loss": self.evaluations[-1][1] if self.evaluations else None,
            "stop_requested": self.stop_requested,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "config": self.config.to_dict(),
        }
        if history:
            data["loss_history"] = [list(point) for point in self.loss_history]
            data["held_out_history"] = [list(point) for point in self.evaluations]
        return _json_safe(data)

    def apply_progress(self, progress: Progress, text: str) -> None:
        """Take a progress report; ``text`` becomes the status unless a stop is under way (its text stays)."""
        self.step = progress.step
        self.total_steps = progress.total_steps
        self.epoch = progress.epoch
        self.loss = progress.loss
        self.smoothed_loss = progress.smoothed_loss
        self.learning_rate = progress.learning_rate
        self.it_per_s = progress.it_per_s
        self.eta_s = progress.eta_s
        self.loss_history.append((progress.step, progress.loss, progress.smoothed_loss))
        if not self.stop_requested:
            self.status_text = text

    def last_progress(self) -> Progress:
        """The last report's numbers (NaN before the first), for the host's progress bar when only the text changes."""
        return Progress(
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch,
            loss=_number(self.loss),
            smoothed_loss=_number(self.smoothed_loss),
            learning_rate=_number(self.learning_rate),
            it_per_s=self.it_per_s or 0.0,
            eta_s=_number(self.eta_s),
            elapsed_s=time.time() - (self.started_at or time.time()),
        )

    def finish(self, result: TrainResult) -> None:
        """Record the run's result: finished, or stopped (on request, or early when the held-out score stalled)."""
        self.result = {
            "embedding_path": str(result.embedding_path),
            "run_dir": str(result.run_dir),
            "steps": result.steps,
            "embedding_step": result.embedding_step,
            "final_loss": result.final_loss,
            "smoothed_loss": result.smoothed_loss,
            "elapsed_s": result.elapsed_s,
            "stopped": result.stopped,
            "early_stopped": result.early_stopped,
            "vectors_step": result.vectors_step,  # the run step whose vectors the file holds
            "held_out_loss": result.held_out_loss,  # their held-out score
            "init_choice": result.init_choice,
            "start_scores": result.start_scores,  # ``starts``: each start's held-out score
            "chosen_start": result.chosen_start,  # the one carried on (1-based; 0: one start)
            "extra_paths": [str(p) for p in result.extra_paths],
        }
        self.step = result.steps
        self.cpu_threads = result.cpu_threads.describe() if result.cpu_threads else None
        self.state = "stopped" if result.stopped else "finished"
        verb = "stopped at" if result.stopped else "finished after"
        if result.early_stopped:
            verb = "stopped early (the held-out score stopped improving) after"
        self.status_text = f"{verb} step {result.steps}; saved {result.embedding_path}"
        if result.vectors_step != result.steps:
            self.status_text += f" (step {result.vectors_step}'s vectors: the best held-out score)"
        self.finished_at = time.time()

    def fail(self, error: BaseException) -> None:
        """Record ``error`` as what ended the run (its field, for a config or dataset error)."""
        text = f"{type(error).__name__}: {error}"
        self.state = "failed"
        self.error = text
        self.error_type = type(error).__name__
        self.error_field = getattr(error, "field", None) if isinstance(error, EmbeddingTrainerError) else None
        self.status_text = f"failed: {text}"
        self.finished_at = time.time()


def describe_model(host: Host) -> dict[str, Any]:
    """A record's ``model``: what the run trains on."""
    return {
        "name": host.model_name,
        "family": host.family,
        "prediction_type": host.prediction_type,
        "encoders": {e.key: e.width for e in host.encoders},
    }


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def _json_safe(value: Any) -> Any:
    """Non-finite floats become ``None`` (JSON has no NaN or infinity); containers are copied."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
