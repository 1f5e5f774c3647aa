"""Runs through the WebUI's HTTP API while they run: one at a time under the queue lock, stopping (by the API, the
host's Interrupt button, or while queued), and failures inside a run reaching the API.

The API runs on the tiny SD1 model through FastAPI's TestClient; ``stand_ins.py`` has the stand-ins, ``conftest.py``
the fixtures.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient needs it

import torch  # noqa: E402

from embedding_trainer.config import TrainConfig  # noqa: E402
from embedding_trainer.embedding_reading import load_embedding  # noqa: E402
from embedding_trainer.errors import HostError  # noqa: E402
from embedding_trainer.hosts.diffusers_host import DiffusersHost  # noqa: E402
from embedding_trainer.trainer import Progress  # noqa: E402
from embedding_trainer.webui.run_manager import RunActiveError  # noqa: E402
from embedding_trainer.webui.run_record import RunRecord  # noqa: E402
from tests.integration.webui_api.stand_ins import (  # noqa: E402
    V1,
    WAIT_S,
    RecordingBridge,
    body,
    start,
    wait_done,
)

pytestmark = pytest.mark.compat


class GateBridge(RecordingBridge):
    """Holds the run after ``hold_at`` steps until the test sets ``proceed`` (for a deterministic stop)."""

    def __init__(self, hold_at: int):
        super().__init__()
        self.hold_at = hold_at
        self.reached = threading.Event()
        self.proceed = threading.Event()

    def update(self, progress: Progress, text: str) -> None:
        super().update(progress, text)
        if progress.step == self.hold_at and text.startswith("step "):
            self.reached.set()
            assert self.proceed.wait(WAIT_S)


class BlockingLock:
    """A ``run_exclusively`` stand-in that waits (like the queue lock held by a generation) until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(WAIT_S)
        return fn()


class BrokenPredictHost:
    """The tiny host, except that the denoiser fails (as a CUDA out-of-memory error would)."""

    def __init__(self, inner: DiffusersHost):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def predict(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory (simulated)")


# ---------------------------------------------------------------------------------------------------------------
# One run at a time, under the queue lock


def test_a_second_run_while_one_is_active_is_409_with_the_active_id(tmp_path, api):
    lock = BlockingLock()
    client, manager = api(run_exclusively=lock)
    first = start(client, body(tmp_path))
    assert lock.entered.wait(WAIT_S)
    assert client.get(f"{V1}/runs/{first}").json()["state"] == "queued"  # waiting for the GPU

    second = client.post(f"{V1}/runs", json=body(tmp_path, name="my-dog"))
    assert second.status_code == 409
    assert second.json()["active_id"] == first and first in second.json()["detail"]
    with pytest.raises(RunActiveError) as raised:
        manager.start_sync(body(tmp_path, name="my-dog"))
    assert raised.value.active_id == first

    lock.release.set()
    assert wait_done(client, first)["state"] == "finished"
    third = start(client, body(tmp_path, name="my-dog"))  # the slot is free again
    assert wait_done(client, third)["state"] == "finished"
    assert lock.calls == 2
    assert [run["id"] for run in client.get(f"{V1}/runs").json()["runs"]] == [third, first]


def test_start_sync_runs_in_the_callers_thread_without_taking_the_lock_again(tmp_path, api):
    calls: list[str] = []

    def run_exclusively(fn):
        calls.append("lock")
        return fn()

    bridge = RecordingBridge()
    client, manager = api(run_exclusively=run_exclusively, bridge=bridge)
    status = manager.start_sync(TrainConfig(**body(tmp_path, max_steps=2)), task_id="task(abc12)")
    assert status["state"] == "finished" and status["step"] == 2
    assert status["task_id"] == "task(abc12)"  # the page that started it finds it by this id
    assert calls == []  # the tab calls it inside wrap_gradio_gpu_call, which already holds the (non-reentrant) lock
    assert bridge.threads == {threading.current_thread().name}
    status = manager.start_sync(body(tmp_path, max_steps=2, overwrite=True), exclusive=True)
    assert status["state"] == "finished" and calls == ["lock"]
    assert client.get(f"{V1}/runs/{status['id']}").json()["step"] == 2


def test_on_finished_runs_once_inside_the_exclusive_section(tmp_path, api):
    lock = threading.Lock()
    seen: list[tuple[str, bool]] = []

    def exclusively(fn):
        with lock:
            return fn()

    client, manager = api(
        run_exclusively=exclusively,
        on_finished=lambda record, outcome: seen.append((record.state, type(outcome).__name__, lock.locked())),
    )
    run_id = start(client, body(tmp_path))
    wait_done(client, run_id)
    # Inside the lock, and before clients can see the run as ended (so they never read a half-published result).
    assert seen == [("running", "TrainResult", True)]


# ---------------------------------------------------------------------------------------------------------------
# Stopping


@pytest.mark.parametrize("route", ["/runs/{id}/stop", "/stop"])
def test_stop_ends_the_run_as_stopped_and_still_writes_the_embedding(tmp_path, api, host, route):
    bridge = GateBridge(hold_at=2)
    client, _ = api(bridge=bridge)
    job_id = start(client, body(tmp_path, max_steps=50))
    assert bridge.reached.wait(WAIT_S)
    response = client.post(V1 + route.format(id=job_id))
    assert response.status_code == 200
    assert response.json() == {"id": job_id, "state": "running", "stop_requested": True}
    assert client.get(f"{V1}/runs/{job_id}").json()["status_text"].startswith("stopping")
    bridge.proceed.set()

    status = wait_done(client, job_id)
    assert status["state"] == "stopped" and status["error"] is None
    assert status["step"] == 2 and status["result"]["steps"] == 2 and status["result"]["stopped"] is True
    path = Path(status["result"]["embedding_path"])
    assert path == tmp_path / "out" / "my-cat.safetensors" and path.is_file()
    assert load_embedding(path).step == 2
    assert bridge.events[-1] == ("end",) and bridge.progress_updates()[-1] == (2, 50)

    again = client.post(f"{V1}/runs/{job_id}/stop")
    assert again.status_code == 409 and "not active (it stopped)" in again.json()["detail"]
    assert client.post(f"{V1}/stop").status_code == 409


def test_the_hosts_interrupt_button_stops_the_run(tmp_path, api):
    bridge = RecordingBridge(interrupt_at=3)
    client, _ = api(bridge=bridge)
    status = wait_done(client, start(client, body(tmp_path, max_steps=50)))
    assert status["state"] == "stopped" and status["step"] == 3 and status["stop_requested"] is True
    assert Path(status["result"]["embedding_path"]).is_file()


def test_a_run_stopped_before_its_first_step_reports_null_not_nan(tmp_path, api):
    bridge = RecordingBridge(interrupt_at=0)
    client, _ = api(bridge=bridge)
    status = wait_done(client, start(client, body(tmp_path)))
    assert status["state"] == "stopped" and status["step"] == 0
    assert status["result"]["final_loss"] is None and status["result"]["smoothed_loss"] is None  # NaN in Python
    assert status["loss_history"] == [] and status["loss"] is None


def test_stopping_a_queued_run_ends_it_before_it_starts(tmp_path, api):
    lock = BlockingLock()
    bridge = RecordingBridge()
    client, manager = api(run_exclusively=lock, bridge=bridge)
    job_id = start(client, body(tmp_path))
    assert lock.entered.wait(WAIT_S)
    assert client.post(f"{V1}/stop").json() == {"id": job_id, "state": "stopped", "stop_requested": True}
    assert manager.active_id is None
    lock.release.set()
    assert manager.join(job_id, WAIT_S)
    status = client.get(f"{V1}/runs/{job_id}").json()
    assert status["state"] == "stopped" and status["status_text"] == "stopped before it started"
    assert status["result"] is None and status["started_at"] is None
    assert bridge.events == [] and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Failures reach the API


def images_gone_while_queued(tmp_path: Path, host: DiffusersHost) -> tuple[dict[str, Any], Any]:
    payload = body(tmp_path)

    def make_host(config: TrainConfig) -> Any:
        shutil.rmtree(payload["images"])  # checked at submission, gone by the time the run starts
        return host

    return payload, make_host


def broken_denoiser(tmp_path: Path, host: DiffusersHost) -> tuple[dict[str, Any], Any]:
    return body(tmp_path), (lambda config: BrokenPredictHost(host))


def no_model(tmp_path: Path, host: DiffusersHost) -> tuple[dict[str, Any], Any]:
    def make_host(config: TrainConfig) -> Any:
        raise HostError("no model is loaded; load a checkpoint first")

    return body(tmp_path), make_host


def bad_timestep(tmp_path: Path, host: DiffusersHost) -> tuple[dict[str, Any], Any]:
    return body(tmp_path, timestep_max=5000), (lambda config: host)


@pytest.mark.parametrize(
    "case, error_type, error_start, error_field",
    [
        (images_gone_while_queued, "DatasetError", "DatasetError: images: folder '", "images"),
        (
            broken_denoiser,
            "TrainingError",
            "TrainingError: the device ran out of memory at step 1 (batch_size 2 at 64 px). Lower batch_size",
            None,
        ),
        (no_model, "HostError", "HostError: no model is loaded; load a checkpoint first", None),
        (
            bad_timestep,
            "ConfigError",
            "ConfigError: timestep_max: 5000 is past the model's last timestep",
            "timestep_max",
        ),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_run_that_fails_inside_is_failed_with_the_error_in_the_api(
    tmp_path, api, host, case, error_type, error_start, error_field
):
    payload, make_host = case(tmp_path, host)
    bridge = RecordingBridge()
    finished: list[tuple[RunRecord, Any]] = []
    client, manager = api(
        make_host=make_host, bridge=bridge, on_finished=lambda record, outcome: finished.append((record, outcome))
    )
    job_id = start(client, payload)
    status = wait_done(client, job_id)
    assert status["state"] == "failed" and status["result"] is None
    assert status["error"].startswith(error_start), status["error"]
    assert (status["error_type"], status["error_field"]) == (error_type, error_field)
    assert status["status_text"] == f"failed: {status['error']}"
    assert bridge.events[0] == ("begin", job_id, 3) and bridge.events[-1] == ("end",)
    assert [f"{type(outcome).__name__}: {outcome}" for _, outcome in finished] == [status["error"]]
    assert manager.active_id is None
    listed = client.get(f"{V1}/runs").json()["runs"][0]
    assert listed["state"] == "failed" and listed["error"] == status["error"]


def test_a_failing_run_exclusively_still_ends_the_run_as_failed(tmp_path, api):
    def run_exclusively(fn):
        raise RuntimeError("queue lock unavailable")

    client, manager = api(run_exclusively=run_exclusively)
    job_id = start(client, body(tmp_path))
    assert manager.join(job_id, WAIT_S)
    status = client.get(f"{V1}/runs/{job_id}").json()
    assert status["state"] == "failed" and status["error"] == "RuntimeError: queue lock unavailable"
    assert manager.active_id is None
