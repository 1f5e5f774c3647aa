"""CUDA's memory accounting and autocast, emulated on CPU (fake) tensors: what ``benchmarks.memory_estimate`` runs a
training step under.

On a CPU-only torch, autograd needs the CUDA device guard for any tensor that requires grad, so the step runs on
fake CPU tensors. Two things then differ from CUDA and are handled here:

* memory: :class:`LiveStorageTracker` (a ``TorchDispatchMode``) counts every storage an op creates once while it
  lives, rounded up to the CUDA caching allocator's 512-byte blocks, comparable to ``torch.cuda.max_memory_allocated``;
  :class:`AllocatorPeak` is the CPU allocator's own count, to check the tracker against with real tensors.
* autocast: CPU autocast keeps GroupNorm, LayerNorm, upsampling, softmax, sum, exp, pow ... in fp16, CUDA autocast
  runs them in fp32 (and autograd saves those fp32 copies). :func:`cuda_autocast_policy` registers kernels on the
  AutocastCPU dispatch key that apply CUDA's op lists (aten/src/ATen/autocast_mode.h), above autograd like the real
  ones; :class:`PolicyCheck` compares, call by call, the dtypes this gives with torch's real AutocastCUDA kernels
  run on fake CUDA tensors (forward without grad works there).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

#: The CUDA caching allocator hands out blocks in multiples of 512 bytes; ``max_memory_allocated`` counts blocks.
CUDA_BLOCK = 512


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


class PolicyCheck(TorchFunctionMode):
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


# -- memory tracking ------------------------------------------------------------------------------------------------
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
