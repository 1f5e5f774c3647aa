"""The training loop on a tiny SD1 model: frozen weights, callbacks, stop, resume, NaN, gradient checks, options."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from embedding_trainer import dataset
from embedding_trainer import trainer as trainer_module
from embedding_trainer.config import TrainConfig
from embedding_trainer.embedding_file import EmbeddingData, save_embedding
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.errors import ConfigError, DatasetError, EmbeddingFileError, TrainingError
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.run_state import find_state
from embedding_trainer.tools.tiny_models import build_tiny_components
from embedding_trainer.trainer import Callbacks, PreparedRun, Trainer, fp16_supported_on, preflight, prepare_run
from tests.helpers import make_images, run_fields

pytestmark = pytest.mark.compat
DEFAULT_VECTORS = TrainConfig().num_vectors


@pytest.fixture(scope="module")
def host() -> DiffusersHost:
    return DiffusersHost.from_components(build_tiny_components("sd1", seed=0))


def config(tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(**run_fields(tmp_path, **changes))


def prepared(tmp_path: Path, **changes) -> PreparedRun:
    return prepare_run(config(tmp_path, **changes))


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_model_weights_and_vocabulary_are_bit_identical_after_training(tmp_path, host):
    before = [state_of(m) for m in (host.unet, host.vae, *host.text_encoders)]
    flags = [p.requires_grad for p in host.unet.parameters()]
    result = Trainer(prepared(tmp_path, max_steps=3), host).run()
    after = [state_of(m) for m in (host.unet, host.vae, *host.text_encoders)]
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        assert all(torch.equal(b[k], a[k]) for k in b)
    assert [p.requires_grad for p in host.unet.parameters()] == flags  # restored after the run
    assert result.steps == 3 and result.embedding_path.is_file()
    data = load_embedding(result.embedding_path, host.encoders)
    assert data.vectors["clip_l"].shape == (DEFAULT_VECTORS, 32) and data.step == 3 and data.name == "my-cat"
    assert data.metadata["family"] == "sd1"


def test_vectors_change_and_only_the_vectors_get_gradients(tmp_path, host):
    trainer = Trainer(prepared(tmp_path, max_steps=2, learning_rate="0.05"), host)
    init = trainer.vectors["clip_l"].clone()
    trainer.run()
    assert not torch.equal(init, trainer.vectors["clip_l"])
    assert all(p.grad is None for p in host.unet.parameters())
    assert all(p.grad is None for p in host.text_encoders[0].parameters())


def test_callbacks_fire_on_the_right_steps(tmp_path, host):
    progress, saves, steps, statuses = [], [], [], []
    callbacks = Callbacks(
        on_progress=progress.append,
        on_save=lambda path, step: saves.append((path.name, step)),
        on_step=lambda step, vectors: steps.append((step, vectors["clip_l"].shape)),
        on_status=statuses.append,
    )
    Trainer(prepared(tmp_path, max_steps=5, save_every=2, keep_saves=1), host, callbacks).run()
    assert [p.step for p in progress] == [1, 2, 3, 4, 5]
    assert all(p.total_steps == 5 and math.isfinite(p.loss) and p.it_per_s > 0 for p in progress)
    assert progress[-1].eta_s == 0
    assert steps == [(i, (DEFAULT_VECTORS, 32)) for i in range(1, 6)]
    assert saves == [("my-cat-000002.safetensors", 2), ("my-cat-000004.safetensors", 4), ("my-cat.safetensors", 5)]
    assert any(s.startswith("encoding latents") for s in statuses)
    # keep_saves=1 keeps only the newest intermediate pair
    remaining = sorted(p.name for p in (tmp_path / "run" / "saves").iterdir())
    assert remaining == ["my-cat-000004.safetensors", "my-cat-000004.state.safetensors"]
    header = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert header[0] == "step,loss,smoothed_loss,learning_rate,elapsed_s" and len(header) == 6


def test_stop_saves_what_it_has(tmp_path, host):
    steps = []
    callbacks = Callbacks(on_step=lambda step, vectors: steps.append(step), should_stop=lambda: len(steps) >= 2)
    result = Trainer(prepared(tmp_path, max_steps=10), host, callbacks).run()
    assert result.stopped and result.steps == 2
    assert load_embedding(result.embedding_path).step == 2
    assert find_state(tmp_path / "run").name == "my-cat-000002.state.safetensors"


@pytest.mark.parametrize("options", [{}, {"grad_accum": 2, "flip": True, "lr_scheduler": "cosine"}])
def test_resume_equals_an_uninterrupted_run(tmp_path, host, options):
    full = Trainer(prepared(tmp_path / "a", max_steps=6, **options), host).run()
    steps = []
    stopped = Trainer(
        prepared(tmp_path / "b", max_steps=6, **options),
        host,
        Callbacks(on_step=lambda step, vectors: steps.append(step), should_stop=lambda: len(steps) >= 3),
    ).run()
    assert stopped.stopped and stopped.steps == 3
    resumed_config = config(tmp_path / "b", max_steps=6, resume=str(tmp_path / "b" / "run"), overwrite=True, **options)
    resumed = Trainer(prepare_run(resumed_config), host).run()
    assert resumed.steps == 6
    a = load_embedding(full.embedding_path).vectors
    b = load_embedding(resumed.embedding_path).vectors
    assert torch.equal(a["vec"], b["vec"])


def test_resume_refuses_a_changed_setting(tmp_path, host):
    steps = []
    Trainer(
        prepared(tmp_path, max_steps=6),
        host,
        Callbacks(on_step=lambda step, vectors: steps.append(step), should_stop=lambda: len(steps) >= 2),
    ).run()
    with pytest.raises(ConfigError, match="batch_size: 1 differs from the run being resumed"):
        Trainer(prepared(tmp_path, max_steps=6, batch_size=1, resume=str(tmp_path / "run"), overwrite=True), host)


def test_nan_loss_stops_and_keeps_the_last_good_embedding(tmp_path, host, monkeypatch):
    monkeypatch.setattr(trainer_module, "REPORT_INTERVAL_S", 0.0)  # a report (and so a check) after every step
    calls = {"n": 0}
    original = DiffusersHost.predict

    def predict(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(DiffusersHost, "predict", predict)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; the last good vectors \(step 2\)") as error:
        Trainer(prepared(tmp_path, max_steps=5, eval_every=0), host).run()  # predict calls: training steps only
    last_good = tmp_path / "run" / "my-cat-last-good.safetensors"
    assert str(last_good) in str(error.value)
    data = load_embedding(last_good)
    assert data.step == 2 and torch.isfinite(data.vectors["vec"]).all()
    assert not (tmp_path / "out" / "my-cat.safetensors").exists()


def test_running_out_of_memory_names_the_settings_that_fix_it(tmp_path, host, monkeypatch):
    monkeypatch.setattr(trainer_module, "REPORT_INTERVAL_S", 0.0)
    calls = {"n": 0}
    original = DiffusersHost.predict
    # CUDA's error type where torch has it (a CPU build too), else the RuntimeError other backends raise.
    oom = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)

    def predict(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusersHost, "predict", predict)
    with pytest.raises(TrainingError, match="ran out of memory at step 2 \\(batch_size 2 at 64 px\\)") as error:
        Trainer(prepared(tmp_path, max_steps=4, eval_every=0), host).run()
    message = str(error.value)
    assert "batch_size 1, grad_accum 2" in message and "gradient_checkpointing" in message
    assert load_embedding(tmp_path / "run" / "my-cat-last-good.safetensors").step == 1


def test_a_detached_gradient_path_is_caught_at_the_first_step(tmp_path, host, monkeypatch):
    original = DiffusersHost.encode_prompts
    monkeypatch.setattr(
        DiffusersHost,
        "encode_prompts",
        lambda self, p, t, vectors, i: original(self, p, t, {k: v.detach() for k, v in vectors.items()}, i),
    )
    with pytest.raises(TrainingError, match="'clip_l' vectors received no gradient"):
        Trainer(prepared(tmp_path), host).run()


def test_a_zero_gradient_is_caught_at_the_first_step(tmp_path, host, monkeypatch):
    original = DiffusersHost.predict
    monkeypatch.setattr(
        DiffusersHost, "predict", lambda self, x, t, c: original(self, x, t, type(c)(c.hidden_states * 0, None))
    )
    with pytest.raises(TrainingError, match="all-zero gradient"):
        Trainer(prepared(tmp_path), host).run()


def test_an_existing_embedding_is_never_overwritten_unless_asked(tmp_path, host):
    out = tmp_path / "out" / "my-cat.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"keep me")
    with pytest.raises(EmbeddingFileError, match="my-cat.safetensors already exists"):
        Trainer(prepared(tmp_path), host)
    assert out.read_bytes() == b"keep me"
    Trainer(prepared(tmp_path, overwrite=True, max_steps=1), host).run()
    assert out.read_bytes() != b"keep me"


def test_a_run_folder_with_a_previous_run_needs_resume_or_overwrite(tmp_path, host):
    Trainer(prepared(tmp_path, max_steps=2, save_every=1, output_dir=str(tmp_path / "o1")), host).run()
    with pytest.raises(ConfigError, match="holds a previous run"):
        Trainer(prepared(tmp_path, max_steps=2, output_dir=str(tmp_path / "o2")), host)


def test_max_steps_counts_this_run_not_the_stored_step(tmp_path, host):
    init = tmp_path / "init.safetensors"
    save_embedding(EmbeddingData("old", {"clip_l": torch.randn(3, 32)}, step=500), init)
    result = Trainer(prepared(tmp_path, init_mode="file", init_file=str(init), max_steps=2), host).run()
    assert result.steps == 2 and result.embedding_step == 502
    assert load_embedding(result.embedding_path).vectors["vec"].shape == (3, 32)


def test_init_from_text_spreads_tokens_over_the_vectors(tmp_path, host):
    trainer = Trainer(prepared(tmp_path, init_text="a red cat", num_vectors=2), host)
    rows = host.token_embeddings("clip_l", "a red cat")  # 3 tokens -> rows 0 and 1 (i * 3 // 2)
    assert torch.equal(trainer.vectors["clip_l"], rows[[0, 1]])
    random_init = Trainer(prepared(tmp_path, init_mode="random", num_vectors=4, output_dir=str(tmp_path / "r")), host)
    assert random_init.vectors["clip_l"].shape == (4, 32)


@pytest.mark.parametrize(
    "options",
    [
        {"crop": "random", "latent_sampling": "random"},
        {"latent_sampling": "once", "flip": True},
        {"buckets": True, "min_snr_gamma": 5.0, "noise_offset": 0.1},
        {"use_alpha_mask": True, "grad_clip": "norm", "grad_clip_value": 0.01},
        {"learning_rate": "0.01:2, 0.001", "grad_clip": "value", "timestep_min": 100, "timestep_max": 900},
        {"precision": "bf16", "gradient_checkpointing": True},
    ],
)
def test_options_train_without_error(tmp_path, host, options):
    images = tmp_path / "images"
    make_images(images, count=3, size=(96, 64))
    from PIL import Image

    Image.new("RGBA", (64, 80), (10, 200, 30, 128)).save(images / "alpha.png")
    result = Trainer(prepared(tmp_path, max_steps=2, **options), host).run()
    assert result.steps == 2 and math.isfinite(result.final_loss)


def test_gradient_checkpointing_gives_identical_vectors(tmp_path, host):
    a = Trainer(prepared(tmp_path / "a", max_steps=2), host).run()
    b = Trainer(prepared(tmp_path / "b", max_steps=2, gradient_checkpointing=True), host).run()
    assert torch.equal(load_embedding(a.embedding_path).vectors["vec"], load_embedding(b.embedding_path).vectors["vec"])


@pytest.mark.skipif(not fp16_supported_on("cpu"), reason="this torch has no fp16 autocast or grad scaler on the CPU")
def test_fp16_with_its_grad_scaler_trains_on_the_cpu(tmp_path, host):
    trainer = Trainer(prepared(tmp_path, precision="fp16", max_steps=4, learning_rate="0.05"), host)
    init = trainer.vectors["clip_l"].clone()
    result = trainer.run()
    assert trainer.precision == "fp16" and trainer.scaler is not None and trainer.scaler.get_scale() > 0
    assert math.isfinite(result.final_loss) and not torch.equal(init, trainer.vectors["clip_l"])
    assert load_embedding(result.embedding_path).vectors["vec"].dtype == torch.float32  # the vectors stay fp32


def test_fp16_where_torch_cannot_is_refused_with_a_reason(tmp_path, host, monkeypatch):
    monkeypatch.setattr(preflight, "fp16_supported_on", lambda device_type: False)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU, or torch 2.3 or newer"):
        Trainer(prepared(tmp_path, precision="fp16"), host)


def test_bad_inputs_name_the_problem(tmp_path, host):
    with pytest.raises(DatasetError, match="does not exist"):
        Trainer(prepared(tmp_path, images=str(tmp_path / "missing")), host)
    template = tmp_path / "bad.txt"
    template.write_text("a photo of a dog\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line.* 1 .*\[name\]"):
        Trainer(prepared(tmp_path, template=str(template)), host)
    with pytest.raises(ConfigError, match="timestep_max: 1000 is past the model's last timestep 999"):
        Trainer(prepared(tmp_path, timestep_max=1000), host)
    with pytest.raises(ConfigError, match="name: is required"):
        Trainer(prepared(tmp_path, name=""), host)


def test_run_header_states_the_plan(tmp_path, host):
    text = Trainer(prepared(tmp_path, max_steps=7, grad_accum=2), host).describe()
    for expected in ("my-cat", "4 from", "64px", "steps:     7", "batch 2 x 2", "cpu, fp32", "my-cat.safetensors"):
        assert expected in text


def test_latents_are_encoded_once_and_reused_across_epochs(tmp_path, host, monkeypatch):
    calls = []
    original = DiffusersHost.encode_images
    monkeypatch.setattr(
        DiffusersHost, "encode_images", lambda self, pixels: calls.append(len(pixels)) or original(self, pixels)
    )
    # 4 images, batch 2: 2 batches per epoch, so 6 steps are 3 epochs; with flip both orientations are cached.
    # eval_every 0: the held-out score would encode its own views when latents cannot be cached (random crops).
    Trainer(prepared(tmp_path, max_steps=6, flip=True, eval_every=0), host).run()
    assert sum(calls) == 8
    calls.clear()
    Trainer(prepared(tmp_path / "random-crop", max_steps=3, crop="random", eval_every=0), host).run()
    assert sum(calls) == 6  # random crops cannot be cached: each micro-batch is encoded


def test_the_vae_moves_to_ram_once_latents_are_cached_and_never_encodes_again(tmp_path, host, monkeypatch):
    events: list[str] = []
    original_encode = host.encode_images
    monkeypatch.setattr(host, "offload_image_encoder", lambda: events.append("offload"))
    monkeypatch.setattr(host, "encode_images", lambda pixels: events.append("encode") or original_encode(pixels))
    Trainer(prepared(tmp_path, max_steps=3, vae_to_cpu=True), host).run()
    assert events[-1] == "offload" and events.count("offload") == 1 and "encode" in events
    with pytest.raises(ConfigError, match="vae_to_cpu: random crop encodes images at every step"):
        config(tmp_path, vae_to_cpu=True, crop="random")


def test_steps_neither_wait_for_the_device_nor_walk_the_model(tmp_path, host, monkeypatch):
    """On a GPU, handing a value to the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``) waits
    for every queued kernel, and walking the model's modules costs CPU time each step. Between reports the loop must
    do neither: a run of 16 steps makes exactly the calls a run of 4 steps makes."""
    monkeypatch.setattr(trainer_module, "REPORT_INTERVAL_S", float("inf"))  # reports only at the end
    calls: Counter[str] = Counter()

    def counted(owner: type, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            # torch's unfused AdamW reads its step counter, a CPU tensor, with .item(): no device involved (and
            # CUDA runs use the fused AdamW, which does not).
            if not sys._getframe(1).f_code.co_filename.endswith(os.path.join("optim", "optimizer.py")):
                calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def count_calls(steps: int) -> Counter[str]:
        calls.clear()
        Trainer(prepared(tmp_path / str(steps), max_steps=steps, batch_size=4), host).run()
        return Counter(calls)

    count_calls(2)  # warm-up: lazy initialisation inside torch and diffusers
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        counted(torch.Tensor, name)
    for name in ("parameters", "named_parameters", "modules", "named_modules", "children", "buffers"):
        counted(torch.nn.Module, name)
    short, long = count_calls(4), count_calls(16)
    assert short == long, f"calls that grew with the steps: {dict(long - short)}"
    assert short["tolist"] >= 1  # the one report at the end (so the counting does see the loop's transfers)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_copied_run_folder_resumes_in_the_copy_and_never_replaces_another_runs_embedding(tmp_path, host):
    steps = []
    stop_at_2 = Callbacks(on_step=lambda step, vectors: steps.append(step), should_stop=lambda: len(steps) >= 2)
    Trainer(prepared(tmp_path, max_steps=6), host, stop_at_2).run()
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    Trainer(prepared(tmp_path, max_steps=6, resume=str(tmp_path / "run")), host).run()  # the original finishes
    original = _files(tmp_path / "run")
    # The copy stopped at step 2; the embedding there now is the finished original's (step 6): not its own.
    with pytest.raises(EmbeddingFileError, match=r"not the embedding the resumed run wrote .*--overwrite"):
        Trainer(prepared(tmp_path, max_steps=6, resume=str(tmp_path / "copy")), host)
    copy = config(tmp_path, max_steps=6, resume=str(tmp_path / "copy"), output_dir=str(tmp_path / "o2"))
    result = Trainer(prepare_run(copy), host).run()
    assert result.run_dir == tmp_path / "copy" and result.steps == 6
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["run_dir"] == str(tmp_path / "copy")
    assert [row.split(",")[0] for row in (tmp_path / "copy" / "loss.csv").read_text().splitlines()[1:]] == [
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    ]
    assert _files(tmp_path / "run") == original  # loss.csv, config.json and last files untouched
    assert load_embedding(tmp_path / "out" / "my-cat.safetensors").step == 6


def test_loss_rows_up_to_each_save_are_on_disk_and_a_resume_from_an_earlier_save_continues_them(
    tmp_path, host, monkeypatch
):
    monkeypatch.setattr(trainer_module, "REPORT_INTERVAL_S", float("inf"))  # rows reach the file at saves only
    on_disk: dict[int, list[int]] = {}

    def on_save(path: Path, step: int) -> None:
        if path.parent.name == "saves":  # what a kill -9 right after this save would leave
            rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]
            on_disk[step] = [int(row.split(",")[0]) for row in rows]

    steps = []
    callbacks = Callbacks(on_save=on_save, on_step=lambda s, v: steps.append(s), should_stop=lambda: len(steps) >= 5)
    Trainer(prepared(tmp_path, max_steps=8, save_every=2), host, callbacks).run()
    assert on_disk[2] == [1, 2] and on_disk[4] == [1, 2, 3, 4]
    earlier = tmp_path / "run" / "saves" / "my-cat-000002.state.safetensors"
    Trainer(prepared(tmp_path, max_steps=8, save_every=2, resume=str(earlier), overwrite=True), host).run()
    with open(tmp_path / "run" / "loss.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert [int(row[0]) for row in rows] == list(range(1, 9))  # steps 3-5 of the first run were replaced
    elapsed = [float(row[4]) for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[2] > elapsed[1]  # the resumed run's time continues the first's
    assert all(math.isfinite(float(row[2])) for row in rows)


def test_a_run_removes_the_temporary_files_a_killed_run_left(tmp_path, host):
    leftovers = [
        tmp_path / "out" / ".my-cat.safetensors.a1b2.tmp",
        tmp_path / "run" / ".loss.csv.x9.tmp",
        tmp_path / "run" / "saves" / ".my-cat-000002.state.safetensors.q.tmp",
    ]
    other = tmp_path / "out" / ".someone-else.safetensors.zz.tmp"
    for path in (*leftovers, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    Trainer(prepared(tmp_path, max_steps=2), host).run()
    assert not any(path.exists() for path in leftovers)
    assert other.exists()  # not this run's


def test_a_picture_card_of_the_result_goes_into_the_run_folder_with_the_first_preview(tmp_path, host):
    from PIL import Image

    previews = tmp_path / "run" / "previews"
    previews.mkdir(parents=True)
    Image.new("RGB", (64, 48), (20, 180, 40)).save(previews / "my-cat-step000002.png")
    result = Trainer(prepared(tmp_path, max_steps=2, write_card=True), host).run()
    card = tmp_path / "run" / "my-cat.png"
    assert card in result.extra_paths and not (tmp_path / "out" / "my-cat.png").exists()
    data = load_embedding(card)
    assert data.layout == "webui_card" and data.step == 2
    assert torch.equal(data.vectors["vec"], load_embedding(result.embedding_path).vectors["vec"])
    with Image.open(card) as image:
        assert image.size[1] == 48  # the preview's height: the bands frame the first preview


def test_the_held_out_score_comes_every_eval_every_steps_and_at_the_end_and_goes_into_the_files(tmp_path, host):
    scores: list[tuple[int, float]] = []
    callbacks = Callbacks(on_evaluation=lambda step, score: scores.append((step, score)))
    fields = {"max_steps": 5, "eval_every": 2, "save_every": 2, "final_vectors": "last"}
    result = Trainer(prepared(tmp_path / "a", **fields), host, callbacks).run()
    # Step 0: the initial vectors' score, the baseline.
    assert [step for step, _ in scores] == [0, 2, 4, 5] and all(math.isfinite(s) and s > 0 for _, s in scores)
    saved = load_embedding(tmp_path / "a" / "run" / "saves" / "my-cat-000004.safetensors")
    assert float(saved.metadata["held_out_loss"]) == pytest.approx(scores[2][1], rel=1e-5)
    assert float(load_embedding(result.embedding_path).metadata["held_out_loss"]) == pytest.approx(
        scores[3][1], rel=1e-5
    )
    # Fixed views: the same vectors score the same; training does not depend on the evaluations.
    again: list[tuple[int, float]] = []
    plain = Trainer(prepared(tmp_path / "b", max_steps=5, eval_every=0), host).run()
    Trainer(
        prepared(tmp_path / "c", **fields),
        host,
        Callbacks(on_evaluation=lambda s, v: again.append((s, v))),
    ).run()
    assert again == scores
    assert torch.equal(
        load_embedding(plain.embedding_path).vectors["vec"], load_embedding(result.embedding_path).vectors["vec"]
    )
    assert "held_out_loss" not in load_embedding(plain.embedding_path).metadata


def test_caption_files_a_template_ignores_are_a_warning(tmp_path, host):
    captioned = config(tmp_path)  # the four images have caption files
    # subject_filewords uses them
    assert not any("caption files" in w for w in Trainer(prepare_run(captioned), host).warnings)
    subject = captioned.replace(template="subject")
    warned = Trainer(prepare_run(subject), host).warnings
    assert [w for w in warned if w.startswith("4 of the 4 images have caption files, but template 'subject'")]
    for caption in (tmp_path / "images").glob("*.txt"):
        caption.unlink()
    assert not any("caption files" in w for w in Trainer(prepare_run(subject), host).warnings)


def test_template_auto_uses_the_captions_when_every_image_has_one(tmp_path, host):
    auto = config(tmp_path, template="auto")  # the four images have caption files
    statuses: list[str] = []
    trainer = Trainer(prepare_run(auto), host, Callbacks(on_status=statuses.append))
    assert trainer.prompts.template == "subject_filewords" and trainer.prompts.uses_filewords
    assert "template auto: subject_filewords (every image has a caption file)" in statuses
    assert not any("caption files" in w for w in trainer.warnings)
    captions = sorted((tmp_path / "images").glob("*.txt"))
    captions[0].unlink()  # now its file name would stand in for a caption: auto leaves them all out
    trainer = Trainer(prepare_run(auto), host)
    assert trainer.prompts.template == "subject" and not trainer.prompts.uses_filewords
    assert [w for w in trainer.warnings if w.startswith("3 of the 4 images have caption files; template auto uses")]


@pytest.fixture
def decodes(monkeypatch) -> Counter[str]:
    """How often each image file's pixels are decoded (every decode goes through ``dataset._decode``)."""
    counts: Counter[str] = Counter()
    original = dataset._decode

    def counting(image):
        counts[Path(image.filename).name] += 1
        return original(image)

    monkeypatch.setattr(dataset, "_decode", counting)
    return counts


@pytest.mark.parametrize("options", [{"flip": True, "eval_every": 2}, {"crop": "random", "eval_every": 0}])
def test_a_run_decodes_each_image_once_from_its_check_at_submission_to_its_end(tmp_path, host, decodes, options):
    queued = prepared(tmp_path, max_steps=4, **options)  # checked when it is queued (the WebUI)
    started = queued.recheck()  # ... and again when it starts: a stat per file
    assert started is queued
    Trainer(started, host).run()
    assert decodes == {f"{i:02d}.png": 1 for i in range(4)}


def test_a_recheck_reads_the_images_again_only_when_they_changed(tmp_path, host, decodes):
    queued = prepared(tmp_path, max_steps=2)
    (tmp_path / "images" / "01.txt").write_text("a new caption", encoding="utf-8")
    started = queued.recheck()
    assert started is not queued and started.scan.records[1].caption == "a new caption"
    (tmp_path / "images" / "02.png").unlink()
    started = started.recheck()
    assert [r.path.name for r in started.scan.records] == ["00.png", "01.png", "03.png"]
    Trainer(started, host).run()
    assert decodes == {"00.png": 3, "01.png": 3, "02.png": 2, "03.png": 3}  # three scans; the run itself none
    with pytest.raises(EmbeddingFileError, match="my-cat.safetensors already exists"):
        started.recheck()  # an output that appeared while a run waited is not replaced unasked


def test_the_host_decides_device_and_precision_unless_the_run_was_prepared_for_a_device(tmp_path, host, monkeypatch):
    monkeypatch.setattr(host, "preferred_precision", "bf16", raising=False)  # weights in bf16 (the WebUI's case)
    assert Trainer(prepared(tmp_path), host).precision == "bf16"
    assert Trainer(prepared(tmp_path, precision="fp32"), host).precision == "fp32"
    placed = prepare_run(config(tmp_path), device="cpu")  # the caller loads the model there
    where = placed.placement
    assert where is not None and (where.device.type, where.precision) == ("cpu", "fp32")
    assert Trainer(placed, host).precision == "fp32"
    elsewhere = SimpleNamespace(device=torch.device("meta"), default_resolution=64)
    with pytest.raises(ConfigError, match="the model is on meta, but the run was prepared for cpu"):
        Trainer(placed, elsewhere)
