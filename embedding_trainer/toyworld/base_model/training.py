"""The two training stages, each checkpointed under ``<out>/state`` so that a later call continues where the last
one stopped: ``vae`` (the autoencoder on rendered world images; its latent scale is then calibrated) and ``unet``
(the text encoder and UNet together on the frozen VAE's latents, epsilon prediction, caption dropout for guidance,
min-SNR weighting and an EMA of the weights, which is what gets saved).

Everything is a function of the seed and the step: the data order, crops, noise and caption choices of step ``s``
come from a generator seeded with ``(seed, stage, s)``, so a run that stops and resumes gives the weights of one that
does not (on the same machine and thread count). Stage lengths are set in steps, never in time: ``minutes`` only
stops a stage early. The long story: embedding_trainer/toyworld/README.md.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...log import logger
from ...losses import min_snr_weights
from .architecture import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    parameter_count,
    scheduler_config,
)
from .data import cached_latents, foreground, to_model_range, tokenize, training_captions, training_images
from .io import torch_load, torch_save
from .plan import FORMAT_VERSION, BaseModelError, Plan, check_plan
from .vae_losses import vae_losses


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of one step: a function of (seed, stage, step) only, so resuming repeats the same draws."""
    mixed = np.random.SeedSequence([seed, sum(map(ord, stage)), step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def machine_description(device: torch.device, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers
        import transformers

        info["diffusers"], info["transformers"] = str(diffusers.__version__), str(transformers.__version__)
    except ImportError:
        pass
    return info


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay (1 + n) / (10 + n)."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


@dataclass
class StageResult:
    stage: str
    done: bool
    step: int
    steps: int
    seconds: float  # training time of this stage over all calls so far
    last_loss: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: VAE


def _crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    top, left = torch.randint(0, x.shape[-1] - size + 1, (2,), generator=generator).tolist()
    return x[..., top : top + size, left : left + size]


@torch.no_grad()
def calibrate_scaling_factor(vae: Any, images: np.ndarray, device: torch.device, count: int = 2048) -> float:
    """1 / std of the VAE's latents over ``count`` images: scaled latents then have unit spread (as SD's 0.18215 was
    chosen for its VAE)."""
    latents = []
    for start in range(0, min(count, len(images)), 256):
        x = to_model_range(images[start : min(start + 256, count)]).to(device)
        latents.append(vae.encode(x).latent_dist.mean.float().cpu())
    return round(1.0 / float(torch.cat(latents).std()), 5)


def train_vae(
    plan: Plan,
    out: Path,
    *,
    minutes: float | None = None,
    device: torch.device | str = "cpu",
    workers: int = 1,
    log_every: int = 50,
    save_every: int = 500,
    stop_after: int | None = None,
) -> StageResult:
    """Train (or continue training) the VAE; stops after ``plan.vae.steps`` steps, after ``minutes``, or at step
    ``stop_after`` (tests: a stage that stops and resumes must give the weights of one that does not)."""
    device = torch.device(device)
    cfg = plan.vae
    state_dir = out / "state"
    path = state_dir / "vae.pt"
    vae = build_vae(plan.arch, plan.seed).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, seconds, prep_seconds, history = 0, 0.0, 0.0, []
    if path.is_file():
        state = torch_load(path)
        check_plan(state, plan, "vae")
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds, history = state["step"], state["seconds"], state["history"]
        prep_seconds = state.get("prep_seconds", 0.0)
    if step >= cfg.steps:
        return StageResult("vae", True, step, cfg.steps, seconds, history[-1]["loss"] if history else None)
    prep_started = time.monotonic()
    images = training_images(plan, state_dir, workers)
    prep_seconds += time.monotonic() - prep_started
    tensor_images = torch.from_numpy(images)

    def save() -> None:
        state = {
            "version": FORMAT_VERSION,
            "plan": plan.to_dict(),
            "model": vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "seconds": seconds + time.monotonic() - started,
            "prep_seconds": prep_seconds,
            "history": history,
            "scaling_factor": float(vae.config.scaling_factor),
            "machine": machine_description(device, torch.get_num_threads()),
        }
        torch_save(state, path)

    logger.info(
        "vae: step %d of %d, batch %d, lr %g, %d params, device %s, %d threads",
        step,
        cfg.steps,
        cfg.batch,
        cfg.lr,
        parameter_count(vae),
        device,
        torch.get_num_threads(),
    )
    vae.train()
    started = time.monotonic()
    window: list[dict[str, float]] = []
    window_start, window_step = started, step
    while step < cfg.steps:
        if minutes is not None and time.monotonic() - started > minutes * 60:
            break
        if stop_after is not None and step >= stop_after:
            break
        generator = step_generator(plan.seed, "vae", step)
        index = torch.randint(0, len(images), (cfg.batch,), generator=generator)
        x = to_model_range(tensor_images[index])
        x = torch.cat([x, 1 + cfg.foreground_weight * foreground(x)], dim=1)  # crop image and weights together
        if cfg.crop and step < cfg.crop_fraction * cfg.steps:
            x = _crop(x, cfg.crop, generator)
        x, weight = x[:, :3], x[:, 3:]
        noise = torch.randn((x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), generator=generator)
        x, weight, noise = x.to(device), weight.to(device), noise.to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        posterior = vae.encode(x).latent_dist
        latent = posterior.mean + posterior.std * noise
        rec = vae.decode(latent).sample
        kl = posterior.kl().mean() / latent[0].numel()
        loss, parts = vae_losses(rec, x, kl, cfg, weight)
        if not math.isfinite(parts["loss"]):
            raise BaseModelError(f"vae: loss is {parts['loss']} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(parts)
        if step % log_every == 0 or step == cfg.steps:
            now = time.monotonic()
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            rate = (step - window_step) / max(1e-9, now - window_start)
            history.append({"step": step, **mean, "steps_per_s": rate})
            logger.info(
                "vae %d/%d loss %.4f (pixel %.4f colour %.4f edge %.4f texture %.4f kl %.3g) %.2f steps/s %.0f img/s",
                step,
                cfg.steps,
                mean["loss"],
                mean["pixel"],
                mean["colour"],
                mean["edge"],
                mean["texture"],
                mean["kl"],
                rate,
                rate * cfg.batch,
            )
            window, window_start, window_step = [], now, step
        if step % save_every == 0:
            save()
    seconds += time.monotonic() - started
    started = time.monotonic()  # save() adds the time since ``started``: none from here on
    vae.eval()
    if step >= cfg.steps:
        vae.register_to_config(scaling_factor=calibrate_scaling_factor(vae, images, device))
        logger.info("vae: done in %.1f min; latent scaling factor %.5f", seconds / 60, vae.config.scaling_factor)
    save()
    return StageResult("vae", step >= cfg.steps, step, cfg.steps, seconds, history[-1]["loss"] if history else None)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: text encoder + UNet


def train_unet(
    plan: Plan,
    out: Path,
    *,
    minutes: float | None = None,
    device: torch.device | str = "cpu",
    workers: int = 1,
    log_every: int = 50,
    save_every: int = 1000,
    stop_after: int | None = None,
) -> StageResult:
    """Train (or continue training) the text encoder and UNet on the frozen VAE's latents (stopping as
    :func:`train_vae`)."""
    device = torch.device(device)
    cfg = plan.unet
    path = out / "state" / "unet.pt"
    unet = build_unet(plan.arch, plan.seed).to(device)
    text_encoder = build_text_encoder(plan.arch, plan.seed).to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    # No weight decay: the 49k token rows the captions never use must keep their initial norms (the trainer's
    # embedding initialisation and norm statistics read the vocabulary).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = Ema([unet, text_encoder], cfg.ema_decay)
    step, seconds, prep_seconds, history = 0, 0.0, 0.0, []
    if path.is_file():
        state = torch_load(path)
        check_plan(state, plan, "unet")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        step, seconds, history = state["step"], state["seconds"], state["history"]
        prep_seconds = state.get("prep_seconds", 0.0)
    if step >= cfg.steps:
        return StageResult("unet", True, step, cfg.steps, seconds, history[-1]["loss"] if history else None)

    prep_started = time.monotonic()
    latents = cached_latents(plan, out, device, workers)
    mean, std, scale = latents["mean"], latents["std"], latents["scaling_factor"]
    cell_weight = 1 + cfg.foreground_weight * latents["foreground"]
    cell_weight = cell_weight / cell_weight.mean(dim=(1, 2, 3), keepdim=True)
    tokenizer = build_tokenizer()
    captions = training_captions(plan)
    unique = sorted({c for variants in captions for c in variants} | {""})
    row = {text: i for i, text in enumerate(unique)}
    token_table = tokenize(tokenizer, unique)
    caption_rows = torch.tensor([[row[c] for c in variants] for variants in captions])
    empty_row = row[""]
    alphas_cumprod = build_scheduler().alphas_cumprod.float()
    # One weight per timestep, looked up by each step's t. Gamma 0 means no weighting (the core would give zeros).
    every_t = torch.arange(len(alphas_cumprod))
    prediction_type = scheduler_config()["prediction_type"]
    loss_weight = (
        min_snr_weights(every_t, alphas_cumprod, cfg.min_snr_gamma, prediction_type)
        if cfg.min_snr_gamma
        else torch.ones_like(alphas_cumprod)
    )
    prep_seconds += time.monotonic() - prep_started

    def save() -> None:
        state = {
            "version": FORMAT_VERSION,
            "plan": plan.to_dict(),
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "step": step,
            "seconds": seconds + time.monotonic() - started,
            "prep_seconds": prep_seconds,
            "history": history,
            "machine": machine_description(device, torch.get_num_threads()),
        }
        torch_save(state, path)

    logger.info(
        "unet: step %d of %d, batch %d, lr %g, UNet %d + text encoder %d params, %d images x %d captions "
        "(%d distinct), device %s, %d threads",
        step,
        cfg.steps,
        cfg.batch,
        cfg.lr,
        parameter_count(unet),
        parameter_count(text_encoder),
        len(captions),
        cfg.caption_variants,
        len(unique),
        device,
        torch.get_num_threads(),
    )
    unet.train()
    text_encoder.train()
    started = time.monotonic()
    window: list[float] = []
    window_start, window_step = started, step
    while step < cfg.steps:
        if minutes is not None and time.monotonic() - started > minutes * 60:
            break
        if stop_after is not None and step >= stop_after:
            break
        generator = step_generator(plan.seed, "unet", step)
        index = torch.randint(0, len(mean), (cfg.batch,), generator=generator)
        variant = torch.randint(0, cfg.caption_variants, (cfg.batch,), generator=generator)
        dropped = torch.rand(cfg.batch, generator=generator) < cfg.caption_dropout
        rows = torch.where(dropped, torch.full_like(variant, empty_row), caption_rows[index, variant])
        latent = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scale
        noise = torch.randn(latent.shape, generator=generator)
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch,), generator=generator)
        if cfg.low_noise_share:
            low = torch.randint(0, cfg.low_noise_until, (cfg.batch,), generator=generator)
            t = torch.where(torch.rand(cfg.batch, generator=generator) < cfg.low_noise_share, low, t)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latent + (1 - a).sqrt() * noise
        ids, noisy, noise, t_dev = token_table[rows].to(device), noisy.to(device), noise.to(device), t.to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        context = text_encoder(ids)[0]
        prediction = unet(noisy, t_dev, encoder_hidden_states=context).sample
        squared = (prediction.float() - noise).pow(2)
        per_sample = (squared * cell_weight[index].to(device)).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t].to(device)).mean()
        if not math.isfinite(loss.item()):
            raise BaseModelError(f"unet: loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        step += 1
        window.append(squared.mean().item())  # the plain MSE, comparable between settings
        if step % log_every == 0 or step == cfg.steps:
            now = time.monotonic()
            rate = (step - window_step) / max(1e-9, now - window_start)
            mse = sum(window) / len(window)
            history.append({"step": step, "loss": mse, "steps_per_s": rate})
            logger.info("unet %d/%d mse %.4f %.2f steps/s %.0f samples/s", step, cfg.steps, mse, rate, rate * cfg.batch)
            window, window_start, window_step = [], now, step
        if step % save_every == 0:
            save()
    seconds += time.monotonic() - started
    started = time.monotonic()
    save()
    return StageResult("unet", step >= cfg.steps, step, cfg.steps, seconds, history[-1]["loss"] if history else None)
