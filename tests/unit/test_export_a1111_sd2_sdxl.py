"""The WebUI checkpoint exporter on SD2 and SDXL: OpenCLIP text towers (SD2's with the pad block "penultimate"
skips, SDXL's second), the sgm layout and config, the open_clip json. Offline and host-free."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedding_trainer.tools.export_a1111 import (
    ModelParts,
    export_a1111,
    load_model_parts,
    open_clip_arch,
    unet_key_table,
    vae_key_table,
)
from tests.export_helpers import loadable_exports

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def loadable(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``loadable(family)`` -> (diffusers folder, ExportResult) of the WebUI-loadable tiny model, made once."""
    return loadable_exports(tmp_path_factory)


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


def test_open_clip_tokenizer_padding_is_checked(tmp_path: Path) -> None:

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
