"""Host adapter over the model Stable Diffusion WebUI Forge (2.x, the ``backend`` package) has loaded: SD1, SD2, SDXL.

Forge keeps none of A1111's ldm objects. Its model (``shared.sd_model``) holds ``forge_objects_original``: a UNet
patcher whose ``model`` is a k-diffusion-style ``KModel`` (the UNet in ``diffusion_model``, the noise schedule and
prediction type in ``predictor``), a CLIP patcher, and a VAE. Prompts go through one text-processing engine per
text encoder, each with its own embedding database; an embedding registered there is spliced into prompts by the
engine's token-embedding hook, gradients included. The adapter takes Forge's objects as arguments
(``webui.host_symbols`` imports them), so nothing here imports Forge.

Three Forge habits stop gradients, and the adapter undoes each for the run (facts from Forge dfdcbab6):

- Forge loads and moves weights under ``torch.inference_mode``: every weight is an inference tensor, which autograd
  refuses to save for backward. The adapter swaps them for ordinary frozen copies (``ordinary_tensors``), and checks
  again each step, since Forge may load weights anew in between (a preview, a LoRA change).
- The UNet's transformer block adds in place (``x += n``) onto a tensor its norm saved for backward. For the run the
  block's forward is recompiled with those additions out of place (``out_of_place_forward``).
- Its own conditioning and VAE calls run under ``inference_mode``: the adapter calls the engines' and the VAE's
  parts directly.

The core's first-step gradient check stops a run whose vectors get no gradient, should a Forge update bring another.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import HostError
from ..host import EncoderInfo, ImageInfo, ModelFamily, channels_last_on_cpu, checkpointed, frozen
from .a1111 import carrying, checkpoint_units, family_from_flags, published

#: In-place additions in Forge's ``BasicTransformerBlock._forward``, and their out-of-place forms.
IN_PLACE_ADDITION = re.compile(r"\b(x) \+= (\w+)")


def model_family(sd_model: Any) -> ModelFamily:
    """SD1, SD2 or SDXL among the models Forge loads; a clear refusal for the others (SD3, Flux, Chroma, the SDXL
    refiner)."""
    name = getattr(getattr(sd_model, "sd_checkpoint_info", None), "model_name", "the loaded model")
    if getattr(sd_model, "forge_objects", None) is None:
        raise HostError("Forge has not loaded a model yet; choose a checkpoint (or generate once) and start again")
    if getattr(sd_model, "is_sdxl", False) and not hasattr(sd_model, "text_processing_engine_l"):
        raise HostError(f"{name} is the SDXL refiner, which has no CLIP-L encoder; load a base SDXL model")
    return family_from_flags(sd_model, name)


def prediction_type(sd_model: Any) -> str:
    """ "epsilon" or "v_prediction", as Forge's predictor for the loaded model says."""
    predictor = sd_model.forge_objects.unet.model.predictor
    return "v_prediction" if predictor.prediction_type == "v_prediction" else "epsilon"


def token_count(sd_model: Any, text: str) -> int:
    """How many tokens ``text`` splits into in the loaded model's (first) tokenizer."""
    engine = getattr(sd_model, "text_processing_engine_l", None) or sd_model.text_processing_engine
    return len(engine.tokenize([text])[0])


def ordinary_tensors(module: torch.nn.Module) -> int:
    """Replace the inference tensors among ``module``'s parameters and buffers with ordinary copies (parameters
    frozen); returns how many were replaced. Cheap when there are none."""
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for part in module.modules():
            for key, parameter in list(part._parameters.items()):
                if parameter is not None and parameter.is_inference():
                    part._parameters[key] = torch.nn.Parameter(parameter.clone(), requires_grad=False)
                    replaced += 1
            for key, buffer in list(part._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    part._buffers[key] = buffer.clone()
                    replaced += 1
    return replaced


@contextlib.contextmanager
def out_of_place_forward(block_class: type) -> Iterator[None]:
    """``block_class._forward`` recompiled with ``x += y`` written ``x = x + y`` for the run, restored afterwards.
    A version of the block without such additions is left as it is."""
    original = block_class.__dict__.get("_forward")
    if original is None:
        yield
        return
    source = textwrap.dedent(inspect.getsource(original))
    rewritten, count = IN_PLACE_ADDITION.subn(r"\1 = \1 + \2", source)
    if count == 0:
        yield
        return
    namespace: dict[str, Any] = {}
    module_globals = inspect.getmodule(original).__dict__  # type: ignore[union-attr]
    exec(compile(rewritten, inspect.getsourcefile(original) or "<forge>", "exec"), module_globals, namespace)
    block_class._forward = namespace["_forward"]  # type: ignore[attr-defined]
    try:
        yield
    finally:
        block_class._forward = original  # type: ignore[attr-defined]


class ForgeHost:
    """Presents Forge's ``shared.sd_model`` to the training core (see ``embedding_trainer.host.Host``)."""

    def __init__(self, sd_model: Any, memory: Any, transformer_block: type, embedding_class: Any):
        self.sd_model = sd_model
        self.memory = memory  # backend.memory_management: Forge moves models between devices itself
        self.transformer_block = transformer_block  # backend.nn.unet.BasicTransformerBlock
        self.embedding_class = embedding_class  # backend.text_processing.textual_inversion.Embedding
        self.family: ModelFamily = model_family(sd_model)
        objects = getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects  # without LoRAs
        self.unet_patcher = objects.unet
        self.clip = objects.clip
        self.vae = objects.vae
        self.kmodel = objects.unet.model
        self.device = torch.device(memory.get_torch_device())
        self.unet_dtype = getattr(self.kmodel, "computation_dtype", None) or next(self.kmodel.parameters()).dtype
        self.prediction_type = prediction_type(sd_model)
        if self.family == "sdxl":
            self.engines = {"clip_l": sd_model.text_processing_engine_l, "clip_g": sd_model.text_processing_engine_g}
        else:
            self.engines = {"clip_h" if self.family == "sd2" else "clip_l": sd_model.text_processing_engine}
        self.encoders = tuple(EncoderInfo(key, int(self.vocabulary(key).shape[-1])) for key in self.engines)
        v_model = self.prediction_type == "v_prediction"
        self.default_resolution = 1024 if self.family == "sdxl" else 768 if self.family == "sd2" and v_model else 512
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "model_name", "") or ""
        self.model_hash = getattr(info, "shorthash", None)
        self.preferred_precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.unet_dtype, "fp32")
        self.embedding: Any = None  # the live Embedding registered under the trigger word
        self.input_memory_format = torch.contiguous_format

    # -- Host interface ----------------------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        return self.kmodel.predictor.alphas_cumprod.detach().to("cpu", torch.float64).clone()

    def token_embeddings(self, encoder_key: str, text: str) -> torch.Tensor:
        ids = self.engines[encoder_key].tokenize([text])[0][:75]
        table = self.vocabulary(encoder_key)
        return table[torch.tensor(ids, dtype=torch.long, device=table.device)].detach().to("cpu", torch.float32).clone()

    @torch.no_grad()
    def encoder_output(self, encoder_key: str, text: str) -> torch.Tensor:
        # The engine's own encode step (its CLIP-skip and final norm), on one start/end-framed chunk.
        engine = self.engines[encoder_key]
        ids = engine.tokenize([text])[0][:75]
        tokens = [engine.id_start, *ids, engine.id_end]
        tokens += [engine.id_pad] * (77 - len(tokens))
        self.memory.load_model_gpu(self.clip.patcher)
        z = engine.encode_with_transformers(torch.asarray([tokens]))
        return z[0, 1 : 1 + len(ids)].detach().to("cpu", torch.float32).clone()

    def vocabulary(self, encoder_key: str) -> torch.Tensor:
        layer = self.engines[encoder_key].text_encoder.transformer.text_model.embeddings.token_embedding
        return getattr(layer, "wrapped", layer).weight.detach()

    def known_token_count(self, text: str) -> int:
        return token_count(self.sd_model, text)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.vae_on_device() as vae:
            parameter = next(vae.parameters())
            h = vae.encoder(pixels.to(parameter.device, parameter.dtype))
            moments = vae.quant_conv(h) if vae.quant_conv is not None else h
            mean, logvar = torch.chunk(moments.float(), 2, dim=1)
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        scale, shift = float(vae.scaling_factor), float(vae.shift_factor)
        return ((mean - shift) * scale).to(self.device), (std * scale).to(self.device)

    @contextlib.contextmanager
    def vae_on_device(self) -> Iterator[Any]:
        """The VAE loaded where Forge computes with it (Forge moves it back when it needs the room)."""
        with torch.inference_mode(False):
            self.memory.load_model_gpu(self.vae.patcher)
        yield self.vae.first_stage_model

    def offload_image_encoder(self) -> None:
        # Forge unloads the VAE itself when the UNet and text encoders need the room (load_models_gpu below).
        pass

    def _live_embedding(self, trigger: str, vectors: dict[str, torch.Tensor]) -> Any:
        """The Embedding for ``trigger`` carrying ``vectors`` in every engine's database."""
        self.embedding = embedding = carrying(self.embedding, self.embedding_class, trigger, vectors)
        for engine in self.engines.values():
            if engine.embeddings.word_embeddings.get(trigger) is not embedding:
                engine.embeddings.register_embedding(embedding)
        return embedding

    def _trainable_models(self) -> None:
        """The UNet and text encoders on the device, their weights ordinary frozen tensors (see the module doc).
        Called every step because a preview or a LoRA change may have reloaded them; when nothing changed it costs
        Forge's loaded-model check and a walk over the modules (0.5 ms for the 367 modules of the Forge tier's SD1)."""
        self.memory.load_models_gpu([self.unet_patcher, self.clip.patcher])
        ordinary_tensors(self.kmodel)
        ordinary_tensors(self.clip.cond_stage_model)

    def _encode(self, key: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An engine's conditioning for ``prompts``: its own chunking and splicing, without its per-call log line
        and infotext bookkeeping (which would grow with every training step)."""
        engine = self.engines[key]
        batch_chunks, _ = engine.process_texts(prompts)
        zs = []
        for i in range(max(len(chunks) for chunks in batch_chunks)):
            chunk = [chunks[i] if i < len(chunks) else engine.empty_chunk() for chunks in batch_chunks]
            engine.embeddings.fixes = [c.fixes for c in chunk]
            zs.append(engine.process_tokens([c.tokens for c in chunk], [c.multipliers for c in chunk]))
        return torch.hstack(zs), getattr(zs[0], "pooled", None)

    def encode_prompts(
        self, prompts: list[str], trigger: str, vectors: dict[str, torch.Tensor], images: list[ImageInfo]
    ) -> Any:
        self._trainable_models()
        self._live_embedding(trigger, vectors)
        if self.family != "sdxl":
            return self._encode(self.encoders[0].key, prompts)[0], None
        cond_l, _ = self._encode("clip_l", prompts)
        cond_g, pooled = self._encode("clip_g", prompts)
        # Real size and crop of each training image (Forge's own call uses one size and the crop settings).
        embedder = self.sd_model.embedder
        sizes = [
            torch.cat(
                [embedder(torch.Tensor([value])) for value in (*im.original_size, *im.crop_top_left, *im.target_size)]
            ).flatten()
            for im in images
        ]
        vector = torch.cat([pooled, torch.stack(sizes).to(pooled)], dim=1)
        return torch.cat([cond_l, cond_g], dim=2), vector

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        # The core's noisy latents are DDPM's x_t, which is what KModel feeds its UNet (x / sqrt(sigma^2 + 1)).
        context, vector = conditioning
        dtype = self.unet_dtype
        latents = noisy_latents.to(dtype).contiguous(memory_format=self.input_memory_format)
        extra = {"y": vector.to(dtype)} if vector is not None else {}
        output = self.kmodel.diffusion_model(
            latents,
            timesteps.to(self.device).float(),
            context=context.to(dtype),
            control=None,
            transformer_options={},
            **extra,
        )
        return output

    @contextlib.contextmanager
    def training_session(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        """Ordinary frozen weights, out-of-place transformer blocks, optional per-block checkpointing."""
        with torch.inference_mode(False):
            self._trainable_models()
            # frozen() below restores each flag afterwards, which an inference tensor refuses.
            ordinary_tensors(self.vae.first_stage_model)
        unet = self.kmodel.diffusion_model
        blocks = checkpoint_units(unet) if gradient_checkpointing else []
        with (
            frozen(self.kmodel, self.clip.cond_stage_model, self.vae.first_stage_model),
            out_of_place_forward(self.transformer_block),
            channels_last_on_cpu(unet, self.device) as channels_last,
            checkpointed(blocks),
        ):
            self.input_memory_format = torch.channels_last if channels_last else torch.contiguous_format
            try:
                yield
            finally:
                self.input_memory_format = torch.contiguous_format

    # -- after a run ---------------------------------------------------------------------------------------
    def publish(self, trigger: str, vectors: dict[str, torch.Tensor], step: int, path: str, sha256: str) -> Any:
        """Register the finished embedding in every engine's database so txt2img uses it at once (Forge reads the
        embeddings folder only when it loads a model)."""
        final = {k: v.detach().to(self.device, torch.float32) for k, v in vectors.items()}
        embedding = self._live_embedding(trigger, final)
        return published(embedding, step, path, sha256, self.model_hash, self.model_name)

    def reload_embeddings(self) -> None:
        """Every engine's database from the embeddings folder again: the files on disk are the truth."""
        for engine in self.engines.values():
            engine.embeddings.load_textual_inversion_embeddings()
        self.embedding = None
