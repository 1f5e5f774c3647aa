"""Training runs inside the WebUI process: one at a time, each recorded from queued to finished, stopped or failed.

``RunManager`` owns the runs. Everything it needs from the host comes in through its constructor (the model
adapter, the GPU queue lock, the progress bar / Interrupt bridge, previews), so tests pass stand-ins and this
module never imports the WebUI. Every error a run meets is kept on its record (``state`` ``failed`` and an
``error`` text), so the API and the tab show it; nothing is reported only on the console.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from ..config import TrainConfig, field_kind
from ..errors import ConfigError, EmbeddingTrainerError
from ..host import Host
from ..log import format_duration, logger
from ..trainer import Callbacks, PreparedRun, Progress, Trainer, TrainResult, prepare_run

T = TypeVar("T")

#: Loss points kept per run (the newest); enough for a chart, bounded for long runs.
LOSS_HISTORY_POINTS = 2000
#: Finished runs kept in memory (the newest).
HISTORY_RUNS = 50
STATES = ("queued", "running", "finished", "stopped", "failed")
ACTIVE_STATES = frozenset({"queued", "running"})


@dataclass(frozen=True)
class PreviewOptions:
    """Preview images of a run: every ``every`` steps (0: none), one image of ``prompt`` with a fixed seed.

    An empty ``prompt`` means the first line of the run's template with the trigger in place. These are options of
    the run, not of the training, so they live beside ``TrainConfig`` rather than in it.
    """

    every: int = 0
    prompt: str = ""
    seed: int = 1
    steps: int = 20

    @classmethod
    def pop_from(cls, body: dict[str, Any]) -> PreviewOptions:
        """Take the ``preview_*`` keys out of a request body and validate them (``ConfigError`` names the key)."""
        values: dict[str, Any] = {}
        for option in RUN_OPTIONS:
            key = option["name"]
            if key not in body:
                continue
            value = body.pop(key)
            kind = option["type"]
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(key, f"{value!r} has type {type(value).__name__}; expected int")
            if kind == "str" and not isinstance(value, str):
                raise ConfigError(key, f"{value!r} has type {type(value).__name__}; expected str")
            if option["min"] is not None and value < option["min"]:
                raise ConfigError(key, f"{value!r} is below the minimum {option['min']}")
            if option["max"] is not None and value > option["max"]:
                raise ConfigError(key, f"{value!r} is above the maximum {option['max']}")
            values[key.removeprefix("preview_")] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f"preview_{k}": v for k, v in self.__dict__.items()}


def _run_option(
    name: str, kind: str, default: Any, text: str, minimum: int | None, maximum: int | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "default": default,
        "help": text,
        "choices": None,
        "min": minimum,
        "max": maximum,
        "min_exclusive": None,
        "accepts_number": False,
    }


#: Options of a run that are not part of ``TrainConfig`` (described like its fields, for forms and the API).
RUN_OPTIONS: tuple[dict[str, Any], ...] = (
    _run_option("preview_every", "int", 0, "Render a preview image every N steps (0: off).", 0),
    _run_option(
        "preview_prompt", "str", "", "Prompt of the previews; empty: the template's first line with the trigger.", None
    ),
    _run_option("preview_seed", "int", 1, "Seed of the previews (the same for every preview of a run).", 0, 2**32 - 1),
    _run_option("preview_steps", "int", 20, "Sampling steps of each preview.", 1, 150),
)


class StateBridge(Protocol):
    """Mirrors a run onto the host's job state (the WebUI's ``shared.state``: progress bar, Interrupt button)."""

    def begin(self, job_id: str, total_steps: int) -> None: ...

    def update(self, progress: Progress, text: str) -> None: ...

    def end(self) -> None: ...

    def interrupted(self) -> bool: ...


#: ``launch(work)`` calls ``work()`` (a whole run) on some worker thread and returns at once.
Launcher = Callable[[Callable[[], None]], None]


def new_thread_launcher(name: str) -> Launcher:
    """A launcher that gives each run a new daemon thread (when the caller has no worker threads of its own)."""

    def launch(work: Callable[[], None]) -> None:
        threading.Thread(target=work, name=name, daemon=True).start()

    return launch


#: ``preview(record, step)`` renders the run's preview images with its vectors as they are now and returns the
#: files it wrote.
PreviewFn = Callable[["RunRecord", int], list[Path]]


class RunActiveError(EmbeddingTrainerError):
    """A run was started while another one is queued or running."""

    def __init__(self, active_id: str):
        self.active_id = active_id
        super().__init__(f"training run {active_id} is still active; stop it or wait until it ends")


class RunNotFoundError(EmbeddingTrainerError, LookupError):
    """No run with this id (never started, or dropped from the bounded history)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no training run with id {job_id!r}")


class RunNotActiveError(EmbeddingTrainerError):
    """A stop was asked for a run that has already ended, or when no run is active."""


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


class RunManager:
    """Starts, tracks and stops training runs; at most one is active (queued or running) at a time.

    ``make_host(config)`` returns the host adapter for the loaded model (it may raise ``HostError``).
    ``run_exclusively(fn)`` calls ``fn`` while holding the host's GPU queue lock. ``state_bridge`` mirrors the
    run onto the host's progress state. ``on_finished(record, outcome)`` is called once when a run ends, with its
    ``TrainResult``, the exception that ended it, or None if it never ran; it runs inside the exclusive section
    and before the record shows the run as ended.
    ``preview(record, step)`` renders preview images (see ``PreviewFn``).
    ``config_defaults(fields)`` fills host-specific defaults (output folder, run folder) into a dict body
    before it is validated; fields the caller gave are kept.
    """

    def __init__(
        self,
        make_host: Callable[[TrainConfig], Host],
        run_exclusively: Callable[[Callable[[], T]], T],
        state_bridge: StateBridge | None = None,
        on_finished: Callable[[RunRecord, TrainResult | Exception | None], None] | None = None,
        preview: PreviewFn | None = None,
        *,
        history_limit: int = HISTORY_RUNS,
        config_defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        self._make_host = make_host
        self._run_exclusively = run_exclusively
        self._bridge = state_bridge
        self._on_finished = on_finished
        self._preview = preview
        self._config_defaults = config_defaults
        self._history_limit = max(1, history_limit)
        self._lock = threading.RLock()
        self._records: OrderedDict[str, RunRecord] = OrderedDict()
        self._active: str | None = None
        self._finished_hooks: set[str] = set()  # runs whose on_finished was called

    # -- starting ------------------------------------------------------------------------------------------
    def start(
        self,
        config: TrainConfig | dict[str, Any],
        *,
        preview: PreviewOptions | None = None,
        launch: Launcher | None = None,
    ) -> str:
        """Validate ``config`` and run it in the background under ``run_exclusively``; returns the run id.

        ``launch`` picks the worker thread (default: a new one). A server should pass its own request workers:
        those are the threads that already ran the host's torch work, so the run reuses their CPU thread team
        rather than adding one that competes with it (see ``embedding_trainer.cpu_threads``).
        Raises ``ConfigError`` (naming the field) for an invalid config and ``RunActiveError`` while another run
        is active. Everything that goes wrong after this returns is reported on the run's record.
        """
        record, prepared = self._create(config, preview)
        launch = launch or new_thread_launcher(f"embtrain-run-{record.id}")
        try:
            launch(lambda: self._run(record, prepared, True))
        except BaseException as error:  # e.g. "can't start new thread"
            self._fail(record, error)
            self._finalize(record)
            raise
        return record.id

    def start_sync(
        self,
        config: TrainConfig | dict[str, Any],
        *,
        preview: PreviewOptions | None = None,
        exclusive: bool = False,
        task_id: str | None = None,
    ) -> dict[str, Any]:
        """Run ``config`` in the caller's thread and return the final :meth:`status`.

        For callers that already hold the GPU queue lock (the tab, inside ``wrap_gradio_gpu_call``), so by default
        it does NOT call ``run_exclusively`` (the WebUI's lock is not re-entrant); ``exclusive=True`` takes it.
        Validation errors and ``RunActiveError`` are raised; errors during the run end up in the status.
        ``task_id``: the caller's WebUI task, recorded so the page that started the run can find it.
        """
        record, prepared = self._create(config, preview, task_id)
        self._run(record, prepared, exclusive)
        return self.status(record.id)

    # -- control and queries -------------------------------------------------------------------------------
    @property
    def active_id(self) -> str | None:
        with self._lock:
            return self._active

    def stop(self, job_id: str | None = None) -> str:
        """Ask a run (default: the active one) to stop; it saves what it has trained. Returns the run's id.

        A queued run is marked stopped at once and never starts. Raises ``RunNotFoundError`` for an unknown id and
        ``RunNotActiveError`` when the run has already ended or no run is active.
        """
        with self._lock:
            if job_id is None:
                if self._active is None:
                    raise RunNotActiveError("no training run is active")
                job_id = self._active
            record = self._get(job_id)
            if not record.active:
                raise RunNotActiveError(f"training run {job_id} is not active (it {record.state})")
            record.stop_requested = True
            if record.state == "queued":
                record.state = "stopped"
                record.status_text = "stopped before it started"
                record.finished_at = time.time()
                if self._active == job_id:
                    self._active = None
            else:
                record.status_text = "stopping: saving what has been trained"
        logger.info("stop requested for run %s", job_id)
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        """Everything about one run, JSON-ready, with its loss history. Raises ``RunNotFoundError``."""
        with self._lock:
            return self._get(job_id).to_dict(history=True)

    def list_runs(self) -> list[dict[str, Any]]:
        """Every remembered run, newest first, without loss histories."""
        with self._lock:
            return [record.to_dict(history=False) for record in reversed(self._records.values())]

    def join(self, job_id: str, timeout: float | None = None) -> bool:
        """Wait until a run is over (its record final, its hooks called); True when it is."""
        with self._lock:
            record = self._get(job_id)
        return record.ended.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the active run and wait for it (for the host's reload/unload callbacks)."""
        active = self.active_id
        if active is None:
            return
        try:
            self.stop(active)
        except RunNotActiveError:
            pass
        self.join(active, timeout)

    # -- internals -----------------------------------------------------------------------------------------
    def _get(self, job_id: str) -> RunRecord:
        record = self._records.get(job_id)
        if record is None:
            raise RunNotFoundError(job_id)
        return record

    def _create(
        self, config: TrainConfig | dict[str, Any], preview: PreviewOptions | None, task_id: str | None = None
    ) -> tuple[RunRecord, PreparedRun]:
        if isinstance(config, TrainConfig):
            config = config.replace()  # a private, re-validated copy: later changes by the caller do not leak in
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(self._config_defaults(config) if self._config_defaults else config)
        else:
            raise ConfigError("config", f"expected a TrainConfig or an object of fields, got {type(config).__name__}")
        # Refuse at once rather than when the run starts; the images read here are not read again.
        prepared = prepare_run(config)
        preview = preview or PreviewOptions()
        if preview.every and self._preview is None:
            raise ConfigError("preview_every", "previews are not available here; use 0")
        with self._lock:
            if self._active is not None:
                raise RunActiveError(self._active)
            record = RunRecord(
                id=f"embtrain-{uuid.uuid4().hex[:12]}",
                config=config,
                preview=preview,
                total_steps=config.max_steps,
                task_id=task_id,
            )
            self._records[record.id] = record
            self._active = record.id
            self._trim()
        logger.info("run %s queued: '%s', %d steps", record.id, config.name, config.max_steps)
        return record, prepared

    def _trim(self) -> None:
        while len(self._records) > self._history_limit:
            oldest = next((k for k, r in self._records.items() if not r.active), None)
            if oldest is None:
                return
            del self._records[oldest]

    def _run(self, record: RunRecord, prepared: PreparedRun, exclusive: bool) -> None:
        try:
            if exclusive:
                self._run_exclusively(lambda: self._execute(record, prepared))
            else:
                self._execute(record, prepared)
        except BaseException as error:  # run_exclusively itself failed, or an interpreter exit
            self._fail(record, error)
            if not isinstance(error, Exception):
                raise
        finally:
            self._finalize(record)

    def _execute(self, record: RunRecord, prepared: PreparedRun) -> None:
        """The run itself, under the queue lock: never raises an ``Exception``, records it instead."""
        with self._lock:
            if record.state != "queued":  # stopped while it waited for the lock
                return
            record.state = "running"
            record.started_at = time.time()
            record.status_text = "loading the model"
        bridge = self._bridge
        outcome: TrainResult | Exception
        try:
            if bridge is not None:
                bridge.begin(record.id, record.total_steps)
            host = self._make_host(record.config)
            with self._lock:
                record.model = describe_model(host)
            prepared = prepared.recheck()  # the files may have changed while it waited: a stat each, no decoding
            trainer = Trainer(prepared, host, self._callbacks(record))
            with self._lock:
                record.config = trainer.config  # with what the run resolved (the checkpoint's resolution)
            outcome = trainer.run()
        except Exception as error:
            outcome = error
        # Still inside the exclusive section (the queue lock, for the WebUI): the hook publishes the result without
        # a generation interleaving (and must not take the non-re-entrant lock itself). Clients see the run end
        # only after that and after the host's job state has ended.
        self._after(record, outcome)
        if bridge is not None:
            try:
                bridge.end()
            except Exception as error:
                self._warn(record, f"the host's job state could not be ended: {type(error).__name__}: {error}")
        if isinstance(outcome, Exception):
            self._fail(record, outcome)
        else:
            self._succeed(record, outcome)

    def _callbacks(self, record: RunRecord) -> Callbacks:
        bridge = self._bridge

        def on_progress(progress: Progress) -> None:
            text = progress_text(progress)
            with self._lock:
                record.step = progress.step
                record.total_steps = progress.total_steps
                record.epoch = progress.epoch
                record.loss = progress.loss
                record.smoothed_loss = progress.smoothed_loss
                record.learning_rate = progress.learning_rate
                record.it_per_s = progress.it_per_s
                record.eta_s = progress.eta_s
                record.loss_history.append((progress.step, progress.loss, progress.smoothed_loss))
                if not record.stop_requested:
                    record.status_text = text
            if bridge is not None:
                bridge.update(progress, text)

        def on_status(text: str) -> None:
            with self._lock:
                record.status_text = text
                progress = Progress(
                    step=record.step,
                    total_steps=record.total_steps,
                    epoch=record.epoch,
                    loss=_number(record.loss),
                    smoothed_loss=_number(record.smoothed_loss),
                    learning_rate=_number(record.learning_rate),
                    it_per_s=record.it_per_s or 0.0,
                    eta_s=_number(record.eta_s),
                    elapsed_s=time.time() - (record.started_at or time.time()),
                )
            if bridge is not None:
                bridge.update(progress, text)

        def should_stop() -> bool:
            if bridge is not None and bridge.interrupted():
                with self._lock:
                    record.stop_requested = True
            return record.stop_requested

        def on_step(step: int, vectors: dict[str, torch.Tensor]) -> None:
            every = record.preview.every
            if self._preview is None or not every or step % every:
                return
            try:
                paths = self._preview(record, step)
            except Exception as error:  # a failed preview must not cost the run
                self._warn(record, f"preview at step {step} failed: {type(error).__name__}: {error}")
                return
            with self._lock:
                record.previews.extend((step, str(Path(p))) for p in paths)

        def on_evaluation(step: int, score: float) -> None:
            with self._lock:
                record.evaluations.append((step, score))

        return Callbacks(
            on_progress=on_progress,
            on_status=on_status,
            on_warning=lambda text: self._warn(record, text),
            on_evaluation=on_evaluation,
            on_step=on_step,
            should_stop=should_stop,
        )

    def _succeed(self, record: RunRecord, result: TrainResult) -> None:
        with self._lock:
            record.result = {
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
            record.step = result.steps
            record.cpu_threads = result.cpu_threads.describe() if result.cpu_threads else None
            record.state = "stopped" if result.stopped else "finished"
            verb = "stopped at" if result.stopped else "finished after"
            if result.early_stopped:
                verb = "stopped early (the held-out score stopped improving) after"
            record.status_text = f"{verb} step {result.steps}; saved {result.embedding_path}"
            if result.vectors_step != result.steps:
                record.status_text += f" (step {result.vectors_step}'s vectors: the best held-out score)"
            record.finished_at = time.time()
        logger.info("run %s %s", record.id, record.status_text)

    def _fail(self, record: RunRecord, error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}"
        with self._lock:
            if not record.active:  # already recorded (or stopped while queued)
                return
            record.state = "failed"
            record.error = text
            record.error_type = type(error).__name__
            record.error_field = getattr(error, "field", None) if isinstance(error, EmbeddingTrainerError) else None
            record.status_text = f"failed: {text}"
            record.finished_at = time.time()
        expected = isinstance(error, EmbeddingTrainerError) and (
            error.__cause__ is None or isinstance(error.__cause__, EmbeddingTrainerError)
        )
        # A user's mistake needs its message only; anything else keeps its traceback for a bug report.
        logger.error("run %s failed: %s", record.id, text, exc_info=None if expected else error)

    def _warn(self, record: RunRecord, text: str) -> None:
        logger.warning("run %s: %s", record.id, text)
        with self._lock:
            record.warnings.append(text)

    def _finalize(self, record: RunRecord) -> None:
        with self._lock:
            if record.active:  # cannot happen unless a stand-in swallowed the call: never leave it hanging
                record.state = "failed"
                record.error = record.error or "RuntimeError: the run ended without running (run_exclusively returned)"
                record.error_type = record.error_type or "RuntimeError"
                record.status_text = f"failed: {record.error}"
            if record.finished_at is None:
                record.finished_at = time.time()
            if self._active == record.id:
                self._active = None
        self._after(record, None)  # a run that never executed (stopped while queued, lock failure)
        with self._lock:
            self._finished_hooks.discard(record.id)
        record.ended.set()

    def _after(self, record: RunRecord, outcome: TrainResult | Exception | None) -> None:
        """Call ``on_finished`` once per run."""
        with self._lock:
            if self._on_finished is None or record.id in self._finished_hooks:
                return
            self._finished_hooks.add(record.id)
        try:
            self._on_finished(record, outcome)
        except Exception as error:
            self._warn(record, f"after the run: {type(error).__name__}: {error}")


def describe_model(host: Host) -> dict[str, Any]:
    return {
        "name": host.model_name,
        "family": host.family,
        "prediction_type": host.prediction_type,
        "encoders": {e.key: e.width for e in host.encoders},
    }


def progress_text(progress: Progress) -> str:
    """One line for the host's progress text: step, loss, speed and time left."""
    eta = format_duration(progress.eta_s)
    return (
        f"step {progress.step}/{progress.total_steps}, loss {progress.loss:.4g} "
        f"(smoothed {progress.smoothed_loss:.4g}), {progress.it_per_s:.2f} it/s, {eta} left"
    )


def config_schema() -> dict[str, Any]:
    """Every ``TrainConfig`` field (name, type, default, help, choices, limits) and the run options, JSON-ready.

    ``accepts_number``: the field is a string that also takes a number (``learning_rate``). ``min_exclusive``: the
    value must be greater than this. ``required``: fields that must be set before a run starts.
    """
    fields = []
    for f in TrainConfig.fields():
        meta = f.metadata
        fields.append(
            {
                "name": f.name,
                "type": field_kind(f),
                "default": f.default,
                "help": meta.get("help", ""),
                "choices": list(meta["choices"]) if meta.get("choices") else None,
                "min": meta.get("min"),
                "max": meta.get("max"),
                "min_exclusive": meta.get("min_exclusive"),
                "accepts_number": bool(meta.get("accepts_number", False)),
            }
        )
    return {"fields": fields, "run_options": [dict(o) for o in RUN_OPTIONS], "required": ["name", "images"]}


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
