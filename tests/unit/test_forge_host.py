"""The Forge adapter's parts that stand without Forge: what it does to Forge's habits that stop gradients, and which
models it refuses. The adapter against the real Forge is in ``test_forge_integration.py`` (opt-in)."""

from __future__ import annotations

import types

import pytest
import torch

from embedding_trainer.errors import HostError
from embedding_trainer.hosts.forge import model_family, ordinary_tensors, out_of_place_forward


def test_inference_tensors_become_ordinary_frozen_ones_that_autograd_can_use() -> None:
    with torch.inference_mode():  # how Forge loads every model
        layer = torch.nn.Linear(3, 2)
        layer.register_buffer("scale", torch.ones(2))
    x = torch.ones(1, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        (layer(x) * layer.scale).sum().backward()
    assert ordinary_tensors(layer) == 3  # weight, bias, buffer
    assert not any(p.is_inference() or p.requires_grad for p in layer.parameters()) and not layer.scale.is_inference()
    (layer(x) * layer.scale).sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    assert ordinary_tensors(layer) == 0  # cheap to call again


class Block(torch.nn.Module):
    """Forge's transformer block adds in place onto a tensor its norm saved for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def _forward(self, x):
        n = self.norm(x) * 2
        x += n
        return self.norm(x)


def test_the_transformer_block_adds_out_of_place_for_the_run_and_is_restored() -> None:
    original = Block._forward
    block = Block()

    def gradient() -> torch.Tensor:
        leaf = torch.randn(2, 4, requires_grad=True)
        block(leaf * 1.0).sum().backward()
        return leaf.grad

    with pytest.raises(RuntimeError, match="inplace"):
        gradient()
    with out_of_place_forward(Block):
        assert Block._forward is not original
        assert torch.isfinite(gradient()).all()
    assert Block._forward is original


def forge_model(**flags: object) -> types.SimpleNamespace:
    info = types.SimpleNamespace(model_name="m")
    return types.SimpleNamespace(forge_objects=object(), sd_checkpoint_info=info, **flags)


def test_the_families_forge_loads_and_the_ones_it_refuses() -> None:
    assert model_family(forge_model(is_sd1=True)) == "sd1"
    assert model_family(forge_model(is_sd2=True)) == "sd2"
    assert model_family(forge_model(is_sdxl=True, text_processing_engine_l=object())) == "sdxl"
    with pytest.raises(HostError, match="refiner"):
        model_family(forge_model(is_sdxl=True))
    with pytest.raises(HostError, match="Flux"):
        model_family(forge_model())
    with pytest.raises(HostError, match="not loaded a model yet"):
        model_family(types.SimpleNamespace(forge_objects=None))


def test_the_tab_reads_forges_tokenizer_and_predictor() -> None:
    from embedding_trainer.hosts.forge import prediction_type, token_count

    engine = types.SimpleNamespace(tokenize=lambda texts: [[7] * len(texts[0].split("-"))])
    predictor = types.SimpleNamespace(prediction_type="v_prediction")
    unet = types.SimpleNamespace(model=types.SimpleNamespace(predictor=predictor))
    sd2 = types.SimpleNamespace(text_processing_engine=engine, forge_objects=types.SimpleNamespace(unet=unet))
    assert token_count(sd2, "my-new-cat") == 3 and prediction_type(sd2) == "v_prediction"
    sdxl = types.SimpleNamespace(text_processing_engine_l=engine)  # SDXL: the CLIP-L engine's tokenizer
    assert token_count(sdxl, "cat") == 1
