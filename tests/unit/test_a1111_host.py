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


class ResBlock(nn.Module):
    """Shaped like ldm's: it takes the timestep embedding (``emb_layers``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb_layers = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SpatialTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x)
        return x


class UNet(nn.Module):
    in_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1))])
        self.middle_block = nn.Sequential(ResBlock(), SpatialTransformer())
        self.output_blocks = nn.ModuleList([nn.Sequential(ResBlock(), nn.Conv2d(4, 4, 1))])

    def checkpointed_layers(self) -> list[nn.Module]:
        """What a run checkpoints, each on its own: residual blocks and transformer blocks."""
        return [self.middle_block[0], *self.middle_block[1].transformer_blocks, self.output_blocks[0][0]]


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
            assert all("forward" in layer.__dict__ for layer in unet.checkpointed_layers())
            assert "forward" not in unet.input_blocks[0][0].__dict__  # a plain convolution is not
            # --medvram's swapping is lifted: the UNet and the text encoders stay on the device together.
            assert not any(hooks(m) for m in model.modules() if m is not model.first_stage_model)
            unet.middle_block(torch.zeros(1, 4, 2, 2))
            assert model.swaps == []
            host.offload_image_encoder()
            raise RuntimeError("the core failed")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(e.is_trainable for e in embedders)
    assert not any("forward" in layer.__dict__ for layer in unet.checkpointed_layers())
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


def test_the_default_resolution_is_the_checkpoints_own():
    """ldm configs give the latent size (64 for SD1, 96 for SD2-768, 8 for a 64 px toy model); the ldm VAE encoder's
    levels give the factor; SDXL has no such field and is a 1024 px model."""
    model = Model("sd1")
    assert host_for(model).default_resolution == 512  # no image_size: the family's usual
    model.first_stage_model.encoder.num_resolutions = 4  # 8x downsampling
    for latent, pixels in ((8, 64), (64, 512), (96, 768)):
        model.image_size = latent
        assert host_for(model).default_resolution == pixels
    assert host_for(Model("sdxl")).default_resolution == 1024


class Optimizer:
    """Shaped like the host's ``SdOptimization``: a name, a title, availability."""

    def __init__(self, name: str, label: str | None = None):
        self.name, self.label = name, label

    def title(self) -> str:
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self) -> bool:
        return True


class Attention:
    """Shaped like ``modules.sd_hijack``: the implementations, the current one, and the function that switches."""

    def __init__(self, current: str | None):
        self.optimizers = [
            Optimizer("sdp-no-mem", "no mem"),
            Optimizer("sdp", "scaled dot product"),
            Optimizer("InvokeAI"),
            Optimizer("xformers"),
        ]
        self.current_optimizer = next((o for o in self.optimizers if o.name == current), None)
        self.applied: list[str] = []

    def apply_optimizations(self, option: str) -> str:
        self.applied.append(option)
        self.current_optimizer = next(o for o in self.optimizers if o.title() == option)
        return self.current_optimizer.name


def test_a_run_trains_with_sdp_attention_instead_of_a_chunked_one_and_gives_it_back():
    attention = Attention("InvokeAI")  # the host's automatic pick on the CPU
    host = A1111Host(Model("sd1"), embedding_db=None, embedding_class=None, attention=attention)
    with pytest.raises(RuntimeError, match="the core failed"):
        with host.training_session():
            assert attention.current_optimizer.name == "sdp"
            raise RuntimeError("the core failed")
    assert attention.applied == ["sdp - scaled dot product", "InvokeAI"]
    for kept in ("xformers", "sdp-no-mem", None):  # fast backward already, or the user's "None"
        attention = Attention(kept)
        with A1111Host(Model("sd1"), None, None, attention=attention).training_session():
            pass
        assert attention.applied == []
