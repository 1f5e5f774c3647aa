"""What the tests of the WebUI run manager and its HTTP API share (the tests in this folder): the API served by
FastAPI's TestClient on the tiny SD1 model, no WebUI needed. Not a test module.

Host pieces are stand-ins passed to ``RunManager``: the model adapter is the diffusers host over the tiny model,
the GPU queue lock is a plain caller (or one that blocks until the test releases it), the progress bridge records
what the WebUI's ``shared.state`` would receive. ``conftest.py`` makes the ``host`` and ``api`` fixtures from
``tiny_host`` and ``api_servers``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient needs it

from fastapi import FastAPI
from fastapi.testclient import TestClient

from embedding_trainer import trainer as trainer_module
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.tools.tiny_models import build_tiny_components
from embedding_trainer.trainer import Progress
from embedding_trainer.webui.api import register_routes
from embedding_trainer.webui.run_manager import RunManager
from tests.helpers import run_fields

V1 = "/embtrain/v1"
WAIT_S = 60.0
#: A test-only route that answers with the id of the server worker thread that served it.
WORKER_ROUTE = "/test/worker-thread"

#: ``build(**manager_options) -> (client, manager)``, as the ``api`` fixtures give it.
ApiBuilder = Callable[..., tuple[TestClient, RunManager]]


def tiny_host() -> DiffusersHost:
    return DiffusersHost.from_components(build_tiny_components("sd1", seed=0))


def body(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    return run_fields(tmp_path, **{"max_steps": 3, **changes})


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


@contextlib.contextmanager
def api_servers(host: DiffusersHost) -> Iterator[ApiBuilder]:
    """Yields ``build(**manager_options) -> (client, manager)``; every manager is closed at the end.

    The loop reports after every step meanwhile: the bridges act on exact steps (stop at step 3).
    """
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

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "REPORT_INTERVAL_S", 0.0)
        try:
            yield build
        finally:
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
