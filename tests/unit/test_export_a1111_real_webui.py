"""Opt-in: a WebUI export loaded into the real ldm (SD1, SD2) and sgm (SDXL) classes of a WebUI checkout, in the
WebUI's Python (``EMBTRAIN_WEBUI_DIR`` = the checkout, ``EMBTRAIN_WEBUI_PYTHON`` = its Python; skipped without them),
its outputs compared with diffusers'."""

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

from embedding_trainer.tools.export_a1111 import export_a1111

pytestmark = pytest.mark.compat

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
