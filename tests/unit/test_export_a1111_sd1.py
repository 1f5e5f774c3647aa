"""The WebUI checkpoint exporter on SD1: a diffusers folder -> ldm-layout .safetensors + .yaml + a local CLIP text
encoder folder. Offline and host-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedding_trainer.tools.export_a1111 import export_a1111, load_model_parts, unet_key_table, vae_key_table
from tests.export_helpers import export_tiny_sd1

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def sd1_export(tiny_model_dirs: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny SD1 model and its export, made once for this module."""
    return export_tiny_sd1(tiny_model_dirs, tmp_path_factory)


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
