"""The project's training step on real-size models without a GPU, for ``benchmarks.memory_estimate``: the host
built over ``benchmarks/archs.py``'s models on fake (or real random) weights, and optimiser steps run as the
trainer's ``Objective.loss`` and ``Stepper.take`` run them, under a ``benchmarks.fake_cuda`` tracker."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import archs
from benchmarks.fake_cuda import LiveStorageTracker, PolicyCheck
from embedding_trainer.host import ImageInfo
from embedding_trainer.hosts import diffusers_host
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.losses import add_noise, denoising_loss, prediction_target


# -- building the components -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    host: DiffusersHost
    unet_params: int
    text_params: int
    vae_params: int
    weight_bytes: int  # UNet + text encoder parameters in the compute dtype


def build(
    model: str, dtype: torch.dtype, fake_mode: FakeTensorMode | None, seed: int = 0, with_vae: bool = False
) -> Built:
    """The host over ``archs.build(model)``: UNet and text encoders in ``dtype``, the VAE in fp32, as
    ``DiffusersHost.from_pretrained`` loads them. Under ``fake_mode`` they are built on the meta device and turned
    into fake CPU tensors (nothing allocated), else they have real random weights. A fake run leaves the VAE on the
    meta device unless ``with_vae``: latents are cached, so the step does not need it (``--vae-to-cpu``; its size
    is reported separately), and ``training_session``'s ``vae.to()`` cannot swap fake parameters."""
    device = torch.device("cpu" if fake_mode is None else "meta")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the caller's random state stays as it was
        warnings.simplefilter("ignore")
        host = DiffusersHost.from_components(archs.build(model, device, dtype, seed), device, model_name=model)
    if fake_mode is not None:  # meta tensors -> fake CPU ones (``to_empty``: a fake tensor cannot be moved, only made)
        with fake_mode:
            for part in (host.unet, *host.text_encoders, *([host.vae] if with_vae else [])):
                part.to_empty(device="cpu")
        host.device = torch.device("cpu")
    weight_bytes = sum(p.numel() * p.element_size() for m in (host.unet, *host.text_encoders) for p in m.parameters())
    text_params = sum(map(archs.parameter_count, host.text_encoders))
    return Built(host, archs.parameter_count(host.unet), text_params, archs.parameter_count(host.vae), weight_bytes)


@contextlib.contextmanager
def session(model: str, dtype: torch.dtype, fake: bool, with_vae: bool = False) -> Iterator[Built]:
    """``model`` built in ``dtype``; while active: fake mode (if ``fake``), a forked random state seeded with 0
    (the caller's stays as it was) and no warnings."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    built = build(model, dtype, fake_mode, with_vae=with_vae)
    mode = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), mode, warnings.catch_warnings(), _cuda_layout():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        yield built


@contextlib.contextmanager
def _cuda_layout() -> Iterator[None]:
    """The host's weight layout on CUDA: contiguous. The estimate runs on (fake) CPU tensors, where the host would
    switch the UNet to channels-last, its CPU-only layout."""

    @contextlib.contextmanager
    def contiguous(module: torch.nn.Module, device: torch.device) -> Iterator[bool]:
        yield False

    original = diffusers_host.channels_last_on_cpu
    diffusers_host.channels_last_on_cpu = contiguous
    try:
        yield
    finally:
        diffusers_host.channels_last_on_cpu = original


# -- one training step -------------------------------------------------------------------------------------------------
def run_steps(
    built: Built,
    tracker: LiveStorageTracker,
    *,
    resolution: int,
    batch: int,
    checkpointing: str,
    dtype: torch.dtype,
    steps: int,
    num_vectors: int = 4,
    policy_check: PolicyCheck | None = None,
    window: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[int, int]:
    """Run ``steps`` optimiser steps as the trainer runs them.

    Returns the live bytes when the first step starts (weights, vectors, cached latents) and right after its loss
    (plus what autograd saved for backward). ``window`` (a profiler, say) is entered around the steps only."""
    host = built.host
    device = host.device
    alphas_cumprod = host.alphas_cumprod()
    leaves = {
        e.key: (torch.randn(num_vectors, e.width, device=device) * 0.01).requires_grad_(True) for e in host.encoders
    }
    optimizer = torch.optim.AdamW(list(leaves.values()), lr=0.01, weight_decay=0.0)
    name = "my-concept"
    prompts = [f"a photo of a {name}"] * batch
    infos = [ImageInfo((resolution, resolution), (0, 0), (resolution, resolution))] * batch
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device)  # one batch of cached latents (fp32)
    tracker.track_all(host.unet, *host.text_encoders, leaves, latents)
    start, after_forward = tracker.current, 0
    if checkpointing == "diffusers":
        host.unet.enable_gradient_checkpointing()
    with host.training_session(checkpointing == "on"), window or contextlib.nullcontext(), tracker:
        for step in range(steps):
            tracker.phase = "data"
            optimizer.zero_grad(set_to_none=True)
            noise = torch.randn(latents.shape, device=device)
            timesteps = torch.randint(0, 1000, (batch,), device=device)
            noisy = add_noise(latents, noise, timesteps, alphas_cumprod)
            tracker.phase = "forward"
            check = policy_check if policy_check is not None and step == 0 else contextlib.nullcontext()
            with torch.autocast(device.type, dtype=dtype), check:
                conditioning = host.encode_prompts(prompts, name, leaves, infos)
                prediction = host.predict(noisy, timesteps, conditioning)
            target = prediction_target(latents, noise, timesteps, alphas_cumprod, host.prediction_type)
            loss = denoising_loss(prediction, target)
            if step == 0:
                after_forward = tracker.current
            del conditioning, prediction, target, noise, noisy
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.phase = "optimizer"
            optimizer.step()
    if checkpointing == "diffusers":
        host.unet.disable_gradient_checkpointing()
    return start, after_forward
