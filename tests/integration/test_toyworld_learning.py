"""The learning-quality pipeline on a quickly trained toy model: user photos -> our trainer -> an embedding file ->
diffusers' own loader -> samples -> judges, and the demo's outputs. (Whether it learns is a question for the
shipped, fully trained model.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from embedding_trainer.embedding_file import EmbeddingData, save_embedding  # noqa: E402
from embedding_trainer.errors import EmbeddingFileError  # noqa: E402
from embedding_trainer.hosts.diffusers_host import DiffusersHost  # noqa: E402
from embedding_trainer.toyworld import base_model, learning, world  # noqa: E402
from embedding_trainer.toyworld.judges import load_judges  # noqa: E402


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    return Path(base_model.train(base_model.Plan.quick(seed=1), out)["model"])


@pytest.mark.slow
def test_a_budget_curve_comes_from_one_run_and_every_point_is_judged(quick_model, tmp_path):
    model, host = base_model.load_model(quick_model), DiffusersHost.from_pretrained(quick_model)
    concept = world.HELD_OUT_CONCEPTS["moon"]
    run = learning.evaluate_concept(
        model, host, load_judges(), concept, learning.WEBUI_DEFAULTS, [2, 4], tmp_path, images_per_prompt=1
    )
    assert sorted(run.scores) == [0, 2, 4] and run.steps_per_s > 0
    for scores in run.scores.values():
        assert 0.0 <= scores.reconstruction <= 1.0 and 0.0 <= scores.editability <= 1.0
        assert scores.images == len(world.reconstruction_prompts(concept, "x")) + 8
    photos = sorted((tmp_path / "photos").glob("*.png"))
    assert len(photos) == 4  # the trainer saw the photos and the template, never the word "moon"
    assert "moon" not in (tmp_path / "template-object.txt").read_text()


def test_a_multi_vector_embedding_is_loaded_by_diffusers_and_changes_the_images(quick_model, tmp_path):
    model = base_model.load_model(quick_model)
    width = model.text_encoder.config.hidden_size
    rows = np.random.default_rng(0).normal(size=(3, width)).astype(np.float32) * 5
    path = save_embedding(EmbeddingData(learning.TRIGGER, {"clip_l": torch_from(rows)}), tmp_path / "e.safetensors")
    tokens_before = len(model.tokenizer)
    with learning.embedding_loaded(model, path) as convert:
        prompt = convert([f"a photo of a {learning.TRIGGER}"])[0]
        with_embedding = base_model.sample(model, [prompt], steps=4)
    assert prompt.split()[-3:] == [learning.TRIGGER, f"{learning.TRIGGER}_1", f"{learning.TRIGGER}_2"]
    assert len(model.tokenizer) == tokens_before  # unloaded again
    plain = base_model.sample(model, ["a photo of a star"], steps=4)
    assert with_embedding.shape == plain.shape == (1, 64, 64, 3)


def test_an_erased_word_comes_back_after_embeddings_were_loaded_and_unloaded(quick_model, tmp_path):
    # Loading an embedding file resizes the text encoder's table (a new tensor); the erased rows must be written back
    # into the table the model has at the end, or the next run of the benchmark judges a model without the word.
    model = base_model.load_model(quick_model)
    concept = world.HELD_OUT_CONCEPTS["cross"]
    ids = list(base_model.held_out_token_ids(model.tokenizer, concept.erase).values())
    before = model.text_encoder.get_input_embeddings().weight[ids].detach().clone()
    width = model.text_encoder.config.hidden_size
    rows = np.random.default_rng(0).normal(size=(2, width)).astype(np.float32)
    path = save_embedding(EmbeddingData(learning.TRIGGER, {"clip_l": torch_from(rows)}), tmp_path / "e.safetensors")
    with learning.concept_erased(concept, [model.text_encoder], model.tokenizer, quick_model):
        assert not np.allclose(model.text_encoder.get_input_embeddings().weight[ids].detach(), before)
        for _ in range(2):  # as the benchmark judges several budgets
            with learning.embedding_loaded(model, path):
                pass
    assert np.array_equal(model.text_encoder.get_input_embeddings().weight[ids].detach(), before)


@pytest.mark.slow
def test_the_own_words_bound_judges_the_same_prompts_with_the_concepts_words(quick_model):
    model = base_model.load_model(quick_model)
    concept = world.HELD_OUT_CONCEPTS["striped_circle"]
    scores = learning.score_own_words(model, load_judges(), concept, images_per_prompt=1)
    assert scores.images == len(world.reconstruction_prompts(concept, "x")) + 8
    assert 0.0 <= scores.reconstruction <= 1.0 and 0.0 <= scores.editability <= 1.0
    assert all(c.prompt.count("striped circle") == 1 for c in world.edit_cases(concept, concept.own_words))
    with pytest.raises(ValueError, match="no words"):  # the shipped model's held-out shapes have none
        learning.score_own_words(model, load_judges(), world.HELD_OUT_CONCEPTS["heart"])


@pytest.mark.slow
def test_the_demo_writes_the_embedding_the_grid_and_the_scores(quick_model, tmp_path):
    from embedding_trainer.standalone import demo
    from embedding_trainer.standalone.demo import run_demo

    report = run_demo(tmp_path / "demo", steps=3, model=quick_model)
    assert Path(report["embedding"]).is_file() and Path(report["grid"]).is_file()
    saved = json.loads((tmp_path / "demo" / "scores.json").read_text())
    assert set(saved["scores"]) == {"before", "after"} and saved["steps"] == 3
    from PIL import Image

    with Image.open(report["grid"]) as grid:  # a title, then five rows of four 128 px tiles beside the labels
        assert grid.size == (demo.LABEL_WIDTH + 4 * 128, demo.TITLE_HEIGHT + 5 * 128)
    # A second demo into its own folder replaces its results (the photos too) instead of refusing.
    again = run_demo(tmp_path / "demo", steps=3, model=quick_model)
    assert again["embedding"] == report["embedding"]
    # A folder the demo did not make keeps its files: refused before anything is drawn there.
    (tmp_path / "mine" / "embeddings").mkdir(parents=True)
    (tmp_path / "mine" / "embeddings" / f"{report['trigger']}.safetensors").write_bytes(b"my own file")
    with pytest.raises(EmbeddingFileError, match=r"--overwrite"):
        run_demo(tmp_path / "mine", steps=3, model=quick_model)
    assert not (tmp_path / "mine" / "photos").exists()


def torch_from(array: np.ndarray):
    import torch

    return torch.from_numpy(array)


def test_the_training_templates_never_name_a_held_out_concept() -> None:
    # The trainer sees only these prompts (and the photos): the concept's word must stay unseen.
    stems = world.forbidden_stems()
    for templates in learning.TEMPLATES.values():
        for template in templates:
            assert "[name]" in template
            assert not [w for w in world.caption_words(template) if w.startswith(stems)], template


def test_captioned_photos_name_their_other_attributes_and_never_the_concept(tmp_path) -> None:
    stems = world.forbidden_stems()
    for name, concept in world.HELD_OUT_CONCEPTS.items():
        paths = learning.write_user_photos(concept, tmp_path / name, count=4, seed=1, captions=True)
        scenes = world.user_photo_scenes(concept, 4, 1)
        for path, scene in zip(paths, scenes):
            words = world.caption_words(path.with_suffix(".txt").read_text(encoding="utf-8"))
            assert words and not [w for w in words if w.startswith(stems)], (name, words)
            for attribute in ("colour", "texture", "shape"):  # each attribute the concept leaves free is named
                if attribute not in concept.attributes:
                    table = {
                        "colour": world.COLOUR_WORDS,
                        "texture": world.TEXTURE_ADJECTIVES,
                        "shape": world.SHAPE_WORDS,
                    }[attribute]
                    value = table[getattr(scene, attribute)]
                    assert (value if isinstance(value, str) else value[-1]) in words, (name, attribute, words)
        template = learning.concept_template(concept, tmp_path, captions=True).read_text(encoding="utf-8")
        assert all(line.endswith(", [filewords]") for line in template.splitlines())
    plain = learning.write_user_photos(world.HELD_OUT_CONCEPTS["heart"], tmp_path / "plain", count=2)
    assert plain and not list((tmp_path / "plain").glob("*.txt"))  # no captions unless asked
