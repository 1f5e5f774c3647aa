"""The WebUI checkpoint exporter's refusals (overwriting, models the WebUI could not build, tensors with no place),
its command line, and the yaml it writes (read back by PyYAML as the hand-written emitter's was). Offline and
host-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from embedding_trainer.standalone import cli
from embedding_trainer.tools.export_a1111 import (
    ExportError,
    ModelParts,
    convert_open_clip_text,
    export_a1111,
    load_model_parts,
    model_config,
    model_config_yaml,
    output_paths,
)
from tests.export_helpers import export_tiny_sd1, loadable_exports

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def sd1_export(tiny_model_dirs: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny SD1 model and its export, made once for this module."""
    return export_tiny_sd1(tiny_model_dirs, tmp_path_factory)


@pytest.fixture(scope="module")
def loadable(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``loadable(family)`` -> (diffusers folder, ExportResult) of the WebUI-loadable tiny model, made once."""
    return loadable_exports(tmp_path_factory)


# -- refusals ---------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite(sd1_export: tuple[Path, Any], tmp_path: Path) -> None:
    model, result = sd1_export
    before = {p: p.stat().st_mtime_ns for p in (result.checkpoint, result.config)}
    with pytest.raises(ExportError, match="already exists"):
        export_a1111(model, result.checkpoint, allow_norm_group_mismatch=True)
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # One existing output is enough to refuse, and nothing else is written.
    checkpoint, config, folder, open_clip_json = output_paths(tmp_path / "partial.safetensors")
    assert open_clip_json.name == "partial.open_clip.json" and folder.name == "partial-text-encoder"
    config.write_text("mine", encoding="utf-8")
    with pytest.raises(ExportError, match="already exists"):
        export_a1111(model, tmp_path / "partial", allow_norm_group_mismatch=True)
    assert config.read_text(encoding="utf-8") == "mine"
    assert not checkpoint.exists() and not folder.exists()

    path = export_a1111(model, tmp_path / "partial", allow_norm_group_mismatch=True, overwrite=True).checkpoint
    assert path == checkpoint and config.read_text(encoding="utf-8").startswith("# ldm")


def test_refusals_name_the_problem_and_the_fix(tiny_model_dirs: Any, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="norm_num_groups=8.*32 groups.*--webui-loadable"):
        export_a1111(tiny_model_dirs("sd1"), tmp_path / "a")
    # The default tiny SD2/SDXL have OpenCLIP-style encoders with 2x MLPs, which open_clip 2.20 cannot build.
    with pytest.raises(
        ExportError, match=r"text encoder: .*intermediate_size 96 is not 4 x hidden_size 48.*webui-load"
    ):
        export_a1111(tiny_model_dirs("sd2"), tmp_path / "b", allow_norm_group_mismatch=True)
    with pytest.raises(ExportError, match=r"text encoder 2: .*intermediate_size=256"):
        export_a1111(tiny_model_dirs("sdxl"), tmp_path / "c", allow_norm_group_mismatch=True)
    with pytest.raises(ExportError, match="NAME"):
        export_a1111(tiny_model_dirs("sd1"), tmp_path / "d.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_open_clip_conversion_refusals() -> None:
    config = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}
    good = {
        f"text_model.encoder.layers.0.{m}.{k}": torch.zeros(1)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        )
        for k in ("weight", "bias")
    }
    good.update(
        {
            f"text_model.{k}": torch.zeros(1)
            for k in (
                "embeddings.token_embedding.weight",
                "embeddings.position_embedding.weight",
                "final_layer_norm.weight",
                "final_layer_norm.bias",
            )
        }
    )
    assert len(convert_open_clip_text(good, config)) == len(good) - 4
    with pytest.raises(ExportError, match="no OpenCLIP name for 1 tensor.*vision_model"):
        convert_open_clip_text({**good, "vision_model.x.weight": torch.zeros(1)}, config)
    missing_v = {k: v for k, v in good.items() if "v_proj.bias" not in k}
    with pytest.raises(ExportError, match="layer 0 has no bias for v"):
        convert_open_clip_text(missing_v, config)
    with pytest.raises(ExportError, match="do not match the config's 2 layers"):
        convert_open_clip_text(good, {**config, "num_hidden_layers": 2})


def test_sdxl_refusals(tmp_path: Path) -> None:
    from embedding_trainer.tools.tiny_models import build_tiny_components

    components = build_tiny_components("sdxl", seed=0, webui_loadable=True)
    components.scheduler.register_to_config(beta_end=0.02)
    with pytest.raises(ExportError, match="not SDXL's schedule.*rebuilds every SDXL model's noise schedule"):
        export_a1111(components, tmp_path / "a")
    components = build_tiny_components("sdxl", seed=0, webui_loadable=True)
    parts = load_model_parts(components)
    parts.text_encoder_2 = {k: v for k, v in parts.text_encoder_2.items() if k != "text_projection.weight"}
    with pytest.raises(ExportError, match="text encoder 2: no text_projection.weight.*CLIPTextModelWithProjection"):
        export_a1111(parts, tmp_path / "b")
    parts = load_model_parts(components)
    parts.text_encoder_2, parts.text_encoder_2_config, parts.tokenizer_2_files = None, None, None
    with pytest.raises(ExportError, match="takes SDXL's added embeddings but there is one text encoder"):
        export_a1111(parts, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


# -- command line -----------------------------------------------------------------------------------------------


def test_cli_export(tiny_model_dirs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs("sd1"))
    assert cli.main(["export-a1111", model, str(tmp_path / "x"), "--allow-norm-group-mismatch"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.safetensors")
    assert (tmp_path / "x.yaml").is_file() and (tmp_path / "x-text-encoder" / "config.json").is_file()
    assert cli.main(["export-a1111", model, str(tmp_path / "x"), "--allow-norm-group-mismatch"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export-a1111", model, str(tmp_path / "y")]) == 2
    assert "norm_num_groups" in capsys.readouterr().err


def test_cli_exports_sd2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    assert cli.main(["make-tiny-model", "sd2", str(model), "--webui-loadable"]) == 0
    capsys.readouterr()
    assert cli.main(["export-a1111", str(model), str(tmp_path / "x")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "x.safetensors")
    assert "open_clip.add_model_config" in captured.err and (tmp_path / "x.open_clip.json").is_file()


# -- yaml -------------------------------------------------------------------------------------------------------


def _hand_written_yaml(value: dict[str, Any], indent: int = 0) -> str:
    """The exporter's yaml emitter before it used PyYAML (block dicts, flow lists of scalars, every string in double
    quotes): the reference the PyYAML output must read the same as."""

    def scalar(item: Any) -> str:
        if item is None:
            return "null"
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int):
            return str(item)
        if isinstance(item, float):
            text = repr(item)
            if "e" in text:
                mantissa, exponent = text.split("e")
                mantissa += "" if "." in mantissa else ".0"
                text = f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"
            return text
        return json.dumps(str(item))

    pad = "  " * indent
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines += [f"{pad}{key}:", _hand_written_yaml(item, indent + 1).rstrip("\n")]
        elif isinstance(item, list | tuple) and item and all(isinstance(v, dict) for v in item):
            lines.append(f"{pad}{key}:")
            for entry in item:
                body = _hand_written_yaml(entry, indent + 2).rstrip("\n").split("\n")
                lines += [f"{pad}  - {body[0].lstrip()}", *body[1:]]
        elif isinstance(item, list | tuple):
            lines.append(f"{pad}{key}: [{', '.join(scalar(v) for v in item)}]")
        else:
            lines.append(f"{pad}{key}: {scalar(item)}")
    return "\n".join(lines) + "\n"


def _sdxl_v_prediction(loadable: Any) -> tuple[ModelParts, Any]:
    model, result = loadable("sdxl")
    parts = load_model_parts(model)
    parts.scheduler_config = {**parts.scheduler_config, "prediction_type": "v_prediction"}
    return parts, result


@pytest.mark.parametrize("case", ["sd1", "sd2", "sdxl", "sdxl-v"])
def test_the_yaml_reads_exactly_as_the_hand_written_one_did(
    case: str, sd1_export: tuple[Path, Any], loadable: Any
) -> None:
    """Same keys, same order, same types and values (json.dumps tells 1 from 1.0 and True, and keeps the order)."""
    if case == "sdxl-v":
        parts, result = _sdxl_v_prediction(loadable)
    else:
        model, result = sd1_export if case == "sd1" else loadable(case)
        parts = load_model_parts(model)
    te_dir = result.text_encoder_dir.resolve() if result.text_encoder_dir else None
    text = model_config_yaml(parts, te_dir, result.open_clip_arch)
    new = yaml.safe_load(text)
    old = yaml.safe_load(_hand_written_yaml(model_config(parts, te_dir, result.open_clip_arch)))
    assert json.dumps(new) == json.dumps(old)
    if case != "sdxl-v":  # the file the export wrote is this text
        assert result.config.read_text(encoding="utf-8") == text
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments[0].endswith("written by embedding_trainer export-a1111") and comments[1].startswith("# source: ")
    assert not [line for line in text.splitlines()[len(comments) :] if line.lstrip().startswith("#")]
    schedule = new["model"]["params"]
    if case.startswith("sdxl"):
        schedule = schedule["denoiser_config"]["params"]["discretization_config"]["params"]
        scaling = new["model"]["params"]["denoiser_config"]["params"]["scaling_config"]["target"]
        assert scaling.endswith("VScaling" if case == "sdxl-v" else "EpsScaling")
    else:
        assert schedule["parameterization"] == ("v" if case == "sd2" else "eps")
        assert type(new["model"]["base_learning_rate"]) is float and new["model"]["base_learning_rate"] == 1e-4
    assert type(schedule["linear_start"]) is float and schedule["linear_start"] == 0.00085
    assert type(schedule["linear_end"]) is float and schedule["linear_end"] == 0.012


def test_awkward_paths_and_small_floats_survive_the_yaml(sd1_export: tuple[Path, Any], tmp_path: Path) -> None:
    model, _ = sd1_export
    parts = load_model_parts(model)
    parts.vae_config = {**parts.vae_config, "scaling_factor": 1e-05}
    parts.scheduler_config = {**parts.scheduler_config, "beta_start": 1e-4, "beta_end": 2e16}
    folder = tmp_path / "a: b #c" / "\"quoted\" 'text' [1, 2] & * ! % @ {x}" / "ünïcode-1e3 true null"
    text = model_config_yaml(parts, folder, None)
    assert text.isascii()  # readable whatever encoding the host assumes
    params = yaml.safe_load(text)["model"]["params"]
    assert params["cond_stage_config"]["params"]["version"] == str(folder)
    assert (params["scale_factor"], params["linear_start"], params["linear_end"]) == (1e-05, 1e-4, 2e16)
    assert all(type(params[k]) is float for k in ("scale_factor", "linear_start", "linear_end"))
    long = tmp_path / ("a very long folder name with spaces " * 5).strip()
    version_lines = [line for line in model_config_yaml(parts, long, None).splitlines() if "version:" in line]
    # One line, not folded at spaces: a moved folder's path can be edited (or replaced as text) in place.
    assert len(version_lines) == 1 and version_lines[0].strip() == f"version: {long}"
