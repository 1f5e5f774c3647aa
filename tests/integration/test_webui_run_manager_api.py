"""The WebUI run manager and its HTTP API on the tiny SD1 model, through FastAPI's TestClient (no WebUI needed).

Host pieces are stand-ins passed to ``RunManager``: the model adapter is the diffusers host over the tiny model,
the GPU queue lock is a plain caller (or one that blocks until the test releases it), the progress bridge records
what the WebUI's ``shared.state`` would receive.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient needs it

import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from embedding_trainer import trainer as trainer_module  # noqa: E402
from embedding_trainer.config import TrainConfig  # noqa: E402
from embedding_trainer.embedding_file import load_embedding  # noqa: E402
from embedding_trainer.errors import ConfigError, HostError  # noqa: E402
from embedding_trainer.hosts.diffusers_host import DiffusersHost  # noqa: E402
from embedding_trainer.tools.tiny_models import build_tiny_components  # noqa: E402
from embedding_trainer.trainer import Progress  # noqa: E402
from embedding_trainer.webui import run_manager  # noqa: E402
from embedding_trainer.webui.api import basic_auth_dependency, register_routes  # noqa: E402
from embedding_trainer.webui.run_manager import (  # noqa: E402
    RunActiveError,
    RunManager,
    RunNotFoundError,
    RunRecord,
)
from tests.helpers import run_fields  # noqa: E402

pytestmark = pytest.mark.compat

V1 = "/embtrain/v1"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def host() -> DiffusersHost:
    return DiffusersHost.from_components(build_tiny_components("sd1", seed=0))


#: A test-only route that answers with the id of the server worker thread that served it.
WORKER_ROUTE = "/test/worker-thread"


def body(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    return run_fields(tmp_path, **{"max_steps": 3, **changes})


@pytest.fixture(autouse=True)
def report_every_step(monkeypatch):
    """The bridges below act on exact steps (stop at step 3), so the loop reports after every step."""
    monkeypatch.setattr(trainer_module, "REPORT_INTERVAL_S", 0.0)


class RecordingBridge:
    """Records what the WebUI's job state would receive; ``interrupt_at`` presses Interrupt after that step."""

    def __init__(self, interrupt_at: int | None = None):
        self.events: list[tuple[Any, ...]] = []
        self.interrupt_at = interrupt_at
        self.last_step = 0
        self.threads: set[str] = set()
        self.thread_ids: set[int] = set()

    def begin(self, job_id: str, total_steps: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.thread_ids.add(threading.get_ident())
        self.events.append(("begin", job_id, total_steps))

    def update(self, progress: Progress, text: str) -> None:
        self.last_step = progress.step
        self.events.append(("update", progress.step, progress.total_steps, text))

    def end(self) -> None:
        self.events.append(("end",))

    def interrupted(self) -> bool:
        return self.interrupt_at is not None and self.last_step >= self.interrupt_at

    def progress_updates(self) -> list[tuple[int, int]]:
        return [(e[1], e[2]) for e in self.events if e[0] == "update" and e[3].startswith("step ")]


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


@pytest.fixture
def api(host):
    """``api(**manager_options) -> (client, manager)``; every manager is closed after the test."""
    managers: list[RunManager] = []
    clients: list[TestClient] = []

    def build(
        make_host=None, run_exclusively=None, bridge=None, on_finished=None, preview=None, auth=None
    ) -> tuple[TestClient, RunManager]:
        manager = RunManager(
            make_host or (lambda config: host),
            run_exclusively or (lambda fn: fn()),
            bridge,
            on_finished,
            preview,
        )
        managers.append(manager)
        app = FastAPI()
        register_routes(app, manager, auth)
        app.add_api_route(WORKER_ROUTE, lambda: threading.get_ident(), methods=["GET"])  # which worker serves
        # One event loop for the client's life, as in a real server: runs started through the API go on its
        # worker threads and must outlive the request that started them.
        client = TestClient(app).__enter__()
        clients.append(client)
        return client, manager

    yield build
    for manager in managers:
        manager.close(timeout=WAIT_S)
    for client in clients:
        client.__exit__(None, None, None)


def wait_done(client: TestClient, job_id: str, **request: Any) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        response = client.get(f"{V1}/runs/{job_id}", **request)
        assert response.status_code == 200, response.text
        status = response.json()
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"run {job_id} did not end within {WAIT_S}s: {status}")


def start(client: TestClient, payload: dict[str, Any]) -> str:
    response = client.post(f"{V1}/runs", json=payload)
    assert response.status_code == 200, response.text
    return response.json()["id"]


# ---------------------------------------------------------------------------------------------------------------
# A run end to end


def test_a_run_trains_and_its_status_has_steps_losses_and_the_result(tmp_path, api, host):
    bridge = RecordingBridge()
    finished: list[tuple[RunRecord, Any]] = []
    client, manager = api(bridge=bridge, on_finished=lambda record, outcome: finished.append((record, outcome)))
    worker = client.get(WORKER_ROUTE).json()
    response = client.post(f"{V1}/runs", json=body(tmp_path, max_steps=3, resolution=0))
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    assert job_id.startswith("embtrain-") and len(job_id) == len("embtrain-") + 12
    assert response.json()["url"] == f"{V1}/runs/{job_id}"

    status = wait_done(client, job_id)
    assert status["state"] == "finished", status["error"]
    assert status["error"] is None and status["active"] is False
    assert status["model"] == {
        "name": host.model_name,
        "family": "sd1",
        "prediction_type": "epsilon",
        "encoders": {"clip_l": 32},
    }
    assert (status["step"], status["total_steps"]) == (3, 3)
    assert [point[0] for point in status["loss_history"]] == [1, 2, 3]
    assert all(isinstance(v, float) and v > 0 for point in status["loss_history"] for v in point[1:])
    assert status["loss"] == status["loss_history"][-1][1]
    assert status["learning_rate"] == pytest.approx(float(TrainConfig().learning_rate))  # in the units given (table)
    assert status["it_per_s"] > 0 and status["eta_s"] == 0
    assert status["config"]["max_steps"] == 3 and status["config"]["name"] == "my-cat"
    # Resolution 0 means the checkpoint's own; the status, the config and the run's config.json say which.
    assert status["resolution"] == status["config"]["resolution"] == host.default_resolution
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolution"] == host.default_resolution
    assert status["cpu_threads"].startswith("1 CPU thread")  # the tests run torch on one thread
    # The held-out score at the start and the end (eval_every 25 > 3 steps): for the chart and the status.
    assert [point[0] for point in status["held_out_history"]] == [0, 3]  # the initial vectors, then the end
    assert status["held_out_loss"] == status["held_out_history"][-1][1] > 0
    assert status["started_at"] <= status["finished_at"] and status["elapsed_s"] >= 0
    result = status["result"]
    assert result["embedding_path"] == str(tmp_path / "out" / "my-cat.safetensors")
    assert Path(result["embedding_path"]).is_file()
    assert (result["steps"], result["stopped"]) == (3, False)
    assert result["final_loss"] == status["loss_history"][-1][1]
    data = load_embedding(result["embedding_path"], host.encoders)
    assert data.step == 3 and data.vectors["clip_l"].shape == (TrainConfig().num_vectors, 32)
    assert status["status_text"].startswith("finished after step 3")

    # The host's job state saw the run begin with its total, every step, and the end.
    assert bridge.events[0] == ("begin", job_id, 3)
    assert bridge.events[-1] == ("end",)
    assert bridge.progress_updates() == [(1, 3), (2, 3), (3, 3)]
    texts = [e[3] for e in bridge.events if e[0] == "update"]
    assert any(t.startswith("encoding latents") for t in texts)
    assert texts[-1].startswith("step 3/3, loss ")
    # The server's worker that served the last request, where the host's own torch work runs too: its CPU
    # thread team is reused, not joined by a competing one.
    assert bridge.thread_ids == {worker}

    assert [(r.id, outcome.steps, str(outcome.embedding_path)) for r, outcome in finished] == [
        (job_id, 3, status["result"]["embedding_path"])
    ]
    listing = client.get(f"{V1}/runs").json()
    assert listing["active_id"] is None
    assert [run["id"] for run in listing["runs"]] == [job_id]
    assert "loss_history" not in listing["runs"][0] and listing["runs"][0]["result"] == result
    assert manager.active_id is None


def test_the_loss_history_keeps_only_the_newest_points(tmp_path, api, monkeypatch):
    monkeypatch.setattr(run_manager, "LOSS_HISTORY_POINTS", 3)
    _, manager = api()
    status = manager.start_sync(body(tmp_path, max_steps=5))
    assert status["state"] == "finished", status["error"]
    assert [point[0] for point in status["loss_history"]] == [3, 4, 5]
    assert run_manager.RunRecord(id="x", config=TrainConfig()).loss_history.maxlen == 3


# ---------------------------------------------------------------------------------------------------------------
# Invalid requests


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"max_steps": 0}, "max_steps", "below the minimum 1"),
        ({"max_steps": "10"}, "max_steps", "expected int"),
        ({"bogus": 1}, "bogus", "unknown field"),
        ({"learning_rate": "fast"}, "learning_rate", "not a number"),
        ({"crop": "left"}, "crop", "choose one of: center, random"),
        ({"name": ""}, "name", "is required"),
        ({"name": "my cat"}, "name", "not a valid trigger word"),
        ({"preview_every": -1}, "preview_every", "below the minimum 0"),
        ({"preview_every": True}, "preview_every", "expected int"),
        ({"preview_prompt": 3}, "preview_prompt", "expected str"),
        ({"preview_steps": 0}, "preview_steps", "below the minimum 1"),
        ({"preview_every": 2}, "preview_every", "previews are not available"),
    ],
)
def test_an_invalid_body_is_422_naming_the_field(tmp_path, api, changes, field, words):
    client, manager = api()
    response = client.post(f"{V1}/runs", json=body(tmp_path, **changes))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 1 and detail[0]["field"] == field
    assert words in detail[0]["message"] and not detail[0]["message"].startswith(f"{field}:")
    assert client.get(f"{V1}/runs").json() == {"runs": [], "active_id": None}


@pytest.mark.parametrize(
    "content, words",
    [(b"{not json", "is not valid JSON"), (b"[1, 2]", "expected a JSON object"), (b"", "name")],
)
def test_a_body_that_is_not_an_object_of_fields_is_422(api, content, words):
    client, _ = api()
    response = client.post(f"{V1}/runs", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    if content:
        assert detail["field"] == "body" and words in detail["message"]
    else:  # an empty body is an empty config: the first missing required field is named
        assert detail == {"field": "name", "message": "is required: the trigger word, e.g. 'my-cat'"}


def test_unknown_ids_are_404(api):
    client, _ = api()
    for method, path in [
        ("GET", f"{V1}/runs/embtrain-000000000000"),
        ("POST", f"{V1}/runs/embtrain-000000000000/stop"),
        ("GET", f"{V1}/runs/embtrain-000000000000/previews/0"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["detail"] == "no training run with id 'embtrain-000000000000'"


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


def test_the_history_keeps_the_newest_50_runs(tmp_path, api):
    def make_host(config: TrainConfig) -> Any:
        raise HostError("no model")

    client, manager = api(make_host=make_host)
    ids = [manager.start_sync(body(tmp_path))["id"] for _ in range(55)]
    runs = manager.list_runs()
    assert [run["id"] for run in runs] == ids[::-1][:50]
    assert all(run["state"] == "failed" for run in runs)
    with pytest.raises(RunNotFoundError):
        manager.status(ids[4])
    assert client.get(f"{V1}/runs/{ids[4]}").status_code == 404
    assert client.get(f"{V1}/runs/{ids[5]}").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Previews


def test_previews_every_n_steps_are_listed_and_served(tmp_path, api):
    calls: list[tuple[int, str, int]] = []

    def preview(record: RunRecord, step: int) -> list[Path]:
        calls.append((step, record.preview.prompt, record.preview.seed))
        if step == 4:
            raise ValueError("sampler exploded")
        path = tmp_path / "previews" / f"step-{step}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (step * 40, 0, 0)).save(path)
        return [path]

    client, _ = api(preview=preview)
    job_id = start(
        client, body(tmp_path, max_steps=5, preview_every=2, preview_prompt="itcat on grass", preview_seed=7)
    )
    status = wait_done(client, job_id)
    assert status["state"] == "finished"  # a failed preview does not cost the run
    assert calls == [(2, "itcat on grass", 7), (4, "itcat on grass", 7)]
    assert (status["preview_every"], status["preview_seed"], status["preview_steps"]) == (2, 7, 20)
    assert status["previews"] == [f"{V1}/runs/{job_id}/previews/0"]
    assert status["preview_steps"] == 20 and status["preview_at_steps"] == [2]
    assert status["preview_paths"] == [str(tmp_path / "previews" / "step-2.png")]
    assert status["warnings"] == ["preview at step 4 failed: ValueError: sampler exploded"]

    image = client.get(status["previews"][0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (tmp_path / "previews" / "step-2.png").read_bytes()
    assert client.get(f"{V1}/runs/{job_id}/previews/1").status_code == 404
    assert client.get(f"{V1}/runs/{job_id}/previews/-1").status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# Auth and schema


def test_every_route_requires_the_api_credentials(tmp_path, api):
    client, manager = api(auth=basic_auth_dependency({"alice": "s3cret", "bob": "hunter2"}))
    routes = {
        ("POST", "/runs"): 422,  # authorised, then the empty body is rejected
        ("GET", "/runs"): 200,
        ("GET", "/runs/{job_id}"): 404,  # authorised, then the id is unknown
        ("POST", "/runs/{job_id}/stop"): 404,
        ("POST", "/stop"): 409,  # no run is active
        ("GET", "/runs/{job_id}/previews/{index}"): 404,
        ("GET", "/config-schema"): 200,
    }
    registered = {(m, r.path[len(V1) :]) for r in client.app.routes if r.path.startswith(V1) for m in r.methods}
    assert registered == set(routes)  # every route the API has is checked here
    for (method, template), authorised in routes.items():
        path = V1 + template.format(job_id="embtrain-000000000000", index=0)
        for auth in (None, ("alice", "wrong"), ("mallory", "s3cret"), ("bob", "s3cret")):
            response = client.request(method, path, auth=auth)
            assert response.status_code == 401, (method, path, auth)
            assert response.headers["www-authenticate"] == "Basic"
        response = client.request(method, path, auth=("alice", "s3cret"))
        assert response.status_code == authorised, (method, path, response.text)
    assert client.get(f"{V1}/runs", auth=("bob", "hunter2")).status_code == 200
    assert manager.list_runs() == []
    with pytest.raises(ValueError, match="no credentials"):
        basic_auth_dependency({})


def test_without_an_auth_dependency_routes_are_open(api):
    client, _ = api()
    assert client.get(f"{V1}/runs").status_code == 200


def test_the_config_schema_describes_every_field(api):
    client, _ = api()
    response = client.get(f"{V1}/config-schema")
    assert response.status_code == 200
    schema = response.json()
    fields = {f["name"]: f for f in schema["fields"]}
    assert list(fields) == [f.name for f in TrainConfig.fields()]
    lr = fields["learning_rate"]
    help_text = next(f.metadata["help"] for f in TrainConfig.fields() if f.name == "learning_rate")
    assert lr["help"] == help_text and "piecewise schedule" in lr["help"]
    default_rate = TrainConfig().learning_rate
    assert (lr["type"], lr["default"], lr["accepts_number"], lr["choices"]) == ("str", default_rate, True, None)
    assert (fields["max_steps"]["type"], fields["max_steps"]["default"], fields["max_steps"]["min"]) == ("int", 1000, 1)
    assert fields["num_vectors"]["max"] == 75 and fields["tag_dropout"]["type"] == "float"
    assert fields["crop"]["choices"] == ["center", "random"] and fields["flip"]["type"] == "bool"
    assert fields["grad_clip_value"]["min_exclusive"] == 0.0
    options = [o["name"] for o in schema["run_options"]]
    assert options == ["preview_every", "preview_prompt", "preview_seed", "preview_steps"]
    assert schema["required"] == ["name", "images"]


def test_a_config_error_keeps_its_field_when_raised_by_the_manager(tmp_path, api):
    _, manager = api()
    with pytest.raises(ConfigError) as raised:
        manager.start(body(tmp_path, images=""))
    assert raised.value.field == "images"
    assert manager.active_id is None and manager.list_runs() == []


def test_an_existing_embedding_is_a_conflict_at_start(tmp_path, api):
    client, manager = api()
    payload = body(tmp_path)
    out = Path(payload["output_dir"]) / f"{payload['name']}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"keep")
    response = client.post(f"{V1}/runs", json=payload)
    assert response.status_code == 409 and "already exists" in response.json()["detail"]
    assert out.read_bytes() == b"keep" and manager.list_runs() == []


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


def test_warnings_of_a_run_reach_its_status(tmp_path, api):
    """A corrupt image among good ones and a trigger the model knows as one word train, and both say so."""
    client, _ = api()
    payload = body(tmp_path, name="cat")
    (Path(payload["images"]) / "broken.png").write_bytes(b"not a png")
    status = wait_done(client, start(client, payload))
    assert status["state"] == "finished", status["error"]
    warnings = status["warnings"]
    assert any(w.startswith("skipped ") and "broken.png" in w for w in warnings), warnings
    assert any("'cat' is a word the model already knows" in w for w in warnings), warnings
    assert client.get(f"{V1}/runs").json()["runs"][0]["warnings"] == warnings


def _no_name_template(tmp_path: Path) -> dict[str, Any]:
    template = tmp_path / "no-name.txt"
    template.write_text("a photo of [filewords]\na photo of a [name]\n", encoding="utf-8")
    return {"template": str(template)}


def _folder(tmp_path: Path, files: dict[str, bytes]) -> dict[str, Any]:
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {"images": str(folder)}


@pytest.mark.parametrize(
    "changes, field, words",
    [
        (lambda tmp: {"images": str(tmp / "nowhere")}, "images", "does not exist; check the path"),
        (lambda tmp: _folder(tmp, {}), "images", "no images"),
        (lambda tmp: _folder(tmp, {"notes.txt": b"hello"}), "images", "no images"),
        (lambda tmp: _folder(tmp, {"a.png": b"not a png", "b.png": b"nor this"}), "images", "readable image"),
        (_no_name_template, "template", "line 1 lacks [name]"),
        (lambda tmp: {"template": str(tmp / "missing.txt")}, "template", "does not exist"),
        (lambda tmp: {"init_mode": "file", "init_file": str(tmp / "none.pt")}, "init_file", "does not exist"),
        (lambda tmp: {"resume": str(tmp / "no-run")}, "resume", "neither a state file"),
    ],
    ids=[
        "missing-folder",
        "empty-folder",
        "no-images",
        "unreadable-images",
        "template-without-name",
        "missing-template",
        "missing-init-file",
        "missing-resume",
    ],
)
def test_inputs_that_can_be_checked_before_queueing_are_422_naming_the_field(tmp_path, api, changes, field, words):
    client, manager = api()
    response = client.post(f"{V1}/runs", json=body(tmp_path, **changes(tmp_path)))
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == field and words in detail["message"], detail
    assert manager.list_runs() == []  # nothing was queued
