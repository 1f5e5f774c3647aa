"""Progress of a run -> the WebUI's shared.state (stand-in with the host's attributes and methods)."""

from __future__ import annotations

import pytest

from embedding_trainer.trainer import Progress
from embedding_trainer.webui.state_bridge import SharedStateBridge

pytestmark = pytest.mark.compat


class FakeState:
    """The parts of modules.shared_state.State the bridge uses, with the host's begin/end behaviour."""

    def __init__(self) -> None:
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.current_image = None
        self.calls: list[str] = []

    def begin(self, job: str = "(unknown)") -> None:
        self.calls.append(f"begin {job}")
        self.job, self.job_count, self.job_no, self.interrupted = job, -1, 0, False

    def end(self) -> None:
        self.calls.append("end")
        self.job, self.job_count = "", 0

    def assign_current_image(self, image) -> None:
        self.current_image = image


class FakeProgress:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start_task(self, id_task: str) -> None:
        self.calls.append(f"start {id_task}")

    def finish_task(self, id_task: str) -> None:
        self.calls.append(f"finish {id_task}")


def progress(step: int, total: int) -> Progress:
    return Progress(step, total, 0, 0.5, 0.5, 1e-3, 2.0, (total - step) / 2.0, step / 2.0)


def test_an_api_run_begins_and_ends_its_own_job():
    state, tasks = FakeState(), FakeProgress()
    bridge = SharedStateBridge(state, tasks)
    bridge.begin("embtrain-abc", 10)
    assert state.calls == ["begin task(embtrain-abc)"] and tasks.calls == ["start task(embtrain-abc)"]
    assert (state.job_count, state.job_no, state.sampling_steps, state.sampling_step) == (1, 0, 10, 0)
    bridge.update(progress(4, 10), "step 4/10")
    assert (state.sampling_step, state.sampling_steps, state.textinfo) == (4, 10, "step 4/10")
    bridge.show_image("img")
    assert state.current_image == "img"
    assert not bridge.interrupted()
    state.interrupted = True  # the Interrupt button
    assert bridge.interrupted()
    bridge.end()
    assert state.calls[-1] == "end" and tasks.calls[-1] == "finish task(embtrain-abc)"


def test_a_run_inside_wrap_gradio_gpu_call_leaves_the_job_to_it():
    state = FakeState()
    state.begin("task(tab-1)")  # wrap_gradio_gpu_call began the job already
    bridge = SharedStateBridge(state, FakeProgress())
    bridge.begin("embtrain-abc", 5)
    bridge.end()
    assert state.calls == ["begin task(tab-1)"] and state.job == "task(tab-1)" and state.job_no == 1
