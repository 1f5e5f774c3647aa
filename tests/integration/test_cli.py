"""The command line, driven in-process through ``cli.main`` (and once as ``python -m embedding_trainer``).

``main`` logs to a StreamHandler on the current ``sys.stderr`` that it adds and removes itself, so what a user
sees is read with ``capsys``. The package logger does not propagate; pytest 9's ``caplog`` still sees its records
because pytest attaches its handler to non-propagating loggers too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embedding_trainer.config import TrainConfig
from embedding_trainer.embedding_file import EmbeddingData, file_sha256, save_embedding
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.log import logger
from embedding_trainer.standalone import cli, driver
from tests.helpers import train_args

pytestmark = pytest.mark.compat


@pytest.fixture(autouse=True)
def logger_is_left_clean() -> Any:
    # pytest attaches its own capture handlers (also to non-propagating loggers); main() must add none for good.
    before = list(logger.handlers)
    yield
    assert logger.handlers == before, "main() left a handler behind"
    assert any(type(h) is logging.NullHandler for h in logger.handlers)
    assert not any(type(h) is logging.StreamHandler for h in logger.handlers)


@pytest.fixture
def model(tiny_model_dirs: Any) -> Path:
    return tiny_model_dirs("sd1")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved transformers model's tensors (transformers 4.30 writes pytorch_model.bin, 5.x model.safetensors)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return load_file(str(files[0]))
    return torch.load(str(folder / "pytorch_model.bin"), map_location="cpu", weights_only=True)


def logged_steps(run_dir: Path) -> list[tuple[int, str]]:
    with open(run_dir / "loss.csv", newline="", encoding="utf-8") as f:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def test_module_help_runs_in_a_subprocess() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embedding_trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m embedding_trainer")
    for command in ("train", "inspect", "convert", "demo", "make-tiny-model"):
        assert command in done.stdout


def test_train_help_lists_every_config_field(capsys: pytest.CaptureFixture[str]) -> None:
    from embedding_trainer.config import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for field in TrainConfig.fields():
        assert "--" + field.name.replace("_", "-") in out
    assert "--no-flip" in out  # booleans get --x / --no-x


def test_make_tiny_model_writes_the_same_model_as_the_fixture(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny"
    assert cli.main(["make-tiny-model", "sd1", str(out), "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / part).is_dir(), part
    # Same family and seed as the conftest model: the same weights.
    ours, theirs = weights(out / "text_encoder"), weights(model / "text_encoder")
    assert ours.keys() == theirs.keys() and len(ours) > 10
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------------------------------------------------------
# train


def test_train_lists_the_runs_warnings_in_its_header_and_at_the_end(
    tmp_path: Path, model: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (image_folder / "broken.png").write_bytes(b"not a png")
    assert cli.main(train_args(model, image_folder, tmp_path, "--quiet", "--template", "subject")) == 0
    err = capsys.readouterr().err
    header, _, end = err.partition("finished after 3 steps")
    assert "warning:   skipped " in header and "broken.png" in header
    assert "2 warning(s):\n  skipped " in end and "broken.png" in end
    # The images have captions the chosen template does not use: said, with the fix.
    assert "4 of the 4 images have caption files, but template 'subject' has no [filewords]" in end
    assert "subject_filewords" in end


def test_train_writes_the_embedding_then_refuses_to_overwrite_it(
    tmp_path: Path, model: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(train_args(model, image_folder, tmp_path, "--quiet")) == 0
    output = tmp_path / "out" / "my-cat.safetensors"
    err = capsys.readouterr().err
    assert "finished after 3 steps" in err
    assert str(output) in err
    assert "it/s" not in err  # --quiet: no progress bar
    data = load_embedding(output)
    assert (data.name, data.step, data.layout) == ("my-cat", 3, "emb_params")
    assert data.vectors["vec"].shape == (TrainConfig().num_vectors, 32)
    assert data.metadata["family"] == "sd1"
    saved = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert (saved["name"], saved["max_steps"], saved["resolution"]) == ("my-cat", 3, 64)
    assert [step for step, _ in logged_steps(tmp_path / "run")] == [1, 2, 3]
    digest = file_sha256(output)

    assert cli.main(train_args(model, image_folder, tmp_path, "--quiet")) == 2
    err = capsys.readouterr().err
    assert f"error: {output} already exists" in err
    assert "overwrite" in err
    assert file_sha256(output) == digest  # untouched

    # --overwrite replaces it; without --quiet the progress bar goes to stderr (as it is when main() runs).
    assert cli.main(train_args(model, image_folder, tmp_path, "--overwrite", steps=2)) == 0
    assert load_embedding(output).step == 2
    err = capsys.readouterr().err
    assert "step 2/2 loss " in err and "it/s ETA" in err  # stderr is not a terminal here: plain lines


def test_train_says_which_start_it_carried_on_with(
    tmp_path: Path, model: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(train_args(model, image_folder, tmp_path, "--quiet", "--starts", "2", "--start-steps", "1")) == 0
    err = capsys.readouterr().err
    assert re.search(r"carried on with start [12] of 2 \(held-out losses \d\.\d+, \d\.\d+\)", err), err
    assert [step for step, _ in logged_steps(tmp_path / "run")] == [1, 2, 3]


def test_a_new_run_starts_a_new_loss_log(tmp_path: Path, model: Path, image_folder: Path) -> None:
    assert cli.main(train_args(model, image_folder, tmp_path, "--quiet", steps=2)) == 0
    assert cli.main(train_args(model, image_folder, tmp_path, "--quiet", "--overwrite", steps=1)) == 0
    assert [step for step, _ in logged_steps(tmp_path / "run")] == [1]


def test_progress_bar_line() -> None:
    class Stream:
        text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    stream = Stream()
    progress = SimpleNamespace(
        step=2, total_steps=4, loss=0.5, smoothed_loss=0.25, learning_rate=0.005, it_per_s=2.0, eta_s=3725.0
    )
    bar = driver.ProgressBar(stream, width=8)
    bar(progress)
    assert stream.text == "\r[####....] 2/4 loss 0.5000 (avg 0.2500) lr 5.00e-03 2.00 it/s ETA 1:02:05  "
    bar.end_line()  # e.g. before "stopped": the next message starts on its own line
    assert stream.text.endswith("  \n")


def test_progress_without_a_terminal_is_a_plain_line_every_twentieth_of_the_run() -> None:
    lines = io.StringIO()  # not a terminal: a log file, a pipe, CI
    bar = driver.ProgressBar(lines)
    for step in range(1, 201):
        bar(
            SimpleNamespace(
                step=step,
                total_steps=200,
                loss=0.5,
                smoothed_loss=0.25,
                learning_rate=0.005,
                it_per_s=20.0,
                eta_s=(200 - step) / 20,
            )
        )
    text = lines.getvalue()
    assert "\r" not in text and text.count("\n") == 20
    assert text.splitlines()[0].startswith("step 10/200 loss 0.5000") and text.splitlines()[-1].startswith("step 200/")


def test_one_duration_formatter_reads_as_a_clock_on_the_command_line_and_in_units_in_the_webui() -> None:
    from embedding_trainer.log import format_duration

    assert [format_duration(s, clock=True) for s in (5.9, 65, 3725)] == ["0:05", "1:05", "1:02:05"]
    assert [format_duration(s) for s in (5.9, 65, 3725)] == ["6s", "1m05s", "1h02m"]
    assert format_duration(float("inf"), clock=True) == format_duration(float("nan")) == "?"


def stop_at_step(monkeypatch: pytest.MonkeyPatch, stop_step: int) -> None:
    """Press Ctrl-C (a real SIGINT to this process) once the run reports ``stop_step`` (it reports every step)."""
    from embedding_trainer import trainer

    monkeypatch.setattr(trainer, "REPORT_INTERVAL_S", 0.0)

    class Bar(driver.ProgressBar):
        def __call__(self, p: Any) -> None:
            if p.step == stop_step:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(driver, "ProgressBar", Bar)


def test_ctrl_c_stops_and_resume_continues_like_an_uninterrupted_run(
    tmp_path: Path, model: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    straight = tmp_path / "straight"
    assert cli.main(train_args(model, image_folder, straight, "--quiet", "--save-every", "2", steps=6)) == 0

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        assert cli.main(train_args(model, image_folder, stopped, "--save-every", "2", steps=6)) == cli.EXIT_STOPPED
    err = capsys.readouterr().err
    assert "stopping after this step and saving" in err
    assert "stopped after 3 steps" in err
    # On its own line, with the exact command that continues the run.
    assert f"\nstopped at step 3; continue with:\n  python -m embedding_trainer train --model {model} --resume " in err
    assert err.rstrip().endswith(str(stopped / "run"))
    assert signal.getsignal(signal.SIGINT) is not None
    assert getattr(signal.getsignal(signal.SIGINT), "__name__", "") != "on_interrupt"  # restored
    assert load_embedding(stopped / "out" / "my-cat.safetensors").step == 3
    saves = sorted(p.name for p in (stopped / "run" / "saves").iterdir())
    assert saves == [
        "my-cat-000002.safetensors",
        "my-cat-000002.state.safetensors",
        "my-cat-000003.safetensors",
        "my-cat-000003.state.safetensors",
    ]

    # The stopped run wrote its embedding at step 3; resuming replaces it.
    resume = ["train", "--model", str(model), "--resume", str(stopped / "run"), "--max-steps", "6", "--quiet"]
    assert cli.main([*resume, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "resuming at step 3 from" in err and "my-cat-000003.state.safetensors" in err
    assert "finished after 3 steps (resumed at step 3, now at 6)" in err  # its own steps and time

    resumed = load_embedding(stopped / "out" / "my-cat.safetensors")
    reference = load_embedding(straight / "out" / "my-cat.safetensors")
    assert resumed.step == reference.step == 6
    torch.testing.assert_close(resumed.vectors["vec"], reference.vectors["vec"], rtol=0, atol=1e-6)
    at_stop = load_embedding(stopped / "run" / "saves" / "my-cat-000003.safetensors").vectors["vec"]
    assert (resumed.vectors["vec"] - at_stop).abs().max() > 1e-4
    # The loss log continues where it stopped, with the losses the uninterrupted run saw.
    assert [step for step, _ in logged_steps(stopped / "run")] == [1, 2, 3, 4, 5, 6]
    assert logged_steps(stopped / "run") == logged_steps(straight / "run")


def test_resume_replaces_the_stopped_runs_own_embedding_without_overwrite(
    tmp_path: Path, model: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with monkeypatch.context() as patch:
        stop_at_step(patch, 2)
        assert cli.main(train_args(model, image_folder, tmp_path, steps=4)) == cli.EXIT_STOPPED
    capsys.readouterr()
    resume = ["train", "--model", str(model), "--resume", str(tmp_path / "run"), "--max-steps", "4", "--quiet"]
    assert cli.main(resume) == 0, capsys.readouterr().err
    assert load_embedding(tmp_path / "out" / "my-cat.safetensors").step == 4


def test_resume_of_a_folder_without_saves_names_the_flag(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", "--model", str(model), "--resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resume: ")
    assert str(tmp_path / "nothing") in err


# ---------------------------------------------------------------------------------------------------------------
# Flag and config-file errors


def test_a_bad_flag_value_names_the_field(tmp_path: Path, model: Path, image_folder: Path, capsys: Any) -> None:
    args = train_args(model, image_folder, tmp_path, "--quiet")
    args[args.index("--resolution") + 1] = "70"
    records: list[logging.LogRecord] = []
    # The package logger does not propagate, so catch its records the way a host application's handler would.
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        assert cli.main(args) == 2
    finally:
        logger.removeHandler(handler)
    message = "error: resolution: 70 is not a multiple of 8 (the VAE downsamples 8x); try 64 or 72"
    assert capsys.readouterr().err.strip() == message
    assert [(r.name, r.levelname, r.getMessage()) for r in records] == [("embedding_trainer", "ERROR", message)]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_argparse_rejects_a_malformed_value_or_choice(tmp_path: Path, model: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model", str(model), "--max-steps", "lots"])
    assert exit_info.value.code == 2
    assert "--max-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model", str(model), "--crop", "diagonal"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--crop" in err and "'center'" in err and "'random'" in err


def test_a_missing_required_field_is_named(tmp_path: Path, model: Path, image_folder: Path, capsys: Any) -> None:
    assert cli.main(["train", "--model", str(model), "--images", str(image_folder), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: name: is required")


def test_config_file_is_read_and_flags_override_it(
    tmp_path: Path, model: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "name": "my-cat",
                "images": str(image_folder),
                "max_steps": 5,
                "resolution": 64,
                "learning_rate": 0.01,
                "seed": 3,
                "flip": True,
                "output_dir": str(tmp_path / "out"),
                "run_dir": str(tmp_path / "run"),
            }
        ),
        encoding="utf-8",
    )
    args = ["train", "--model", str(model), "--config", str(config), "--max-steps", "2", "--no-flip", "--quiet"]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert saved["max_steps"] == 2  # flag
    assert saved["flip"] is False  # flag
    assert (saved["learning_rate"], saved["seed"], saved["resolution"]) == ("0.01", 3, 64)  # file
    assert load_embedding(tmp_path / "out" / "my-cat.safetensors").step == 2
    assert "finished after 2 steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"nmae": "my-cat"}', "error: nmae: unknown field; allowed fields are: name, images,"),
        ('{"max_steps": "5"}', "error: max_steps: '5' has type str; expected int"),
        ('["name"]', "error: config: "),
        ('{"name": "my-cat",', "error: "),
    ],
)
def test_config_file_errors_are_named(
    tmp_path: Path, model: Path, content: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(content, encoding="utf-8")
    assert cli.main(["train", "--model", str(model), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected)
    assert len(err.strip().splitlines()) == 1  # refused before the model is loaded


def test_a_missing_config_file_is_named(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.json"
    assert cli.main(["train", "--model", str(model), "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err


# ---------------------------------------------------------------------------------------------------------------
# inspect and convert


def known_embedding(tmp_path: Path) -> Path:
    vectors = torch.zeros(2, 768)
    vectors[0, :2] = torch.tensor([3.0, 4.0])  # norm 5
    vectors[1, -2:] = torch.tensor([12.0, 5.0])  # norm 13
    data = EmbeddingData("my-cat", {"clip_l": vectors}, step=42, metadata={"base_model_name": "tiny"})
    return save_embedding(data, tmp_path / "my-cat.safetensors")


def test_inspect_prints_layout_name_vectors_and_norms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = known_embedding(tmp_path)
    assert cli.main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"file:        {path}"
    assert "layout:      emb_params (safetensors)" in lines
    assert "name:        my-cat" in lines
    assert "step:        42" in lines
    assert "vectors:     2" in lines
    assert f"sha256:      {file_sha256(path)} (short {file_sha256(path)[:10]})" in lines
    assert "encoder vec: width 768 (SD1 / CLIP-L, also SDXL's clip_l)" in lines
    assert "  L2 norms: 5, 13 (mean 9)" in lines
    assert "  base_model_name: tiny" in lines


def test_inspect_of_a_missing_file_fails_with_its_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.safetensors'}: file not found"


def test_convert_to_pt_and_back_keeps_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = known_embedding(tmp_path)
    original = load_embedding(src)
    pt = tmp_path / "webui" / "my-cat.pt"
    assert cli.main(["convert", str(src), str(pt)]) == 0
    assert capsys.readouterr().out.strip() == str(pt)
    as_pt = load_embedding(pt)
    assert as_pt.layout == "a1111_pt"
    back = tmp_path / "back.safetensors"
    assert cli.main(["convert", str(pt), str(back)]) == 0
    for data in (as_pt, load_embedding(back)):
        assert (data.name, data.step, data.metadata) == ("my-cat", 42, {"base_model_name": "tiny"})
        assert torch.equal(data.vectors["vec"], original.vectors["vec"])
    assert load_embedding(back).layout == "emb_params"

    assert cli.main(["convert", str(src), str(pt)]) == 2
    assert f"{pt}: file already exists" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(pt), "--overwrite"]) == 0
    assert cli.main(["convert", str(src), str(tmp_path / "x.bin")]) == 2
    assert "cannot tell the layout from the suffix '.bin'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# render


def test_render_draws_a_labelled_grid_with_the_embedding_and_its_trigger_changes_the_images(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        from diffusers import StableDiffusionPipeline  # noqa: F401
    except (ImportError, RuntimeError) as error:  # diffusers 0.35 pipelines next to transformers 4.30
        pytest.skip(f"diffusers pipelines unavailable: {error}")
    from PIL import Image

    from embedding_trainer.embedding_file import EmbeddingData, save_embedding
    from embedding_trainer.tools import render

    def embedding(seed: int) -> Path:
        vectors = {"clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed)) * 3}
        return save_embedding(EmbeddingData("my-cat", vectors), tmp_path / f"e{seed}" / "my-cat.safetensors")

    def draw(path: Path, out: str) -> np.ndarray:
        args = [
            "render",
            "--model",
            str(model),
            "--embedding",
            str(path),
            "--prompt",
            "a photo of my-cat",
            "--prompt",
            "my-cat on a sofa",
            "--seeds",
            "1",
            "2",
            "--steps",
            "2",
            "--out",
            str(tmp_path / out),
        ]
        assert cli.main(args) == 0, capsys.readouterr().err
        with Image.open(tmp_path / out) as grid:
            assert grid.size == (render.LABEL_WIDTH + 2 * 64, render.HEADER_HEIGHT + 2 * 64)
            return np.asarray(grid.convert("RGB"))[render.HEADER_HEIGHT :, render.LABEL_WIDTH :]

    one, two = embedding(1), embedding(2)
    assert not np.array_equal(draw(one, "a.png"), draw(two, "b.png"))  # the trigger's vectors reach the images
    base = ["render", "--model", str(model), "--embedding", str(one), "--steps", "2"]
    assert cli.main([*base, "--prompt", "a photo of a cat", "--out", str(tmp_path / "c.png")]) == 2
    assert "no prompt contains a trigger" in capsys.readouterr().err
    assert cli.main([*base, "--prompt", "my-cat", "--out", str(tmp_path / "a.png")]) == 2
    assert "add --overwrite" in capsys.readouterr().err


def test_convert_writes_a_picture_card_the_reader_reads_back(tmp_path: Path) -> None:
    from PIL import Image

    from embedding_trainer.embedding_file import EmbeddingData, save_embedding

    source = save_embedding(EmbeddingData("my-cat", {"clip_l": torch.randn(2, 32)}, step=9), tmp_path / "a.safetensors")
    Image.new("RGB", (80, 48), (200, 120, 10)).save(tmp_path / "picture.jpg")
    card = tmp_path / "my-cat.png"
    assert cli.main(["convert", str(source), str(card), "--picture", str(tmp_path / "picture.jpg")]) == 0
    assert load_embedding(card).layout == "webui_card" and load_embedding(card).step == 9
    assert torch.equal(load_embedding(card).vectors["vec"], load_embedding(source).vectors["vec"])
    with Image.open(card) as image:
        assert image.size[1] == 48
