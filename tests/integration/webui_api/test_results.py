"""What a run reports through the WebUI's HTTP API: its status from the first step to the result, the loss history,
warnings, previews, and the list of remembered runs.

The API runs on the tiny SD1 model through FastAPI's TestClient; ``stand_ins.py`` has the stand-ins, ``conftest.py``
the fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient needs it

from PIL import Image  # noqa: E402

from embedding_trainer.config import TrainConfig  # noqa: E402
from embedding_trainer.embedding_reading import load_embedding  # noqa: E402
from embedding_trainer.errors import HostError  # noqa: E402
from embedding_trainer.webui import run_record  # noqa: E402
from embedding_trainer.webui.run_manager import RunNotFoundError  # noqa: E402
from embedding_trainer.webui.run_record import RunRecord  # noqa: E402
from tests.integration.webui_api.stand_ins import (  # noqa: E402
    V1,
    WORKER_ROUTE,
    RecordingBridge,
    body,
    start,
    wait_done,
)

pytestmark = pytest.mark.compat


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
    monkeypatch.setattr(run_record, "LOSS_HISTORY_POINTS", 3)
    _, manager = api()
    status = manager.start_sync(body(tmp_path, max_steps=5))
    assert status["state"] == "finished", status["error"]
    assert [point[0] for point in status["loss_history"]] == [3, 4, 5]
    assert run_record.RunRecord(id="x", config=TrainConfig()).loss_history.maxlen == 3


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
