"""The WebUI checkpoint exporter: diffusers SD1 folder -> ldm-layout .safetensors + .yaml + local text encoder.

Offline and host-free. The opt-in test at the end loads an export into the real ldm classes of a WebUI checkout
(``EMBTRAIN_WEBUI_DIR`` = the checkout, ``EMBTRAIN_WEBUI_PYTHON`` = its Python) and compares outputs with diffusers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedding_trainer.standalone import cli
from embedding_trainer.tools.export_a1111 import (
    ExportError,
    ModelParts,
    convert_open_clip_text,
    export_a1111,
    load_model_parts,
    model_config,
    model_config_yaml,
    open_clip_arch,
    output_paths,
    unet_key_table,
    vae_key_table,
)

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def sd1_export(tiny_model_dirs: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny SD1 model exported once (its GroupNorms use 8 groups, so the mismatch must be allowed)."""
    model = tiny_model_dirs("sd1")
    out = tmp_path_factory.mktemp("export") / "tiny"
    return model, export_a1111(model, out, allow_norm_group_mismatch=True)


def _sources(model: Path) -> dict[str, dict[str, torch.Tensor]]:
    parts = load_model_parts(model)
    return {"unet": parts.unet, "vae": parts.vae, "text": parts.text_encoder}


def test_every_tensor_lands_exactly_once(sd1_export: tuple[Path, Any]) -> None:
    model, result = sd1_export
    checkpoint = load_file(str(result.checkpoint))
    sources = _sources(model)
    text = {k.removeprefix("text_model."): v for k, v in sources["text"].items() if "position_ids" not in k}
    assert len(checkpoint) == len(sources["unet"]) + len(sources["vae"]) + len(text)
    assert result.tensors == len(checkpoint)

    parts = load_model_parts(model)
    unet_table = unet_key_table(parts.unet_config)
    vae_table, _ = vae_key_table(parts.vae_config)
    landed: dict[str, str] = {}

    def target(key: str, table: dict[str, str]) -> str:
        pieces = key.split(".")
        for cut in range(len(pieces) - 1, 0, -1):
            module = ".".join(pieces[:cut])
            if module in table:
                return ".".join([table[module], *pieces[cut:]])
        raise AssertionError(f"{key} has no ldm name")

    for prefix, state, table in (
        ("model.diffusion_model.", sources["unet"], unet_table),
        ("first_stage_model.", sources["vae"], vae_table),
    ):
        for key, value in state.items():
            new = prefix + target(key, table)
            assert new not in landed, f"{key} and {landed.get(new)} both land on {new}"
            landed[new] = key
            assert torch.equal(checkpoint[new].reshape(value.shape), value), new
    for key, value in text.items():
        new = "cond_stage_model.transformer.text_model." + key
        landed[new] = key
        assert torch.equal(checkpoint[new], value), new
    assert set(landed) == set(checkpoint)


def test_known_ldm_keys(sd1_export: tuple[Path, Any]) -> None:
    model, result = sd1_export
    ck = load_file(str(result.checkpoint))
    src = _sources(model)
    unet, vae = src["unet"], src["vae"]
    text = {k.removeprefix("text_model."): v for k, v in src["text"].items()}
    u, f, t = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
    same = {
        # UNet: conv_in, time embedding, down path (level 0 has attention, one resnet per level), mid, up path, out
        u + "input_blocks.0.0.weight": unet["conv_in.weight"],
        u + "time_embed.0.weight": unet["time_embedding.linear_1.weight"],
        u + "time_embed.2.bias": unet["time_embedding.linear_2.bias"],
        u + "input_blocks.1.0.in_layers.0.weight": unet["down_blocks.0.resnets.0.norm1.weight"],
        u + "input_blocks.1.0.emb_layers.1.weight": unet["down_blocks.0.resnets.0.time_emb_proj.weight"],
        u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": unet[
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        ],
        u + "input_blocks.1.1.proj_in.weight": unet["down_blocks.0.attentions.0.proj_in.weight"],
        u + "input_blocks.2.0.op.weight": unet["down_blocks.0.downsamplers.0.conv.weight"],
        u + "input_blocks.3.0.skip_connection.weight": unet["down_blocks.1.resnets.0.conv_shortcut.weight"],
        u + "input_blocks.3.0.out_layers.3.weight": unet["down_blocks.1.resnets.0.conv2.weight"],
        u + "middle_block.0.in_layers.2.weight": unet["mid_block.resnets.0.conv1.weight"],
        u + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": unet[
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
        ],
        u + "middle_block.2.out_layers.0.bias": unet["mid_block.resnets.1.norm2.bias"],
        u + "output_blocks.0.0.skip_connection.weight": unet["up_blocks.0.resnets.0.conv_shortcut.weight"],
        u + "output_blocks.1.1.conv.weight": unet["up_blocks.0.upsamplers.0.conv.weight"],
        u + "output_blocks.2.1.proj_out.weight": unet["up_blocks.1.attentions.0.proj_out.weight"],
        u + "output_blocks.3.0.in_layers.0.weight": unet["up_blocks.1.resnets.1.norm1.weight"],
        u + "output_blocks.3.1.transformer_blocks.0.norm3.weight": unet[
            "up_blocks.1.attentions.1.transformer_blocks.0.norm3.weight"
        ],
        u + "out.0.weight": unet["conv_norm_out.weight"],
        u + "out.2.weight": unet["conv_out.weight"],
        # VAE: encoder down levels in order, decoder up levels reversed (diffusers' first up block is ldm's up.3)
        f + "encoder.conv_in.weight": vae["encoder.conv_in.weight"],
        f + "encoder.down.0.block.0.conv1.weight": vae["encoder.down_blocks.0.resnets.0.conv1.weight"],
        f + "encoder.down.0.downsample.conv.weight": vae["encoder.down_blocks.0.downsamplers.0.conv.weight"],
        f + "encoder.down.1.block.0.nin_shortcut.weight": vae["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"],
        f + "encoder.mid.block_2.norm2.weight": vae["encoder.mid_block.resnets.1.norm2.weight"],
        f + "encoder.mid.attn_1.norm.weight": vae["encoder.mid_block.attentions.0.group_norm.weight"],
        f + "encoder.norm_out.weight": vae["encoder.conv_norm_out.weight"],
        f + "quant_conv.weight": vae["quant_conv.weight"],
        f + "post_quant_conv.weight": vae["post_quant_conv.weight"],
        f + "decoder.up.3.block.0.conv1.weight": vae["decoder.up_blocks.0.resnets.0.conv1.weight"],
        f + "decoder.up.3.upsample.conv.weight": vae["decoder.up_blocks.0.upsamplers.0.conv.weight"],
        f + "decoder.up.0.block.0.nin_shortcut.weight": vae["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"],
        f + "decoder.up.0.block.1.conv2.bias": vae["decoder.up_blocks.3.resnets.1.conv2.bias"],
        f + "decoder.conv_out.weight": vae["decoder.conv_out.weight"],
        # CLIP text model under transformers 4.x names
        t + "embeddings.token_embedding.weight": text["embeddings.token_embedding.weight"],
        t + "embeddings.position_embedding.weight": text["embeddings.position_embedding.weight"],
        t + "encoder.layers.1.self_attn.q_proj.weight": text["encoder.layers.1.self_attn.q_proj.weight"],
        t + "final_layer_norm.bias": text["final_layer_norm.bias"],
    }
    for key, value in same.items():
        assert key in ck, key
        assert torch.equal(ck[key], value), key
    assert ck[t + "embeddings.token_embedding.weight"].shape == (49408, 32)
    assert not any(k.startswith(f + "decoder.up.0.upsample") for k in ck)  # the highest resolution has none
    assert not any(k.startswith(f + "encoder.down.3.downsample") for k in ck)

    # The VAE's mid-block attention projections are 1x1 convs in ldm.
    for part in ("encoder", "decoder"):
        for ldm_name, diffusers_name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            weight = ck[f"{f}{part}.mid.attn_1.{ldm_name}.weight"]
            source = vae[f"{part}.mid_block.attentions.0.{diffusers_name}.weight"]
            channels = source.shape[0]
            assert weight.shape == (channels, channels, 1, 1)
            assert torch.equal(weight[:, :, 0, 0], source)
            assert torch.equal(
                ck[f"{f}{part}.mid.attn_1.{ldm_name}.bias"],
                vae[diffusers_name.join([f"{part}.mid_block.attentions.0.", ".bias"])],
            )
    assert all(k.startswith((u, f, "cond_stage_model.transformer.text_model.")) for k in ck)


def test_yaml_matches_the_model(sd1_export: tuple[Path, Any]) -> None:
    model, result = sd1_export
    parts = load_model_parts(model)
    config = yaml.safe_load(result.config.read_text(encoding="utf-8"))["model"]
    assert config["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    params = config["params"]
    assert isinstance(config["base_learning_rate"], float)
    assert params["parameterization"] == "eps" and params["conditioning_key"] == "crossattn"
    assert params["scale_factor"] == pytest.approx(parts.vae_config["scaling_factor"])
    assert params["scale_factor"] != pytest.approx(0.18215)  # the tiny VAE is calibrated: the value must carry over
    assert params["linear_start"] == pytest.approx(0.00085) and params["linear_end"] == pytest.approx(0.012)
    assert params["beta_schedule"] == "linear" and params["timesteps"] == 1000
    unet = params["unet_config"]["params"]
    assert params["unet_config"]["target"] == "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    assert unet["model_channels"] == 32 and unet["channel_mult"] == [1, 2]
    assert unet["attention_resolutions"] == [1]  # attention at the first level only (CrossAttnDownBlock2D)
    assert unet["num_res_blocks"] == 1
    assert (unet["num_heads"], unet["num_head_channels"]) == (8, -1)
    assert unet["context_dim"] == 32 and unet["transformer_depth"] == 1
    assert unet["use_linear_in_transformer"] is False and unet["use_spatial_transformer"] is True
    assert (unet["in_channels"], unet["out_channels"]) == (4, 4)
    vae = params["first_stage_config"]["params"]
    dd = vae["ddconfig"]
    assert vae["embed_dim"] == 4 and dd["z_channels"] == 4 and dd["double_z"] is True
    assert dd["ch"] == 8 and dd["ch_mult"] == [1, 2, 2, 2] and len(dd["ch_mult"]) == 4
    assert dd["num_res_blocks"] == 1 and dd["attn_resolutions"] == []
    cond = params["cond_stage_config"]
    assert cond["target"] == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert Path(cond["params"]["version"]) == result.text_encoder_dir.resolve()
    assert Path(cond["params"]["version"]).is_absolute()


def test_text_encoder_folder_loads_offline(sd1_export: tuple[Path, Any]) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    model, result = sd1_export
    folder = result.text_encoder_dir
    assert not list(folder.glob("*.safetensors"))  # the WebUI would list it as a checkpoint
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer("a photo of a", return_tensors="pt").input_ids[0].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 49407]
    assert tokenizer.model_max_length == 77
    exported = CLIPTextModel.from_pretrained(str(folder), local_files_only=True).eval()
    original = CLIPTextModel.from_pretrained(str(model / "text_encoder"), local_files_only=True).eval()
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(exported(ids).last_hidden_state, original(ids).last_hidden_state)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "clip_text_model" and config["hidden_size"] == 32


def test_same_model_same_bytes(tiny_model_dirs: Any, tmp_path: Path) -> None:
    """The WebUI's model hash is the file's sha256: exporting one model twice must give identical files."""
    model = tiny_model_dirs("sd1")
    first = export_a1111(model, tmp_path / "a" / "m", allow_norm_group_mismatch=True).checkpoint
    second = export_a1111(model, tmp_path / "b" / "m", allow_norm_group_mismatch=True).checkpoint
    assert first.read_bytes() == second.read_bytes()


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


def _ldm_compatible_sd1(folder: Path) -> Path:
    """A tiny SD1 model whose GroupNorms have 32 groups, as ldm builds them."""
    from embedding_trainer.tools.tiny_models import save_tiny_model

    return save_tiny_model("sd1", folder, seed=0, webui_loadable=True)


def test_components_and_folder_give_the_same_checkpoint(tmp_path: Path) -> None:
    from embedding_trainer.tools.tiny_models import build_tiny_components

    folder = _ldm_compatible_sd1(tmp_path / "model")
    from_folder = load_file(str(export_a1111(folder, tmp_path / "from-folder").checkpoint))
    components = build_tiny_components("sd1", seed=0)
    components.unet, components.vae = _load_unet_vae(folder)
    from_components = load_file(str(export_a1111(components, tmp_path / "from-components.safetensors").checkpoint))
    assert from_folder.keys() == from_components.keys()
    for key, value in from_folder.items():
        assert torch.equal(value, from_components[key]), key
    half = load_file(str(export_a1111(folder, tmp_path / "half", dtype=torch.float16).checkpoint))
    assert half["model.diffusion_model.out.2.weight"].dtype == torch.float16


def _load_unet_vae(folder: Path) -> tuple[Any, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder / "unet"), AutoencoderKL.from_pretrained(folder / "vae")


def test_cli_export(tiny_model_dirs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs("sd1"))
    assert cli.main(["export-a1111", model, str(tmp_path / "x"), "--allow-norm-group-mismatch"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.safetensors")
    assert (tmp_path / "x.yaml").is_file() and (tmp_path / "x-text-encoder" / "config.json").is_file()
    assert cli.main(["export-a1111", model, str(tmp_path / "x"), "--allow-norm-group-mismatch"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export-a1111", model, str(tmp_path / "y")]) == 2
    assert "norm_num_groups" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# SD2 and SDXL (OpenCLIP text towers, the sgm layout)


@pytest.fixture(scope="module")
def loadable(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``loadable(family)`` -> (diffusers folder, ExportResult) of the WebUI-loadable tiny model, made once."""
    from embedding_trainer.tools.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("loadable")
    made: dict[str, tuple[Path, Any]] = {}

    def get(family: str) -> tuple[Path, Any]:
        if family not in made:
            folder = save_tiny_model(family, root / family, seed=0, webui_loadable=True)
            made[family] = folder, export_a1111(folder, root / "out" / f"tiny-{family}")
        return made[family]

    return get


def _hf_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}


def _check_open_clip_tower(ck: dict[str, torch.Tensor], prefix: str, hf: dict[str, torch.Tensor]) -> set[str]:
    """Every HF CLIP tensor is found, unchanged, at its OpenCLIP place; returns the checkpoint keys that hold them."""
    layers = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers."))
    used: set[str] = set()

    def same(key: str, value: torch.Tensor) -> None:
        assert torch.equal(ck[prefix + key], value), key
        used.add(prefix + key)

    same("token_embedding.weight", hf["embeddings.token_embedding.weight"])
    same("positional_embedding", hf["embeddings.position_embedding.weight"])
    same("ln_final.weight", hf["final_layer_norm.weight"])
    same("ln_final.bias", hf["final_layer_norm.bias"])
    if "text_projection.weight" in hf:
        same("text_projection", hf["text_projection.weight"].t())
    for n in range(layers):
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        width = hf[src + "self_attn.q_proj.weight"].shape[0]
        for kind in ("weight", "bias"):
            q, k, v = ck[f"{prefix}{dst}attn.in_proj_{kind}"].split(width, 0)
            assert torch.equal(q, hf[f"{src}self_attn.q_proj.{kind}"]) and torch.equal(
                k, hf[f"{src}self_attn.k_proj.{kind}"]
            )
            assert torch.equal(v, hf[f"{src}self_attn.v_proj.{kind}"])
            used.add(f"{prefix}{dst}attn.in_proj_{kind}")
            for a, b in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                same(f"{dst}{b}.{kind}", hf[f"{src}{a}.{kind}"])
    # 6 q/k/v tensors per layer became 2 in_proj tensors.
    assert len(used) == len(hf) - 4 * layers
    return used


def test_sd2_every_tensor_lands_exactly_once(loadable: Any) -> None:
    model, result = loadable("sd2")
    ck = load_file(str(result.checkpoint))
    parts = load_model_parts(model)
    unet_table, (vae_table, _) = unet_key_table(parts.unet_config), vae_key_table(parts.vae_config)
    hf = _hf_text(parts.text_encoder)
    assert "text_projection.weight" not in hf  # diffusers' SD2 text encoder is a plain CLIPTextModel
    used = _check_open_clip_tower(ck, "cond_stage_model.model.", hf)
    layers = parts.text_encoder_config["num_hidden_layers"]
    # The constants: logit_scale, an identity projection, and one all-zero block the "penultimate" layer skips.
    pad = {k: v for k, v in ck.items() if k.startswith(f"cond_stage_model.model.transformer.resblocks.{layers}.")}
    assert len(pad) == 12 and all(not v.any() for v in pad.values())
    assert torch.equal(ck["cond_stage_model.model.text_projection"], torch.eye(48))
    assert ck["cond_stage_model.model.logit_scale"].shape == () and float(
        ck["cond_stage_model.model.logit_scale"]
    ) == pytest.approx(2.6592600)
    fillers = {*pad, "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    assert len(ck) == len(parts.unet) + len(parts.vae) + len(used) + len(fillers) == result.tensors
    assert set(ck) == (
        {"model.diffusion_model." + _target(k, unet_table) for k in parts.unet}
        | {"first_stage_model." + _target(k, vae_table) for k in parts.vae}
        | used
        | fillers
    )
    assert not result.text_encoder_dir and result.family == "sd2"


def test_sdxl_every_tensor_lands_exactly_once(loadable: Any) -> None:
    model, result = loadable("sdxl")
    ck = load_file(str(result.checkpoint))
    parts = load_model_parts(model)
    assert parts.family == "sdxl" and parts.text_encoder_2 is not None
    unet_table, (vae_table, _) = unet_key_table(parts.unet_config), vae_key_table(parts.vae_config)
    u = "model.diffusion_model."
    for src, dst in (("linear_1", "label_emb.0.0"), ("linear_2", "label_emb.0.2")):
        for kind in ("weight", "bias"):
            assert torch.equal(ck[f"{u}{dst}.{kind}"], parts.unet[f"add_embedding.{src}.{kind}"])
    assert ck[u + "label_emb.0.0.weight"].shape[1] == 6 * 8 + 64  # sizes (3 x 2 x 8) + pooled OpenCLIP-G
    clip_l = {f"conditioner.embedders.0.transformer.text_model.{k}" for k in _hf_text(parts.text_encoder)}
    for key in clip_l:
        assert torch.equal(ck[key], _hf_text(parts.text_encoder)[key.split("text_model.", 1)[1]])
    hf_g = _hf_text(parts.text_encoder_2)
    assert "text_projection.weight" in hf_g
    used = _check_open_clip_tower(ck, "conditioner.embedders.1.model.", hf_g)
    fillers = {"conditioner.embedders.1.model.logit_scale"}
    assert len(ck) == len(parts.unet) + len(parts.vae) + len(clip_l) + len(used) + len(fillers) == result.tensors
    assert set(ck) == (
        {u + _target(k, unet_table) for k in parts.unet}
        | {"first_stage_model." + _target(k, vae_table) for k in parts.vae}
        | clip_l
        | used
        | fillers
    )


def _target(key: str, table: dict[str, str]) -> str:
    pieces = key.split(".")
    for cut in range(len(pieces) - 1, 0, -1):
        if ".".join(pieces[:cut]) in table:
            return ".".join([table[".".join(pieces[:cut])], *pieces[cut:]])
    raise AssertionError(f"{key} has no ldm name")


def test_sd2_config_is_v_prediction_with_the_open_clip_arch(loadable: Any) -> None:
    _, result = loadable("sd2")
    params = yaml.safe_load(result.config.read_text(encoding="utf-8"))["model"]["params"]
    assert params["parameterization"] == "v"  # the tiny SD2 is v-prediction; the host reads it from the yaml
    assert params["unet_config"]["params"]["use_linear_in_transformer"] is True
    assert params["unet_config"]["params"]["context_dim"] == 48
    cond = params["cond_stage_config"]
    assert cond["target"] == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    assert cond["params"] == {"arch": "tiny-sd2.open_clip", "version": None, "freeze": True, "layer": "penultimate"}
    assert result.open_clip_arch == "tiny-sd2.open_clip" and result.open_clip_config.name == "tiny-sd2.open_clip.json"
    open_clip_config = json.loads(result.open_clip_config.read_text(encoding="utf-8"))
    assert open_clip_config["embed_dim"] == 48 and open_clip_config["quick_gelu"] is False
    # Two diffusers layers + the never-run block that makes "penultimate" the diffusers encoder's last layer.
    assert open_clip_config["text_cfg"] == {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 48,
        "heads": 4,
        "layers": 3,
    }
    assert not result.config.with_name("tiny-sd2-text-encoder").exists()


def test_sdxl_config_is_sgm(loadable: Any) -> None:
    _, result = loadable("sdxl")
    model = yaml.safe_load(result.config.read_text(encoding="utf-8"))["model"]
    assert model["target"] == "sgm.models.diffusion.DiffusionEngine"
    params = model["params"]
    assert params["scale_factor"] != pytest.approx(0.13025)  # the tiny VAE's calibrated factor carries over
    assert params["denoiser_config"]["params"]["scaling_config"]["target"].endswith("EpsScaling")
    unet = params["network_config"]["params"]
    assert (unet["adm_in_channels"], unet["num_classes"], unet["context_dim"]) == (112, "sequential", 96)
    assert unet["attention_resolutions"] == [2] and unet["transformer_depth"] == [1, 1]
    embedders = params["conditioner_config"]["params"]["emb_models"]
    assert [e["target"].rsplit(".", 1)[1] for e in embedders] == [
        "FrozenCLIPEmbedder",
        "FrozenOpenCLIPEmbedder2",
        *["ConcatTimestepEmbedderND"] * 3,
    ]
    assert [e["input_key"] for e in embedders] == [
        "txt",
        "txt",
        "original_size_as_tuple",
        "crop_coords_top_left",
        "target_size_as_tuple",
    ]
    clip_l, clip_g = embedders[0]["params"], embedders[1]["params"]
    assert clip_l == {"version": str(result.text_encoder_dir.resolve()), "layer": "hidden", "layer_idx": 1}
    assert clip_g["arch"] == result.open_clip_arch == "tiny-sdxl.open_clip" and clip_g["layer"] == "penultimate"
    assert clip_g["always_return_pooled"] is True and clip_g["legacy"] is False and clip_g["version"] is None
    assert all(e["params"]["outdim"] == 8 for e in embedders[2:])
    assert params["first_stage_config"]["target"] == "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"
    open_clip_config = json.loads(result.open_clip_config.read_text(encoding="utf-8"))
    assert open_clip_config["embed_dim"] == 64 and open_clip_config["text_cfg"]["layers"] == 2
    assert not list(result.text_encoder_dir.glob("*.safetensors"))


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


def test_real_sized_open_clip_towers_use_the_built_in_archs(tmp_path: Path) -> None:
    """A diffusers SD2 (23 layers of 1024) is exactly ViT-H-14's text tower with the pad block; SDXL's second
    encoder is ViT-bigG-14's: no open_clip config to register."""
    h = {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 23, "hidden_act": "gelu"}
    g = {"hidden_size": 1280, "num_attention_heads": 20, "num_hidden_layers": 32, "hidden_act": "gelu"}
    sd2 = ModelParts({}, {}, {}, {}, {}, h, {}, {}, "sd2")
    sdxl = ModelParts(
        {},
        {},
        {},
        {},
        {},
        {"hidden_act": "quick_gelu"},
        {},
        {},
        "sdxl",
        text_encoder_2={"text_projection.weight": torch.empty(1280, 1280)},
        text_encoder_2_config=g,
    )
    assert open_clip_arch(sd2, tmp_path / "x.open_clip.json") == ("ViT-H-14", None)
    assert open_clip_arch(sdxl, tmp_path / "x.open_clip.json") == ("ViT-bigG-14", None)
    narrower = ModelParts({}, {}, {}, {}, {}, {**h, "num_attention_heads": 8}, {}, {}, "sd2")
    name, config = open_clip_arch(narrower, tmp_path / "x.open_clip.json")
    assert name == "x.open_clip" and config["text_cfg"]["heads"] == 8 and config["text_cfg"]["layers"] == 24


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


def test_open_clip_tokenizer_padding_is_checked(tmp_path: Path) -> None:
    import logging

    from embedding_trainer.log import logger
    from embedding_trainer.tools.tiny_models import build_tiny_components

    components = build_tiny_components("sd2", seed=0, webui_loadable=True)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        export_a1111(components, tmp_path / "good")
        assert not [r for r in records if r.startswith("warning")]
        components.tokenizers[0].pad_token = "<|endoftext|>"
        export_a1111(components, tmp_path / "bad")
    finally:
        logger.removeHandler(handler)
    assert any("pads with '<|endoftext|>' (id 49407)" in r and "id 0" in r for r in records), records


def test_sdxl_components_and_folder_give_the_same_checkpoint(tmp_path: Path) -> None:
    from embedding_trainer.tools.tiny_models import build_tiny_components, save_components

    components = build_tiny_components("sdxl", seed=0, webui_loadable=True)
    folder = save_components(components, tmp_path / "model")
    a = export_a1111(folder, tmp_path / "from-folder")
    b = export_a1111(components, tmp_path / "from-components")
    first, second = load_file(str(a.checkpoint)), load_file(str(b.checkpoint))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads(a.open_clip_config.read_text()) == json.loads(b.open_clip_config.read_text())


def test_cli_exports_sd2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    assert cli.main(["make-tiny-model", "sd2", str(model), "--webui-loadable"]) == 0
    capsys.readouterr()
    assert cli.main(["export-a1111", str(model), str(tmp_path / "x")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "x.safetensors")
    assert "open_clip.add_model_config" in captured.err and (tmp_path / "x.open_clip.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Opt-in: the real ldm (SD1, SD2) and sgm (SDXL) classes of a WebUI checkout, in the WebUI's Python

PROMPT = "a photo of a cat"

_REAL_CHECK = textwrap.dedent(
    """
    import json, os, sys, torch
    webui, checkpoint, reference, family = sys.argv[1:5]
    base = checkpoint[: -len(".safetensors")]
    code = "generative-models" if family == "sdxl" else "stable-diffusion-stability-ai"
    sys.path[:0] = [webui + "/repositories/" + code]
    import open_clip
    if os.path.exists(base + ".open_clip.json"):  # what the WebUI needs registered before it builds the model
        open_clip.add_model_config(base + ".open_clip.json")
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    if family == "sdxl":
        from sgm.util import instantiate_from_config
    else:
        from ldm.util import instantiate_from_config
    model = instantiate_from_config(OmegaConf.load(base + ".yaml").model).eval()
    missing, unexpected = model.load_state_dict(load_file(checkpoint), strict=False)
    parameters = dict(model.named_parameters())
    ref = torch.load(reference)
    prompt = [ref["prompt"]]
    out, ids = {}, {}
    with torch.no_grad():
        first_stage = model.first_stage_model
        mean, logvar = first_stage.quant_conv(first_stage.encoder(ref["image"])).chunk(2, dim=1)
        out.update(vae_mean=mean, vae_logvar=logvar, vae_decoded=first_stage.decode(ref["latents"]))
        if family == "sdxl":
            embedders = model.conditioner.embedders
            for embedder in embedders:
                embedder.device = "cpu"
            sizes = ref["time_ids"]
            vector = torch.cat([ref["text_embeds"], embedders[2](sizes[:, 0:2]), embedders[3](sizes[:, 2:4]),
                                embedders[4](sizes[:, 4:6])], dim=1)
            out["unet"] = model.model(ref["x"], ref["t"], {"crossattn": ref["context"], "vector": vector})
            batch = {"txt": prompt, "original_size_as_tuple": ref["text_time_ids"][:, 0:2],
                     "crop_coords_top_left": ref["text_time_ids"][:, 2:4],
                     "target_size_as_tuple": ref["text_time_ids"][:, 4:6]}
            cond = model.conditioner(batch)
            ids["clip_l"] = embedders[0].tokenizer(prompt, padding="max_length", max_length=77,
                                                   return_tensors="pt").input_ids
            ids["clip_g"] = open_clip.tokenize(prompt)
            out["clip_l_hidden"] = embedders[0](prompt)
            clip_g = embedders[1].encode_with_transformer(ids["clip_g"])
            out.update(clip_g_hidden=clip_g["penultimate"], pooled=clip_g["pooled"], crossattn=cond["crossattn"],
                       vector=cond["vector"])
            out["unet_from_prompt"] = model.model(ref["x"][:1], ref["t"][:1], cond)
            parameterization = type(model.denoiser.scaling).__name__
        else:
            out["unet"] = model.apply_model(ref["x"], ref["t"], ref["context"])
            if family == "sd2":
                ids["clip_h"] = open_clip.tokenize(prompt)  # the host's OpenCLIP tokenizer, padded with 0
                out["text_hidden"] = model.cond_stage_model.encode_with_transformer(ids["clip_h"])
            else:
                ids["clip_l"] = model.cond_stage_model.tokenizer(prompt, padding="max_length", max_length=77,
                                                                 return_tensors="pt").input_ids
                out["text_hidden"] = model.cond_stage_model.transformer(input_ids=ids["clip_l"]).last_hidden_state
            out["unet_from_prompt"] = model.apply_model(ref["x"][:1], ref["t"][:1], out["text_hidden"])
            parameterization = model.parameterization
    print(json.dumps({
        "missing_parameters": [k for k in missing if k in parameters],
        "missing_buffers": [k for k in missing if k not in parameters],
        "unexpected": list(unexpected),
        "ids": {k: v[0].tolist() for k, v in ids.items()},
        "scale_factor": float(model.scale_factor),
        "parameterization": parameterization,
        "diff": {k: float((v - ref[k]).abs().max()) for k, v in out.items()},
        "scale": {k: float(ref[k].abs().max()) for k in out},
    }))
    """
)

#: Buffers ldm / sgm / transformers compute themselves; nothing else may be missing from a checkpoint.
COMPUTED_BUFFERS = re.compile(
    r"(betas|alphas_cumprod.*|alphas_cumprod_prev|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|"
    r"denoiser\.sigmas|.*position_ids|logvar)$"
)


def _diffusers_reference(folder: Path, family: str) -> dict[str, Any]:
    """Inputs and the diffusers outputs the real classes must reproduce."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    generator = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    ref: dict[str, Any] = {
        "prompt": PROMPT,
        "x": torch.randn(2, 4, 8, 8, generator=generator),
        "t": torch.tensor([10, 500]),
        "context": torch.randn(2, 77, width, generator=generator),
        "image": torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1,
        "latents": torch.randn(1, 4, 8, 8, generator=generator),
    }
    ids: dict[str, list[int]] = {}
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(ref["image"]))
        ref["vae_mean"], ref["vae_logvar"] = moments.chunk(2, dim=1)
        ref["vae_decoded"] = vae.decode(ref["latents"]).sample

        def encode(name: str, cls: Any) -> Any:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / name.replace("text_encoder", "tokenizer")))
            tokens = tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
            return tokens, cls.from_pretrained(str(folder / name)).eval()(tokens, output_hidden_states=True)

        if family == "sdxl":
            ref["text_embeds"] = torch.randn(2, 64, generator=generator)
            ref["time_ids"] = torch.tensor([[64.0, 96, 0, 0, 64, 96], [1024.0, 512, 16, 32, 768, 512]])
            ref["unet"] = unet(
                ref["x"],
                ref["t"],
                ref["context"],
                added_cond_kwargs={"text_embeds": ref["text_embeds"], "time_ids": ref["time_ids"]},
            ).sample
            tokens_l, out_l = encode("text_encoder", CLIPTextModel)
            tokens_g, out_g = encode("text_encoder_2", CLIPTextModelWithProjection)
            ids.update(clip_l=tokens_l[0].tolist(), clip_g=tokens_g[0].tolist())
            # diffusers' SDXL pipeline: both encoders' hidden states before their last layer, side by side.
            ref["clip_l_hidden"], ref["clip_g_hidden"] = out_l.hidden_states[-2], out_g.hidden_states[-2]
            ref["pooled"] = out_g.text_embeds
            ref["crossattn"] = torch.cat([ref["clip_l_hidden"], ref["clip_g_hidden"]], dim=-1)
            ref["text_time_ids"] = torch.tensor([[48.0, 80, 4, 8, 64, 96]])  # original (h, w), crop, target
            ref["vector"] = torch.cat(
                [ref["pooled"], unet.add_time_proj(ref["text_time_ids"].flatten()).reshape(1, -1)], 1
            )
            ref["unet_from_prompt"] = unet(
                ref["x"][:1],
                ref["t"][:1],
                ref["crossattn"],
                added_cond_kwargs={"text_embeds": ref["pooled"], "time_ids": ref["text_time_ids"]},
            ).sample
        else:
            ref["unet"] = unet(ref["x"], ref["t"], ref["context"]).sample
            tokens, out = encode("text_encoder", CLIPTextModel)
            ids["clip_h" if family == "sd2" else "clip_l"] = tokens[0].tolist()
            ref["text_hidden"] = out.last_hidden_state
            ref["unet_from_prompt"] = unet(ref["x"][:1], ref["t"][:1], ref["text_hidden"]).sample
    ref["ids"] = ids
    return ref


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_model_code_loads_the_export(family: str, tmp_path: Path) -> None:
    webui, python = os.environ.get("EMBTRAIN_WEBUI_DIR"), os.environ.get("EMBTRAIN_WEBUI_PYTHON")
    if not webui or not python:
        pytest.skip("set EMBTRAIN_WEBUI_DIR (a WebUI v1.10 checkout with its repositories) and EMBTRAIN_WEBUI_PYTHON")
    from embedding_trainer.tools.tiny_models import save_tiny_model

    folder = save_tiny_model(family, tmp_path / "model", seed=0, webui_loadable=True)
    checkpoint = export_a1111(folder, tmp_path / "out" / "tiny").checkpoint
    ref = _diffusers_reference(folder, family)
    torch.save({k: v for k, v in ref.items() if k != "ids"}, tmp_path / "ref.pt")
    script = tmp_path / "check.py"
    script.write_text(_REAL_CHECK, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [python, str(script), webui, str(checkpoint), str(tmp_path / "ref.pt"), family],
        capture_output=True,
        text=True,
        env=env,
        cwd=webui,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\n{family}: max |diff| vs diffusers", json.dumps(report["diff"]), "scale", json.dumps(report["scale"]))
    assert report["unexpected"] == []
    # The host's loader fills a missing weight with zeros: only buffers the model code computes may be absent.
    assert report["missing_parameters"] == []
    assert all(COMPUTED_BUFFERS.match(k) for k in report["missing_buffers"]), report["missing_buffers"]
    assert report["ids"] == ref["ids"]  # the host's tokenizers give diffusers' ids (OpenCLIP: padded with 0)
    assert report["ids"][next(iter(ref["ids"]))][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    expected = {"sd1": "eps", "sd2": "v", "sdxl": "EpsScaling"}[family]
    assert report["parameterization"] == expected
    assert report["scale_factor"] == pytest.approx(
        json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    )
    assert set(report["diff"]) == set(report["scale"]) and len(report["diff"]) >= 6
    assert all(diff < 2e-5 for diff in report["diff"].values()), report["diff"]
