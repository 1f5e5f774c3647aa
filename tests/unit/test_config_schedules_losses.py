"""The validated config, learning-rate schedules and the loss arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from embedding_trainer.config import TrainConfig
from embedding_trainer.errors import ConfigError
from embedding_trainer.losses import add_noise, denoising_loss, min_snr_weights, prediction_target
from embedding_trainer.schedules import learning_rate_at, parse_learning_rate

pytestmark = pytest.mark.compat


def test_from_dict_round_trips_and_accepts_a_numeric_learning_rate():
    config = TrainConfig.from_dict({"name": "my-cat", "images": "x", "learning_rate": 0.001, "max_steps": 5})
    assert config.learning_rate == "0.001"
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nmae": "x"}, "nmae: unknown field"),
        ({"max_steps": "10"}, "max_steps: '10' has type str; expected int"),
        ({"flip": 1}, "flip: 1 has type int; expected bool"),
        ({"crop": "middle"}, "crop: 'middle' is not allowed; choose one of: center, random"),
        ({"num_vectors": 76}, "num_vectors: 76 is above the maximum 75"),
        ({"resolution": 70}, "resolution: 70 is not a multiple of 8 .* try 64 or 72"),
        ({"name": "my cat"}, "name: 'my cat' is not a valid trigger word"),
        ({"tag_dropout": 1.5}, "tag_dropout: 1.5 is above the maximum 1.0"),
        ({"timestep_min": 500, "timestep_max": 100}, "timestep_min: 500 is above timestep_max 100"),
        ({"init_mode": "file"}, "init_file: init_mode is 'file' but no init_file is given"),
        ({"learning_rate": "0.01:100, 0.001", "lr_scheduler": "cosine"}, "lr_scheduler: 'cosine' cannot be combined"),
        ({"learning_rate": "fast"}, "learning_rate: 'fast' in 'fast' is not a number"),
        ({"grad_clip_value": 0.0}, "grad_clip_value: 0.0 must be greater than 0.0"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_piecewise_schedule_like_the_webui():
    schedule = parse_learning_rate("0.005:100, 1e-3:1000, 1e-5")
    rates = [learning_rate_at(s, schedule, "constant", 0, 2000) for s in (0, 99, 100, 999, 1000, 1999)]
    assert rates == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    with pytest.raises(ConfigError, match="must increase"):
        parse_learning_rate("0.01:100, 0.001:50, 0.0001")
    with pytest.raises(ConfigError, match="only the last piece"):
        parse_learning_rate("0.01, 0.001:50")


def test_warmup_linear_and_cosine():
    one = parse_learning_rate("0.01")
    assert learning_rate_at(0, one, "constant", 4, 100) == pytest.approx(0.002)
    assert learning_rate_at(4, one, "constant", 4, 100) == pytest.approx(0.01)
    assert learning_rate_at(0, one, "cosine", 0, 100) == pytest.approx(0.01)
    assert learning_rate_at(50, one, "cosine", 0, 100) == pytest.approx(0.005)
    assert learning_rate_at(100, one, "cosine", 0, 100) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_at(25, one, "linear", 0, 100) == pytest.approx(0.0075)


def test_noise_and_targets():
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0, 999])
    noisy = add_noise(x0, noise, t, alphas)
    a = alphas[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert torch.equal(prediction_target(x0, noise, t, alphas, "epsilon"), noise)
    v = prediction_target(x0, noise, t, alphas, "v_prediction")
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    # x0 can be recovered from x_t and v: sqrt(a) x_t - sqrt(1 - a) v = x0
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * v, x0, rtol=1e-4, atol=1e-5)


def test_min_snr_weights():
    alphas = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)  # snr 9, 1, 1/9
    t = torch.tensor([0, 1, 2])
    eps = min_snr_weights(t, alphas, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([5 / 9, 1.0, 1.0]))
    v = min_snr_weights(t, alphas, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([5 / 10, 0.5, (1 / 9) / (1 / 9 + 1)]))


def test_masked_loss_counts_only_the_weighted_area():
    prediction = torch.zeros(1, 4, 2, 2)
    target = torch.zeros(1, 4, 2, 2)
    target[..., 0, 0] = 2.0  # error 4 in the top-left pixel only
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(denoising_loss(prediction, target)) == pytest.approx(1.0)
    assert float(denoising_loss(prediction, target, mask)) == pytest.approx(4.0)
    assert float(denoising_loss(prediction, target, 1 - mask)) == pytest.approx(0.0)
    assert math.isclose(float(denoising_loss(prediction, target, weights=torch.tensor([0.5]))), 0.5)
