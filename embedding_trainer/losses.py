"""The denoising loss for epsilon- and v-prediction models, with min-SNR weighting, offset noise and masks."""

from __future__ import annotations

import torch


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The forward process: ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``."""
    a = alphas_cumprod.to(latents.device)[timesteps].to(torch.float32).view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def prediction_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the denoiser should output: the noise (epsilon) or ``v = sqrt(a) * noise - sqrt(1 - a) * x0``."""
    if prediction_type == "epsilon":
        return noise
    a = alphas_cumprod.to(latents.device)[timesteps].to(torch.float32).view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023).

    The MSE on epsilon equals SNR-weighted x0 error; clamping that weight at ``gamma`` gives
    ``min(snr, gamma) / snr`` for epsilon targets and ``min(snr, gamma) / (snr + 1)`` for v targets.
    """
    a = alphas_cumprod.to(timesteps.device)[timesteps].to(torch.float32)
    snr = a / (1 - a)
    clamped = torch.clamp(snr, max=gamma)
    return clamped / (snr + 1) if prediction_type == "v_prediction" else clamped / snr


def denoising_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Mean squared error per sample, masked (``mask`` is ``[B,1,h,w]`` in [0,1]) and weighted, averaged to a scalar.

    A masked sample's error is averaged over its weighted area, so images with large transparent regions are not
    down-weighted as a whole. ``batch_size``: when these rows are one process's share of a larger batch
    (data-parallel), that batch's size: the samples' sum is divided by it, so the shares' losses add up to the
    batch's mean.
    """
    error = (prediction.float() - target.float()) ** 2
    if mask is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        mask = mask.to(error.dtype).expand_as(error)
        per_sample = (error * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.sum() / (per_sample.shape[0] if batch_size is None else batch_size)
