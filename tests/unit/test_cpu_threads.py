"""CPU threads of a run: giving an idle OpenMP team back, and picking the thread count from the first steps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from embedding_trainer import cpu_threads
from embedding_trainer.cpu_threads import SINGLE_THREAD_MARGIN, WATCHED_STEPS, ThreadTuner

pytestmark = pytest.mark.compat


def _os_threads() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


@pytest.mark.skipif(cpu_threads._openmp_runtime() is None, reason="no OpenMP runtime with omp_pause_resource_all")
def test_a_thread_gives_its_idle_openmp_team_back():
    """A thread that ran a parallel operator keeps an idle worker team (which slows every other thread's team);
    ``release_openmp_team`` ends those workers."""
    before_threads = torch.get_num_threads()
    counts: dict[str, int] = {}
    done = threading.Event()

    def worker() -> None:
        torch.set_num_threads(2)
        torch.randn(1 << 20).exp_()  # large enough to run in parallel: a team of 2 (the caller + 1 worker)
        counts["with_team"] = _os_threads()
        assert cpu_threads.release_openmp_team()
        deadline = time.monotonic() + 5
        while _os_threads() >= counts["with_team"] and time.monotonic() < deadline:
            time.sleep(0.01)
        counts["released"] = _os_threads()
        done.set()

    try:
        thread = threading.Thread(target=worker)
        thread.start()
        assert done.wait(30)
        thread.join()
    finally:
        torch.set_num_threads(before_threads)
    assert counts["released"] == counts["with_team"] - 1


class _Script:
    """Scripted clock and context-switch counter for ``ThreadTuner`` (no timing in tests)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.now, self.switches = 0.0, 0
        monkeypatch.setattr(cpu_threads.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(cpu_threads, "context_switches", lambda: self.switches)

    def steps(self, tuner: ThreadTuner, count: int, seconds: float, switches: int) -> None:
        for _ in range(count):
            self.now += seconds
            self.switches += switches
            tuner.after_step()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_an_uncontended_team_stays(monkeypatch, two_threads):
    script = _Script(monkeypatch)
    tuner = ThreadTuner(torch.device("cpu"))
    script.steps(tuner, 1 + WATCHED_STEPS, seconds=0.02, switches=1)  # warm-up, then the team
    assert torch.get_num_threads() == 1  # now timing one thread
    script.steps(tuner, WATCHED_STEPS, seconds=0.035, switches=0)
    assert tuner.setup.threads == 2 and torch.get_num_threads() == 2
    assert tuner.setup.reason == "2 threads ran 1.75x as fast as 1"
    script.steps(tuner, 20, seconds=0.5, switches=2000)  # decided once: later steps change nothing
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("switches", [1300, 36])  # an idle team elsewhere; another process on the cores
def test_a_contended_team_gives_way_to_one_thread_when_that_is_clearly_faster(monkeypatch, two_threads, switches):
    script = _Script(monkeypatch)
    tuner = ThreadTuner(torch.device("cpu"))
    script.steps(tuner, 1 + WATCHED_STEPS, seconds=0.07, switches=switches)
    script.steps(tuner, WATCHED_STEPS, seconds=0.03, switches=1)
    assert tuner.setup.threads == 1 and torch.get_num_threads() == 1
    assert tuner.setup.reason.startswith(f"1 thread ran 2.33x faster than 2 ({switches} context switches per step")
    tuner.restore()
    assert torch.get_num_threads() == 2


def test_one_thread_must_be_clearly_faster(monkeypatch, two_threads):
    script = _Script(monkeypatch)
    tuner = ThreadTuner(torch.device("cpu"))
    script.steps(tuner, 1 + WATCHED_STEPS, seconds=0.100, switches=3)
    script.steps(tuner, WATCHED_STEPS, seconds=0.095, switches=0)  # within SINGLE_THREAD_MARGIN: noise
    assert tuner.setup.threads == 2 and torch.get_num_threads() == 2
    assert 0.095 > 0.100 * SINGLE_THREAD_MARGIN


def test_cuda_runs_and_single_core_processes_are_left_alone(monkeypatch, two_threads):
    script = _Script(monkeypatch)
    tuner = ThreadTuner(torch.device("cuda"))
    script.steps(tuner, 20, seconds=0.1, switches=5000)
    assert torch.get_num_threads() == 2 and tuner.setup.reason == "not a CPU run"
    torch.set_num_threads(1)
    assert ThreadTuner(torch.device("cpu")).setup.reason == "one core"
