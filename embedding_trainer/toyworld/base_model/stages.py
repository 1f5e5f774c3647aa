"""Running the stages in order (:func:`train`) and assembling the finished model from their checkpoints
(:func:`trained_model`): the EMA weights, the text encoder without the held-out words, saved as ``<out>/model``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .architecture import build_text_encoder, build_tokenizer, build_unet, scheduler_config
from .held_out import erase_held_out_words, held_out_token_ids
from .io import BaseModel, load_trained_vae, save_model, torch_load
from .plan import FORMAT_VERSION, BaseModelError, Plan, check_plan
from .training import Ema, StageResult, train_unet, train_vae


def trained_model(
    plan: Plan, out: Path, use_ema: bool = True, require_done: bool = True, erase_held_out: bool = True
) -> BaseModel:
    """The model from the stage checkpoints (the EMA weights unless ``use_ema`` is false), its text encoder without
    the held-out words unless ``erase_held_out`` is false (to measure what the UNet learnt to draw for them)."""
    vae = load_trained_vae(plan, out)
    path = out / "state" / "unet.pt"
    if not path.is_file():
        raise BaseModelError(f"{path}: no UNet checkpoint; run the unet stage first (--stage unet)")
    state = torch_load(path)
    check_plan(state, plan, "unet")
    if require_done and state["step"] < plan.unet.steps:
        raise BaseModelError(f"{path}: {state['step']} of {plan.unet.steps} UNet steps done; finish the unet stage")
    unet, text_encoder = build_unet(plan.arch, plan.seed), build_text_encoder(plan.arch, plan.seed)
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    if use_ema:
        ema = Ema([unet, text_encoder], plan.unet.ema_decay)
        ema.load_state_dict(state["ema"])
        ema.copy_to()
    tokenizer = build_tokenizer()
    if erase_held_out:
        erase_held_out_words(text_encoder, tokenizer, build_text_encoder(plan.arch, plan.seed))
    return BaseModel(unet.eval(), vae, text_encoder.eval(), tokenizer, scheduler_config())


def train(
    plan: Plan,
    out: str | Path,
    *,
    stage: str = "all",
    minutes: float | None = None,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run ``stage`` (``vae``, ``unet`` or ``all``), each stage for at most ``minutes``, and write ``<out>/model``
    when both stages are done. Returns a summary (stage results, model folder if written)."""
    if stage not in ("vae", "unet", "all"):
        raise BaseModelError(f"stage {stage!r}: expected vae, unet or all")
    out = Path(out)
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    workers = max(1, threads)
    results: dict[str, StageResult] = {}
    if stage in ("vae", "all"):
        results["vae"] = train_vae(plan, out, minutes=minutes, device=device, workers=workers, stop_after=stop_after)
        if not results["vae"].done:
            return _summary(results, None)
    if stage in ("unet", "all"):
        results["unet"] = train_unet(plan, out, minutes=minutes, device=device, workers=workers, stop_after=stop_after)
        if not results["unet"].done:
            return _summary(results, None)
    vae_state = torch_load(out / "state" / "vae.pt")
    unet_state = torch_load(out / "state" / "unet.pt") if (out / "state" / "unet.pt").is_file() else None
    if unet_state is None or unet_state["step"] < plan.unet.steps or vae_state["step"] < plan.vae.steps:
        return _summary(results, None)
    model = trained_model(plan, out)
    record = {
        "format_version": FORMAT_VERSION,
        "plan": plan.to_dict(),
        "stages": {
            name: {
                "steps": st["step"],
                "minutes": round(st["seconds"] / 60, 2),
                "data_minutes": round(st.get("prep_seconds", 0.0) / 60, 2),
                "machine": st.get("machine"),
            }
            for name, st in (("vae", vae_state), ("unet", unet_state))
        },
        "final_losses": {"vae": vae_state["history"][-1:], "unet": unet_state["history"][-1:]},
        "scaling_factor": float(model.vae.config.scaling_factor),
        "erased_words": held_out_token_ids(model.tokenizer),
        "note": "minutes: the training steps; data_minutes: rendering images (vae) or encoding latents and "
        "tokenizing captions (unet); machine: the one that ran the stage's last steps; erased_words: held-out words "
        "(token ids) in the captions whose text-encoder rows were put back to their initial values",
    }
    folder = save_model(model, out / "model", record)
    return _summary(results, folder)


def _summary(results: dict[str, StageResult], folder: Path | None) -> dict[str, Any]:
    return {"stages": {k: dataclasses.asdict(v) for k, v in results.items()}, "model": str(folder) if folder else None}
