"""The toy world's base model: a --quick training run gives a diffusers SD1 folder that the project loads and exports,
deterministically, within the size budget of weights that ship in the repository."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from embedding_trainer.toyworld import base_model  # noqa: E402

MIB = 1024 * 1024


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(path).items():
            tensors[f"{path.parent.name}/{key}"] = value
    return tensors


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same quick plan twice: once straight through, once stopped after one step of each stage and resumed."""
    plan = base_model.Plan.quick(seed=3)
    straight = tmp_path_factory.mktemp("straight")
    summary = base_model.train(plan, straight)
    assert summary["model"] == str(straight / "model")
    resumed = tmp_path_factory.mktemp("resumed")
    first = base_model.train(plan, resumed, stage="vae", stop_after=1)
    assert first["model"] is None and not first["stages"]["vae"]["done"]
    base_model.train(plan, resumed, stage="vae")
    second = base_model.train(plan, resumed, stage="unet", stop_after=1)
    assert second["model"] is None and second["stages"]["unet"]["step"] == 1
    final = base_model.train(plan, resumed, stage="all")
    assert final["model"] == str(resumed / "model")
    return straight / "model", resumed / "model"


def test_folder_layout_sizes_and_record(quick_runs: tuple[Path, Path]) -> None:
    folder = quick_runs[0]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir()
    weights = list(folder.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    # The quick plan has the full model's architecture: these are the sizes that ship.
    assert all(p.stat().st_size < 16 * MIB for p in weights)
    assert sum(base_model.folder_sizes(folder).values()) < 30 * 1000 * 1000
    tensors = _weights(folder)
    # (transformers 4.30 also stores CLIP's int64 position_ids buffer)
    assert {v.dtype for v in tensors.values() if v.dtype.kind == "f"} == {np.dtype("float16")}
    record = json.loads((folder / "training_record.json").read_text())
    assert record["stages"]["vae"]["steps"] == 3 and record["stages"]["unet"]["machine"]["device"] == "cpu"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["beta_schedule"] == "scaled_linear"


def test_folder_loads_in_every_transformers_version(quick_runs: tuple[Path, Path]) -> None:
    """The slow tokenizer's files and the ``text_model.`` key names: what transformers 4.30 (the WebUI's pin)
    needs, and what 5.x reads too (5.x itself would write tokenizer.json and unprefixed keys)."""
    from safetensors import safe_open

    folder = quick_runs[0]
    assert {p.name for p in (folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as handle:
        assert all(key.startswith("text_model.") for key in handle.keys())
    model = base_model.load_model(folder)
    token_table = model.text_encoder.get_input_embeddings().weight
    assert np.array_equal(
        token_table.half().detach().numpy(),
        _weights(folder)["text_encoder/text_model.embeddings.token_embedding.weight"],
    )


def test_same_seed_same_weights_also_after_resuming(quick_runs: tuple[Path, Path]) -> None:
    a, b = (_weights(folder) for folder in quick_runs)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_other_seed_other_weights(tmp_path: Path) -> None:
    import torch

    arch = base_model.Architecture()
    one, two = base_model.build_unet(arch, 0), base_model.build_unet(arch, 1)
    assert not torch.equal(one.conv_in.weight, two.conv_in.weight)
    assert torch.equal(one.conv_in.weight, base_model.build_unet(arch, 0).conv_in.weight)


def test_architecture_is_sd1_and_webui_buildable(quick_runs: tuple[Path, Path]) -> None:
    folder = quick_runs[0]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4 and vae["latent_channels"] == 4 and vae["norm_num_groups"] == 32
    assert unet["norm_num_groups"] == 32 and all(
        c % 32 == 0 for c in unet["block_out_channels"] + vae["block_out_channels"]
    )
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert text["vocab_size"] == 49408 and text["max_position_embeddings"] == 77 and text["hidden_act"] == "quick_gelu"
    assert 0.05 < vae["scaling_factor"] < 100


def test_diffusers_host_loads_it(quick_runs: tuple[Path, Path]) -> None:
    from embedding_trainer.hosts.diffusers_host import DiffusersHost

    host = DiffusersHost.from_pretrained(quick_runs[0])
    assert host.family == "sd1"
    ids = host.tokenizers[0]("a photo of a red star").input_ids
    assert ids[:5] == [49406, 320, 1125, 539, 320]


def test_exports_for_the_webui(quick_runs: tuple[Path, Path], tmp_path: Path) -> None:
    from embedding_trainer.tools.export_a1111 import export_a1111

    result = export_a1111(quick_runs[0], tmp_path / "toyworld")
    assert result.checkpoint.is_file() and result.checkpoint.stat().st_size < 30 * 1000 * 1000
    assert "first_stage_config" in result.config.read_text()


def test_samples_and_evaluation_prompts(quick_runs: tuple[Path, Path]) -> None:
    model = base_model.load_model(quick_runs[0])
    images = base_model.sample(model, ["a red star", "a blue circle on a white background"], steps=2, seed=1)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    again = base_model.sample(model, ["a red star"], steps=2, seed=1)
    assert np.array_equal(images[:1], again)
    seen = {"a red striped star on a grey background"}
    cases = base_model.evaluation_prompts(20, seed=0, exclude=seen)
    assert len(cases) == 20 and len({c.prompt for c in cases}) == 20
    for case in cases:
        assert case.prompt not in seen and not base_model.world.caption_violations([case.prompt])
        for attribute in base_model.JUDGED:
            assert case.expected[attribute] not in ("heart", "moon", "dots")


def test_counterfactual_judge_reads_clean_images() -> None:
    scenes = [base_model.world.example(0, base_model.EVAL_INDEX_OFFSET + i)[0] for i in range(6)]
    for scene in scenes:
        image = np.asarray(base_model.world.render(scene))
        assert base_model.counterfactual_judge(image, scene) == {k: scene.attributes()[k] for k in base_model.JUDGED}


def test_vae_checkpoint_survives_unet_changes_but_not_vae_changes(tmp_path: Path) -> None:
    import dataclasses

    plan = base_model.Plan.quick(seed=5)
    assert base_model.train(plan, tmp_path, stage="vae")["stages"]["vae"]["done"]
    other_unet = dataclasses.replace(plan, arch=dataclasses.replace(plan.arch, unet_channels=(32, 64)))
    assert base_model.train(other_unet, tmp_path, stage="vae")["stages"]["vae"]["done"]
    other_vae = dataclasses.replace(plan, vae=dataclasses.replace(plan.vae, lr=plan.vae.lr / 2))
    with pytest.raises(base_model.BaseModelError, match="vae checkpoint was made with"):
        base_model.train(other_vae, tmp_path, stage="vae")


def test_an_image_cache_from_another_world_version_is_rendered_again(tmp_path: Path) -> None:
    plan = base_model.Plan.quick(seed=3)
    fresh = base_model.training_images(plan, tmp_path)
    cache = tmp_path / f"images-seed{plan.seed}-n{plan.images}.npy"
    assert cache.is_file()
    stale = fresh.copy()
    stale[len(stale) // 2] //= 2  # as if world.py had drawn it differently
    np.save(cache, stale)
    assert np.array_equal(base_model.training_images(plan, tmp_path), fresh)
    assert np.array_equal(np.load(cache), fresh)  # and the cache is fixed


def test_erasing_the_held_out_words_restores_exactly_their_initial_rows() -> None:
    plan = base_model.Plan.quick()
    tokenizer = base_model.build_tokenizer()
    initial = base_model.build_text_encoder(plan.arch, plan.seed)
    trained = base_model.build_text_encoder(plan.arch, plan.seed)
    with torch.no_grad():
        trained.get_input_embeddings().weight.add_(1.0)  # stands for training: every row moved
    ids = base_model.erase_held_out_words(trained, tokenizer, initial)
    assert set(ids) == {"heart", "moon", "dotted", "dots"}
    after, before = trained.get_input_embeddings().weight, initial.get_input_embeddings().weight
    erased = torch.zeros(len(after), dtype=torch.bool)
    erased[list(ids.values())] = True
    assert torch.equal(after[erased], before[erased])
    assert torch.equal(after[~erased], before[~erased] + 1.0)
    # Held-out prompts name a held-out class; regular ones never do.
    for case in base_model.evaluation_prompts(6, held_out=True):
        assert set(base_model.world.caption_words(case.prompt)) & set(ids)
    for case in base_model.evaluation_prompts(6):
        assert not set(base_model.world.caption_words(case.prompt)) & set(ids)


@pytest.mark.slow
def test_the_training_command_judges_regular_and_held_out_prompts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from embedding_trainer.toyworld import train_base

    assert train_base.main(["--out", str(tmp_path), "--quick", "--seed", "3", "--eval", "4", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["sample_eval"]["judges"]) >= set(base_model.JUDGED)
    rates = summary["held_out_eval"]
    assert set(rates) == {"with_the_words", "shipped_words_erased"}
    for result in rates.values():
        assert set(result["held_out_classes"]) <= {"heart", "moon", "dots"} and result["held_out_classes"]
    assert (tmp_path / "samples.png").is_file()
