"""Many embeddings from one job file: ``python -m embedding_trainer jobs JOBS.jsonl --model MODEL [flags]``.

The job file is JSON Lines: one object per embedding holding ``TrainConfig`` fields (``name`` and ``images`` at
least) and optionally ``model`` (another diffusers folder than ``--model``); blank lines and lines starting with
``#`` are skipped. Training flags given on the command line are defaults that every job can override. Paths are
read from the current folder, as the flags are.

Each job is an ordinary run with its own run folder and files. One that cannot start or fails is recorded with its
error and the others go on. Run the same command again and finished jobs are skipped (each leaves
``job-result.json`` in its run folder), stopped or killed ones resume from their last save, failed ones start over.

Under ``torchrun`` the jobs spread over the processes (one per GPU): each process takes the next job when it is
free (:class:`~embedding_trainer.distributed.JobQueue`). Progress comes per job and overall; at the end process 0
prints a summary and writes it as JSON (``--summary``, default ``<job file>.summary.json``).
"""

from __future__ import annotations

import collections
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic_write import write_atomically
from ..config import TrainConfig
from ..distributed import JobQueue, Processes
from ..errors import ConfigError, EmbeddingTrainerError
from ..log import format_duration, logger
from ..run_state import STATE_SUFFIX
from .driver import ProgressBar, load_host, progress_callbacks

#: Left in a job's run folder when the job has finished; a later run of the job file skips the job.
JOB_RESULT = "job-result.json"


@dataclass
class Job:
    line: int  # 1-based line in the job file
    label: str  # the name, or "line N" when the line has none
    config: TrainConfig | None = None
    model: str = ""
    error: str = ""  # why the job cannot run at all (its line is not a valid job)


@dataclass
class JobResult:
    line: int
    name: str
    #: finished, stopped, failed, skipped (finished earlier), not started (the command was stopped first),
    #: interrupted (its process ended without reporting: killed)
    status: str
    process: int | None = None
    embedding: str = ""
    run_dir: str = ""
    steps: int = 0
    final_loss: float | None = None
    held_out_loss: float | None = None
    elapsed_s: float = 0.0
    error: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_jobs(path: Path, defaults: dict[str, Any], default_model: str) -> list[Job]:
    """The job file's jobs, each with its config or the reason it cannot run (a bad line does not stop the rest)."""
    if not path.is_file():
        raise ConfigError("jobs", f"{path}: no such file; give a JSON Lines file with one object per embedding")
    jobs: list[Job] = []
    claimed: dict[Path, int] = {}  # output files and run folders, by the line that writes them
    for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        job = Job(line=number, label=f"line {number}")
        jobs.append(job)
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as error:
            job.error = f"line {number} is not JSON ({error}); write one object per line, e.g. " + (
                '{"name": "my-cat", "images": "photos/cat"}'
            )
            continue
        if not isinstance(entry, dict):
            job.error = f"line {number} holds {type(entry).__name__}, not an object of TrainConfig fields"
            continue
        job.label = str(entry.get("name") or job.label)
        job.model = str(entry.pop("model", "") or default_model)
        try:
            config = TrainConfig.from_dict({**defaults, **entry})
            config.require_for_training()
        except ConfigError as error:
            job.error = f"line {number}: {error}"
            continue
        if not job.model:
            job.error = f'line {number}: no model; give --model or a "model" on the line'
            continue
        outputs = [Path(config.output_dir) / f"{config.name}.safetensors", Path(config.effective_run_dir)]
        taken = [claimed[p.resolve()] for p in outputs if p.resolve() in claimed]
        if taken:
            job.error = (
                f"line {number}: '{config.name}' would write the same files as line {taken[0]}; give it another name, "
                "output_dir or run_dir"
            )
            continue
        claimed.update({p.resolve(): number for p in outputs})
        job.config = config
    if not jobs:
        raise ConfigError("jobs", f"{path} holds no jobs; write one JSON object per line")
    return jobs


class _Hosts:
    """The last model this process loaded, kept for the next job that uses the same model, device and precision."""

    def __init__(self) -> None:
        self.key: tuple[str, str, str] | None = None
        self.host: Any = None

    def get(self, model: str, device: Any, precision: str) -> Any:
        key = (str(Path(model).resolve()), str(device), precision)
        if key != self.key:
            self.host = self.key = None  # free the previous model first
            self.host = load_host(model, device, precision)
            self.key = key
        return self.host


#: Fields a job may change between runs without it being another job (where it runs, and how it treats its files).
_NOT_THE_JOB = frozenset({"device", "overwrite", "resume"})


def _settings(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_THE_JOB}


def _previous_result(config: TrainConfig) -> dict[str, Any] | None:
    """What the job's run folder says its last run did (``JOB_RESULT``), or None (none, or not readable)."""
    try:
        previous = json.loads((Path(config.effective_run_dir) / JOB_RESULT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return previous if isinstance(previous, dict) and isinstance(previous.get("settings"), dict) else None


def _plan(config: TrainConfig, head: str) -> tuple[TrainConfig | None, str]:
    """How to run a job again: ``(None, why)`` when it finished earlier with these settings (skip it); else the
    config to run (resuming from the run folder's last save when there is one) and what that is."""
    if config.overwrite:
        return config, "starting over (overwrite)"
    previous = _previous_result(config)
    if previous is not None and previous.get("status") == "finished" and Path(previous.get("embedding", "")).is_file():
        if previous["settings"] == _settings(config):
            return None, f"finished earlier: {previous['embedding']}"
        changed = sorted(k for k, v in _settings(config).items() if previous["settings"].get(k) != v)
        raise ConfigError(
            changed[0] if changed else "jobs",
            f'{head} finished earlier with other settings ({", ".join(changed)}); add "overwrite": true to its '
            "line to train it again",
        )
    saves = Path(config.effective_run_dir) / "saves"
    if not config.resume and saves.is_dir() and any(saves.glob(f"*{STATE_SUFFIX}")):
        return config.replace(resume=config.effective_run_dir), f"resuming from its last save in {saves}"
    return config, "starting"


def run_job(job: Job, count: int, processes: Processes, hosts: _Hosts, should_stop: Any) -> JobResult:
    """One job as an ordinary run on this process's device; never raises for the job's own failures."""
    from ..trainer import Trainer, prepare_run

    head = f"job {job.line}" if job.label == f"line {job.line}" else f"job '{job.label}' (line {job.line})"
    result = JobResult(line=job.line, name=job.label, status="failed", process=processes.rank)
    if job.config is None:
        result.error = job.error
        logger.error("%s cannot run: %s", head, result.error)
        return result
    result.run_dir = job.config.effective_run_dir
    started = time.perf_counter()
    bar = ProgressBar(label=f"{head}:", interactive=False if processes.distributed else None)
    try:
        config, what = _plan(job.config, head)
        if config is None:
            logger.info("%s: %s, skipped", head, what)
            result.status, result.embedding = "skipped", what.split(": ", 1)[1]
            return result
        # Checked and read before the model loads; this process's device (a job trains in one process).
        prepared = prepare_run(config, device=processes.device(config.device))
        assert prepared.placement is not None  # prepared with a device
        device = prepared.placement.device
        host = hosts.get(job.model, device, prepared.placement.precision)
        if should_stop():  # asked while the model loaded
            result.status = "not started"
            return result
        logger.info("%s of %d: %s", head, count, what)
        callbacks = progress_callbacks(bar, should_stop, on_warning=result.warnings.append)
        try:
            trainer = Trainer(prepared, host, callbacks)
        except ConfigError as error:
            if not config.resume or job.config.resume:
                raise
            raise ConfigError(
                error.field, f'{error}; to start this job over instead, add "overwrite": true to its line'
            ) from error
        logger.info("%s on %s:\n%s", head, device, trainer.describe())
        outcome = trainer.run()
        result.status = "stopped" if outcome.stopped else "finished"
        result.embedding = str(outcome.embedding_path)
        result.run_dir = str(outcome.run_dir)
        result.steps = outcome.steps
        result.final_loss = outcome.final_loss if math.isfinite(outcome.final_loss) else None
        result.held_out_loss = outcome.held_out_loss
        logger.info(
            "%s %s after %d steps in %s: %s",
            head,
            result.status,
            result.steps,
            format_duration(time.perf_counter() - started, clock=True),
            result.embedding,
        )
    except Exception as error:  # noqa: BLE001 - a failed job is recorded and the others go on
        known = isinstance(error, (EmbeddingTrainerError, OSError))
        result.status = "failed"
        result.error = str(error) if known else f"{type(error).__name__}: {error}"
        logger.error("%s failed: %s", head, result.error)
    finally:
        bar.end_line()
        result.elapsed_s = time.perf_counter() - started
    _keep_result(result, job.config)
    return result


def _keep_result(result: JobResult, config: TrainConfig) -> None:
    """``JOB_RESULT`` in the job's run folder (when there is one), for the next run of the job file."""
    folder = Path(config.effective_run_dir)
    if not folder.is_dir():
        return
    record = json.dumps({**result.to_dict(), "settings": _settings(config)}, indent=2).encode("utf-8")
    try:
        write_atomically(folder / JOB_RESULT, lambda f: f.write(record), overwrite=True)
    except OSError as error:
        logger.warning("could not record the result of %s in %s: %s", result.name, folder, error)


def run_jobs(
    path: Path,
    defaults: dict[str, Any],
    default_model: str,
    summary_path: Path | None,
    should_stop: Any,
    processes: Processes,
) -> list[JobResult] | None:
    """Run the job file's jobs on this process (and the others under torchrun). Process 0 returns every job's
    result (in file order) and writes the summary; the other processes return None."""
    jobs = load_jobs(path, defaults, default_model)
    queue = JobQueue(len(jobs), processes)
    hosts = _Hosts()
    while not should_stop():
        index = queue.claim()
        if index is None:
            break
        queue.record(
            index, JobResult(jobs[index].line, jobs[index].label, "interrupted", processes.rank).to_dict(), final=False
        )
        result = run_job(jobs[index], len(jobs), processes, hosts, should_stop)
        done = queue.record(index, result.to_dict())
        logger.info("overall: %d of %d jobs done", done, len(jobs))
    queue.finish()
    if not processes.writes_files:
        return None
    recorded = queue.results(should_stop)
    results = [
        JobResult(**recorded[i]) if i in recorded else JobResult(line=job.line, name=job.label, status="not started")
        for i, job in enumerate(jobs)
    ]
    logger.info("%s", format_summary(results))
    summary_path = summary_path or path.with_name(path.name + ".summary.json")
    summary = {
        "job_file": str(path),
        "processes": processes.world_size,
        "counts": _counts(results),
        "jobs": [r.to_dict() for r in results],
    }
    text = json.dumps(summary, indent=2).encode("utf-8")
    write_atomically(summary_path, lambda f: f.write(text), overwrite=True)
    logger.info("summary: %s", summary_path)
    return results


def format_summary(results: list[JobResult]) -> str:
    """A table: one row per job, then the counts."""
    rows = [("line", "name", "status", "steps", "loss", "detail")]
    for r in results:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else ""
        detail = r.error.splitlines()[0] if r.error else r.embedding
        rows.append((str(r.line), r.name, r.status, str(r.steps or ""), loss, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5] for row in rows]
    counts = _counts(results)
    lines.append(f"{len(results)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return "\n".join(lines)


def _counts(results: list[JobResult]) -> dict[str, int]:
    return dict(collections.Counter(r.status for r in results))
