"""Bad inputs across the command line and the HTTP API, one table: each names the problem's field and the fix.

CLI rows assert exit status 2, ``error: <field>: ...`` on stderr and the words of the fix; API rows assert the
status (422 for a bad field, 409 for a conflict), the field and the words. Nothing is trained in any row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from embedding_trainer.standalone import cli
from tests.helpers import make_images, run_fields, train_args

pytestmark = pytest.mark.compat


@dataclass(frozen=True)
class Case:
    """``make(tmp, model, images)`` -> CLI arguments (list) or an API body (dict)."""

    id: str
    make: Callable[[Path, Path, Path], Any]
    field: str | None  # None: a file-level error (no config field)
    words: str


def _train(*extra: str) -> Callable[[Path, Path, Path], list[str]]:
    def make(tmp: Path, model: Path, images: Path) -> list[str]:
        return train_args(model, images, tmp, "--device", "cpu", *(a.format(tmp=tmp) for a in extra), steps=2)

    return make


def _with_images(files: dict[str, bytes], *extra: str) -> Callable[[Path, Path, Path], list[str]]:
    def make(tmp: Path, model: Path, images: Path) -> list[str]:
        folder = tmp / "folder"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        args = _train(*extra)(tmp, model, images)
        args[args.index("--images") + 1] = str(folder)
        return args

    return make


def _file_flag(flag: str, file_name: str, content: str) -> Callable[[Path, Path, Path], list[str]]:
    """``flag`` pointing at a file ``file_name`` holding ``content`` (a template, a --config file)."""

    def make(tmp: Path, model: Path, images: Path) -> list[str]:
        (tmp / file_name).write_text(content, encoding="utf-8")
        return _train(flag, "{tmp}/" + file_name)(tmp, model, images)

    return make


def _template(text: str) -> Callable[[Path, Path, Path], list[str]]:
    return _file_flag("--template", "t.txt", text)


def _existing_output(tmp: Path, model: Path, images: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "my-cat.safetensors").write_bytes(b"someone's embedding")
    return _train()(tmp, model, images)


def _config_file(content: str) -> Callable[[Path, Path, Path], list[str]]:
    return _file_flag("--config", "c.json", content)


def _one_trainer_output_embedding(tmp: Path, model: Path, images: Path) -> list[str]:
    tensors = {"emp_params": torch.zeros(1, 32), "emp_params_out": torch.randn(1, 32)}
    safetensors.torch.save_file(tensors, str(tmp / "ot.safetensors"))
    return ["inspect", str(tmp / "ot.safetensors")]


CLI_CASES = [
    Case("missing-folder", _train("--images", "{tmp}/nowhere"), "images", "does not exist; check the path"),
    Case("empty-folder", _with_images({}), "images", "no images"),
    Case("no-image-files", _with_images({"notes.txt": b"hi"}), "images", "no images"),
    Case("unreadable-images", _with_images({"a.png": b"x", "b.png": b"y"}), "images", "repair or remove"),
    Case("missing-template", _train("--template", "{tmp}/none.txt"), "template", "check the path"),
    Case("template-without-name", _template("a photo\n"), "template", "add [name] where the trigger word belongs"),
    Case("empty-template", _template("\n\n"), "template", "write one prompt per line"),
    Case("resolution-not-8", _train("--resolution", "100"), "resolution", "try 96 or 104"),
    Case("resolution-small", _train("--resolution", "32"), "resolution", "use at least 64"),
    Case("learning-rate-text", _train("--learning-rate", "fast"), "learning_rate", "0.005:100"),
    Case("vectors-too-many", _train("--num-vectors", "80"), "num_vectors", "75"),
    Case(
        "missing-init-file",
        _train("--init-mode", "file", "--init-file", "{tmp}/none.pt"),
        "init_file",
        "give the path of an embedding file",
    ),
    Case("missing-resume", _train("--resume", "{tmp}/no-run"), "resume", "check the path"),
    Case("missing-config", _train("--config", "{tmp}/none.json"), "config", "give the path of a JSON file"),
    Case("config-not-object", _config_file("[1, 2]"), "config", "must hold a JSON object"),
    Case("config-unknown-field", _config_file('{"bach_size": 2}'), "bach_size", "batch_size"),
    Case("existing-output", _existing_output, None, "--overwrite"),
    Case("timestep-past-end", _train("--timestep-max", "1000"), "timestep_max", "past the model's last timestep"),
    Case("cuda-without-gpu", _train("--device", "cuda:0"), "device", "use cpu or auto"),
    Case("not-a-model-folder", lambda tmp, model, images: _train()(tmp, tmp, images), None, "model_index.json"),
    Case(
        "inspect-missing", lambda tmp, model, images: ["inspect", str(tmp / "gone.safetensors")], None, "file not found"
    ),
    Case("inspect-output-embedding", _one_trainer_output_embedding, None, "output embedding off"),
    Case(
        "convert-unknown-suffix",
        lambda tmp, model, images: ["convert", str(tmp / "a.safetensors"), str(tmp / "a.x")],
        None,
        "name the file .safetensors (recommended), .pt or .png",
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_the_command_line_names_the_field_and_the_fix(
    case: Case, tmp_path: Path, tiny_model_dirs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.id == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    images = tmp_path / "images"
    make_images(images, count=4)
    assert cli.main(case.make(tmp_path, tiny_model_dirs("sd1"), images)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if case.field is not None:
        assert f"error: {case.field}: " in err or f"error: {case.field} " in err, err
    assert case.words in err, err
    assert not (tmp_path / "run" / "saves").exists()  # nothing was trained


API_CASES = [
    Case("unknown-field", lambda tmp, m, i: {"bach_size": 2}, "bach_size", "batch_size"),
    Case("wrong-type", lambda tmp, m, i: {"max_steps": "many"}, "max_steps", "int"),
    Case("below-minimum", lambda tmp, m, i: {"max_steps": 0}, "max_steps", "minimum 1"),
    Case("bad-choice", lambda tmp, m, i: {"crop": "left"}, "crop", "center, random"),
    Case("no-name", lambda tmp, m, i: {"name": ""}, "name", "the trigger word"),
    Case("missing-folder", lambda tmp, m, i: {"images": str(tmp / "nowhere")}, "images", "check the path"),
    Case(
        "template-without-name",
        lambda tmp, m, i: {"template": _write(tmp / "t.txt", "a cat\n")},
        "template",
        "add [name]",
    ),
    Case("bad-preview-option", lambda tmp, m, i: {"preview_steps": 0}, "preview_steps", "minimum 1"),
]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_the_api_names_the_field_and_the_fix(case: Case, tmp_path: Path) -> None:
    pytest.importorskip("httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from embedding_trainer.webui.api import register_routes
    from embedding_trainer.webui.run_manager import RunManager

    def no_host(config: Any) -> Any:
        raise AssertionError("a bad request must not reach the model")

    app = FastAPI()
    manager = RunManager(no_host, lambda fn: fn())
    register_routes(app, manager)
    body = {**run_fields(tmp_path), **case.make(tmp_path, tmp_path, tmp_path)}
    with TestClient(app) as client:
        response = client.post("/embtrain/v1/runs", content=json.dumps(body))
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == case.field and case.words in detail["message"], detail
    assert manager.list_runs() == []


def test_the_table_has_at_least_25_cases() -> None:
    assert len(CLI_CASES) + len(API_CASES) >= 25
