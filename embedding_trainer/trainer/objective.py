"""The objective: the denoising loss of a micro-batch, and the held-out score (the same loss on fixed draws).

Randomness is derived from ``(seed, micro-batch index)`` rather than carried in generator state, so a run resumed
from a save at step k draws exactly the data, noise and timesteps an uninterrupted run draws from step k on.
Latents of images that are always rendered the same way are encoded once and kept on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..dataset import RenderedSample, Sample, TrainingSet
from ..distributed import Processes
from ..errors import ConfigError
from ..host import Host, ImageInfo
from ..losses import add_noise, denoising_loss, min_snr_weights, prediction_target
from ..templates import PromptBuilder
from .events import Callbacks
from .preflight import COMPUTE_DTYPES


def seeded(seed: int, purpose: str, index: int) -> int:
    """A 63-bit seed for one purpose at one micro-batch, independent of any generator's history."""
    digest = hashlib.blake2b(f"{seed}:{purpose}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class _CachedLatents:
    mean: torch.Tensor
    std: torch.Tensor  # zero unless latents are re-sampled every step
    mask: torch.Tensor | None
    info: ImageInfo


class Objective:
    """The loss of micro-batch ``index`` for given vectors: images, prompts, noise and timesteps drawn from
    ``(seed, index)``, this process's share of the batch (data-parallel), the prediction under autocast, min-SNR
    weights and the alpha mask."""

    def __init__(
        self,
        config: TrainConfig,
        host: Host,
        data: TrainingSet,
        prompts: PromptBuilder,
        precision: str,
        processes: Processes,
        callbacks: Callbacks,
    ):
        self.config = config
        self.host = host
        self.data = data
        self.prompts = prompts
        self.device = host.device
        self.precision = precision
        self.processes = processes
        self.callbacks = callbacks
        self.alphas_cumprod = host.alphas_cumprod()
        if config.timestep_max >= len(self.alphas_cumprod):
            raise ConfigError(
                "timestep_max",
                f"{config.timestep_max} is past the model's last timestep {len(self.alphas_cumprod) - 1}",
            )
        self.batches_per_epoch = data.batches_per_epoch(config.batch_size)
        # Encoded latents per (image, flipped), kept on the device and reused across epochs.
        self.cache: dict[tuple[int, bool], _CachedLatents] = {}
        self._plan: list[list[Sample]] = []  # the batches of epoch ``_plan_epoch``
        self._plan_epoch = -1

    # -- latents ------------------------------------------------------------------------------------------------
    def _encode(self, rendered: list[RenderedSample]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([r.pixels for r in rendered]).to(self.device)
        with torch.no_grad():
            return self.host.encode_images(pixels)

    def _latent_mask(self, rendered: RenderedSample, latent_shape: torch.Size) -> torch.Tensor | None:
        if rendered.mask is None:
            return None
        mask = rendered.mask.unsqueeze(0).to(self.device, torch.float32)
        return torch.nn.functional.interpolate(mask, size=latent_shape[-2:], mode="area")[0]

    def fill_cache(self) -> None:
        """Encode every image the run can draw (each orientation with ``flip``), when latents can be cached."""
        if not self.data.cacheable or self.cache:
            return
        flips = (False, True) if self.config.flip else (False,)
        keys = sorted({(i, f) for i in range(len(self.data)) for f in flips})
        by_size: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for key in keys:
            by_size.setdefault(self.data.target_size(key[0]), []).append(key)
        done = 0
        generator = torch.Generator().manual_seed(seeded(self.config.seed, "latent-once", 0))
        # On a GPU, one image per VAE call: four at 1024 px would make caching the run's memory peak (estimated for
        # SDXL: 16.7 GiB with four per call, 9.1 with one, against 7.1 for a batch-1 step with checkpointing;
        # benchmarks/RESULTS.md). RAM has room for four.
        per_call = 4 if self.device.type == "cpu" else 1
        for group in by_size.values():
            for start in range(0, len(group), per_call):
                chunk = group[start : start + per_call]
                rendered = [self.data.render(Sample(i, f, 0.5, 0.5)) for i, f in chunk]
                mean, std = self._encode(rendered)
                for j, (key, r) in enumerate(zip(chunk, rendered)):
                    m, s = mean[j], std[j]
                    if self.config.latent_sampling == "once":
                        noise = torch.randn(m.shape, generator=generator).to(m.device)
                        m, s = m + s * noise, torch.zeros_like(s)
                    elif self.config.latent_sampling == "deterministic":
                        s = torch.zeros_like(s)
                    self.cache[key] = _CachedLatents(m, s, self._latent_mask(r, m.shape), r.info)
                done += len(chunk)
                self.callbacks.status(f"encoding latents {done}/{len(keys)}")

    # -- batches ------------------------------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> list[Sample]:
        epoch, position = divmod(index, self.batches_per_epoch)
        if self._plan_epoch != epoch:
            self._plan = self.data.epoch(epoch, self.config.batch_size, self.config.seed)
            self._plan_epoch = epoch
        return self._plan[position]

    def _batch(
        self, batch: list[Sample], share: slice, index: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[ImageInfo], list[str]]:
        """Latents, masks, image infos and prompts of this process's ``share`` of micro-batch ``index`` (all of it in
        one process): the rows the whole batch's draws give them."""
        rng = random.Random(seeded(seed, "prompts", index))
        prompts = [self.prompts.build(self.data.caption(s.record_index), rng) for s in batch][share]
        samples = batch[share]
        rendered = [self.data.render(s) for s in samples] if not self.data.cacheable else None
        if rendered is None:
            entries = [self.cache[(s.record_index, s.flip)] for s in samples]
            infos = [e.info for e in entries]
            mean = torch.stack([e.mean for e in entries])
            std = torch.stack([e.std for e in entries])
            masks = [e.mask for e in entries]
        else:
            mean, std = self._encode(rendered)
            if self.config.latent_sampling == "deterministic":
                std = torch.zeros_like(std)
            infos = [r.info for r in rendered]
            masks = [self._latent_mask(r, mean.shape[1:]) for r in rendered]
        generator = torch.Generator().manual_seed(seeded(seed, "latents", index))
        latents = mean + std * torch.randn((len(batch), *mean.shape[1:]), generator=generator)[share].to(self.device)
        mask = None
        if any(m is not None for m in masks):
            mask = torch.stack([m if m is not None else torch.ones_like(latents[0, :1]) for m in masks])
        return latents, mask, infos, prompts

    # -- the loss -----------------------------------------------------------------------------------------------
    def loss(self, index: int, leaves: dict[str, torch.Tensor], seed: int | None = None) -> torch.Tensor:
        """The loss of micro-batch ``index``; its data, noise and timesteps depend only on (seed, index)."""
        c = self.config
        seed = c.seed if seed is None else seed
        batch = self._micro_batch(index)
        share = self.processes.share(len(batch))
        if share.start == share.stop:  # data-parallel, a batch smaller than the processes: no rows here
            return sum(leaf.sum() for leaf in leaves.values()) * 0.0
        latents, mask, infos, prompts = self._batch(batch, share, index, seed)
        generator = torch.Generator().manual_seed(seeded(seed, "noise", index))
        size = len(batch)
        noise = torch.randn((size, *latents.shape[1:]), generator=generator)[share]
        if c.noise_offset:
            offsets = torch.randn((size, latents.shape[1], 1, 1), generator=generator)[share]
            noise = noise + c.noise_offset * offsets
        timesteps = torch.randint(c.timestep_min, c.timestep_max + 1, (size,), generator=generator)[share]
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = add_noise(latents, noise, timesteps, self.alphas_cumprod)
        autocast = (
            torch.autocast(self.device.type, dtype=COMPUTE_DTYPES[self.precision])
            if self.precision != "fp32"
            else contextlib.nullcontext()
        )
        with autocast:
            conditioning = self.host.encode_prompts(prompts, c.name, leaves, infos)
            prediction = self.host.predict(noisy, timesteps, conditioning)
        target = prediction_target(latents, noise, timesteps, self.alphas_cumprod, self.host.prediction_type)
        weights = (
            min_snr_weights(timesteps, self.alphas_cumprod, c.min_snr_gamma, self.host.prediction_type)
            if c.min_snr_gamma
            else None
        )
        return denoising_loss(prediction, target, mask, weights, batch_size=size)

    @torch.no_grad()
    def held_out_loss(self, leaves: dict[str, torch.Tensor], batches: int, seed: int) -> float:
        """Mean loss of ``leaves`` (on the device) over ``batches`` micro-batches drawn with ``seed``: the same seed
        gives the same images, prompts, noise and timesteps, so two vector sets compare fairly."""
        total, error = torch.zeros((), device=self.device), None
        try:
            for index in range(batches):
                total = total + self.loss(index, leaves, seed).detach().float()
        except Exception as failure:  # noqa: BLE001 - raised again by sum_checked, in every process
            error = failure
        total = self.processes.sum_checked(total, error, "an evaluation")  # data-parallel: the shares add up
        return float(total) / batches  # one transfer per evaluation
