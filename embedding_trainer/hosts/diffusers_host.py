"""Host adapter over diffusers components: SD1, SD2 (epsilon or v-prediction) and SDXL.

The trainable vectors are spliced into the token embeddings by a thin wrapper module installed with
``set_input_embeddings`` for the duration of one text-encoder call. That works on transformers 4.30 (the WebUI's
pin) and 5.x alike (5.x CLIP text models take no ``inputs_embeds``), and the vocabulary is never modified.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import HostError
from ..host import ENCODER_KEYS, EncoderInfo, ImageInfo, ModelFamily, channels_last_on_cpu, checkpointed, frozen

MAX_TOKENS = 77


class _SplicingEmbedding(torch.nn.Module):
    """Token embedding that replaces the rows at given (batch, position) pairs with trainable vectors."""

    def __init__(
        self, base: torch.nn.Embedding, batch_index: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor
    ):
        super().__init__()
        self.base = base
        self.batch_index, self.positions, self.rows = batch_index, positions, rows

    @property
    def weight(self) -> torch.Tensor:  # some code paths read the table's dtype/device through .weight
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        if self.positions.numel() == 0:
            return embeds
        # index_put (not in place) keeps the gradient path from the output back to the vectors.
        return embeds.index_put((self.batch_index, self.positions), self.rows.to(embeds.dtype))


@dataclass
class DiffusersConditioning:
    hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class _TokenizedPrompt:
    ids: tuple[int, ...]
    slots: tuple[int, ...]  # positions holding the trigger's vectors, in order, n per occurrence


class DiffusersHost:
    """Presents diffusers components to the training core (see ``embedding_trainer.host.Host``)."""

    def __init__(
        self,
        *,
        family: ModelFamily,
        unet: Any,
        vae: Any,
        text_encoders: list[Any],
        tokenizers: list[Any],
        scheduler_config: dict[str, Any],
        device: torch.device | str = "cpu",
        model_name: str = "",
    ):
        if family not in ENCODER_KEYS:
            raise HostError(f"unknown model family {family!r}; supported: sd1, sd2, sdxl")
        if len(text_encoders) != len(ENCODER_KEYS[family]) or len(tokenizers) != len(text_encoders):
            raise HostError(f"{family} needs {len(ENCODER_KEYS[family])} text encoders and as many tokenizers")
        self.family: ModelFamily = family
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.device = torch.device(device)
        self.model_name = model_name
        self.preferred_precision: str | None = None  # the caller loads weights in the precision it asks for
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise HostError(
                f"prediction type {self.prediction_type!r} is not supported; the scheduler config must say "
                "'epsilon' or 'v_prediction'"
            )
        self._scheduler_config = dict(scheduler_config)
        self.encoders = tuple(
            EncoderInfo(key, enc.get_input_embeddings().weight.shape[1])
            for key, enc in zip(ENCODER_KEYS[family], self.text_encoders)
        )
        self.default_resolution = int(getattr(unet.config, "sample_size", 64)) * self._vae_factor()
        self._tokenize = lru_cache(maxsize=4096)(self._tokenize_uncached)
        self._session_dtype: torch.dtype | None = None
        self.input_memory_format = torch.contiguous_format  # the UNet inputs' layout: channels-last with its weights

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> DiffusersHost:
        """Load a local diffusers-format model folder (``model_index.json`` with unet, vae, text encoders)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise HostError(
                f"{folder} is not a diffusers model folder (no model_index.json); point --model at the folder "
                "that holds model_index.json, unet/, vae/ and text_encoder/"
            )
        index = json.loads(index_file.read_text(encoding="utf-8"))
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (folder / part).is_dir():
                raise HostError(f"{folder} has no {part}/ folder; a full diffusers model folder is needed")
        sdxl = "text_encoder_2" in index
        encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)]
        tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer")]
        if sdxl:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype))
            tokenizers.append(CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
            family: ModelFamily = "sdxl"
        else:
            config = encoders[0].config
            # SD2 uses OpenCLIP ViT-H (gelu, 1024 wide); SD1 uses OpenAI CLIP ViT-L (quick_gelu, 768 wide).
            family = "sd2" if config.hidden_act == "gelu" or config.hidden_size == 1024 else "sd1"
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        # The VAE only encodes the training images once; fp32 avoids the SDXL VAE's fp16 overflow.
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        host = cls(
            family=family,
            unet=unet,
            vae=vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            scheduler_config=scheduler_config,
            device=device,
            model_name=folder.name,
        )
        host.to(device)
        return host

    def to(self, device: torch.device | str) -> DiffusersHost:
        self.device = torch.device(device)
        for model in (self.unet, self.vae, *self.text_encoders):
            model.to(self.device)
        return self

    @property
    def _unet_dtype(self) -> torch.dtype:
        # Fixed for a training session, so its steps never walk the model; diffusers' ``unet.dtype`` walks every
        # submodule (1.2 ms per call for SD1.5's UNet, 4.2 ms for SDXL's on a CPU; benchmarks/RESULTS.md).
        if self._session_dtype is not None:
            return self._session_dtype
        return next(self.unet.parameters()).dtype

    # -- Host interface ----------------------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        from diffusers import DDPMScheduler

        config = {k: v for k, v in self._scheduler_config.items() if not k.startswith("_")}
        scheduler = DDPMScheduler.from_config(config)
        return scheduler.alphas_cumprod.to(torch.float64).cpu()

    def _encoder(self, key: str) -> tuple[Any, Any]:
        for info, encoder, tokenizer in zip(self.encoders, self.text_encoders, self.tokenizers):
            if info.key == key:
                return encoder, tokenizer
        raise HostError(f"no text encoder {key!r}; this {self.family} model has {[e.key for e in self.encoders]}")

    def token_embeddings(self, encoder_key: str, text: str) -> torch.Tensor:
        encoder, tokenizer = self._encoder(encoder_key)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return encoder.get_input_embeddings().weight[ids].detach().float().cpu().clone()

    @torch.no_grad()
    def encoder_output(self, encoder_key: str, text: str) -> torch.Tensor:
        encoder, tokenizer = self._encoder(encoder_key)
        ids = tokenizer(text, add_special_tokens=False).input_ids[: MAX_TOKENS - 2]
        full = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        full += [tokenizer.pad_token_id] * (MAX_TOKENS - len(full))
        out = encoder(torch.tensor([full], device=self.device), output_hidden_states=True)
        hidden = out.hidden_states[-2] if self.family == "sdxl" else out.last_hidden_state  # as encode_prompts
        return hidden[0, 1 : 1 + len(ids)].float().cpu().clone()

    def vocabulary(self, encoder_key: str) -> torch.Tensor:
        return self._encoder(encoder_key)[0].get_input_embeddings().weight.detach()

    def known_token_count(self, text: str) -> int:
        return len(self.tokenizers[0](text, add_special_tokens=False).input_ids)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist
        scale = float(self.vae.config.scaling_factor)
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()

    def _tokenize_uncached(self, prompt: str, trigger: str, num_vectors: int, encoder_index: int) -> _TokenizedPrompt:
        tokenizer = self.tokenizers[encoder_index]
        pieces = re.split(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", prompt, flags=re.IGNORECASE)
        placeholder = tokenizer.convert_tokens_to_ids("*</w>")
        ids: list[int] = [tokenizer.bos_token_id]
        slots: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                slots.extend(range(len(ids), len(ids) + num_vectors))
                ids.extend([placeholder] * num_vectors)
            ids.extend(tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else [])
        if slots and slots[-1] >= MAX_TOKENS - 1:
            raise HostError(
                f"the prompt {prompt!r} is too long: the trigger's {num_vectors} vector(s) would fall past CLIP's "
                f"{MAX_TOKENS}-token limit; shorten the caption or template, or use fewer vectors"
            )
        ids = ids[: MAX_TOKENS - 1] + [tokenizer.eos_token_id]
        ids += [tokenizer.pad_token_id] * (MAX_TOKENS - len(ids))
        return _TokenizedPrompt(tuple(ids), tuple(slots))

    def _encode_one(
        self, encoder_index: int, prompts: list[str], trigger: str, vectors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoder = self.text_encoders[encoder_index]
        tokenized = [self._tokenize(p, trigger, vectors.shape[0], encoder_index) for p in prompts]
        ids = torch.tensor([t.ids for t in tokenized], device=self.device)
        batch_index = torch.tensor([b for b, t in enumerate(tokenized) for _ in t.slots], device=self.device)
        positions = torch.tensor([s for t in tokenized for s in t.slots], device=self.device, dtype=torch.long)
        vector_index = torch.tensor(
            [k % vectors.shape[0] for t in tokenized for k in range(len(t.slots))], device=self.device, dtype=torch.long
        )
        rows = vectors.to(self.device)[vector_index]
        base = encoder.get_input_embeddings()
        encoder.set_input_embeddings(_SplicingEmbedding(base, batch_index.long(), positions, rows))
        try:
            if self.family == "sdxl":
                out = encoder(ids, output_hidden_states=True)
                # SDXL conditions on the penultimate layer; the second encoder also gives the pooled projection.
                pooled = out.text_embeds if encoder_index == 1 else None
                return out.hidden_states[-2], pooled
            return encoder(ids).last_hidden_state, None
        finally:
            encoder.set_input_embeddings(base)

    def encode_prompts(
        self, prompts: list[str], trigger: str, vectors: dict[str, torch.Tensor], images: list[ImageInfo]
    ) -> DiffusersConditioning:
        states, pooled = [], None
        for i, info in enumerate(self.encoders):
            hidden, pooled_i = self._encode_one(i, prompts, trigger, vectors[info.key])
            states.append(hidden)
            pooled = pooled_i if pooled_i is not None else pooled
        hidden_states = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        added = None
        if self.family == "sdxl":
            time_ids = torch.tensor(
                [[*im.original_size, *im.crop_top_left, *im.target_size] for im in images],
                device=self.device,
                dtype=hidden_states.dtype,
            )
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return DiffusersConditioning(hidden_states, added)

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: DiffusersConditioning
    ) -> torch.Tensor:
        dtype = self._unet_dtype
        added = conditioning.added_cond_kwargs
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        return self.unet(
            noisy_latents.to(dtype).contiguous(memory_format=self.input_memory_format),
            timesteps.to(self.device),
            encoder_hidden_states=conditioning.hidden_states.to(dtype),
            added_cond_kwargs=added,
        ).sample

    @contextlib.contextmanager
    def training_session(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        models = (self.unet, self.vae, *self.text_encoders)
        modes = [m.training for m in models]
        vae_device = next(self.vae.parameters()).device
        blocks = self._checkpoint_units() if gradient_checkpointing else []
        try:
            for m in models:
                m.eval()  # dropout off: the frozen model must behave as at inference
            self._session_dtype = next(self.unet.parameters()).dtype
            with frozen(*models), channels_last_on_cpu(self.unet, self.device) as channels_last, checkpointed(blocks):
                self.input_memory_format = torch.channels_last if channels_last else torch.contiguous_format
                yield
        finally:
            self._session_dtype = None
            self.input_memory_format = torch.contiguous_format
            for m, mode in zip(models, modes):
                m.train(mode)
            self.vae.to(vae_device)  # back from offload_image_encoder

    def offload_image_encoder(self) -> None:
        self.vae.to("cpu")

    # -- helpers -------------------------------------------------------------------------------------------
    def _checkpoint_units(self) -> list[torch.nn.Module]:
        """Each resnet and each transformer block of the UNet: a backward recomputes one layer at a time, not a
        whole down/up block (estimated for SDXL at 1024 px: see benchmarks/RESULTS.md, peak CUDA memory)."""
        units: list[torch.nn.Module] = []
        for block in [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]:
            units.extend(getattr(block, "resnets", []))
            for attention in getattr(block, "attentions", []):
                units.extend(getattr(attention, "transformer_blocks", [attention]))
        return units

    def _vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_components(
        cls, components: Any, device: torch.device | str = "cpu", model_name: str = "tiny"
    ) -> DiffusersHost:
        """Wrap in-memory components (``tools.tiny_models.TinyComponents`` or the same attributes)."""
        host = cls(
            family=components.family,
            unet=components.unet,
            vae=components.vae,
            text_encoders=components.text_encoders,
            tokenizers=components.tokenizers,
            scheduler_config=dict(components.scheduler.config),
            device=device,
            model_name=model_name,
        )
        return host.to(device)
