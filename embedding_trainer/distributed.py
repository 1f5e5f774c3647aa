"""Many processes, one run or many runs: data-parallel training and a shared job queue on ``torch.distributed``.

``torchrun`` starts the processes (one per GPU, or a few on a CPU machine, on one node or several) and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; nothing here starts or watches a process.

- **Data-parallel** (``prepare_run(config, processes)``): every process holds the whole model and the same vectors and
  takes its share of every micro-batch: its rows of the very batch one process would draw (the same images, prompts,
  noise and timesteps, since every draw depends only on the seed and the micro-batch index). Its loss is its rows'
  sum over the whole batch's size, so the shares add up to the batch's mean; one all-reduce per step sums the
  gradients, the loss and the stop votes, and every process then takes the same AdamW step on the same numbers, so
  the vectors and the optimiser state stay identical (checked at every save and at the end). Process 0 writes the
  files. NCCL on GPUs, gloo on CPUs.
- **Jobs** (:class:`JobQueue`): each process takes the next job from a counter in torchrun's own store when it is
  free, so long and short jobs spread themselves; results go back through the same store.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, EmbeddingTrainerError, LostProcessesError, TrainingError

#: Set by torchrun in every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: How long a collective (or a store read) may wait for the other processes. Data-parallel processes are in step
#: apart from model loading and latent caching; a job queue's results are only read once every process is done.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run (one process: rank 0 of 1, and every method a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Processes:
        """What torchrun says (one process when it did not start this one)."""
        if not launched_by_torchrun():
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes_files(self) -> bool:
        """Process 0 writes a run's files and reports its progress; the others compute."""
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this process trains on: under torchrun ``auto`` and ``cuda`` mean the GPU of this process's
        local rank (one process per GPU)."""
        if not self.distributed or requested == "cpu":
            return requested
        if requested not in ("auto", "cuda"):
            raise ConfigError(
                "device",
                f"{requested!r}: under torchrun each process takes the GPU of its local rank; use auto, cuda or cpu",
            )
        if not torch.cuda.is_available():
            return "cpu" if requested == "auto" else requested  # "cuda" without a GPU: resolve_device says why
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ConfigError(
                "device",
                f"torchrun started process {self.local_rank} of this node, which has {count} GPU(s); start at most "
                f"{count} processes per node (--nproc-per-node {count}) or train on the CPU (--device cpu)",
            )
        return f"cuda:{self.local_rank}"

    # -- data-parallel ---------------------------------------------------------------------------------------
    def join(self, device: torch.device) -> None:
        """Join the run's process group (NCCL for a GPU, gloo for the CPU); a no-op for one process."""
        if not self.distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)

    def leave(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def share(self, count: int) -> slice:
        """This process's rows of a batch of ``count`` (contiguous, sizes differing by at most one)."""
        return slice(count * self.rank // self.world_size, count * (self.rank + 1) // self.world_size)

    def sum_(self, tensor: torch.Tensor, what: str) -> None:
        """Sum ``tensor`` over the processes, in place (every process gets the same result)."""
        if self.distributed:
            self._collective(what, lambda: dist.all_reduce(tensor))

    def sum_checked(self, tensor: torch.Tensor, error: BaseException | None, what: str) -> torch.Tensor:
        """Sum ``tensor`` over the processes together with whether ``what`` failed in each, and raise in all of them
        if it failed in any (the process that failed re-raises its own error), so none is left waiting in the next
        collective. Returns the sum. One transfer of the flags to the host: a synchronisation on a GPU."""
        if not self.distributed:
            if error is not None:
                raise error
            return tensor
        flags = torch.zeros(self.world_size, device=tensor.device, dtype=torch.float32)
        flags[self.rank] = 0.0 if error is None else 1.0
        buffer = torch.cat([tensor.reshape(-1).float(), flags])
        self.sum_(buffer, what)
        if error is not None:
            raise error
        failed = [rank for rank, flag in enumerate(buffer[-self.world_size :].tolist()) if flag]
        if failed:
            raise TrainingError(f"process {failed[0]} failed during {what}; its own error says why")
        return buffer[: -self.world_size].view_as(tensor)

    def check_identical(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Raise if ``tensors`` differ between processes in any bit (they must: every process takes the same step)."""
        if not self.distributed:
            return
        for key, tensor in tensors.items():
            bits = tensor.detach().contiguous().view(torch.uint8)  # bit patterns: NaN equals NaN, -0 differs from 0
            low, high = bits.clone(), bits.clone()
            self._collective(what, functools.partial(dist.all_reduce, low, dist.ReduceOp.MIN))
            self._collective(what, functools.partial(dist.all_reduce, high, dist.ReduceOp.MAX))
            if not torch.equal(low, high):
                raise TrainingError(
                    f"{what}: the '{key}' tensors differ between processes; the processes must run the same torch on "
                    "the same kind of device (the run cannot go on consistently)"
                )

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every process says whether ``what`` worked for it; if it failed anywhere, raise everywhere (the process
        that failed re-raises its own error; the others name it) instead of leaving them waiting."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        message = None if error is None else str(error) or type(error).__name__
        messages: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(messages, message))
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failed:
            rank, text = failed[0]
            raise TrainingError(f"{what} failed in process {rank}: {text}")

    def check_same(self, value: str, what: str) -> None:
        """Raise if ``value`` (a description of ``what``: inputs) differs between processes."""
        if not self.distributed:
            return
        values: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(values, value))
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            raise ConfigError(
                "images",
                f"process {differing[0]} sees other {what} than process 0; every node needs the same files at the "
                "same paths",
            )

    def _collective(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except RuntimeError as error:  # gloo/NCCL: a peer closed its connection, timed out or crashed
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LostProcessesError(
                f"process {self.rank} lost the other processes during {what} ({first}): one of them stopped, "
                "failed or was killed (its own error, if it printed one, says why)"
            ) from error


class JobQueue:
    """Job indexes handed out one at a time to whichever process asks next, and the jobs' results collected.

    Under torchrun the counter and the results live in torchrun's own TCP store (reached through torch's ``env://``
    rendezvous), under keys of this launch and restart; in one process they live here.
    """

    #: After a stop, how long process 0 waits for the others to save and report (torchrun kills them 30 s after
    #: a Ctrl-C).
    STOP_WAIT_S = 25.0

    def __init__(self, count: int, processes: Processes):
        self.count = count
        self.processes = processes
        self._next = 0
        self._results: dict[int, dict[str, Any]] = {}
        self.store: Any = None
        launch = os.environ.get("TORCHELASTIC_RUN_ID", "")
        self.prefix = f"embtrain-jobs/{launch}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        if processes.distributed:
            try:
                self.store, _, _ = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
            except (RuntimeError, ValueError) as error:
                raise EmbeddingTrainerError(f"cannot reach torchrun's store: {error}") from error

    def claim(self) -> int | None:
        """The next job nobody has taken, or None when all are taken."""
        if self.store is None:
            index, self._next = self._next, self._next + 1
        else:
            index = int(self.store.add(self.prefix + "next", 1)) - 1
        return index if index < self.count else None

    def record(self, index: int, result: dict[str, Any], final: bool = True) -> int:
        """Keep a job's result (``final=False``: what to report if its process never records another); returns how
        many jobs have final results now (overall progress)."""
        if self.store is None:
            self._results[index] = result
            return sum(1 for r in self._results.values() if r.get("status") != "interrupted")
        self.store.set(f"{self.prefix}result/{index}", json.dumps(result))
        return int(self.store.add(self.prefix + "recorded", 1 if final else 0))

    def finish(self) -> None:
        """This process takes no more jobs."""
        if self.store is not None:
            self.store.add(self.prefix + "finished", 1)

    def results(self, should_stop: Callable[[], bool] = lambda: False, poll_s: float = 0.5) -> dict[int, dict]:
        """Process 0, after :meth:`finish`: every job's result once every process has finished (polling the store,
        which has no time limit for a long job elsewhere); after a stop, at most ``STOP_WAIT_S`` more."""
        if self.store is None:
            return dict(self._results)
        stopped_at: float | None = None
        while int(self.store.add(self.prefix + "finished", 0)) < self.processes.world_size:
            if stopped_at is None and should_stop():
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > self.STOP_WAIT_S:
                break
            time.sleep(poll_s)
        keys = [f"{self.prefix}result/{index}" for index in range(self.count)]
        return {index: json.loads(self.store.get(key)) for index, key in enumerate(keys) if self.store.check([key])}
