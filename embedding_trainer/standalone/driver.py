"""The standalone run driver: a training run from a config and a diffusers model folder, as the command line, the
job files and the demo run it (progress on stderr, Ctrl-C to stop and save, a summary at the end).

The front ends (``cli.py``, ``job_files.py``, ``demo.py``) import this module; it imports none of them.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainConfig
from ..errors import LostProcessesError
from ..log import format_duration, logger

if TYPE_CHECKING:  # torch is imported once a run starts, not for --help
    from ..distributed import Processes
    from ..trainer import Callbacks


class ProgressBar:
    """Progress on stderr: on a terminal one status line redrawn in place (bar, step, loss, rate, ETA); otherwise
    (a log file, a pipe, CI) a plain line every twentieth of the run or every 30 seconds.

    Not tqdm: it has no plain-line mode for logs (it writes carriage returns into a file, or nothing), and the
    trainer hands over progress in bursts with its own rate and ETA, which tqdm would recompute from arrival times."""

    LINES_PER_RUN = 20
    PLAIN_EVERY_S = 30.0

    def __init__(self, stream: Any = None, width: int = 24, label: str = "", interactive: bool | None = None):
        """``label``: what plain lines start with (e.g. a job's name); ``interactive``: False for plain lines even on
        a terminal (several processes share it)."""
        self.stream, self.width = stream if stream is not None else sys.stderr, width  # stderr as it is now
        self.label = label
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive
        self.last = 0.0 if self.interactive else time.monotonic()  # plain lines: the 30 s clock starts now
        self.open_line = False  # a redrawn line without its newline yet

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        eta = format_duration(p.eta_s, clock=True)
        text = (
            f"{p.step}/{p.total_steps} loss {p.loss:.4f} (avg {p.smoothed_loss:.4f}) lr {p.learning_rate:.2e} "
            f"{p.it_per_s:.2f} it/s ETA {eta}"
        )
        done = p.step >= p.total_steps
        if not self.interactive:
            every = max(1, p.total_steps // self.LINES_PER_RUN)
            if done or p.step % every == 0 or now - self.last >= self.PLAIN_EVERY_S:
                self.last = now
                self.stream.write(f"{self.label + ' ' if self.label else ''}step {text}\n")
                self.stream.flush()
            return
        if now - self.last < 0.1 and not done:
            return
        self.last = now
        filled = int(self.width * p.step / p.total_steps)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {text}  ")
        self.open_line = not done
        if done:
            self.stream.write("\n")
        self.stream.flush()

    def end_line(self) -> None:
        """End a redrawn line, so what is printed next starts on its own line."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


class StopSignals:
    """Ctrl-C (SIGINT) asks the run to stop after its step and save; a second one aborts. Under torchrun SIGTERM asks
    too (torchrun sends it when another process fails) and a repeat never aborts: torchrun forwards the terminal's
    Ctrl-C, so every process gets it twice, and torchrun itself kills a process that does not stop in time."""

    def __init__(self, processes: Processes):
        self.asked = False
        self.processes = processes
        self.signals = [signal.SIGINT, signal.SIGTERM] if processes.distributed else [signal.SIGINT]
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.previous = {number: signal.signal(number, self._on_signal) for number in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.asked:
            if not self.processes.distributed:
                raise KeyboardInterrupt
            return
        self.asked = True
        if self.processes.distributed:
            if self.processes.writes_files:
                logger.warning("stopping: every process stops after the same step and process 0 saves")
        else:
            logger.warning("\nstopping after this step and saving (Ctrl-C again to abort)")


def _resume_command(model: str, run_dir: Path, processes: Processes) -> str:
    launcher = ["python", "-m"]
    if processes.distributed:  # torchrun again (several nodes: with the same node options as before)
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(processes.world_size))
        one_node = ["--standalone"] if per_node == str(processes.world_size) else []
        launcher = ["torchrun", *one_node, "--nproc-per-node", per_node, "-m"]
    return shlex.join([*launcher, "embedding_trainer", "train", "--model", model, "--resume", str(run_dir)])


def progress_callbacks(
    bar: ProgressBar | None, should_stop: Callable[[], bool], on_warning: Callable[[str], None] | None = None
) -> Callbacks:
    """The command line's callbacks for a run (a single run or a job): progress on ``bar``, each held-out score as a
    log line, and the stop signal."""
    from ..trainer import Callbacks

    def on_evaluation(step: int, score: float) -> None:
        if bar is not None:
            bar.end_line()
        logger.info("step %d: held-out loss %.4f (fixed views of the images; lower is better)", step, score)

    return Callbacks(on_progress=bar, should_stop=should_stop, on_evaluation=on_evaluation, on_warning=on_warning)


def load_host(model: str, device: Any, precision: str, where: str = "") -> Any:
    """The diffusers model folder ``model`` as a host on ``device``, its weights in ``precision``'s dtype."""
    from ..hosts.diffusers_host import DiffusersHost
    from ..trainer import COMPUTE_DTYPES

    logger.info("loading %s on %s (%s)%s", model, device, precision, where)
    return DiffusersHost.from_pretrained(model, device=device, dtype=COMPUTE_DTYPES[precision])


def run_training(
    config: TrainConfig, model: str, show_progress: bool = True, processes: Processes | None = None
) -> tuple[Any, Any]:
    """Load the model as the config asks and train; Ctrl-C stops cleanly (a second Ctrl-C aborts).

    ``processes``: this process's place in a data-parallel run under torchrun (default one process): every process
    loads the model and trains its share of each batch; process 0 writes the files and reports progress.
    Returns the ``Trainer`` and its ``TrainResult``.
    """
    from ..distributed import Processes
    from ..run_state import STATE_SUFFIX
    from ..trainer import Trainer, prepare_run

    processes = processes or Processes()
    # Checked and read before minutes of model loading; the model is loaded where the run was prepared for.
    prepared = prepare_run(config, processes, device=config.device)
    assert prepared.placement is not None  # prepared with a device
    device, precision = prepared.placement.device, prepared.placement.precision
    stop = StopSignals(processes)
    bar = ProgressBar() if show_progress and processes.writes_files else None
    callbacks = progress_callbacks(bar, lambda: stop.asked)
    trainer: Trainer | None = None
    problem: BaseException | None = None
    try:
        where = f" in {processes.world_size} processes (this is {processes.rank})" if processes.distributed else ""
        host = load_host(model, device, precision, where)
        trainer = Trainer(prepared, host, callbacks)
    except Exception as error:  # noqa: BLE001 - every process must hear of it (agree raises it again)
        problem = error
    processes.agree(problem, "setting up the run")  # a process that failed raises; the others name it
    assert trainer is not None
    logger.info("%s", trainer.describe())
    with stop:
        try:
            result = trainer.run()
        except LostProcessesError as error:  # nothing in the run itself went wrong: its saves can go on
            saves = sorted((trainer.run_dir / "saves").glob(f"*{STATE_SUFFIX}"))
            if not saves or not processes.writes_files:
                raise
            resume = _resume_command(model, trainer.run_dir, processes)
            raise LostProcessesError(
                f"{error}\nContinue from the last save ({saves[-1].name}) with:\n  {resume}"
            ) from error
        finally:
            if bar is not None:
                bar.end_line()
    verb = "stopped" if result.stopped else "finished"
    threads = f", {result.cpu_threads.describe()}" if result.cpu_threads and device.type == "cpu" else ""
    this_run = result.steps - trainer.start_step  # a resumed run reports its own steps and time
    resumed = f" (resumed at step {trainer.start_step}, now at {result.steps})" if trainer.start_step else ""
    logger.info(
        "%s after %d steps%s in %s at %d px%s, loss %.4f (avg %.4f)\nembedding: %s%s",
        verb,
        this_run,
        resumed,
        format_duration(result.elapsed_s, clock=True),
        result.resolution,
        threads,
        result.final_loss,
        result.smoothed_loss,
        result.embedding_path,
        "".join(f"\n also:     {p}" for p in result.extra_paths),
    )
    if result.chosen_start:
        logger.info(
            "carried on with start %d of %d (held-out losses %s)",
            result.chosen_start,
            len(result.start_scores),
            ", ".join(f"{s:.4f}" for s in result.start_scores),
        )
    if result.early_stopped:
        logger.info("stopped early: the held-out score had not improved for %d evaluations", config.early_stop_patience)
    if result.held_out_loss is not None:
        which = "the best held-out score" if result.vectors_step != result.steps else "the last step"
        logger.info(
            "the file holds step %d's vectors (%s): held-out loss %.4f",
            result.vectors_step,
            which,
            result.held_out_loss,
        )
    if trainer.warnings and processes.writes_files:
        logger.warning("%d warning(s):%s", len(trainer.warnings), "".join(f"\n  {w}" for w in trainer.warnings))
    if result.stopped and processes.writes_files:
        command = _resume_command(model, result.run_dir, processes)
        logger.warning("stopped at step %d; continue with:\n  %s", result.steps, command)
    return trainer, result
