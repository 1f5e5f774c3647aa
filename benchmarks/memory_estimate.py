"""Peak CUDA memory of one textual-inversion training step, estimated on a machine without a GPU.

The real-size models (SD1.5, SD2.1, SDXL from their published configs, as ``benchmarks/archs.py`` builds them;
nothing is downloaded) are built on the meta device, turned into fp16 fake tensors and wrapped in the project's
``DiffusersHost``; one step runs as the trainer's ``Objective.loss`` and ``Stepper.take`` run it (autocast, the fp32
MSE loss, ``backward``, AdamW on the vectors) under ``benchmarks.fake_cuda``'s storage tracker and CUDA autocast
emulation. Attention is CPU flash SDPA, which, like CUDA's flash and memory-efficient kernels, never keeps the score
matrix (the attention ops recorded are printed). The method, what is not included (the CUDA context, the allocator's
reserve, kernels' workspaces) and the results: benchmarks/RESULTS.md, "Peak CUDA memory, estimated without a GPU".
Examples::

    python -m benchmarks.memory_estimate                       # SD1.5 512 px and SDXL 1024 px, checkpointing off/on
    python -m benchmarks.memory_estimate --models sd15 sd21 sdxl --batch 1 4 --checkpointing off on diffusers --caching
    python -m benchmarks.memory_estimate --tiny --validate     # seconds: tiny models, fake vs real tensors
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import os
import platform
import time
from collections import Counter
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import archs  # noqa: E402
from benchmarks.fake_cuda import CUDA_BLOCK, AllocatorPeak, LiveStorageTracker, PolicyCheck, cuda_autocast_policy  # noqa: E402
from benchmarks.training_step import run_steps, session  # noqa: E402

GIB = 2**30

#: The models (keys of archs.RESOLUTION: their configs live in benchmarks/archs.py); the tiny ones (tiny_models.py's
#: SD1 and SDXL at a tiny width) are for tests and --tiny.
MODELS = tuple(sorted(archs.RESOLUTION))


@dataclasses.dataclass(frozen=True)
class Goal:
    """A memory goal for batch 1 at the model's native resolution."""

    gib: float
    needs_checkpointing: bool = False


GOALS = {"sd15": Goal(4.0), "sdxl": Goal(10.0, needs_checkpointing=True)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: off; on: the project's ``training_session(True)`` (each resnet and transformer block under its own checkpoint);
#: diffusers: the UNet's own ``enable_gradient_checkpointing()`` (the same units inside diffusers), for comparison.
CHECKPOINTING = ("off", "on", "diffusers")


# -- estimates ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Estimate:
    model: str
    resolution: int
    batch: int
    checkpointing: str  # one of CHECKPOINTING
    dtype: str
    fake: bool
    unet_params: int
    text_params: int
    vae_params: int
    weight_bytes: int
    start_bytes: int  # live when the first step starts: weights, buffers, vectors, one batch of cached latents
    after_forward_bytes: int  # live once the loss exists: what autograd saved for backward
    peak_bytes: int
    peak_phase: str
    peak_op: str
    phase_peaks: dict[str, int]
    largest_bytes: int
    largest_op: str
    attention_ops: dict[str, int]
    seconds: float

    @property
    def activation_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def _attention_ops(counts: Counter[str]) -> dict[str, int]:
    keys = ("attention", "softmax")
    return {k: v for k, v in sorted(counts.items()) if any(s in k for s in keys)}


def estimate(
    model: str,
    *,
    resolution: int | None = None,
    batch: int = 1,
    checkpointing: str = "off",
    dtype: str = "fp16",
    fake: bool = True,
    steps: int = 2,
    round_to: int = CUDA_BLOCK,
    policy_check: PolicyCheck | None = None,
    window: contextlib.AbstractContextManager[Any] | None = None,
) -> Estimate:
    """Peak live bytes of ``steps`` training steps of ``model`` (a key of :data:`MODELS`)."""
    resolution = resolution or archs.RESOLUTION[model]
    started = time.perf_counter()
    tracker = LiveStorageTracker(round_to)
    with session(model, DTYPES[dtype], fake) as built, cuda_autocast_policy():
        start, after_forward = run_steps(
            built,
            tracker,
            resolution=resolution,
            batch=batch,
            checkpointing=checkpointing,
            dtype=DTYPES[dtype],
            steps=steps,
            policy_check=policy_check,
            window=window,
        )
    return Estimate(
        model,
        resolution,
        batch,
        checkpointing,
        dtype,
        fake,
        built.unet_params,
        built.text_params,
        built.vae_params,
        built.weight_bytes,
        start,
        after_forward,
        tracker.peak,
        tracker.peak_phase,
        tracker.peak_op,
        dict(tracker.phase_peaks),
        *tracker.largest,
        _attention_ops(tracker.op_counts),
        time.perf_counter() - started,
    )


@dataclasses.dataclass
class CachingEstimate:
    model: str
    resolution: int
    images: int
    start_bytes: int  # UNet and text encoders in the compute dtype, the VAE in fp32, the pixels
    peak_bytes: int
    seconds: float


def estimate_latent_caching(
    model: str, *, resolution: int | None = None, images: int = 4, dtype: str = "fp16", fake: bool = True
) -> CachingEstimate:
    """Peak of filling the latent cache before the first step: ``Objective.fill_cache`` (chunks of 4 images, no grad,
    no autocast) through ``DiffusersHost.encode_images`` with the fp32 VAE, while the UNet and text encoders are
    already on the device."""
    resolution = resolution or archs.RESOLUTION[model]
    started = time.perf_counter()
    tracker = LiveStorageTracker()
    with session(model, DTYPES[dtype], fake, with_vae=True) as built:
        host = built.host
        pixels = torch.rand(images, 3, resolution, resolution) * 2 - 1
        tracker.track_all(host.unet, host.vae, *host.text_encoders, pixels)
        start = tracker.current
        with tracker, torch.no_grad():  # (no training_session: its VAE .to() cannot swap fake parameters)
            mean, std = host.encode_images(pixels)
        del mean, std
    return CachingEstimate(model, resolution, images, start, tracker.peak, time.perf_counter() - started)


# -- checks ------------------------------------------------------------------------------------------------------------
def check_autocast_policy(model: str = "tiny-xl", dtype: str = "fp16") -> PolicyCheck:
    """Run one forward of ``model`` (fake tensors) under the emulated policy and compare every distinct call's output
    dtype with torch's real AutocastCUDA kernels on fake CUDA tensors. ``mismatches`` should be empty."""
    check = PolicyCheck(DTYPES[dtype])
    estimate(model, steps=1, dtype=dtype, policy_check=check)
    return check


@dataclasses.dataclass
class Validation:
    model: str
    resolution: int
    checkpointing: str
    fake_peak: int
    real_peak: int
    fake_after_forward: int
    real_after_forward: int
    tracker_rise: int  # real run: the tracker's peak above the live bytes when the steps start (1-byte granularity)
    allocator_rise: int  # real run: the CPU allocator's peak rise over the same window (torch profiler)


def validate(model: str = "tiny", resolution: int = 64, checkpointing: str = "off") -> Validation:
    """The same small config with fake and with real CPU tensors (1-byte granularity), and the real run's peak rise
    by the tracker against the CPU allocator's own count."""
    fake = estimate(model, resolution=resolution, checkpointing=checkpointing, fake=True, round_to=1)
    allocator = AllocatorPeak()
    real = estimate(model, resolution=resolution, checkpointing=checkpointing, fake=False, round_to=1, window=allocator)
    return Validation(
        model,
        resolution,
        checkpointing,
        fake.peak_bytes,
        real.peak_bytes,
        fake.after_forward_bytes,
        real.after_forward_bytes,
        real.peak_bytes - real.start_bytes,
        allocator.peak,
    )


# -- report ------------------------------------------------------------------------------------------------------------
def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f}"


def verdict(e: Estimate) -> str:
    goal = GOALS.get(e.model)
    if goal is None or e.resolution != archs.RESOLUTION[e.model] or e.batch != 1:
        return ""
    if goal.needs_checkpointing and e.checkpointing == "off":
        return f"(goal < {goal.gib:g} GiB is with checkpointing)"
    ok = e.peak_bytes < goal.gib * GIB
    note = " (diffusers' checkpointing, not the project's)" if e.checkpointing == "diffusers" else ""
    return f"{'yes' if ok else 'NO'}: < {goal.gib:g} GiB{note}"


def table(estimates: list[Estimate]) -> str:
    """A Markdown table of the estimates."""
    head = (
        "| model | px | batch | ckpt | params UNet + text | weights GiB | peak GiB (step) | activations GiB | "
        "+ VAE fp16 resident | + VAE fp32 resident | goal |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in estimates:
        vae16, vae32 = e.vae_params * 2, e.vae_params * 4
        lines.append(
            f"| {e.model} | {e.resolution} | {e.batch} | {e.checkpointing} | "
            f"{e.unet_params / 1e6:.0f}M + {e.text_params / 1e6:.0f}M | {_gib(e.weight_bytes)} | "
            f"**{_gib(e.peak_bytes)}** | {_gib(e.activation_bytes)} | {_gib(e.peak_bytes + vae16)} | "
            f"{_gib(e.peak_bytes + vae32)} | {verdict(e)} |"
        )
    return "\n".join(lines)


def details(e: Estimate) -> str:
    phases = ", ".join(f"{k} {_gib(v)}" for k, v in e.phase_peaks.items())
    return (
        f"{e.model} {e.resolution}px b{e.batch} ckpt {e.checkpointing}: start {_gib(e.start_bytes)}"
        f" GiB, after forward {_gib(e.after_forward_bytes)} GiB, peak {_gib(e.peak_bytes)} GiB in {e.peak_phase} "
        f"(at {e.peak_op}); phase peaks: {phases}; largest tensor {e.largest_bytes / 2**20:.0f} MiB ({e.largest_op});"
        f" attention ops: {e.attention_ops}; {e.seconds:.0f} s"
    )


def machine() -> str:
    import diffusers
    import transformers

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU; Python "
        f"{platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}; {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=MODELS)
    parser.add_argument("--tiny", action="store_true", help="the tiny models only (seconds; what the tests run)")
    parser.add_argument("--resolution", type=int, nargs="+", help="pixels (default: each model's native)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        choices=CHECKPOINTING,
        default=["off", "on"],
        help="on: the project's (each resnet and transformer block); diffusers: the UNet's own, for comparison",
    )
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per estimate (the 2nd has AdamW state)")
    parser.add_argument("--validate", action="store_true", help="also: fake vs real tensors, autocast policy check")
    parser.add_argument(
        "--caching", action="store_true", help="also: the latent-caching phase before the first step (fp32 VAE)"
    )
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    models = ["tiny", "tiny-xl"] if args.tiny else args.models
    print(f"machine: {machine()}", flush=True)

    def resolutions(model: str) -> list[int]:
        return args.resolution or [archs.RESOLUTION[model]]

    results = []
    for model in models:
        for resolution, batch, checkpointing in itertools.product(resolutions(model), args.batch, args.checkpointing):
            e = estimate(
                model,
                resolution=resolution,
                batch=batch,
                checkpointing=checkpointing,
                dtype=args.precision,
                steps=args.steps,
            )
            results.append(e)
            print(details(e), flush=True)
    print()
    print(table(results))
    if args.caching:
        print()
        print("| model | px | images per VAE call | resident before (UNet + text fp16, VAE fp32) GiB | peak GiB |")
        print("|---|---|---|---|---|")
        for model in dict.fromkeys(models):
            for resolution, images in itertools.product(resolutions(model), (1, 4)):
                c = estimate_latent_caching(model, resolution=resolution, images=images, dtype=args.precision)
                print(f"| {model} | {resolution} | {images} | {_gib(c.start_bytes)} | **{_gib(c.peak_bytes)}** |")
    if args.validate:
        print()
        for checkpointing in CHECKPOINTING:
            v = validate("tiny", 64, checkpointing)
            print(
                f"validate tiny 64px ckpt {checkpointing}: peak fake {v.fake_peak} B, real "
                f"{v.real_peak} B; after forward fake {v.fake_after_forward} B, real {v.real_after_forward} B; "
                f"real run peak rise: tracker {v.tracker_rise} B, CPU allocator (profiler) {v.allocator_rise} B"
            )
        for model in dict.fromkeys(models):
            check = check_autocast_policy(model, args.precision)
            fp32 = sorted({k.split("(")[0] for k, v in check.checked.items() if v == "torch.float32"})
            print(
                f"{model}: autocast emulation vs torch's AutocastCUDA kernels: {len(check.checked)} distinct calls "
                f"agree ({', '.join(fp32)} among those in fp32), {len(check.mismatches)} differ "
                f"{check.mismatches}, {len(check.skipped)} not replayable on fake CUDA: {sorted(check.skipped)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
