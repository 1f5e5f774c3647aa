"""Training runs inside the WebUI process: one at a time, each recorded from queued to finished, stopped or failed.

``RunManager`` owns the runs (``run_record`` holds what is known about each). Everything it needs from the host
comes in through its constructor (the model adapter, the GPU queue lock, the progress bar / Interrupt bridge,
previews), so tests pass stand-ins and this module never imports the WebUI. Every error a run meets is kept on its
record (``state`` ``failed`` and an ``error`` text), so the API and the tab show it; nothing is reported only on
the console.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from ..config import TrainConfig
from ..errors import ConfigError, EmbeddingTrainerError
from ..host import Host
from ..log import format_duration, logger
from ..trainer import Callbacks, PreparedRun, Progress, Trainer, TrainResult, prepare_run
from .run_options import PreviewOptions
from .run_record import RunRecord, describe_model

T = TypeVar("T")

#: Finished runs kept in memory (the newest).
HISTORY_RUNS = 50


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
PreviewFn = Callable[[RunRecord, int], list[Path]]


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
                record.apply_progress(progress, text)
            if bridge is not None:
                bridge.update(progress, text)

        def on_status(text: str) -> None:
            with self._lock:
                record.status_text = text
                progress = record.last_progress()
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
            record.finish(result)
        logger.info("run %s %s", record.id, record.status_text)

    def _fail(self, record: RunRecord, error: BaseException) -> None:
        with self._lock:
            if not record.active:  # already recorded (or stopped while queued)
                return
            record.fail(error)
            text = record.error
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


def progress_text(progress: Progress) -> str:
    """One line for the host's progress text: step, loss, speed and time left."""
    eta = format_duration(progress.eta_s)
    return (
        f"step {progress.step}/{progress.total_steps}, loss {progress.loss:.4g} "
        f"(smoothed {progress.smoothed_loss:.4g}), {progress.it_per_s:.2f} it/s, {eta} left"
    )
