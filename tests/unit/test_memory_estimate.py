"""The GPU-less memory estimator (benchmarks/memory_estimate.py, over benchmarks/fake_cuda.py and
benchmarks/training_step.py) on tiny models: it runs, it counts what torch allocates, it emulates CUDA's autocast, and
gradient checkpointing lowers what it reports."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def me() -> Iterator[ModuleType]:
    """The benchmark as a module, with diffusers' cast warnings quiet."""
    from diffusers.utils import logging

    from benchmarks import memory_estimate

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    yield memory_estimate
    logging.set_verbosity(verbosity)


def test_weights_are_two_bytes_per_parameter_in_fp16(me: ModuleType):
    e = me.estimate("tiny-xl", steps=1)
    assert e.weight_bytes == (e.unet_params + e.text_params) * 2
    # The step starts with the weights (plus buffers, vectors and latents) and the peak is above that.
    assert e.weight_bytes <= e.start_bytes < e.peak_bytes


@pytest.mark.parametrize(
    ("model", "unet", "text_encoders"),
    [
        ("sd15", 859_520_964, [123_060_480]),
        ("sd21", 865_910_724, [340_387_840]),
        ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),
    ],
)
def test_published_configs_have_the_published_parameter_counts(
    me: ModuleType, model: str, unet: int, text_encoders: list[int]
):
    """benchmarks/archs.py's configs are the released models' (fake weights: nothing is allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.training_step import build

    built = build(model, torch.float16, FakeTensorMode(allow_non_fake_inputs=True))
    assert built.unet_params == unet
    assert [sum(p.numel() for p in e.parameters()) for e in built.host.text_encoders] == text_encoders
    assert built.vae_params == 83_653_863
    assert built.weight_bytes == (built.unet_params + built.text_params) * 2


def test_checkpointing_lowers_the_activation_peak(me: ModuleType):
    # 256 px: the activations outweigh the per-block recomputation that checkpointing adds back in backward.
    peaks = {mode: me.estimate("tiny", resolution=256, checkpointing=mode, steps=1) for mode in ("off", "on")}
    assert peaks["on"].activation_bytes < peaks["off"].activation_bytes
    assert peaks["on"].after_forward_bytes < peaks["off"].after_forward_bytes  # fewer tensors saved for backward
    assert peaks["on"].weight_bytes == peaks["off"].weight_bytes


def test_attention_never_materialises_the_score_matrix(me: ModuleType):
    e = me.estimate("tiny", resolution=256, steps=1)
    assert "_scaled_dot_product_flash_attention_for_cpu" in e.attention_ops
    assert not any("math" in op or "softmax" in op for op in e.attention_ops), e.attention_ops
    tokens = (256 // 8) ** 2
    assert e.largest_bytes < tokens * tokens * 2  # one head's fp16 score matrix would be bigger than any tensor


@pytest.mark.slow
def test_fake_and_real_tensors_give_the_same_peak(me: ModuleType):
    v = me.validate("tiny", 64, "on")
    assert v.fake_peak == v.real_peak
    assert v.fake_after_forward == v.real_after_forward
    # The CPU allocator sees everything the tracker sees plus kernels' scratch buffers (CPU flash attention's).
    assert v.tracker_rise <= v.allocator_rise <= 1.5 * v.tracker_rise


def test_emulated_autocast_matches_torchs_cuda_autocast(me: ModuleType):
    check = me.check_autocast_policy("tiny-xl")
    assert check.mismatches == []
    fp32 = {key.split("(")[0] for key, dtype in check.checked.items() if dtype == "torch.float32"}
    assert {"group_norm", "layer_norm", "interpolate"} <= fp32  # what CPU autocast would have left in fp16
    assert any(key.startswith("scaled_dot_product_attention(") for key in check.checked)


def test_the_policy_is_removed_on_exit():
    from benchmarks.fake_cuda import cuda_autocast_policy

    x = torch.randn(1, 8, 4, 4, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        with cuda_autocast_policy():
            assert torch.nn.functional.group_norm(x, 4).dtype == torch.float32
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.float16


def test_latent_caching_counts_the_fp32_vae_and_its_activations(me: ModuleType):
    from benchmarks.training_step import build

    one, four = (me.estimate_latent_caching("tiny", resolution=128, images=n) for n in (1, 4))
    built = build("tiny", torch.float16, None, with_vae=True)
    assert one.start_bytes >= built.weight_bytes + built.vae_params * 4  # the VAE is resident, in fp32
    assert one.start_bytes < one.peak_bytes < four.peak_bytes


@pytest.mark.slow
def test_command_line_prints_the_table(me: ModuleType, capsys: pytest.CaptureFixture[str]):
    assert me.main(["--tiny", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4  # tiny and tiny-xl, checkpointing off and on
    assert "peak GiB (step)" in out
