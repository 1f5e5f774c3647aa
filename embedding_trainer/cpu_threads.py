"""CPU threads of a training run: keep torch's OpenMP workers busy instead of asleep.

torch runs its CPU operators on an OpenMP team that belongs to the calling thread. GNU OpenMP (the runtime in
torch's Linux wheels) counts every thread of every team in the process, idle teams included; once that count
exceeds the CPU count it makes workers sleep after a short spin, and each of the hundreds of parallel operators in
a step then pays a sleep and a wake-up. In a server such as the WebUI, every request thread that once ran torch
keeps such an idle team, so a run on another thread loses much of its speed (measured in a real WebUI beside one
idle team, benchmarks/RESULTS.md: the built-in trainer 3.1x slower with 1,897 context switches per step instead of
0-1; our 2-thread team 821-836 switches per step, and one thread 2.60-2.95x faster than it). Two remedies here:

- ``release_openmp_team()``: a thread gives its idle team back when it is done with torch, so it stops slowing
  the others (``omp_pause_resource_all``, OpenMP 5.0; a no-op where the runtime lacks it).
- ``ThreadTuner``: at the start of a CPU run, time a few steps with the default team and as many on one thread,
  keep the faster setting, and say why (with the context switches per step that explain a slow team).

Nothing here applies to CUDA runs, whose CPU side only launches kernels.
"""

from __future__ import annotations

import ctypes
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .log import logger

#: Steps timed per setting (after the first step, which creates the team and warms caches).
WATCHED_STEPS = 4
#: One thread must take less than this share of the team's step time to be chosen. Measured (benchmarks/RESULTS.md):
#: an uncontended team ran 0.99-1.28x as fast as one thread on the toy models, a contended one 1.9-3.0x slower
#: beside an idle team and 28x slower beside a busy process, so noise of a few percent must not flip the choice.
SINGLE_THREAD_MARGIN = 0.9

_OPENMP_LIBRARY = re.compile(r"lib(gomp|omp|iomp5)[-.\w]*\.(so[.\d]*|dylib)$")


@functools.lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch has loaded (found in this process's memory map), or None."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    try:
        lines = maps.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.rsplit(" ", 1)[-1]
        if path.startswith("/") and _OPENMP_LIBRARY.search(Path(path).name):
            try:
                runtime = ctypes.CDLL(path)  # already loaded: the same library instance torch uses
            except OSError:
                continue
            if hasattr(runtime, "omp_pause_resource_all"):
                return runtime
    return None


def release_openmp_team() -> bool:
    """Give back the calling thread's idle OpenMP team (its workers end); True if the runtime did it.

    The next parallel operator on this thread makes a new team (tens of microseconds), so this is cheap to call
    when a thread is done with torch for a while.
    """
    runtime = _openmp_runtime()
    if runtime is None:
        return False
    omp_pause_soft = 1
    return runtime.omp_pause_resource_all(omp_pause_soft) == 0


def context_switches() -> int | None:
    """This process's context switches so far, voluntary (a worker sleeping) and involuntary (a worker preempted);
    None where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


@dataclass
class ThreadSetup:
    """What a run's CPU threads were, for the run header, status and benchmark."""

    threads: int
    reason: str

    def describe(self) -> str:
        return f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} ({self.reason})"


class ThreadTuner:
    """Picks the run thread's torch thread count from the first steps, and restores it when the run ends.

    After one warm-up step it times ``WATCHED_STEPS`` steps with the default team and as many with one thread, and
    keeps one thread only if it was clearly faster (``SINGLE_THREAD_MARGIN``). One thread wins when the team's
    workers keep being put to sleep or off the cores: another thread's idle OpenMP team in the process (many
    voluntary context switches) or other processes on the cores (involuntary ones too). Call :meth:`after_step` after
    every optimiser step (a counter and a clock, and for the watched steps one ``getrusage``); :meth:`restore` when
    the run ends. ``setup`` says what was chosen and why.
    """

    def __init__(self, device: torch.device):
        self.initial_threads = torch.get_num_threads()
        self.active = device.type == "cpu" and self.initial_threads > 1 and context_switches() is not None
        reason = "one core" if self.initial_threads == 1 else "not a CPU run"
        self.setup = ThreadSetup(self.initial_threads, "the process default" if self.active else reason)
        self._phase = "warm-up" if self.active else "done"
        self._steps = 0
        self._mark: tuple[float, int] = (0.0, 0)
        self._team: tuple[float, float] = (0.0, 0.0)  # seconds and context switches per step with the default team

    def after_step(self) -> None:
        if self._phase == "done":
            return
        self._steps += 1
        now, switches = time.perf_counter(), context_switches() or 0
        if self._phase == "warm-up":
            self._phase, self._steps, self._mark = "team", 0, (now, switches)
            return
        if self._steps < WATCHED_STEPS:
            return
        seconds = (now - self._mark[0]) / self._steps
        per_step = (switches - self._mark[1]) / self._steps
        if self._phase == "team":
            self._team = (seconds, per_step)
            torch.set_num_threads(1)
            self._phase, self._steps, self._mark = "single", 0, (now, switches)
            return
        team_s, team_switches = self._team
        n = self.initial_threads
        if seconds < team_s * SINGLE_THREAD_MARGIN:
            self._finish(
                1,
                f"1 thread ran {team_s / seconds:.2f}x faster than {n} ({team_switches:.0f} context switches per step "
                f"with {n}: another thread's idle OpenMP team, or other processes on the cores)",
            )
        else:
            torch.set_num_threads(n)
            self._finish(n, f"{n} threads ran {seconds / team_s:.2f}x as fast as 1")

    def _finish(self, threads: int, reason: str) -> None:
        self._phase = "done"
        self.setup = ThreadSetup(threads, reason)
        logger.info("CPU threads: %s", self.setup.describe())

    def restore(self) -> None:
        """The thread count as it was, and this thread's OpenMP team given back (it would slow other threads)."""
        if not self.active:
            return
        if torch.get_num_threads() != self.initial_threads:
            torch.set_num_threads(self.initial_threads)
        release_openmp_team()
