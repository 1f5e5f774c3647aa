"""Our embedding files load with diffusers' own ``load_textual_inversion``, and our splicing equals its result.

Each test loads a file we wrote into a tiny pipeline the way diffusers documents it, then checks (1) the rows
diffusers added to the text encoder's token table are bit-identical to our vectors, (2) the trigger tokenises
to the added token ids (``my-cat``, ``my-cat_1``, ...), and (3) the hidden states diffusers computes for prompts
with the trigger equal the ones ``DiffusersHost.encode_prompts`` computes by splicing the vectors in, which is
what training optimises. So an embedding trained here means the same thing in a diffusers pipeline.

The full-pipeline tests need diffusers' pipeline classes, which diffusers 0.35.2 cannot import next to
transformers 4.30.2 (it wants ``SiglipImageProcessor``); the loader-mixin test runs in both environments.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from embedding_trainer.embedding_file import EmbeddingData, save_embedding
from embedding_trainer.host import ImageInfo
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.tools.tiny_models import TINY_WIDTHS, build_tiny_components

VOCAB = 49408  # CLIP's vocabulary: tokens diffusers adds get ids from here on
BOS, EOS = 49406, 49407
A_PHOTO_OF = [320, 1125, 539]  # CLIP's ids for "a photo of"
PROMPTS = ["a photo of my-cat", "my-cat on a sofa, next to my-cat", "a plain photo of a sofa"]
SIZE = ImageInfo(original_size=(64, 64), crop_top_left=(0, 0), target_size=(64, 64))


@pytest.fixture(scope="module")
def components() -> Any:
    built: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in built:
            built[family] = build_tiny_components(family, seed=0)
        return built[family]

    return get


def fresh_text_parts(c: Any) -> tuple[list[Any], list[Any]]:
    """Copies of the text encoders and tokenizers: load_textual_inversion grows them in place."""
    encoders = [copy.deepcopy(e) for e in c.text_encoders]
    tokenizers = [copy.deepcopy(t) for t in c.tokenizers]
    assert all(t.model_max_length == 77 for t in tokenizers)  # diffusers pads and truncates to it
    return encoders, tokenizers


def make_vectors(family: str, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(n, width, generator=g) * 0.5 for key, width in TINY_WIDTHS[family].items()}


def perturbed(vectors: torch.Tensor, seed: int = 99) -> torch.Tensor:
    # A random change: a constant shift of every channel would vanish in CLIP's pre-layer-norm residual stream.
    return vectors + torch.randn(vectors.shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def our_encoding(c: Any, vectors: dict[str, torch.Tensor], prompts: list[str]) -> Any:
    host = DiffusersHost.from_components(c)
    with torch.no_grad():
        return host.encode_prompts(prompts, "my-cat", vectors, [SIZE] * len(prompts))


def import_pipelines() -> tuple[Any, Any]:
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    except (ImportError, RuntimeError) as error:  # diffusers 0.35.2 + transformers 4.30.2
        pytest.skip(f"diffusers' pipeline classes cannot be imported here: {str(error).splitlines()[0]}")
    return StableDiffusionPipeline, StableDiffusionXLPipeline


def check_added_rows(encoder: Any, tokenizer: Any, vectors: torch.Tensor) -> None:
    n = vectors.shape[0]
    names = ["my-cat"] + [f"my-cat_{i}" for i in range(1, n)]
    ids = tokenizer.convert_tokens_to_ids(names)
    assert ids == list(range(VOCAB, VOCAB + n))
    table = encoder.get_input_embeddings().weight.detach()
    assert table.shape == (VOCAB + n, vectors.shape[1])
    assert table.dtype == torch.float32
    assert torch.equal(table[VOCAB : VOCAB + n], vectors)  # bit-identical


def check_prompt_tokens(pipe: Any, tokenizer: Any, n: int) -> None:
    converted = pipe.maybe_convert_prompt("a photo of my-cat", tokenizer)
    assert converted == "a photo of " + " ".join(["my-cat"] + [f"my-cat_{i}" for i in range(1, n)])
    ids = tokenizer(converted).input_ids
    assert ids == [BOS, *A_PHOTO_OF, *range(VOCAB, VOCAB + n), EOS]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Full pipelines


def sd1_pipeline(c: Any) -> Any:
    StableDiffusionPipeline, _ = import_pipelines()
    encoders, tokenizers = fresh_text_parts(c)
    return StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        unet=c.unet,
        scheduler=c.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd1_prompt_embeds(pipe: Any, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(
            prompts, torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert negative is None
    return embeds


def test_sd1_safetensors_with_two_vectors_loads_into_the_pipeline(components: Any, tmp_path: Path) -> None:
    c = components("sd1")
    vectors = make_vectors("sd1", 2)
    path = save_embedding(EmbeddingData("my-cat", vectors, step=7), tmp_path / "my-cat.safetensors")
    assert set(load_file(str(path))) == {"emb_params"}
    pipe = sd1_pipeline(c)

    pipe.load_textual_inversion(str(path), token="my-cat")

    check_added_rows(pipe.text_encoder, pipe.tokenizer, vectors["clip_l"])
    check_prompt_tokens(pipe, pipe.tokenizer, 2)
    theirs = sd1_prompt_embeds(pipe, PROMPTS)
    ours = our_encoding(c, vectors, PROMPTS).hidden_states
    assert_same(ours, theirs)
    # The comparison is sensitive to the vectors: other vectors give clearly different states for trigger prompts.
    other = our_encoding(c, {"clip_l": perturbed(vectors["clip_l"])}, PROMPTS).hidden_states
    assert (other[:2] - theirs[:2]).abs().max() > 1e-2
    assert torch.equal(other[2], ours[2])  # the prompt without the trigger does not depend on them


def test_sd1_pt_layout_loads_under_its_stored_name(components: Any, tmp_path: Path) -> None:
    c = components("sd1")
    vectors = make_vectors("sd1", 1, seed=2)
    # The file name differs from the trigger: without token=..., diffusers takes the .pt dict's "name".
    path = save_embedding(EmbeddingData("my-cat", vectors, step=3), tmp_path / "exported.pt")
    pipe = sd1_pipeline(c)

    pipe.load_textual_inversion(str(path))

    assert pipe.tokenizer.convert_tokens_to_ids("my-cat") == VOCAB
    assert "my-cat_1" not in pipe.tokenizer.get_vocab()
    check_added_rows(pipe.text_encoder, pipe.tokenizer, vectors["clip_l"])
    check_prompt_tokens(pipe, pipe.tokenizer, 1)
    assert_same(our_encoding(c, vectors, PROMPTS).hidden_states, sd1_prompt_embeds(pipe, PROMPTS))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sdxl_file_loads_per_encoder_as_diffusers_documents(components: Any, tmp_path: Path, suffix: str) -> None:
    _, StableDiffusionXLPipeline = import_pipelines()
    c = components("sdxl")
    vectors = make_vectors("sdxl", 3, seed=3)
    path = save_embedding(EmbeddingData("my-cat", vectors), tmp_path / f"my-cat{suffix}")
    encoders, tokenizers = fresh_text_parts(c)
    pipe = StableDiffusionXLPipeline(
        vae=c.vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=c.unet,
        scheduler=c.scheduler,
    )

    # diffusers' documented recipe for SDXL embeddings: one call per text encoder.
    state_dict = read_state_dict(path)
    assert set(state_dict) == {"clip_l", "clip_g"}
    pipe.load_textual_inversion(
        state_dict["clip_g"], token="my-cat", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    pipe.load_textual_inversion(
        state_dict["clip_l"], token="my-cat", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )

    check_added_rows(pipe.text_encoder, pipe.tokenizer, vectors["clip_l"])
    check_added_rows(pipe.text_encoder_2, pipe.tokenizer_2, vectors["clip_g"])
    check_prompt_tokens(pipe, pipe.tokenizer, 3)
    check_prompt_tokens(pipe, pipe.tokenizer_2, 3)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    ours = our_encoding(c, vectors, PROMPTS)
    assert embeds.shape == (3, 77, 32 + 64)
    assert_same(ours.hidden_states, embeds)
    assert pooled.shape == (3, 64)
    assert_same(ours.added_cond_kwargs["text_embeds"], pooled)
    # Both halves matter: changing clip_l changes only the first 32 channels, clip_g the rest and the pooled output.
    moved_l = our_encoding(c, {**vectors, "clip_l": perturbed(vectors["clip_l"])}, PROMPTS)
    assert (moved_l.hidden_states[:2, :, :32] - embeds[:2, :, :32]).abs().max() > 1e-2
    assert torch.equal(moved_l.hidden_states[..., 32:], ours.hidden_states[..., 32:])
    moved_g = our_encoding(c, {**vectors, "clip_g": perturbed(vectors["clip_g"])}, PROMPTS)
    assert (moved_g.added_cond_kwargs["text_embeds"][:2] - pooled[:2]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# The loader mixin alone (also on the WebUI's transformers 4.30.2)


def loader_only(encoder: Any, tokenizer: Any) -> Any:
    from diffusers import DiffusionPipeline
    from diffusers.loaders import TextualInversionLoaderMixin

    class LoaderOnly(DiffusionPipeline, TextualInversionLoaderMixin):
        def __init__(self, text_encoder: Any, tokenizer: Any):
            super().__init__()
            self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)

    return LoaderOnly(encoder, tokenizer)


@pytest.mark.compat
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loader_mixin_matches_our_splicing(components: Any, tmp_path: Path, family: str) -> None:
    c = components(family)
    vectors = make_vectors(family, 2, seed=4)
    path = save_embedding(EmbeddingData("my-cat", vectors), tmp_path / "my-cat.safetensors")
    state_dict = load_file(str(path))
    encoders, tokenizers = fresh_text_parts(c)
    keys = list(TINY_WIDTHS[family])
    hidden, pooled = [], None
    for key, encoder, tokenizer in zip(keys, encoders, tokenizers, strict=True):
        pipe = loader_only(encoder, tokenizer)
        if family == "sdxl":
            pipe.load_textual_inversion(state_dict[key], token="my-cat")
        else:
            pipe.load_textual_inversion(str(path), token="my-cat")
        check_added_rows(encoder, tokenizer, vectors[key])
        check_prompt_tokens(pipe, tokenizer, 2)
        # What diffusers' encode_prompt does: convert the prompt, pad to 77, run the encoder.
        ids = tokenizer(
            pipe.maybe_convert_prompt(PROMPTS, tokenizer),
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if family == "sdxl" else out.last_hidden_state)
        if key == "clip_g":
            pooled = out.text_embeds
        # transformers >= 4.31 stores the end token id on the text model and pools there (unless it is the legacy 2).
        pools_at_eos = any(getattr(m, "eos_token_id", 2) != 2 for m in encoder.modules())
    ours = our_encoding(c, vectors, PROMPTS)
    assert_same(ours.hidden_states, torch.cat(hidden, dim=-1))
    if family == "sdxl":
        # transformers < 4.31 pools at argmax(input_ids), which is an added token once diffusers has added some,
        # not the end token; we (like the WebUI) pool at the end token. Compare all prompts where transformers
        # pools at the end token too, and otherwise the prompt without the trigger.
        rows = slice(None) if pools_at_eos else slice(2, 3)
        assert_same(ours.added_cond_kwargs["text_embeds"][rows], pooled[rows])
