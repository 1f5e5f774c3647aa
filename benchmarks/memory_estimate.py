"""Peak CUDA memory of one textual-inversion training step, estimated on a machine without a GPU.

The real-size models (SD1.5, SD2.1, SDXL: UNet and CLIP text encoders from their published configs, as
``benchmarks/archs.py`` builds them; nothing is downloaded) are built on the meta device and turned into fp16 fake
tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): every op computes shapes, dtypes and strides, nothing
is allocated. The components are wrapped in the project's ``DiffusersHost`` and one step runs as the trainer's
``Objective.loss`` and ``Stepper.take`` run it: ``training_session(gradient_checkpointing)``, then under autocast
``encode_prompts`` (the fp32 vectors spliced into the token embeddings) and ``predict``, the fp32 MSE loss,
``backward`` and AdamW on the vectors. A ``TorchDispatchMode`` sees every tensor an op creates and counts its
storage once while it lives (weakref finalizers), rounded up to 512 bytes as the CUDA caching allocator rounds
blocks; the largest sum is the step's peak, comparable to ``torch.cuda.max_memory_allocated``.

Why not fake CUDA tensors: on a CPU-only torch, autograd needs the CUDA device guard for any tensor that requires
grad, so the step runs on fake CPU tensors. Two things then differ from CUDA and are handled:

* autocast: CPU autocast keeps GroupNorm, LayerNorm, upsampling, softmax, sum, exp, pow ... in fp16, CUDA autocast
  runs them in fp32 (and autograd saves those fp32 copies). ``cuda_autocast_policy`` registers kernels on the
  AutocastCPU dispatch key that apply CUDA's op lists (aten/src/ATen/autocast_mode.h), above autograd like the real
  ones. ``check_autocast_policy`` compares, op by op, the dtypes this gives with torch's real AutocastCUDA kernels
  run on fake CUDA tensors (forward without grad works there).
* attention: F.scaled_dot_product_attention picks the CPU flash kernel, which, like CUDA's flash and
  memory-efficient kernels, keeps only the output and a per-row log-sum-exp for backward, never the full attention
  matrix. The ops recorded are printed so this can be checked.

``--checkpointing diffusers`` (the UNet's own, finer checkpointing; not what the project runs) is there for
comparison. ``--caching`` also estimates the phase before the first step, filling the latent cache: the fp32 VAE
encodes chunks of 4 images while the UNet and text encoders are already on the device.

Not included: the CUDA context (~300-500 MB), the caching allocator's reserve and fragmentation, cuBLAS/cuDNN and
attention kernels' internal workspaces, and anything outside the step (the WebUI, other models). Examples::

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
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves, tree_map_only  # noqa: E402

from benchmarks import archs  # noqa: E402
from embedding_trainer.host import ImageInfo  # noqa: E402
from embedding_trainer.hosts import diffusers_host  # noqa: E402
from embedding_trainer.hosts.diffusers_host import DiffusersHost  # noqa: E402
from embedding_trainer.losses import add_noise, denoising_loss, prediction_target  # noqa: E402

GIB = 2**30
#: The CUDA caching allocator hands out blocks in multiples of 512 bytes; ``max_memory_allocated`` counts blocks.
CUDA_BLOCK = 512

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


# -- CUDA's autocast policy on CPU tensors ----------------------------------------------------------------------
#: torch's AutocastCUDA op lists (AT_FORALL_* in aten/src/ATen/autocast_mode.h). Ops this torch lacks are skipped.
CUDA_LOWER_PRECISION_OPS = (
    "_convolution.deprecated",
    "_convolution",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "convolution",
    "prelu",
    "addmm",
    "addmv",
    "addr",
    "matmul",
    "einsum",
    "mm",
    "mv",
    "linalg_vecdot",
    "linear",
    "addbmm",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "linalg_multi_dot",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
    "_scaled_dot_product_flash_attention",
    "scaled_dot_product_attention",
)
CUDA_FP32_OPS = (
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "group_norm",
    "frobenius_norm.dim",
    "nuclear_norm",
    "nuclear_norm.dim",
    "cosine_similarity",
    "poisson_nll_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "nll_loss2d",
    "hinge_embedding_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "mse_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "binary_cross_entropy_with_logits",
    "dist",
    "pdist",
    "cdist",
    "renorm",
    "logsumexp",
    "upsample_nearest1d",
    "_upsample_nearest_exact1d",
    "upsample_nearest2d",
    "_upsample_nearest_exact2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "_upsample_bilinear2d_aa",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
CUDA_FP32_SET_OPT_DTYPE_OPS = (
    "prod",
    "prod.dim_int",
    "prod.dim_Dimname",
    "softmax.int",
    "softmax.Dimname",
    "log_softmax.int",
    "log_softmax.Dimname",
    "cumprod",
    "cumprod.dimname",
    "cumsum",
    "cumsum.dimname",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
    "sum",
    "sum.dim_IntList",
    "sum.dim_DimnameList",
)
CUDA_PROMOTE_OPS = (
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "vdot",
    "grid_sampler",
    "index_put",
    "tensordot",
    "scatter_add",
)
#: Ops AutocastCPU runs in fp32 that AutocastCUDA leaves alone: passed through unchanged under the CUDA policy.
CPU_ONLY_FP32_OPS = (
    "avg_pool3d",
    "polar",
    "quantile",
    "quantile.scalar",
    "nanquantile",
    "nanquantile.scalar",
    "stft",
    "stft.center",
    "grid_sampler_2d",
    "_grid_sampler_2d_cpu_fallback",
    "grid_sampler_3d",
    "trace",
    "view_as_complex",
    "max_pool3d",
    "max_unpool2d",
    "max_unpool3d",
    "adaptive_avg_pool3d",
    "reflection_pad1d",
    "reflection_pad2d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "cross_entropy_loss",
    "fractional_max_pool2d",
    "fractional_max_pool3d",
    "adaptive_max_pool3d",
)


def _eligible(t: Any) -> bool:
    """What autocast casts: floating tensors other than double."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast(args: Any, dtype: torch.dtype) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.to(dtype) if _eligible(t) else t, args)


def _without_cpu_autocast() -> Any:
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def _op(name: str) -> Any | None:
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    return getattr(packet, overload or "default", None) if packet is not None else None


def _policy_kernel(policy: str, op: Any) -> Callable[..., Any]:
    """A Python autocast kernel for ``op`` with the given CUDA cast policy (as ``WrapFunction_`` implements it)."""
    arg_names = [a.name for a in op._schema.arguments]

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with _without_cpu_autocast():
            if policy == "lower_precision_fp":
                args, kwargs = _cast((args, kwargs), torch.get_autocast_dtype("cpu"))
            elif policy == "fp32":
                args, kwargs = _cast((args, kwargs), torch.float32)
            elif policy == "promote":
                dtypes = {t.dtype for t in tree_leaves((args, kwargs)) if _eligible(t)}
                wide = torch.float32 if torch.float32 in dtypes else torch.get_autocast_dtype("cpu")
                args, kwargs = _cast((args, kwargs), wide)
            elif policy == "fp32_set_opt_dtype" and args and _eligible(args[0]):  # softmax, sum, ...: fp32 out
                index = arg_names.index("dtype")
                if index < len(args):
                    if args[index] is None:
                        args = (*args[:index], torch.float32, *args[index + 1 :])
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)  # "passthrough": as CUDA, which has no entry for the op

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While active, ``torch.autocast("cpu", ...)`` casts as ``torch.autocast("cuda", ...)`` does.

    Kernels registered on the AutocastCPU dispatch key sit above autograd, as CUDA's do, so autograd records the
    casts and saves what CUDA would save (for example GroupNorm's fp32 copy of its input). Removed on exit.
    """
    lib = torch.library.Library("aten", "IMPL")
    lists = (
        ("lower_precision_fp", CUDA_LOWER_PRECISION_OPS),
        ("fp32", CUDA_FP32_OPS),
        ("fp32_set_opt_dtype", CUDA_FP32_SET_OPT_DTYPE_OPS),
        ("promote", CUDA_PROMOTE_OPS),
        ("passthrough", CPU_ONLY_FP32_OPS),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel" for CPU's own entries
            for policy, names in lists:
                for name in names:
                    op = _op(name)
                    if op is not None:
                        lib.impl(name, _policy_kernel(policy, op), "AutocastCPU")
        yield
    finally:
        lib._destroy()


class _PolicyCheck(TorchFunctionMode):
    """Replays each distinct top-level call on fake CUDA tensors under torch's real CUDA autocast (no grad) and
    compares the output dtype with what the emulated policy gave on CPU."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.checked: dict[str, str] = {}  # call signature -> dtype
        self.mismatches: list[str] = []
        self.skipped: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not (isinstance(out, torch.Tensor) and out.is_floating_point() and any(map(_eligible, inputs))):
            return out
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        key = f"{name}({', '.join(str(t.dtype).removeprefix('torch.') for t in inputs)})"
        if key in self.checked or key in self.skipped:
            return out
        try:
            cuda_args = tree_map_only(
                torch.Tensor,
                lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda"),
                (args, kwargs),
            )
            previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", self.dtype)
            try:
                with torch.no_grad():
                    reference = func(*cuda_args[0], **cuda_args[1])
            finally:
                torch.set_autocast_enabled("cuda", previous[0])
                torch.set_autocast_dtype("cuda", previous[1])
        except Exception:  # CUDA-only code paths (indexing's device guard) a CPU-only torch cannot run
            self.skipped[key] += 1
            return out
        self.checked[key] = str(out.dtype)
        if reference.dtype != out.dtype:
            self.mismatches.append(f"{key}: CUDA {reference.dtype}, emulated {out.dtype}")
        return out


# -- memory tracker -------------------------------------------------------------------------------------------------
class LiveStorageTracker(TorchDispatchMode):
    """Live bytes of every tensor storage an op creates (each storage counted once), and the peak.

    A storage is counted from the op that creates it until its last tensor dies (a weakref finalizer on the storage
    object, which torch keeps alive as long as the storage). Tensors that exist before the step (weights, cached
    latents, the vectors) are added with :meth:`track`. Works on real and fake tensors alike.
    """

    def __init__(self, round_to: int = CUDA_BLOCK):
        super().__init__()
        self.round_to = round_to
        self.current = 0
        self.peak = 0
        self.phase = "setup"
        self.peak_phase = ""
        self.peak_op = ""
        self.phase_peaks: dict[str, int] = {}
        self.op_counts: Counter[str] = Counter()
        self.largest: tuple[int, str] = (0, "")
        self._live: dict[int, int] = {}

    def track(self, tensor: Any, op: str = "existing") -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = -(-storage.nbytes() // self.round_to) * self.round_to
        if nbytes == 0:
            return
        self._live[key] = nbytes
        weakref.finalize(storage, self._release, key).atexit = False
        self.current += nbytes
        if op != "existing":
            self.largest = max(self.largest, (nbytes, op))
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        if self.current > self.peak:
            self.peak, self.peak_phase, self.peak_op = self.current, self.phase, op

    def track_all(self, *objects: Any) -> None:
        """Add modules' parameters and buffers and any tensors (or containers of them) that already exist."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for t in [*obj.parameters(), *obj.buffers()]:
                    self.track(t)
            else:
                for t in tree_leaves(obj):
                    self.track(t)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.op_counts[name] += 1
        for t in tree_leaves(out):
            self.track(t, name)
        return out


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


# -- one training step -----------------------------------------------------------------------------------------------
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
    policy_check: _PolicyCheck | None = None,
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


@contextlib.contextmanager
def _session(model: str, dtype: str, fake: bool, with_vae: bool = False) -> Iterator[Built]:
    """``model`` built in ``dtype``; while active: fake mode (if ``fake``), a forked random state seeded with 0
    (the caller's stays as it was) and no warnings."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    built = build(model, DTYPES[dtype], fake_mode, with_vae=with_vae)
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
    policy_check: _PolicyCheck | None = None,
    window: contextlib.AbstractContextManager[Any] | None = None,
) -> Estimate:
    """Peak live bytes of ``steps`` training steps of ``model`` (a key of :data:`MODELS`)."""
    resolution = resolution or archs.RESOLUTION[model]
    started = time.perf_counter()
    tracker = LiveStorageTracker(round_to)
    with _session(model, dtype, fake) as built, cuda_autocast_policy():
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
    with _session(model, dtype, fake, with_vae=True) as built:
        host = built.host
        pixels = torch.rand(images, 3, resolution, resolution) * 2 - 1
        tracker.track_all(host.unet, host.vae, *host.text_encoders, pixels)
        start = tracker.current
        with tracker, torch.no_grad():  # (no training_session: its VAE .to() cannot swap fake parameters)
            mean, std = host.encode_images(pixels)
        del mean, std
    return CachingEstimate(model, resolution, images, start, tracker.peak, time.perf_counter() - started)


# -- checks ------------------------------------------------------------------------------------------------------------
def check_autocast_policy(model: str = "tiny-xl", dtype: str = "fp16") -> _PolicyCheck:
    """Run one forward of ``model`` (fake tensors) under the emulated policy and compare every distinct call's output
    dtype with torch's real AutocastCUDA kernels on fake CUDA tensors. ``mismatches`` should be empty."""
    check = _PolicyCheck(DTYPES[dtype])
    estimate(model, steps=1, dtype=dtype, policy_check=check)
    return check


class AllocatorPeak:
    """The CPU allocator's peak rise in live bytes while this context is active, from the torch profiler's
    allocation events: independent of the tracker, it sees every allocation c10's CPU allocator makes (kernels'
    scratch buffers included), for real tensors only."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peak = 0

    def __enter__(self) -> AllocatorPeak:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._C._profiler import _EventType

        self._profile.__exit__(*exc)
        events: list[tuple[int, int]] = []

        def walk(nodes: Any) -> None:
            for node in nodes:
                if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                    events.append((node.start_time_ns, node.extra_fields.alloc_size))
                walk(node.children)

        walk(self._profile.profiler.kineto_results.experimental_event_tree())
        live = 0
        for _, size in sorted(events):
            live += size
            self.peak = max(self.peak, live)


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
