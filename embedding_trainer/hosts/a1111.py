"""Host adapter over the model A1111 has loaded (``shared.sd_model``): SD1 and SD2 (ldm) and SDXL (sgm).

The trainable vectors live in an ``Embedding`` registered in the WebUI's embedding database under the trigger
word, so the host's own prompt parsing and splicing carry them into the text encoders (gradients included), and
the trigger works in txt2img as soon as the run starts. The adapter takes the host objects it needs as arguments
(``webui.host_symbols`` imports them), so nothing here imports ``modules.*``.

Host facts this relies on are in ``shared/reference/a1111-host.md``: SDXL's conditioner runs embedders under
``no_grad`` unless ``is_trainable``; ``alphas_cumprod_original`` is the unmodified schedule; the ldm/sgm first stage
is an encoder + ``quant_conv`` giving Gaussian moments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import HostError
from ..host import EncoderInfo, ImageInfo, ModelFamily, channels_last_on_cpu, checkpointed, frozen
from ..log import logger

#: The forward pre-hook --medvram/--lowvram install on the modules they swap (modules/lowvram.py).
LOWVRAM_HOOK = "send_me_to_gpu"
#: The host's cross-attention implementations that split attention into chunks to save memory at inference (its
#: automatic pick on the CPU is InvokeAI, on Apple GPUs sub-quadratic). Their backward is plain autograd through
#: every chunk; a run trains with the host's SDP implementation instead (toy SD1 in a real v1.10.1 on the CPU, batch
#: 4: 28.9 ms a step against 33.4 ms with InvokeAI).
SPLIT_ATTENTION = frozenset({"InvokeAI", "sub-quadratic", "Doggettx", "V1"})


def model_family(sd_model: Any) -> ModelFamily:
    """SD1, SD2 or SDXL; a clear refusal for anything else the WebUI can load."""
    name = getattr(getattr(sd_model, "sd_checkpoint_info", None), "model_name", "the loaded model")
    if getattr(sd_model, "is_sd3", False):
        raise HostError(f"{name} is an SD3 model; Embedding Trainer trains SD1.x, SD2.x and SDXL embeddings")
    if getattr(sd_model, "is_sdxl_inpaint", False) or getattr(sd_model, "is_ssd", False):
        raise HostError(f"{name} is an SDXL inpainting or SSD-1B model, which is not supported; load a base SDXL model")
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is not None and getattr(unet, "in_channels", 4) != 4:
        raise HostError(
            f"{name} is an inpainting or instruct model ({unet.in_channels} input channels); load the base model"
        )
    return family_from_flags(sd_model, name)


def family_from_flags(sd_model: Any, name: str) -> ModelFamily:
    """The family the loaded model's flags name (``is_sdxl``, ``is_sd2``, ``is_sd1``: the WebUI's and Forge's)."""
    families: tuple[tuple[str, ModelFamily], ...] = (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1"))
    for flag, family in families:
        if getattr(sd_model, flag, False):
            return family
    raise HostError(f"{name} is not an SD1.x, SD2.x or SDXL model (e.g. Flux, SD3); Embedding Trainer cannot train it")


def native_resolution(sd_model: Any, family: ModelFamily) -> int:
    """The checkpoint's own training size in pixels: its config's latent ``image_size`` times the VAE's factor.

    ldm models (SD1, SD2) carry ``image_size`` from their yaml (64 for SD1 and SD2-512, 96 for SD2-768, 8 for a
    64 px toy model); sgm's SDXL has none, and SDXL is a 1024 px model.
    """
    latent = getattr(sd_model, "image_size", None)
    if family == "sdxl" or not isinstance(latent, int) or latent <= 0:
        return 1024 if family == "sdxl" else 512
    levels = getattr(getattr(getattr(sd_model, "first_stage_model", None), "encoder", None), "num_resolutions", 4)
    return latent * 2 ** (int(levels) - 1)


def checkpoint_units(unet: Any) -> list[torch.nn.Module]:
    """The ldm/sgm UNet's residual blocks and transformer blocks, each checkpointed on its own: a backward then
    recomputes one layer at a time, not a whole input/output block (a block of SDXL holds up to 10 transformer
    layers)."""
    units: list[torch.nn.Module] = []
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block if isinstance(block, torch.nn.Sequential) else [block]:
            transformer_blocks = getattr(layer, "transformer_blocks", None)
            if transformer_blocks is not None:  # SpatialTransformer
                units.extend(transformer_blocks)
            elif hasattr(layer, "emb_layers"):  # ResBlock (it takes the timestep embedding)
                units.append(layer)
    return units


def carrying(embedding: Any, embedding_class: Any, trigger: str, vectors: dict[str, torch.Tensor]) -> Any:
    """``embedding`` (a new one of ``embedding_class`` if it is for another word) carrying ``vectors``: one tensor,
    or SDXL's dict of both encoders' (the hosts' embedding format)."""
    vec: Any = dict(vectors) if len(vectors) > 1 else next(iter(vectors.values()))
    if embedding is None or embedding.name != trigger:
        embedding = embedding_class(vec, trigger)
    embedding.vec = vec
    embedding.vectors = next(iter(vectors.values())).shape[0]
    embedding.shape = sum(v.shape[-1] for v in vectors.values())
    return embedding


def published(embedding: Any, step: int, path: str, sha256: str, model_hash: str | None, model_name: str) -> Any:
    """``embedding`` with what the host shows of a finished file: step, file, checkpoint and hash."""
    embedding.step = step
    embedding.filename = path
    embedding.sd_checkpoint = model_hash
    embedding.sd_checkpoint_name = model_name
    embedding.cached_checksum = None
    if hasattr(embedding, "set_hash"):
        embedding.set_hash(sha256)
    else:
        embedding.hash, embedding.shorthash = sha256, sha256[:12]
    return embedding


class A1111Host:
    """Presents ``shared.sd_model`` to the training core (see ``embedding_trainer.host.Host``)."""

    def __init__(
        self, sd_model: Any, embedding_db: Any, embedding_class: Any, lowvram: Any = None, attention: Any = None
    ):
        self.sd_model = sd_model
        self.embedding_db = embedding_db
        self.embedding_class = embedding_class
        self.lowvram = lowvram  # modules.lowvram: --medvram/--lowvram swap modules between RAM and the GPU
        self.attention = attention  # modules.sd_hijack: the host's cross-attention implementations
        self.family: ModelFamily = model_family(sd_model)
        unet = sd_model.model.diffusion_model
        # The model object's device, not the UNet's: --medvram may have parked the UNet in RAM just now.
        self.device = torch.device(getattr(sd_model, "device", None) or next(unet.parameters()).device)
        self.unet_dtype = next(unet.parameters()).dtype
        self.prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        keys = ("clip_l", "clip_g") if self.family == "sdxl" else ("clip_h" if self.family == "sd2" else "clip_l",)
        self._text_embedders = dict(zip(keys, self._find_text_embedders()))
        self.encoders = tuple(
            EncoderInfo(key, int(embedder.encode_embedding_init_text(",", 1).shape[-1]))
            for key, embedder in self._text_embedders.items()
        )
        self.default_resolution = native_resolution(sd_model, self.family)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "model_name", "") or ""
        self.model_hash = getattr(info, "shorthash", None)
        # fp16 weights need a grad scaler; fp32 weights (--no-half) train in fp32.
        self.preferred_precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.unet_dtype, "fp32")
        self.embedding: Any = None  # the live Embedding registered under the trigger word
        self.input_memory_format = torch.contiguous_format  # the UNet inputs' layout: channels-last with its weights

    def _find_text_embedders(self) -> list[Any]:
        if self.family == "sdxl":
            found = [e for e in self.sd_model.conditioner.embedders if hasattr(e, "encode_embedding_init_text")]
            if len(found) != 2:
                raise HostError(f"expected SDXL's two text embedders (CLIP-L, OpenCLIP-G); found {len(found)}")
            return found
        return [self.sd_model.cond_stage_model]

    # -- Host interface ----------------------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        # The working alphas_cumprod may be fp16 or rescaled by a setting; the original is the training schedule.
        alphas = getattr(self.sd_model, "alphas_cumprod_original", None)
        if alphas is None:
            alphas = self.sd_model.alphas_cumprod
        return torch.as_tensor(alphas).detach().to("cpu", torch.float64)

    def token_embeddings(self, encoder_key: str, text: str) -> torch.Tensor:
        rows = self._text_embedders[encoder_key].encode_embedding_init_text(text, 75)
        return rows.detach().to("cpu", torch.float32).reshape(-1, rows.shape[-1]).clone()

    @torch.no_grad()
    def encoder_output(self, encoder_key: str, text: str) -> torch.Tensor:
        # The host's own encode step (its CLIP-skip and SDXL layer settings), on one start/end-framed chunk.
        embedder = self._text_embedders[encoder_key]
        ids = list(embedder.tokenize([text])[0])[:75]
        tokens = [embedder.id_start, *ids, embedder.id_end]
        tokens += [embedder.id_pad] * (77 - len(tokens))
        device = next(embedder.parameters()).device  # --medvram may keep the text encoder in RAM
        z = embedder.encode_with_transformers(torch.asarray([tokens], device=device))
        return z[0, 1 : 1 + len(ids)].detach().to("cpu", torch.float32).clone()

    def vocabulary(self, encoder_key: str) -> torch.Tensor:
        embedder = self._text_embedders[encoder_key]
        wrapped = embedder.wrapped
        if hasattr(wrapped, "transformer"):  # OpenAI CLIP (transformers CLIPTextModel)
            layer = wrapped.transformer.text_model.embeddings.token_embedding
        else:  # OpenCLIP
            layer = wrapped.model.token_embedding
        return getattr(layer, "wrapped", layer).weight.detach()

    def known_token_count(self, text: str) -> int:
        return len(self._text_embedders[self.encoders[0].key].tokenize([text])[0])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.vae_on_device() as vae:
            dtype = next(vae.parameters()).dtype
            mean, std = self._vae_moments(vae, pixels.to(self.device, dtype))
            if dtype != torch.float32 and not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                # The SDXL VAE overflows in fp16 unless it is the fp16-fix VAE: encode in fp32 once, then restore.
                vae.float()
                try:
                    mean, std = self._vae_moments(vae, pixels.to(self.device, torch.float32))
                finally:
                    vae.to(dtype)
        scale = float(self.sd_model.scale_factor)
        return (mean * scale).float(), (std * scale).float()

    @staticmethod
    def _vae_moments(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ldm's AutoencoderKL and sgm's inference wrapper share encoder + quant_conv -> (mean, logvar); calling
        # them directly gives the deterministic mean (sgm's encode() would sample) with autocast left to the caller.
        moments = vae.quant_conv(vae.encoder(pixels))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))

    @contextlib.contextmanager
    def vae_on_device(self) -> Iterator[Any]:
        """The VAE on the compute device for a moment, wherever it was parked (RAM under --medvram or after
        ``offload_image_encoder``); it goes back afterwards. Encoding calls the VAE's submodules directly, which
        --medvram's hooks (on ``encode``/``decode``/``forward``) would not see."""
        vae = self.sd_model.first_stage_model
        where = next(vae.parameters()).device
        if where == self.device:
            yield vae
            return
        vae.to(self.device)
        try:
            yield vae
        finally:
            vae.to(where)

    def offload_image_encoder(self) -> None:
        self.sd_model.first_stage_model.to("cpu")

    def _live_embedding(self, trigger: str, vectors: dict[str, torch.Tensor]) -> Any:
        """The registered Embedding for ``trigger`` carrying ``vectors`` (the core's trainable leaves)."""
        self.embedding = embedding = carrying(self.embedding, self.embedding_class, trigger, vectors)
        # Re-register if the database lost it (a forced reload replaces every Embedding object).
        if self.embedding_db.word_embeddings.get(trigger) is not embedding:
            self.embedding_db.register_embedding(embedding, self.sd_model)
        return embedding

    def encode_prompts(
        self, prompts: list[str], trigger: str, vectors: dict[str, torch.Tensor], images: list[ImageInfo]
    ) -> Any:
        self._live_embedding(trigger, vectors)
        if self.family != "sdxl":
            return self.sd_model.cond_stage_model(prompts)

        # Real size and crop of each training image, not the single size a generation uses.
        def sizes(pick: Any) -> torch.Tensor:
            return torch.tensor([list(pick(im)) for im in images], device=self.device, dtype=self.unet_dtype)

        batch = {
            "txt": list(prompts),
            "original_size_as_tuple": sizes(lambda im: im.original_size),
            "crop_coords_top_left": sizes(lambda im: im.crop_top_left),
            "target_size_as_tuple": sizes(lambda im: im.target_size),
            "aesthetic_score": torch.full((len(prompts), 1), 6.0, device=self.device, dtype=self.unet_dtype),
        }
        return self.sd_model.conditioner(batch)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        latents = noisy_latents.to(self.unet_dtype).contiguous(memory_format=self.input_memory_format)
        return self.sd_model.apply_model(latents, timesteps.to(self.device), conditioning)

    @contextlib.contextmanager
    def training_session(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        """Freeze every weight, make SDXL's text embedders pass gradients, optionally checkpoint UNet blocks."""
        sd_model = self.sd_model
        unet = sd_model.model.diffusion_model
        blocks = checkpoint_units(unet) if gradient_checkpointing else []
        embedders = list(self._text_embedders.values()) if self.family == "sdxl" else []
        trainable = [getattr(e, "is_trainable", False) for e in embedders]
        try:
            # Without is_trainable, sgm's conditioner runs the embedders under no_grad: backward still succeeds
            # but the vectors get no gradient (the core's first-step check would stop the run).
            for embedder in embedders:
                embedder.is_trainable = True
            with (
                frozen(sd_model),
                self._resident_for_training(),
                self._vae_returns(),
                self._attention_for_training(),
                channels_last_on_cpu(unet, self.device) as channels_last,
                checkpointed(blocks),
            ):
                self.input_memory_format = torch.channels_last if channels_last else torch.contiguous_format
                yield
        finally:
            self.input_memory_format = torch.contiguous_format
            for embedder, flag in zip(embedders, trainable):
                embedder.is_trainable = flag

    @contextlib.contextmanager
    def _attention_for_training(self) -> Iterator[None]:
        """The host's SDP attention for the run when its current pick is a chunked one (``SPLIT_ATTENTION``);
        xformers, SDP and a user's "None" stay. The host's pick comes back afterwards."""
        hijack = self.attention
        current = getattr(hijack, "current_optimizer", None)
        if current is None or getattr(current, "name", None) not in SPLIT_ATTENTION:
            yield
            return
        sdp = next((o for o in getattr(hijack, "optimizers", []) if o.name == "sdp" and o.is_available()), None)
        if sdp is None:
            yield
            return
        logger.info("training with the WebUI's %s attention instead of %s (faster backward)", sdp.name, current.name)
        hijack.apply_optimizations(sdp.title())
        try:
            yield
        finally:
            hijack.apply_optimizations(current.title())

    @contextlib.contextmanager
    def _vae_returns(self) -> Iterator[None]:
        """The VAE ends the run where it started (``offload_image_encoder`` and previews move it)."""
        vae = self.sd_model.first_stage_model
        where = next(vae.parameters()).device
        try:
            yield
        finally:
            if next(vae.parameters()).device != where:
                vae.to(where)

    @contextlib.contextmanager
    def _resident_for_training(self) -> Iterator[None]:
        """Under --medvram/--lowvram, the text encoders and the UNet on the device together for the run.

        Those modes keep one big module on the GPU and swap modules in forward pre-hooks. Backward runs through
        the text encoder after the UNet's forward, so a swap between them would leave saved activations and weights
        on different devices. For the run the hooks are lifted and both stay on the device; afterwards every
        tensor goes back to where it was and the hooks return. The VAE comes in only to encode
        (``vae_on_device``) or to decode a preview.
        """
        sd_model = self.sd_model
        if not getattr(sd_model, "lowvram", False):
            yield
            return
        text = sd_model.conditioner if self.family == "sdxl" else sd_model.cond_stage_model
        residents = (sd_model.model, text)
        if self.lowvram is not None:
            self.lowvram.send_everything_to_cpu()  # its bookkeeping must not point at a module we move
        # Per tensor: --lowvram keeps a few small UNet parts on the GPU for good, next to the swapped blocks.
        placement = [(t, t.device) for part in residents for t in (*part.parameters(), *part.buffers())]
        lifted = [
            (module, key, hook)
            for part in residents
            for module in part.modules()
            for key, hook in list(module._forward_pre_hooks.items())
            if getattr(hook, "__name__", "") == LOWVRAM_HOOK
        ]
        try:
            for module, key, _ in lifted:
                del module._forward_pre_hooks[key]
            for part in residents:
                part.to(self.device)
            yield
        finally:
            for tensor, device in placement:
                tensor.data = tensor.data.to(device)
            for module, key, hook in lifted:
                module._forward_pre_hooks[key] = hook
            if self.lowvram is not None:
                self.lowvram.send_everything_to_cpu()  # a preview's decode may have left the VAE marked as loaded

    # -- after a run ---------------------------------------------------------------------------------------
    def publish(self, trigger: str, vectors: dict[str, torch.Tensor], step: int, path: str, sha256: str) -> Any:
        """Register the finished embedding (final vectors, file name, hash) so txt2img uses and credits it."""
        final = {k: v.detach().to(self.device, torch.float32) for k, v in vectors.items()}
        embedding = self._live_embedding(trigger, final)
        return published(embedding, step, path, sha256, self.model_hash, self.model_name)

    def reload_embeddings(self) -> None:
        """The embedding database from the embeddings folders again: the files on disk are the truth."""
        self.embedding_db.load_textual_inversion_embeddings(force_reload=True)
