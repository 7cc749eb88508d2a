"""Shared math: coordinate and prediction conversions round-trip in float64; grids and densities are what they say."""

from __future__ import annotations

import math

import pytest
import torch

from distill.core import conversions as C
from distill.core.schedules import (
    karras_sigmas,
    logsnr_sigmas,
    make_grid,
    sample_discrete_index_sigma,
    sample_lognormal_sigma,
    uniform_sigmas,
)

B = 64


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.empty(B, dtype=torch.float64).uniform_(math.log(0.002), math.log(80), generator=g))
    return x0, eps, sigma


def test_append_dims():
    assert C.append_dims(torch.ones(5), 4).shape == (5, 1, 1, 1)
    with pytest.raises(ValueError, match="more than the target"):
        C.append_dims(torch.ones(5, 2), 1)


def test_coordinate_round_trips(data):
    x0, eps, sigma = data
    x = x0 + C.append_dims(sigma, 4) * eps  # VE point
    abar = C.alpha_bar_from_sigma(sigma)
    torch.testing.assert_close(C.sigma_from_alpha_bar(abar), sigma, rtol=1e-10, atol=0)
    x_vp = C.ve_to_vp(x, sigma)
    # the VP marginal really is sqrt(abar) x0 + sqrt(1 - abar) eps
    torch.testing.assert_close(x_vp, C.append_dims(abar.sqrt(), 4) * x0 + C.append_dims((1 - abar).sqrt(), 4) * eps)
    torch.testing.assert_close(C.vp_to_ve(x_vp, abar), x)
    t = C.rf_t_from_sigma(sigma)
    torch.testing.assert_close(C.sigma_from_rf_t(t), sigma, rtol=1e-10, atol=0)
    x_rf = C.ve_to_rf(x, sigma)
    torch.testing.assert_close(x_rf, C.append_dims(1 - t, 4) * x0 + C.append_dims(t, 4) * eps)
    torch.testing.assert_close(C.rf_to_ve(x_rf, t), x)
    tt = C.trig_t_from_sigma(sigma, 0.5)
    torch.testing.assert_close(C.sigma_from_trig_t(tt, 0.5), sigma, rtol=1e-10, atol=0)


def test_prediction_round_trips(data):
    x0, eps, sigma = data
    x = x0 + C.append_dims(sigma, 4) * eps
    torch.testing.assert_close(C.eps_to_x0(x, sigma, eps), x0)
    torch.testing.assert_close(C.x0_to_eps(x, sigma, x0), eps)
    abar = C.alpha_bar_from_sigma(sigma)
    x_vp = C.ve_to_vp(x, sigma)
    v = C.append_dims(abar.sqrt(), 4) * eps - C.append_dims((1 - abar).sqrt(), 4) * x0  # Salimans & Ho's v
    torch.testing.assert_close(C.x0_to_v(x_vp, abar, x0), v)
    torch.testing.assert_close(C.v_to_x0(x_vp, abar, v), x0)
    t = C.rf_t_from_sigma(sigma)
    x_rf = C.ve_to_rf(x, sigma)
    u = eps - x0
    torch.testing.assert_close(C.x0_to_rf_velocity(x_rf, t, x0), u)
    torch.testing.assert_close(C.rf_velocity_to_x0(x_rf, t, u), x0)
    score = -eps / C.append_dims(sigma, 4)  # score of N(x0, sigma^2) at x
    torch.testing.assert_close(C.score_from_x0(x, sigma, x0), score)
    torch.testing.assert_close(C.x0_from_score(x, sigma, score), x0)
    torch.testing.assert_close(C.ode_derivative(x, sigma, x0), eps)


def test_as_sigma_shapes():
    x = torch.zeros(3, 2)
    assert C.as_sigma(1.5, x).shape == (3,)
    with pytest.raises(ValueError, match=r"shape \[B\]=\[3\]"):
        C.as_sigma(torch.ones(4), x)


@pytest.mark.parametrize("fn", [karras_sigmas, logsnr_sigmas, uniform_sigmas])
def test_grids(fn):
    s = fn(10, 0.002, 80.0)
    assert s.shape == (11,) and s[-1] == 0
    assert torch.isclose(s[0], torch.tensor(80.0, dtype=s.dtype))
    assert torch.isclose(s[-2], torch.tensor(0.002, dtype=s.dtype))
    assert (s[:-1].diff() < 0).all()
    assert fn(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="n >= 1"):
        fn(0)


def test_grid_shapes_are_their_definitions():
    torch.testing.assert_close(logsnr_sigmas(7, append_zero=False).log().diff(),
                               torch.full((6,), (math.log(0.002) - math.log(80)) / 6, dtype=torch.float64))
    torch.testing.assert_close(karras_sigmas(7, append_zero=False).pow(1 / 7).diff(),
                               torch.full((6,), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 6, dtype=torch.float64))
    with pytest.raises(KeyError, match="valid grids: karras, logsnr, uniform"):
        make_grid("cosine", 4, 0.002, 80)


def test_densities():
    g = torch.Generator().manual_seed(0)
    s = sample_lognormal_sigma(200_000, -1.2, 1.2, generator=g)
    assert abs(float(s.log().mean()) + 1.2) < 0.01 and abs(float(s.log().std()) - 1.2) < 0.01
    grid = karras_sigmas(1000, append_zero=False)
    idx, sig = sample_discrete_index_sigma(50_000, grid, 0.02, 0.98, generator=g)
    assert int(idx.min()) == 19 and int(idx.max()) == 980  # floor(0.02 * 999), ceil(0.98 * 999)
    torch.testing.assert_close(sig, grid[idx])
