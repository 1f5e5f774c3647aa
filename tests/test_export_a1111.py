"""The WebUI checkpoint exporter: diffusers SD1 folder -> ldm-layout .safetensors + .yaml + local text encoder.

Offline and host-free. The opt-in test at the end loads an export into the real ldm classes of a WebUI checkout
(``EMBTRAIN_WEBUI_DIR`` = the checkout, ``EMBTRAIN_WEBUI_PYTHON`` = its Python) and compares outputs with diffusers.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from embedding_trainer.standalone import cli
from embedding_trainer.standalone.export_a1111 import (
    ExportError,
    export_a1111,
    load_model_parts,
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
    yaml = pytest.importorskip("yaml")
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
    checkpoint, config, folder = output_paths(tmp_path / "partial.safetensors")
    config.write_text("mine", encoding="utf-8")
    with pytest.raises(ExportError, match="already exists"):
        export_a1111(model, tmp_path / "partial", allow_norm_group_mismatch=True)
    assert config.read_text(encoding="utf-8") == "mine"
    assert not checkpoint.exists() and not folder.exists()

    path = export_a1111(model, tmp_path / "partial", allow_norm_group_mismatch=True, overwrite=True).checkpoint
    assert path == checkpoint and config.read_text(encoding="utf-8").startswith("# ldm")


def test_norm_groups_sd2_and_sdxl_are_refused(tiny_model_dirs: Any, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="norm_num_groups=8.*32 groups"):
        export_a1111(tiny_model_dirs("sd1"), tmp_path / "a")
    with pytest.raises(ExportError, match="SD2"):
        export_a1111(tiny_model_dirs("sd2"), tmp_path / "b", allow_norm_group_mismatch=True)
    with pytest.raises(ExportError, match="SDXL"):
        export_a1111(tiny_model_dirs("sdxl"), tmp_path / "c", allow_norm_group_mismatch=True)
    with pytest.raises(ExportError, match="NAME"):
        export_a1111(tiny_model_dirs("sd1"), tmp_path / "d.ckpt")
    assert list(tmp_path.iterdir()) == []


def _ldm_compatible_sd1(folder: Path) -> Path:
    """A tiny SD1 model whose GroupNorms have 32 groups, as ldm builds them."""
    from embedding_trainer.standalone.tiny_models import save_tiny_model

    return save_tiny_model("sd1", folder, seed=0, webui_loadable=True)


def test_components_and_folder_give_the_same_checkpoint(tmp_path: Path) -> None:
    from embedding_trainer.standalone.tiny_models import build_tiny_components

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
# Opt-in: the real ldm classes of a WebUI checkout

_LDM_CHECK = textwrap.dedent(
    """
    import json, sys, torch
    webui, checkpoint, reference = sys.argv[1:4]
    sys.path[:0] = [webui + "/repositories/stable-diffusion-stability-ai"]
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    from safetensors.torch import load_file
    model = instantiate_from_config(OmegaConf.load(checkpoint[: -len(".safetensors")] + ".yaml").model).eval()
    missing, unexpected = model.load_state_dict(load_file(checkpoint), strict=False)
    ref = torch.load(reference)
    with torch.no_grad():
        tokens = model.cond_stage_model.tokenizer(
            ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        post = model.first_stage_model.encode(ref["image"])
        out = {
            "eps": model.apply_model(ref["x"], ref["t"], ref["context"]),
            "mean": post.mean,
            "decoded": model.first_stage_model.decode(ref["x"][:1]),
            "hidden": model.cond_stage_model.transformer(input_ids=tokens).last_hidden_state,
        }
    print(json.dumps({
        "missing": [k for k in missing], "unexpected": list(unexpected), "ids": tokens[0, :7].tolist(),
        "scale_factor": float(model.scale_factor), "parameterization": model.parameterization,
        "diff": {k: float((v - ref[k]).abs().max()) for k, v in out.items()},
    }))
    """
)


def test_real_ldm_loads_the_export(tmp_path: Path) -> None:
    webui, python = os.environ.get("EMBTRAIN_WEBUI_DIR"), os.environ.get("EMBTRAIN_WEBUI_PYTHON")
    if not webui or not python:
        pytest.skip("set EMBTRAIN_WEBUI_DIR (a WebUI v1.10 checkout with its repositories) and EMBTRAIN_WEBUI_PYTHON")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = _ldm_compatible_sd1(tmp_path / "model")
    checkpoint = export_a1111(folder, tmp_path / "out" / "tiny").checkpoint
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    tokens = CLIPTokenizer.from_pretrained(str(checkpoint.with_name("tiny-text-encoder")))(
        ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    image, t = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1, torch.tensor([10, 500])
    with torch.no_grad():
        ref = {
            "x": x,
            "t": t,
            "context": context,
            "image": image,
            "eps": unet(x, t, context).sample,
            "mean": vae.encode(image).latent_dist.mean,
            "decoded": vae.decode(x[:1]).sample,
            "hidden": text(tokens).last_hidden_state,
        }
    torch.save(ref, tmp_path / "ref.pt")
    script = tmp_path / "check.py"
    script.write_text(_LDM_CHECK, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [python, str(script), webui, str(checkpoint), str(tmp_path / "ref.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=webui,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["unexpected"] == []
    # Only buffers that ldm / transformers compute themselves may be absent from the checkpoint.
    assert all(
        "alphas" in k or k in ("betas",) or k.startswith("posterior_") or "position_ids" in k for k in report["missing"]
    ), report["missing"]
    assert report["ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert report["parameterization"] == "eps"
    assert report["scale_factor"] == pytest.approx(vae.config.scaling_factor)
    assert all(diff < 1e-4 for diff in report["diff"].values()), report["diff"]
