"""Noise, timesteps and loss weighting follow their formulas."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.train.loss import (
    LossOptions, compute_target, debiased_weight, diffusion_loss, min_snr_weight, snr,
)
from lora_trainer.train.noise import add_noise, pyramid_noise, sample_noise, sample_timesteps


def _ac():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return torch.cumprod(1 - betas, 0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noise_is_repeatable_from_the_generator():
    lat = torch.zeros(2, 4, 16, 16)
    a = sample_noise(lat, _gen(), 0.1, 6, 0.3)
    b = sample_noise(lat, _gen(), 0.1, 6, 0.3)
    c = sample_noise(lat, _gen(1), 0.1, 6, 0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_plain_noise_is_standard_normal():
    n = sample_noise(torch.zeros(8, 4, 32, 32), _gen())
    assert abs(n.mean()) < 0.02 and abs(n.std() - 1) < 0.02


def test_offset_noise_adds_a_per_channel_constant():
    lat = torch.zeros(4, 4, 32, 32)
    plain = sample_noise(lat, _gen())
    g = _gen()
    torch.randn(lat.shape, generator=g)  # same first draw as the plain noise
    expected_shift = 0.5 * torch.randn((4, 4, 1, 1), generator=g)
    shifted = sample_noise(lat, _gen(), noise_offset=0.5)
    assert torch.allclose(shifted - plain, expected_shift.expand_as(plain), atol=1e-6)


def test_pyramid_noise_formula_and_unit_std():
    g = _gen()
    base = torch.randn(2, 4, 32, 32, generator=g)
    g1, g2 = _gen(5), _gen(5)
    got = pyramid_noise(base.clone(), 3, 0.5, g1)
    expected = base.clone()
    for i in (1, 2, 3):
        low = torch.randn(2, 4, 32 // 2 ** i, 32 // 2 ** i, generator=g2)
        expected += torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear") * 0.5 ** i
    expected = expected / expected.std()
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.std() == pytest.approx(1.0, abs=1e-4)
    # low frequencies gain energy: neighbouring pixels correlate more than in white noise
    def corr(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]

    assert corr(got) > corr(base) + 0.05


def test_pyramid_noise_stops_at_one_pixel():
    out = pyramid_noise(torch.randn(1, 4, 4, 4), 10, 0.3, _gen())
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all()


def test_timesteps_range_and_validation():
    t = sample_timesteps(10000, 100, 200, _gen())
    assert t.dtype == torch.int64 and t.min() >= 100 and t.max() <= 199 and t.max() > 190
    assert torch.equal(sample_timesteps(5, 0, 1000, _gen()), sample_timesteps(5, 0, 1000, _gen()))
    with pytest.raises(ConfigError, match="min_timestep"):
        sample_timesteps(1, 500, 500)
    with pytest.raises(ConfigError, match="max_timestep"):
        sample_timesteps(1, 0, 1001)


def test_add_noise_formula():
    ac = _ac()
    lat, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    out = add_noise(lat, noise, t, ac)
    for i in range(3):
        a = ac[t[i]]
        assert torch.allclose(out[i], a.sqrt() * lat[i] + (1 - a).sqrt() * noise[i], atol=1e-6)


def test_targets():
    ac = _ac()
    lat, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(compute_target(lat, noise, t, ac, "epsilon"), noise)
    v = compute_target(lat, noise, t, ac, "v_prediction")
    for i in range(2):
        a = ac[t[i]]
        assert torch.allclose(v[i], a.sqrt() * noise[i] - (1 - a).sqrt() * lat[i], atol=1e-6)
    with pytest.raises(ConfigError, match="prediction_type"):
        compute_target(lat, noise, t, ac, "sample")


def test_snr_weights():
    s = torch.tensor([0.5, 5.0, 50.0, 1e6])
    assert torch.allclose(min_snr_weight(s, 5.0, False), torch.tensor([1.0, 1.0, 0.1, 5e-6]))
    assert torch.allclose(min_snr_weight(s, 5.0, True), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51, 5 / (1e6 + 1)]))
    assert torch.allclose(debiased_weight(s, False), torch.tensor([0.5 ** -0.5, 5 ** -0.5, 50 ** -0.5, 1000 ** -0.5]))
    assert torch.allclose(debiased_weight(s, True), 1 / (torch.tensor([0.5, 5.0, 50.0, 1000.0]) + 1))


def test_diffusion_loss_weighting():
    ac = _ac()
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 300, 800])
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    s = ac[t] / (1 - ac[t])
    plain = diffusion_loss(pred, target, t, ac, LossOptions())
    assert plain == pytest.approx(mse.mean().item(), rel=1e-6)
    w = torch.tensor([1.0, 0.5, 2.0])
    assert diffusion_loss(pred, target, t, ac, LossOptions(), w) == pytest.approx((mse * w).mean().item(), rel=1e-6)
    got = diffusion_loss(pred, target, t, ac, LossOptions("epsilon", min_snr_gamma=5.0, debiased_estimation=True))
    expected = mse * torch.clamp(s, max=5.0) / s / torch.clamp(s, max=1000).sqrt()
    assert got == pytest.approx(expected.mean().item(), rel=1e-5)
    got_v = diffusion_loss(pred, target, t, ac, LossOptions("v_prediction", min_snr_gamma=5.0))
    assert got_v == pytest.approx((mse * torch.clamp(s, max=5.0) / (s + 1)).mean().item(), rel=1e-5)
    assert torch.allclose(snr(t, ac), s)
