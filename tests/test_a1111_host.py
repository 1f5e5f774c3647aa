"""The A1111 host adapter's run-time changes to the loaded model, on a small model shaped like the host's (ldm
attribute names, --medvram's hooks), so every change can be seen being made and undone, also when the run raises.
The real host is exercised by the opt-in integration tier."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from embedding_trainer.errors import HostError
from embedding_trainer.hosts.a1111 import LOWVRAM_HOOK, A1111Host

pytestmark = pytest.mark.compat


class Recording(nn.Module):
    """Records the devices it is moved to."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[str] = []

    def to(self, *args: Any, **kwargs: Any) -> Any:
        self.moves.append(str(args[0]) if args else str(kwargs))
        return super().to(*args, **kwargs)


class UNet(nn.Module):
    in_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Conv2d(4, 4, 1)])
        self.middle_block = nn.Conv2d(4, 4, 1)
        self.output_blocks = nn.ModuleList([nn.Conv2d(4, 4, 1)])


class Wrapper(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = UNet()


class TextEmbedder(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Linear(8, 8)
        self.is_trainable = False

    def encode_embedding_init_text(self, text: str, n: int) -> torch.Tensor:
        return torch.zeros(1, 8)


class VAE(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 8, stride=8)
        self.quant_conv = nn.Conv2d(8, 8, 1)


class Conditioner(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.embedders = nn.ModuleList([TextEmbedder(), TextEmbedder()])


class Model(nn.Module):
    def __init__(self, family: str, lowvram: bool = False) -> None:
        super().__init__()
        self.is_sd1, self.is_sdxl = family == "sd1", family == "sdxl"
        self.model = Wrapper()
        self.first_stage_model = VAE()
        if self.is_sdxl:
            self.conditioner = Conditioner()
        else:
            self.cond_stage_model = TextEmbedder()
        self.scale_factor = 0.18215
        if lowvram:  # what modules/lowvram.py leaves on the model: a flag and hooks on the swapped modules
            self.lowvram = True

            def send_me_to_gpu(module: nn.Module, _: Any) -> None:
                self.swaps.append(module)

            assert send_me_to_gpu.__name__ == LOWVRAM_HOOK
            self.swaps: list[nn.Module] = []
            text = self.conditioner if self.is_sdxl else self.cond_stage_model.transformer
            for module in (self.model, text, *self.model.diffusion_model.input_blocks):
                module.register_forward_pre_hook(send_me_to_gpu)


class LowVram:
    def __init__(self) -> None:
        self.calls = 0

    def send_everything_to_cpu(self) -> None:
        self.calls += 1


def host_for(model: Model, lowvram: LowVram | None = None) -> A1111Host:
    return A1111Host(model, embedding_db=None, embedding_class=None, lowvram=lowvram)


def hooks(module: nn.Module) -> list[str]:
    return [getattr(h, "__name__", "") for h in module._forward_pre_hooks.values()]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_change_is_undone_when_the_run_raises(family):
    model, lowvram = Model(family, lowvram=True), LowVram()
    host = host_for(model, lowvram)
    flags = [p.requires_grad for p in model.parameters()]
    embedders = list(model.conditioner.embedders) if family == "sdxl" else []
    unet = model.model.diffusion_model
    with pytest.raises(RuntimeError, match="the core failed"):
        with host.training_session(gradient_checkpointing=True):
            assert not any(p.requires_grad for p in model.parameters())
            assert all(e.is_trainable for e in embedders)  # else SDXL's vectors get no gradient
            assert "forward" in unet.middle_block.__dict__  # checkpointed
            # --medvram's swapping is lifted: the UNet and the text encoders stay on the device together.
            assert not any(hooks(m) for m in model.modules() if m is not model.first_stage_model)
            unet.middle_block(torch.zeros(1, 4, 2, 2))
            assert model.swaps == []
            host.offload_image_encoder()
            raise RuntimeError("the core failed")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(e.is_trainable for e in embedders)
    assert "forward" not in unet.middle_block.__dict__
    assert hooks(model.model) == [LOWVRAM_HOOK] and hooks(unet.input_blocks[0]) == [LOWVRAM_HOOK]
    assert lowvram.calls == 2  # before (nothing marked as loaded) and after (a preview may have loaded the VAE)
    assert model.first_stage_model.moves == ["cpu"]  # offloaded (on this CPU-only machine it is already back)
    text = model.conditioner if family == "sdxl" else model.cond_stage_model
    assert model.model.moves == ["cpu"] and text.moves == ["cpu"]  # to the compute device for the run


def test_without_lowvram_nothing_is_moved():
    model = Model("sd1")
    with host_for(model).training_session():
        pass
    assert model.model.moves == [] and model.cond_stage_model.moves == [] and model.first_stage_model.moves == []


def test_encoding_brings_a_parked_vae_in_and_back(monkeypatch):
    model = Model("sd1")
    host = host_for(model)
    host.device = torch.device("meta")  # stands in for the GPU (the VAE sits in RAM, as under --medvram)
    vae = model.first_stage_model
    monkeypatch.setattr(vae, "to", lambda device: vae.moves.append(str(device)))  # record only: no GPU here
    with host.vae_on_device():
        assert vae.moves == ["meta"]
    assert vae.moves == ["meta", "cpu"]


def test_models_it_cannot_train_are_refused_by_name():
    model = Model("sd1")
    model.is_sd1 = False
    with pytest.raises(HostError, match="not an SD1.x, SD2.x or SDXL"):
        host_for(model)
