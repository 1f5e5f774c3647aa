"""The tab's pure parts (no gradio needed): the form from TrainConfig metadata, the dataset check, defaults."""

from __future__ import annotations

from embedding_trainer.webui import tab
from tests.helpers import make_images


def test_fields_map_to_components_by_their_metadata():
    specs = {s.name: s for s in tab.field_specs()}
    assert specs["crop"].kind == "dropdown" and specs["crop"].choices == ("center", "random")
    assert specs["flip"].kind == "checkbox"
    assert specs["max_steps"].kind == "number" and specs["max_steps"].precision == 0 and specs["max_steps"].minimum == 1
    assert specs["tag_dropout"].kind == "number" and specs["tag_dropout"].maximum == 1.0
    assert specs["learning_rate"].kind == "textbox"
    assert specs["max_steps"].info.startswith("Optimiser steps") and specs["max_steps"].elem_id == "embtrain_max_steps"
    advanced = {s.name for s in tab.advanced_specs()}
    assert not advanced & (set(tab.OWN_FIELDS) | set(tab.MAIN_FIELDS)) and "seed" in advanced


def test_form_sends_changed_fields_only():
    specs = tab.field_specs(("max_steps", "flip", "output_dir"))
    body = tab.form_config(specs, [20.0, False, "/e"], {"output_dir": "/e"}, always=("max_steps",))
    assert body == {"max_steps": 20}
    assert tab.form_config(specs, [None, True, "/x"], {"output_dir": "/e"}) == {"flip": True, "output_dir": "/x"}


def test_defaults_per_family():
    assert tab.family_defaults("sd1") == tab.FamilyDefaults(512)
    assert tab.family_defaults("sd2", "eps").resolution == 512
    assert tab.family_defaults("sd2", "v").resolution == 768
    assert tab.family_defaults("sdxl") == tab.FamilyDefaults(1024)
    assert tab.family_defaults(None).resolution == 512  # no model loaded yet
    assert tab.family_defaults("sd1", "eps", 64) == tab.FamilyDefaults(64)  # the checkpoint's own size


def test_dataset_check_lists_problems(tmp_path):
    make_images(tmp_path / "ok", count=3)
    report = tab.check_dataset(str(tmp_path / "ok"))
    assert report.ok and len(report.items) == 3 and report.problems == []
    make_images(tmp_path / "bad", count=2, size=(32, 32), captions=False)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image")
    report = tab.check_dataset(str(tmp_path / "bad"))
    text = " ".join(report.problems)
    assert "broken.png" in text and "tiny image" in text and "without a caption" in text
    # Without [filewords] in the template, captions are never read: a missing caption file is no problem.
    make_images(tmp_path / "plain", count=2, captions=False)
    assert tab.check_dataset(str(tmp_path / "plain"), template="subject").problems == []
    with_captions = tab.check_dataset(str(tmp_path / "plain"), template="subject_filewords")
    assert "without a caption" in " ".join(with_captions.problems)
    assert tab.check_dataset(str(tmp_path / "plain"), template="auto").problems == []  # auto: no captions, subject
    make_images(tmp_path / "some", count=2, captions=True)
    (tmp_path / "some" / sorted(p.name for p in (tmp_path / "some").glob("*.txt"))[0]).unlink()
    partly = " ".join(tab.check_dataset(str(tmp_path / "some"), template="auto").problems)
    assert "1 image(s) without a caption file, so template auto leaves every caption out" in partly
    assert tab.check_dataset(str(tmp_path / "ok"), template="auto").problems == []
    missing_template = tab.check_dataset(str(tmp_path / "plain"), template=str(tmp_path / "none.txt")).problems
    assert any(p.startswith("template: ") and "does not exist" in p for p in missing_template)
    missing = tab.check_dataset(str(tmp_path / "nowhere"))
    assert not missing.ok and "Cannot use" in missing.summary


def test_name_warnings_and_result_summary():
    assert tab.name_warnings("cat", [], 1)[0].startswith("'cat' is a single token")
    assert "already exists" in tab.name_warnings("mine", ["sub/mine.pt"], 3)[0]
    assert tab.name_warnings("fine-name", [], 4) == []
    status = {
        "state": "finished",
        "result": {
            "steps": 5,
            "embedding_step": 5,
            "elapsed_s": 3.0,
            "final_loss": 0.5,
            "smoothed_loss": 0.6,
            "embedding_path": "/e/x.safetensors",
        },
        "warnings": [],
    }
    html = tab.result_html({**status, "resolution": 64})
    assert "/e/x.safetensors" in html and "0.5" in html and "64 px" in html
    assert "embtrain-error" in tab.result_html({"error": "Boom: bad"})
    warned = tab.result_html({**status, "warnings": ["skipped /d/broken.png: cannot decode"]})
    assert "embtrain-warning" in warned and "broken.png" in warned
    starts = tab.result_html({**status, "result": {**status["result"], "chosen_start": 2, "start_scores": [0.31, 0.2]}})
    assert "<th>Start</th><td>2 of 2, the lowest held-out loss (0.31, 0.2)</td>" in starts
    assert "<th>Start</th>" not in html  # one start: no row
