"""Closed-form checks of the SIM loss (docs/methods.md §4.2; /work/shared/methods.md §2.8): on Gaussian -> Gaussian with
the exact fake score the surrogate's gradient is the gradient of the score divergence ``E d(D_q - D_p)`` (SIM
Theorem 3.1, including the gradient through ``d'``), it vanishes at the target and a Gaussian generator trained with it
converges to the target, for both distances; pseudo-Huber with a huge ``c`` is ``l2 / (2c)``; the full loss trains an
MLP generator on the ring with finite terms and reports NaN rows as ``NONFINITE_ROWS`` with exactly zero gradient."""

from __future__ import annotations

import pytest
import torch
from _helpers import ExactGaussianFake, GaussianGenerator, batch, ctx, fit, gaussian_denoiser
from torch import nn

from distill.core.registry import ConfigError
from losses import LOSSES, build_loss
from losses.base import NONFINITE_ROWS, DataSpec
from losses.sim import SIM, distance_grad, sim_rows
from students import build_student
from teachers import GaussianMixtureTeacher, ring

F64 = torch.float64
M, S = 1.0, 0.5  # the target N(M, S^2)
DISTANCES = [("l2", 1.0), ("pseudo_huber", 0.05), ("pseudo_huber", 1e-3)]


class TargetDenoiser(nn.Module):
    """The target's denoiser alone (what the loss calls of a teacher): the same values as the one-component
    :class:`GaussianMixtureTeacher`, without its mixture machinery, for the long fits."""

    data_shape, sigma_min, sigma_max, sigma_data = (1,), 0.002, 80.0, S

    def forward(self, x, sigma, cond=None, guidance=1.0):
        return gaussian_denoiser(x, sigma, M, S)


def gaussian_sim(a: float, b: float, light: bool = False, **kw):
    """``(teacher, generator N(b, a^2), sim loss with the exact fake score)`` for the target N(M, S^2)."""
    teacher = GaussianMixtureTeacher(torch.tensor([[M]]), S)
    gen = GaussianGenerator(a, b)
    loss = build_loss("sim", fake_init="fresh", fake_hidden=4, fake_depth=1, **kw)
    loss.setup(gen, teacher, ctx(dtype=F64))
    loss.fake = ExactGaussianFake(gen)
    return (TargetDenoiser() if light else teacher), gen, loss


def test_distance_grads_closed_form_and_huge_c_limit():
    torch.manual_seed(0)
    delta = torch.randn(5, 3, 2, dtype=F64)
    torch.testing.assert_close(distance_grad(delta, "l2", 1.0), 2 * delta)
    norms = torch.stack([delta[i].norm() for i in range(5)])
    torch.testing.assert_close(distance_grad(delta, "pseudo_huber", 0.3),
                               delta / (norms**2 + 0.09).sqrt()[:, None, None])
    # c -> 0: the unit direction of each sample's score gap
    unit = distance_grad(delta, "pseudo_huber", 1e-12).flatten(1).norm(dim=1)
    torch.testing.assert_close(unit, torch.ones(5, dtype=F64))
    # c huge: d'_PH = Delta / c (1 + O(|Delta|^2 / c^2)) = d'_l2 / (2c), hence the whole loss is l2 / (2c)
    x0, d_real, d_fake = (torch.randn(6, 4, dtype=F64) for _ in range(3))
    c = 1e6
    torch.testing.assert_close(2 * c * sim_rows(x0, d_real, d_fake, "pseudo_huber", c),
                               sim_rows(x0, d_real, d_fake, "l2", 1.0), rtol=1e-9, atol=0)
    # the per-sample loss is -d'(D_fake - D_real) . (D_fake - x0), row by row
    rows = sim_rows(x0, d_real, d_fake, "l2", 1.0)
    by_hand = [-2 * (d_fake[i] - d_real[i]) @ (d_fake[i] - x0[i]) for i in range(6)]
    torch.testing.assert_close(rows, torch.stack(by_hand))


@pytest.mark.parametrize("distance, c", DISTANCES)
@pytest.mark.parametrize("a0, b0, sig", [(1.0, 0.0, 0.7), (0.3, 1.5, 2.0)])
def test_surrogate_gradient_is_the_score_divergence_gradient(distance, c, a0, b0, sig):
    """SIM Theorem 3.1: the surrogate's gradient (through x0, x_t, both denoisers and d') equals the gradient of
    ``E_{x_t ~ q_sg} d(D_{q_theta}(x_t) - D_p(x_t))`` with the samples held fixed (Monte Carlo, 400k samples). Detaching
    ``d'`` (or a sign error) changes the ``a`` gradient by a factor ~2 (or its sign)."""
    gen = GaussianGenerator(a0, b0)
    g = torch.Generator().manual_seed(1)
    z, n = torch.randn(400_000, 1, dtype=F64, generator=g), torch.randn(400_000, 1, dtype=F64, generator=g)
    x_t = gen.b + gen.a * z + sig * n
    rows = sim_rows(gen.b + gen.a * z, gaussian_denoiser(x_t, sig, M, S), ExactGaussianFake(gen).denoise(x_t, sig),
                    distance, c)
    got = torch.autograd.grad(rows.mean(), [gen.a, gen.b])
    delta = gaussian_denoiser(x_t.detach(), sig, gen.b, gen.a) - gaussian_denoiser(x_t.detach(), sig, M, S)
    div = (delta**2).sum(1) if distance == "l2" else ((delta**2).sum(1) + c * c).sqrt() - c
    want = torch.autograd.grad(div.mean(), [gen.a, gen.b])
    for gv, wv in zip(got, want):
        assert abs(float(gv) - float(wv)) < 0.03 * abs(float(wv)) + 1e-3, (got, want)


@pytest.mark.parametrize("distance, c", DISTANCES)
def test_gradient_vanishes_at_the_target(distance, c):
    teacher, gen, loss = gaussian_sim(S, M, distance=distance, huber_c=c)
    out = loss("student", gen, teacher, batch(size=4096, seed=3, dtype=F64), ctx(dtype=F64))
    out["loss"].backward()
    assert abs(float(gen.a.grad)) < 1e-12 and abs(float(gen.b.grad)) < 1e-12
    assert float(out["score_gap"]) < 1e-12 and int(out[NONFINITE_ROWS]) == 0
    # off the target it does not vanish, and descent moves toward the target
    teacher, gen, loss = gaussian_sim(1.0, 2.0, distance=distance, huber_c=c)
    loss("student", gen, teacher, batch(size=4096, seed=3, dtype=F64), ctx(dtype=F64))["loss"].backward()
    assert float(gen.a.grad) > 0 and float(gen.b.grad) > 0


@pytest.mark.parametrize("distance, c", DISTANCES)
def test_gaussian_generator_converges_through_the_loss(distance, c):
    teacher, gen, loss = gaussian_sim(1.0, 0.0, light=True, distance=distance, huber_c=c)
    torch.testing.assert_close(teacher(torch.linspace(-3, 3, 7, dtype=F64)[:, None], torch.full((7,), 0.8, dtype=F64)),
                               GaussianMixtureTeacher(torch.tensor([[M]]), S)(
                                   torch.linspace(-3, 3, 7, dtype=F64)[:, None], torch.full((7,), 0.8, dtype=F64)))
    fit(lambda i: loss("student", gen, teacher, batch(size=512, k=i, dtype=F64), ctx(i, dtype=F64))["loss"],
        gen.parameters(), 300, 5e-2)
    assert abs(gen.a.item() - S) < 1e-2 and abs(gen.b.item() - M) < 1e-2, (gen.a.item(), gen.b.item())


def test_loss_value_and_injected_gradient_match_the_rows():
    """``loss`` = mean of SIM's rows, and its gradient on the generator is that of ``mean_B rows`` (g / B)."""
    teacher, gen, loss = gaussian_sim(0.8, 0.3, distance="pseudo_huber", huber_c=0.1)
    b = batch(size=64, seed=7, dtype=F64)
    out = loss("student", gen, teacher, b, ctx(dtype=F64))
    out["loss"].backward()
    b2 = batch(size=64, seed=7, dtype=F64)  # replay the draws: z, sigma, noise
    a, bb = gen.a.detach().clone().requires_grad_(True), gen.b.detach().clone().requires_grad_(True)
    z = b2.randn(1, dtype=F64)
    x0 = bb + a * z
    sigma = loss._sim_sigma(b2, x0)
    x_t = x0 + sigma[:, None] * b2.randn(1, dtype=F64)
    rows = sim_rows(x0, teacher(x_t, sigma), gaussian_denoiser(x_t, sigma, bb.detach(), a.detach()), "pseudo_huber",
                    0.1)
    torch.testing.assert_close(out["loss"].detach(), rows.mean().detach())
    ga, gb = torch.autograd.grad(rows.mean(), [a, bb])
    torch.testing.assert_close(gen.a.grad, ga)
    torch.testing.assert_close(gen.b.grad, gb)


class NaNRows(nn.Module):
    """Wraps a fake score and returns NaN (or Inf) in the given rows."""

    def __init__(self, inner: nn.Module, rows: list[int]) -> None:
        super().__init__()
        self.inner, self.rows = inner, rows

    def denoise(self, x, sigma, cond=None):
        out = self.inner.denoise(x, sigma, cond)
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        mask[self.rows] = True
        return torch.where(mask[:, None], torch.tensor([float("nan"), float("inf")], dtype=out.dtype), out)


def test_ring_mlp_generator_phases_and_nonfinite_rows():
    torch.manual_seed(0)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=32, depth=2)
    loss = build_loss("sim", fake_init="residual", fake_hidden=32, fake_depth=2, huber_c=1e-2)
    loss.setup(student, teacher, ctx())
    assert set(loss.phase_groups("critic", student)) == {"fake"}
    opts = {p: torch.optim.Adam([q for g in loss.phase_groups(p, student).values() for q in g], lr=1e-3,
                                betas=(0.0, 0.999)) for p in loss.phases}
    for k in range(6):
        for phase in loss.phases_for_step(k):
            for p in [*student.parameters(), *loss.parameters()]:
                p.grad = None
            out = loss(phase, student, teacher, batch(size=64, k=k), ctx(k))
            assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values()), (phase, out)
            out["loss"].backward()
            assert all(p.grad is None for p in teacher.parameters())
            if phase == "student":
                assert int(out[NONFINITE_ROWS]) == 0 and float(out["score_gap"]) > 0
                assert all(p.grad is None for p in loss.parameters())  # the fake is frozen in the student phase
            opts[phase].step()
    # NaN/Inf rows: zeroed, counted, and they contribute exactly zero gradient
    student.zero_grad()
    clean = loss("student", student, teacher, batch(size=16, k=9), ctx(9))
    clean_rows = loss.sample_grad(student(80.0 * batch(size=16, k=9).randn(2), torch.full((16,), 80.0),
                                          torch.zeros(16)), teacher, _skip_one(batch(size=16, k=9)))[0]
    torch.testing.assert_close(clean["sim_loss"], clean_rows.mean())
    fake = loss.fake
    loss.fake = NaNRows(fake, [2, 5])
    out = loss("student", student, teacher, batch(size=16, k=9), ctx(9))
    loss.fake = fake
    assert int(out[NONFINITE_ROWS]) == 2 and torch.isfinite(out["loss"])
    keep = torch.ones(16, dtype=torch.bool)
    keep[[2, 5]] = False
    torch.testing.assert_close(out["sim_loss"], clean_rows[keep].sum() / 16)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def _skip_one(b):
    b.randn(2)  # the generator's z was drawn first
    return b


def test_registered_defaults_and_config_errors():
    assert LOSSES.get("sim") is SIM and SIM.student_kind == "generator"
    loss = build_loss("sim")
    assert loss.distance == "pseudo_huber" and loss.update_every() == {"critic": 1, "student": 1}
    assert loss.data_specs() == {"data": DataSpec("noise")} and loss.sampling() is None
    SIM(**SIM.tiny_config())
    for kw, match in [({"distance": "l1"}, "l2, pseudo_huber"), ({"huber_c": 0.0}, "huber_c"),
                      ({"critic_updates": 0}, "critic_updates"), ({"sim_sigma": "x"}, "grid, lognormal"),
                      ({"fake_init": "copy"}, "teacher, fresh")]:
        with pytest.raises(ConfigError, match=match):
            build_loss("sim", **kw)
    student = build_student("generator", ring(), init="fresh", hidden=8, depth=1)
    with pytest.raises(ConfigError, match="needs a conditional"):
        build_loss("sim", fake_init="residual", guidance=2.0).setup(student, ring(), ctx())
