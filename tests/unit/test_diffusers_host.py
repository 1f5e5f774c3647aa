"""The diffusers host for SD1, SD2 (v-prediction) and SDXL: splicing, gradients, sessions, loading from disk."""

from __future__ import annotations

import pytest
import torch

from embedding_trainer.errors import HostError
from embedding_trainer.host import ImageInfo
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.tools.tiny_models import TINY_WIDTHS, build_tiny_components

pytestmark = pytest.mark.compat

SIZE = ImageInfo(original_size=(80, 64), crop_top_left=(8, 0), target_size=(64, 64))


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def host(request) -> DiffusersHost:
    return DiffusersHost.from_components(build_tiny_components(request.param, seed=0))


def leaves(host: DiffusersHost, n: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {e.key: torch.randn(n, e.width, generator=generator).requires_grad_(True) for e in host.encoders}


def loss_and_grads(host: DiffusersHost, checkpointing: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    vectors = leaves(host)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with host.training_session(checkpointing):
        cond = host.encode_prompts(["a photo of my-cat", "my-cat on a table"], "my-cat", vectors, [SIZE, SIZE])
        out = host.predict(latents, torch.tensor([10, 700]), cond)
        loss = out.pow(2).mean()
        loss.backward()
    return float(loss.detach()), {k: v.grad for k, v in vectors.items()}


def test_encoders_and_prediction_type(host):
    assert {e.key: e.width for e in host.encoders} == TINY_WIDTHS[host.family]
    assert host.prediction_type == ("v_prediction" if host.family == "sd2" else "epsilon")
    assert host.alphas_cumprod().shape == (1000,) and host.alphas_cumprod().dtype == torch.float64
    assert host.default_resolution == 64


def test_every_vector_gets_a_finite_nonzero_gradient_and_no_weight_does(host):
    _, grads = loss_and_grads(host)
    for key, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key
        assert (grad.abs().sum(dim=1) > 0).all(), f"each of the {key} vectors must get a gradient"
    for model in (host.unet, *host.text_encoders):
        assert all(p.grad is None for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(host):
    loss_a, grads_a = loss_and_grads(host, checkpointing=False)
    loss_b, grads_b = loss_and_grads(host, checkpointing=True)
    assert loss_a == loss_b
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-5, atol=1e-8)
    # Each resnet and transformer block is checkpointed on its own (a backward recomputes one layer at a time).
    units = [*host.unet.mid_block.resnets, *host.unet.mid_block.attentions[0].transformer_blocks]
    with host.training_session(True):
        assert all("forward" in unit.__dict__ for unit in units)
    assert not any("forward" in unit.__dict__ for unit in units)  # the wrappers are removed afterwards


def test_session_restores_flags_and_modes(host):
    host.unet.train()
    flags = [p.requires_grad for p in host.unet.parameters()]
    with host.training_session(True):
        assert not any(p.requires_grad for p in host.unet.parameters())
        assert not host.unet.training
    assert host.unet.training and [p.requires_grad for p in host.unet.parameters()] == flags
    host.unet.eval()


def test_the_vectors_replace_exactly_the_trigger_positions(host):
    tokenized = host._tokenize("a My-Cat and my-cat, not my-cats", "my-cat", 2, 0)
    tokenizer = host.tokenizers[0]
    assert tokenized.slots == (2, 3, 5, 6)  # <start> a [v0 v1] and [v0 v1] ...: case-insensitive, whole words
    assert len(tokenized.ids) == 77 and tokenized.ids[0] == tokenizer.bos_token_id
    decoded = tokenizer.decode(
        [i for i in tokenized.ids[7:] if i not in (tokenizer.pad_token_id, tokenizer.eos_token_id)]
    )
    assert decoded.strip() == ", not my - cats"


def test_vectors_change_the_conditioning_only_where_spliced(host):
    a, b = leaves(host), leaves(host)
    for value in b.values():
        value.data[1] += 1.0
    with torch.no_grad():
        cond_a = host.encode_prompts(["a photo of my-cat"], "my-cat", a, [SIZE])
        cond_b = host.encode_prompts(["a photo of my-cat"], "my-cat", b, [SIZE])
        plain = host.encode_prompts(["a photo of a dog"], "my-cat", a, [SIZE])
    # Causal text encoders: positions before the trigger are unaffected, positions after it change.
    assert torch.equal(cond_a.hidden_states[:, :4], cond_b.hidden_states[:, :4])
    assert not torch.equal(cond_a.hidden_states[:, 5:], cond_b.hidden_states[:, 5:])
    assert not torch.equal(cond_a.hidden_states, plain.hidden_states)


def test_sdxl_size_conditioning_comes_from_each_image(host):
    if host.family != "sdxl":
        pytest.skip("size conditioning is SDXL's")
    other = ImageInfo((1024, 768), (0, 32), (64, 64))
    with torch.no_grad():
        cond = host.encode_prompts(["my-cat", "my-cat"], "my-cat", leaves(host), [SIZE, other])
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[80, 64, 8, 0, 64, 64], [1024, 768, 0, 32, 64, 64]]
    assert cond.hidden_states.shape == (2, 77, 32 + 64) and cond.added_cond_kwargs["text_embeds"].shape == (2, 64)


def test_a_prompt_too_long_for_the_vectors_is_refused(host):
    long_prompt = " ".join(["word"] * 74) + " my-cat"
    with pytest.raises(HostError, match="too long"):
        host.encode_prompts([long_prompt], "my-cat", leaves(host, 3), [SIZE])


def test_load_from_a_diffusers_folder(tiny_model_dirs):
    for family in ("sd1", "sd2", "sdxl"):
        loaded = DiffusersHost.from_pretrained(tiny_model_dirs(family))
        assert loaded.family == family and loaded.model_name == family
        built = build_tiny_components(family, seed=0)
        assert torch.equal(
            loaded.vocabulary(loaded.encoders[0].key), built.text_encoders[0].get_input_embeddings().weight
        )


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(HostError, match="no model_index.json"):
        DiffusersHost.from_pretrained(tmp_path)
