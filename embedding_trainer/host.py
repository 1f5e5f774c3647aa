"""The interface between the training core and a model host (diffusers components, A1111's loaded model, ...).

The core owns the data, the trainable vectors, the optimiser and the loss; a host owns the frozen model. Data
flows one way: the core asks the host to encode images once, then on every step to encode prompts with the
current vectors spliced in and to predict noise (or v) for noisy latents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

ModelFamily = Literal["sd1", "sd2", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]

#: Text encoders per model family: (key, token-embedding width of the real model).
#: SD1 uses OpenAI CLIP ViT-L/14, SD2 OpenCLIP ViT-H/14, SDXL both CLIP ViT-L and OpenCLIP ViT-bigG.
ENCODER_KEYS: dict[str, tuple[str, ...]] = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


@dataclass(frozen=True)
class EncoderInfo:
    """One text encoder whose token-embedding space holds trainable vectors."""

    key: str  # "clip_l", "clip_h" or "clip_g"
    width: int  # token-embedding width (768, 1024, 1280 for the real models)


@dataclass(frozen=True)
class ImageInfo:
    """What SDXL's size conditioning needs to know about one training sample (pixels, (height, width))."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


@runtime_checkable
class Host(Protocol):
    """A frozen text-to-image model presented to the trainer.

    Every model weight must have ``requires_grad=False`` while :meth:`training_session` is active; the only
    trainable tensors are the vectors the core passes to :meth:`encode_prompts`.
    """

    family: ModelFamily
    prediction_type: PredictionType
    encoders: tuple[EncoderInfo, ...]
    device: torch.device
    default_resolution: int
    model_name: str
    preferred_precision: str | None  # what precision "auto" means for this host; None: the core decides

    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule: cumulative alpha products, float64, on the CPU, one per timestep."""

    def token_embeddings(self, encoder_key: str, text: str) -> torch.Tensor:
        """Token-embedding rows ``[k, width]`` (float32, CPU) of ``text`` without start/end tokens."""

    def encoder_output(self, encoder_key: str, text: str) -> torch.Tensor:
        """The encoder's output ``[k, width]`` (float32, CPU) at ``text``'s tokens: the hidden states the denoiser
        reads (the penultimate layer where the model conditions on it), without start/end tokens."""

    def vocabulary(self, encoder_key: str) -> torch.Tensor:
        """The encoder's whole token-embedding table ``[vocab, width]`` (read-only; for statistics)."""

    def known_token_count(self, text: str) -> int:
        """How many tokens ``text`` splits into (1 means the tokenizer already knows it as one word)."""

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images ``[B,3,H,W]`` in ``[-1, 1]`` to scaled latents: ``(mean, std)`` as float32 on the device.

        A latent sample is ``mean + std * noise``; the deterministic latent is ``mean``.
        """

    def encode_prompts(
        self,
        prompts: list[str],
        trigger: str,
        vectors: dict[str, torch.Tensor],
        images: list[ImageInfo],
    ) -> Any:
        """Conditioning for a batch: each occurrence of ``trigger`` becomes the ``n`` vectors of each encoder.

        The result is opaque to the core and is only passed back to :meth:`predict`. It must be differentiable
        with respect to ``vectors``. Raises ``HostError`` if a prompt is too long to hold the vectors.
        """

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        """The denoiser's output (noise for epsilon models, v for v-prediction) for discrete ``timesteps``."""

    def training_session(self, gradient_checkpointing: bool) -> contextlib.AbstractContextManager[None]:
        """Prepare the model for a run (freeze weights, wrap blocks) and undo every change on exit."""

    def offload_image_encoder(self) -> None:
        """Move the image encoder (VAE) to system RAM until the training session ends (latents are cached)."""


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``modules`` and restore each flag afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def channels_last_on_cpu(module: torch.nn.Module, device: torch.device) -> Iterator[bool]:
    """On the CPU, ``module``'s weights in channels-last layout for the run, contiguous again afterwards: oneDNN's
    convolutions run faster on it (in the real WebUI benchmark it took ours from 2.34x to 2.67x the built-in at batch
    1, 2.00x to 2.19x at batch 4; benchmarks/RESULTS.md). Yields whether the layout changed, so the caller lays out
    its inputs that way too. Elsewhere nothing changes."""
    if device.type != "cpu":
        yield False
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        module.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def checkpointed(blocks: list[torch.nn.Module]) -> Iterator[None]:
    """Run each block's forward under ``torch.utils.checkpoint`` (non-reentrant) and restore it afterwards.

    Non-reentrant checkpointing works with frozen weights and keyword arguments, and gives the same gradients
    as the plain forward; it trades about one extra forward pass for the activations it does not keep.
    """
    import torch.utils.checkpoint as ckpt

    originals: list[tuple[torch.nn.Module, bool, Any]] = []
    try:
        for block in blocks:
            had_own = "forward" in block.__dict__
            original = block.forward
            originals.append((block, had_own, original))

            def forward(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return ckpt.checkpoint(_original, *args, use_reentrant=False, **kwargs)

            block.forward = forward  # type: ignore[method-assign]
        yield
    finally:
        for block, had_own, original in reversed(originals):
            if had_own:
                block.forward = original  # type: ignore[method-assign]
            else:
                del block.forward
