"""The WebUI glue against stand-ins for the few ``modules.*`` symbols it uses (the host's real signatures).

The stand-ins are put into ``sys.modules`` the way the WebUI provides them; the real host is exercised by the
opt-in integration tier.
"""

from __future__ import annotations

import importlib
import runpy
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from embedding_trainer.config import TrainConfig  # noqa: E402
from embedding_trainer.embedding_file import EmbeddingData, file_sha256, save_embedding  # noqa: E402
from embedding_trainer.errors import HostError, TrainingError  # noqa: E402
from embedding_trainer.host import EncoderInfo  # noqa: E402
from embedding_trainer.hosts.a1111 import A1111Host
from embedding_trainer.trainer import TrainResult  # noqa: E402
from embedding_trainer.webui import extension, host_symbols  # noqa: E402
from embedding_trainer.webui.run_options import PreviewOptions  # noqa: E402
from embedding_trainer.webui.run_record import RunRecord  # noqa: E402

pytestmark = pytest.mark.compat
ROOT = Path(__file__).resolve().parents[2]


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None):
        self.default, self.label, self.section = default, label, section


class Options:
    def __init__(self) -> None:
        self.data_labels: dict[str, OptionInfo] = {}

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info


class State:
    def __init__(self) -> None:
        self.job, self.job_count, self.job_no = "", 0, 0
        self.sampling_step = self.sampling_steps = 0
        self.textinfo, self.interrupted = None, False

    def begin(self, job: str = "(unknown)") -> None:
        self.job = job

    def end(self) -> None:
        self.job = ""

    def assign_current_image(self, image: Any) -> None:
        self.current_image = image


class EmbeddingDatabase:
    def __init__(self) -> None:
        self.word_embeddings: dict[str, Any] = {}
        self.forced_reloads = 0

    def register_embedding(self, embedding: Any, model: Any) -> Any:
        self.word_embeddings[embedding.name] = embedding
        return embedding

    def load_textual_inversion_embeddings(self, force_reload: bool = False) -> None:
        self.forced_reloads += int(force_reload)


class Txt2Img:
    """The keyword arguments of the host's ``StableDiffusionProcessingTxt2Img`` that previews use (v1.10)."""

    def __init__(
        self,
        *,
        sd_model=None,
        prompt="",
        negative_prompt="",
        seed=-1,
        sampler_name=None,
        steps=50,
        cfg_scale=7.0,
        width=512,
        height=512,
        batch_size=1,
        n_iter=1,
        do_not_save_samples=False,
        do_not_save_grid=False,
    ):
        self.prompt, self.seed, self.steps, self.size = prompt, seed, steps, (width, height)
        self.do_not_reload_embeddings = False
        self.closed = False

    def close(self) -> None:
        self.closed = True


def fake_processing(calls: list[Any]) -> types.SimpleNamespace:
    """``modules.processing`` for previews: records what the pipeline saw at the moment it ran."""
    processing_class = type("P", (), {"cached_c": [None, None], "cached_uc": [None, None]})

    def process_images(p: Txt2Img) -> Any:
        calls.append((p, p.do_not_reload_embeddings, list(processing_class.cached_c)))
        processing_class.cached_c = ["cached", "cached"]  # what a real generation leaves behind
        return types.SimpleNamespace(images=[Image.new("RGB", p.size, (len(calls), 0, 0))])

    return types.SimpleNamespace(
        StableDiffusionProcessing=processing_class,
        StableDiffusionProcessingTxt2Img=Txt2Img,
        process_images=process_images,
    )


@pytest.fixture
def webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand-in ``modules`` package; returns handles to what the glue touches."""
    registered: dict[str, list[Any]] = {}
    fakes = types.SimpleNamespace(
        callbacks=registered,
        opts=Options(),
        state=State(),
        db=EmbeddingDatabase(),
        lock=threading.Lock(),
        generations=[],
    )
    shared = types.ModuleType("modules.shared")
    shared.opts, shared.state, shared.OptionInfo, shared.sd_model = fakes.opts, fakes.state, OptionInfo, None
    shared.cmd_opts = types.SimpleNamespace(embeddings_dir=str(tmp_path / "embeddings"), api_auth="ann:se:cret")
    modules = {
        "modules": types.ModuleType("modules"),
        "modules.shared": shared,
        "modules.sd_hijack": types.SimpleNamespace(model_hijack=types.SimpleNamespace(embedding_db=fakes.db)),
        "modules.textual_inversion": types.ModuleType("modules.textual_inversion"),
        "modules.textual_inversion.textual_inversion": types.SimpleNamespace(Embedding=object),
        "modules.call_queue": types.SimpleNamespace(queue_lock=fakes.lock, wrap_gradio_gpu_call=lambda f, **k: f),
        "modules.processing": fake_processing(fakes.generations),
        "modules.paths": types.SimpleNamespace(data_path=str(tmp_path)),
        "modules.progress": types.SimpleNamespace(start_task=lambda i: None, finish_task=lambda i: None),
        "modules.lowvram": types.SimpleNamespace(send_everything_to_cpu=lambda: None),
    }
    callbacks = types.ModuleType("modules.script_callbacks")
    for name in ("on_app_started", "on_ui_settings", "on_before_reload", "on_script_unloaded", "on_ui_tabs"):
        setattr(callbacks, name, lambda fn, _name=name: registered.setdefault(_name, []).append(fn))
    modules["modules.script_callbacks"] = callbacks
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    fakes.processing = modules["modules.processing"].StableDiffusionProcessing
    fakes.tmp = tmp_path
    return fakes


def test_the_entry_script_only_registers_callbacks(webui):
    runpy.run_path(str(ROOT / "scripts" / "embedding_trainer_entry.py"))
    assert sorted(webui.callbacks) == [
        "on_app_started",
        "on_before_reload",
        "on_script_unloaded",
        "on_ui_settings",
        "on_ui_tabs",
    ]
    assert len((ROOT / "scripts" / "embedding_trainer_entry.py").read_text().splitlines()) <= 5
    assert [p.name for p in (ROOT / "scripts").glob("*.py")] == ["embedding_trainer_entry.py"]


def test_a_missing_host_symbol_names_it_and_the_supported_versions(webui, monkeypatch):
    monkeypatch.setitem(sys.modules, "modules.call_queue", types.SimpleNamespace(wrap_gradio_gpu_call=None))
    with pytest.raises(HostError, match=r"no modules\.call_queue\.queue_lock .* supports AUTOMATIC1111 WebUI v1\.6"):
        host_symbols.load()


def test_settings_are_prefixed_and_in_their_own_section(webui):
    glue = extension.register()
    webui.callbacks["on_ui_settings"][0]()
    assert set(webui.opts.data_labels) == {key for key, _, _ in extension.SETTINGS}
    assert all(key.startswith("embtrain_") for key in webui.opts.data_labels)
    assert {info.section for info in webui.opts.data_labels.values()} == {("embtrain", "Embedding Trainer")}
    assert glue.manager.active_id is None


def test_defaults_put_the_result_in_the_embeddings_folder_and_run_files_outside_it(webui):
    glue = extension.register()
    values = glue.config_defaults({"name": "my-cat", "images": "x", "save_every": 5})
    config = TrainConfig.from_dict(values)
    assert config.output_dir == str(webui.tmp / "embeddings")
    assert config.run_dir == str(webui.tmp / "embtrain-runs" / "my-cat")
    assert not Path(config.run_dir).is_relative_to(Path(config.output_dir))
    assert config.save_every == 5 and config.keep_saves == 3  # given fields win; settings fill the rest


def test_api_auth_parsing_keeps_colons_in_passwords():
    assert extension.parse_api_auth("ann:se:cret, bob:pw") == {"ann": "se:cret", "bob": "pw"}
    assert extension.parse_api_auth(None) == {}


def test_app_started_adds_the_api_behind_the_hosts_api_auth(webui):
    extension.register()
    app = FastAPI()
    webui.callbacks["on_app_started"][0](None, app)
    client = TestClient(app)
    assert client.get("/embtrain/v1/runs").status_code == 401
    response = client.get("/embtrain/v1/runs", auth=("ann", "se:cret"))
    assert response.status_code == 200 and response.json()["runs"] == []


class PublishingHost:
    """What on_finished needs from A1111Host: encoders, the database and publish()."""

    def __init__(self, db: EmbeddingDatabase) -> None:
        self.encoders = (EncoderInfo("clip_l", 8),)
        self.embedding_db = db
        self.published: list[tuple] = []

    def publish(self, trigger: str, vectors: dict, step: int, path: str, sha256: str) -> None:
        self.published.append((trigger, vectors["clip_l"].clone(), step, path, sha256))

    reload_embeddings = A1111Host.reload_embeddings


def test_a_finished_run_is_published_with_hash_and_stale_conditioning_dropped(webui):
    glue = extension.register()
    glue.host = host = PublishingHost(webui.db)
    config = TrainConfig.from_dict(glue.config_defaults({"name": "my-cat", "images": "x"}))
    vectors = torch.randn(2, 8)
    path = save_embedding(
        EmbeddingData("my-cat", {"clip_l": vectors}, step=7), Path(config.output_dir) / "my-cat.safetensors"
    )
    webui.processing.cached_c = ["stale", "stale"]
    glue.on_finished(
        RunRecord(id="embtrain-1", config=config), TrainResult(path, path.parent, 7, 7, 1.0, 1.0, 0.1, False)
    )
    (trigger, published, step, published_path, sha) = host.published[0]
    assert (trigger, step, published_path, sha) == ("my-cat", 7, str(path), file_sha256(path))
    assert torch.equal(published, vectors)
    assert webui.processing.cached_c == [None, None] and webui.processing.cached_uc == [None, None]
    assert not webui.lock.locked()  # the hook runs inside the run's lock; it takes none itself


def test_a_failed_run_reloads_the_embeddings_from_disk(webui):
    glue = extension.register()
    glue.host = host = PublishingHost(webui.db)
    config = TrainConfig.from_dict(glue.config_defaults({"name": "my-cat", "images": "x"}))
    glue.on_finished(RunRecord(id="embtrain-2", config=config), TrainingError("the loss became nan"))
    assert host.published == [] and webui.db.forced_reloads == 1
    glue.on_finished(RunRecord(id="embtrain-3", config=config), None)  # never ran: nothing to reload
    assert webui.db.forced_reloads == 1


def test_previews_use_the_live_vectors_without_stale_conditioning_and_land_in_the_run_folder(webui):
    glue = extension.register()
    config = TrainConfig.from_dict(glue.config_defaults({"name": "my-cat", "images": "x", "resolution": 64}))
    record = RunRecord(id="embtrain-4", config=config, preview=PreviewOptions(every=5, seed=42, steps=3))
    webui.processing.cached_c = ["stale", "stale"]
    paths = glue.manager._preview(record, 10)
    p, no_reload, cache_seen = webui.generations[0]
    # The template's first line with the trigger; the host must not reload the folder nor reuse cached conditioning.
    assert (p.prompt, p.seed, p.steps, p.size) == ("a photo of a my-cat", 42, 3, (64, 64))
    assert no_reload and cache_seen == [None, None] and p.closed
    assert webui.processing.cached_c == [None, None]  # nothing left for the next txt2img either
    assert paths == [Path(config.effective_run_dir) / "previews" / "my-cat-step000010.png"]
    assert not paths[0].is_relative_to(config.output_dir)  # a file in the embeddings folder would trigger a reload
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64) and image.getpixel((0, 0)) == (1, 0, 0)
    assert webui.state.current_image is not None  # shown as the WebUI's live preview too
    record = RunRecord(id="embtrain-5", config=config, preview=PreviewOptions(every=5, prompt="  my-cat on grass "))
    glue.manager._preview(record, 5)
    assert webui.generations[1][0].prompt == "my-cat on grass"


def test_glue_modules_import_without_the_webui():
    # The glue imports host symbols lazily through host_symbols.load(), so the package imports anywhere.
    for name in ("embedding_trainer.webui.extension", "embedding_trainer.hosts.a1111"):
        importlib.import_module(name)
