"""Submitting a run to the WebUI's HTTP API: what is refused before anything is queued (422 naming the field, 404,
409 for an existing embedding), the credentials every route asks for, and the config schema.

The API runs on the tiny SD1 model through FastAPI's TestClient; ``stand_ins.py`` has the stand-ins, ``conftest.py``
the fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient needs it

from embedding_trainer.config import TrainConfig  # noqa: E402
from embedding_trainer.errors import ConfigError  # noqa: E402
from embedding_trainer.webui.api import basic_auth_dependency  # noqa: E402
from tests.integration.webui_api.stand_ins import V1, body  # noqa: E402

pytestmark = pytest.mark.compat


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
