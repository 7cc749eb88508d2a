"""The one copy of the preconditioning math (distill.core.precond) against independent formulas: EDM Table 1 values
and its unit-variance design goals, diffusers' consistency-model boundary scalings, the TrigFlow closed form, and the
VP / rectified-flow prediction conversions."""

from __future__ import annotations

import math

import pytest
import torch

from distill.core.precond import cm_scalings, edm_scalings, flow_scalings, trigflow_scalings, vp_scalings

torch.set_num_threads(1)
F64 = torch.float64


def test_edm_scalings_match_table_1_values_and_unit_variance():
    # Karras et al. 2022 Table 1 at sd = 0.5, by hand: sigma = 0.5 -> (1/2, 1/(2 sqrt 2), sqrt 2, ln(0.5)/4);
    # sigma = 1.5 -> v = 2.5: (0.1, 0.75/sqrt(2.5), 1/sqrt(2.5), ln(1.5)/4).
    c = edm_scalings(torch.tensor([0.5, 1.5], dtype=F64), 0.5)
    want = [[0.5, 0.1], [0.5 / math.sqrt(2), 0.75 / math.sqrt(2.5)], [math.sqrt(2), 1 / math.sqrt(2.5)],
            [math.log(0.5) / 4, math.log(1.5) / 4]]
    for got, w in zip(c, want):
        torch.testing.assert_close(got, torch.tensor(w, dtype=F64))
    # The design goals of Table 1 (EDM App. B.6): unit-variance input c_in x and training target (x0 - c_skip x)/c_out
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(200_000, dtype=F64, generator=g)
    for sig in (0.05, 1.0, 30.0):
        c_skip, c_out, c_in, _ = edm_scalings(torch.tensor(sig, dtype=F64), 0.5)
        x = x0 + sig * torch.randn(x0.shape, dtype=F64, generator=g)
        assert abs((c_in * x).std().item() - 1) < 0.01 and abs(((x0 - c_skip * x) / c_out).std().item() - 1) < 0.01


def test_cm_scalings_boundary_is_exact_and_match_diffusers():
    from diffusers import CMStochasticIterativeScheduler

    for eps in (0.002, 0.01, 0.3):
        for dtype in (torch.float32, F64):
            c_skip, c_out = cm_scalings(torch.tensor([eps], dtype=dtype), 0.5, eps)
            assert c_skip.item() == 1.0 and c_out.item() == 0.0
    sched = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_data=0.5)
    sig = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=F64)
    want = sched.get_scalings_for_boundary_condition(sig)
    for got, w in zip(cm_scalings(sig, 0.5, 0.002), want):
        torch.testing.assert_close(got, w)


def test_trigflow_scalings_closed_form():
    """TrigFlow (arXiv:2410.11081): x_t = cos t x0 + sin t z, z ~ N(0, sd^2); f = cos t x_t - sin t sd F(x_t/sd, t).
    In VE units (x = x_t / cos t, sigma = sd tan t) the scalings must give the same f for any F, and the TrigFlow
    velocity target F* = (cos t z - sin t x0)/sd must give f = x0 exactly."""
    sd = 0.7
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.0, 0.1, 0.7, 1.2, 1.5], dtype=F64)
    x0, z = torch.randn(5, 3, dtype=F64, generator=g), sd * torch.randn(5, 3, dtype=F64, generator=g)
    ct, st = t.cos()[:, None], t.sin()[:, None]
    x_t = ct * x0 + st * z
    x, sigma = x_t / ct, sd * t.tan()
    c_skip, c_out, c_in, c_noise = (v[:, None] for v in trigflow_scalings(sigma, sd))
    torch.testing.assert_close(c_noise[:, 0], t)
    torch.testing.assert_close(c_in * x, x_t / sd)  # the network sees x_t / sd
    F = torch.randn(5, 3, dtype=F64, generator=g)
    torch.testing.assert_close(c_skip * x + c_out * F, ct * x_t - st * sd * F)
    F_star = (ct * z - st * x0) / sd
    torch.testing.assert_close(c_skip * x + c_out * F_star, x0)
    # boundary f(x, 0) = x at sigma = 0, bit for bit
    b = trigflow_scalings(torch.zeros(1), sd)
    assert (b[0].item(), b[1].item(), b[3].item()) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_vp_and_flow_scalings_match_the_conversions(pred):
    from distill.core.conversions import alpha_bar_from_sigma, eps_to_x0, rf_velocity_to_x0, v_to_x0

    g = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.01, 0.5, 3.0, 50.0], dtype=F64)
    x, out = 2 * torch.randn(4, 3, dtype=F64, generator=g), torch.randn(4, 3, dtype=F64, generator=g)
    c_skip, c_out, c_in = (v[:, None] for v in vp_scalings(sigma, pred))
    abar = alpha_bar_from_sigma(sigma)
    x_t = x * abar.sqrt()[:, None]
    torch.testing.assert_close(c_in * x, x_t)
    want = {"epsilon": eps_to_x0(x, sigma, out), "v_prediction": v_to_x0(x_t, abar, out), "sample": out}[pred]
    torch.testing.assert_close(c_skip * x + c_out * out, want)
    f_skip, f_out, f_in, f_noise = (v[:, None] for v in flow_scalings(sigma))
    rt = sigma / (1 + sigma)
    torch.testing.assert_close(f_in * x, x / (1 + sigma[:, None]))
    torch.testing.assert_close(f_skip * x + f_out * out, rf_velocity_to_x0(x / (1 + sigma[:, None]), rt, out))
    torch.testing.assert_close(f_noise[:, 0], rt)
