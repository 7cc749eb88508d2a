"""Closed-form checks of the DMD2 loss (methods.md §4.2, §2.5): the DMD gradient vanishes at the target, the
gradient-injection surrogate injects exactly ``g``, a Gaussian generator trained with the exact fake score converges
to the target, the fake score's DSM is minimised by the exact denoiser, and the full loss runs with a multi-step
student (backward simulation) and with the GAN head on a tiny 8x8 UNet teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from distill.registry import ConfigError
from distill.schedules import karras_sigmas, sample_discrete_index_sigma
from losses import LOSSES, build_loss
from losses.dmd2 import (
    DMD2,
    GANHead,
    dmd_gradient,
    dsm_loss,
    edm_loss_weight,
    gan_critic_loss,
    gan_generator_loss,
    gradient_injection_loss,
)
from students import FlowMapStudent, build_student
from teachers import DiffusersTeacher, GaussianMixtureTeacher, ring
from teachers.nets import small_unet

F64 = torch.float64


def gaussian_denoiser(x: Tensor, sigma: Tensor, m: Tensor | float, s: Tensor | float) -> Tensor:
    """Closed form ``D*(x, sigma) = (s^2 x + sigma^2 m) / (s^2 + sigma^2)`` of ``N(m, s^2)`` (``sigma: [B]``)."""
    sig2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return (s**2 * x + sig2 * m) / (s**2 + sig2)


class GaussianGenerator(FlowMapStudent):
    """One-step generator ``x = b + a z`` in the student contract: ``J(sigma_max z, sigma_max, 0) = b + a z``."""

    kind = "generator"

    def __init__(self, a: float, b: float, sigma_max: float = 80.0) -> None:
        super().__init__((1,), 0.002, sigma_max, 0.5)
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))
        self.b = nn.Parameter(torch.tensor(b, dtype=F64))

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        return self.b + self.a * x / sigma_from.reshape(-1, 1)


class ExactGaussianFake(nn.Module):
    """The exact fake score of a :class:`GaussianGenerator`'s *current* distribution ``N(b, a^2)``, optionally
    biased by ``shift`` (a wrong denoiser for the DSM check)."""

    def __init__(self, gen: GaussianGenerator, shift: float = 0.0) -> None:
        super().__init__()
        self.__dict__["gen"] = gen  # a reference, not a submodule: the fake must not own the generator's parameters
        self.shift = shift

    def denoise(self, x, sigma, cond=None):
        a, b = self.gen.a.detach().abs(), self.gen.b.detach()
        return gaussian_denoiser(x, sigma, b, a) + self.shift


def tiny_unet_teacher(num_class_embeds: int | None = None) -> DiffusersTeacher:
    torch.manual_seed(0)
    net = small_unet(8, 1, (16, 32, 32), num_class_embeds=num_class_embeds)
    sched = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "prediction_type": "epsilon"}
    return DiffusersTeacher(net, sched, null_class=(num_class_embeds - 1) if num_class_embeds else None)


# ---------------------------------------------------------------------------------------------------------------
# (a) the DMD gradient vanishes at the target; otherwise it is (mu_fake - mu_real) / mean|x - mu_real|
# ---------------------------------------------------------------------------------------------------------------


def test_dmd_gradient_is_zero_when_fake_equals_real():
    torch.manual_seed(0)
    real = ring()
    fake = ring()  # an independently built, identical exact denoiser: the generator sits at the target
    x = real.sample(256).double()
    sigma = torch.rand(256, dtype=F64) * 5 + 0.01
    x_t = x + sigma[:, None] * torch.randn_like(x)
    g = dmd_gradient(x, real(x_t, sigma), fake(x_t, sigma))
    assert torch.equal(g, torch.zeros_like(g))


def test_dmd_gradient_matches_formula_and_is_finite():
    torch.manual_seed(1)
    x, mu_r, mu_f = (torch.randn(5, 3, 4, dtype=F64) for _ in range(3))
    g = dmd_gradient(x, mu_r, mu_f)
    for i in range(5):
        norm = (x[i] - mu_r[i]).abs().mean()
        torch.testing.assert_close(g[i], (mu_f[i] - mu_r[i]) / norm)
    # A sample the teacher reproduces exactly: the clamped normaliser keeps g finite (= diff / eps).
    g0 = dmd_gradient(x[:1], x[:1], x[:1] + 1e-7, eps=1e-5)
    assert torch.isfinite(g0).all()
    torch.testing.assert_close(g0, torch.full_like(g0, 1e-2))


# ---------------------------------------------------------------------------------------------------------------
# (b) the surrogate injects exactly g / numel
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_injection_surrogate_gradient():
    torch.manual_seed(2)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    g = torch.randn(4, 2, 3, dtype=F64)
    loss = gradient_injection_loss(x, g)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, g / x.numel(), rtol=0, atol=1e-15)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())


# ---------------------------------------------------------------------------------------------------------------
# (c) Gaussian generator -> N(1, 0.5^2) with the exact fake score (methods.md §4.2)
# ---------------------------------------------------------------------------------------------------------------

TARGET_M, TARGET_S = 1.0, 0.5


def _fit_gaussian(step_fn, gen: GaussianGenerator, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        step_fn().backward()
        opt.step()
        sched.step()


def test_gaussian_generator_converges_with_pure_functions():
    torch.manual_seed(3)
    gen = GaussianGenerator(1.0, 0.0)
    grid = karras_sigmas(1000, 0.002, 80.0, append_zero=False)

    def step() -> Tensor:
        z = torch.randn(1024, 1, dtype=F64)
        x = gen.b + gen.a * z
        _, sigma = sample_discrete_index_sigma(1024, grid, 0.02, 0.98)
        x_t = x.detach() + sigma[:, None] * torch.randn_like(x)
        mu_real = gaussian_denoiser(x_t, sigma, TARGET_M, TARGET_S)
        mu_fake = gaussian_denoiser(x_t, sigma, gen.b.detach(), gen.a.detach().abs())
        return gradient_injection_loss(x, dmd_gradient(x.detach(), mu_real, mu_fake))

    _fit_gaussian(step, gen, steps=400, lr=5e-2)
    assert abs(gen.a.item() - TARGET_S) < 1e-2 and abs(gen.b.item() - TARGET_M) < 1e-2, (gen.a.item(), gen.b.item())


def test_gaussian_generator_converges_through_the_loss_object():
    """The same fit, through DMD2's student phase (sigma_max z input, DMD2 grid, normaliser, surrogate)."""
    torch.manual_seed(4)
    teacher = GaussianMixtureTeacher(torch.tensor([[TARGET_M]]), TARGET_S)
    gen = GaussianGenerator(1.0, 0.0)
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=8, fake_depth=1)
    loss.setup(gen, teacher)
    loss.fake = ExactGaussianFake(gen)
    batch = {"batch_size": 1024}
    _fit_gaussian(lambda: loss("student", gen, teacher, batch, 0)["loss"], gen, steps=400, lr=5e-2)
    assert abs(gen.a.item() - TARGET_S) < 1e-2 and abs(gen.b.item() - TARGET_M) < 1e-2, (gen.a.item(), gen.b.item())
    # At the optimum the injected gradient vanishes.
    with torch.no_grad():
        gen.a.fill_(TARGET_S)
        gen.b.fill_(TARGET_M)
    gen.zero_grad()
    out = loss("student", gen, teacher, batch, 0)
    assert float(out["dm_grad_norm"]) < 1e-12
    out["loss"].backward()
    assert gen.a.grad.abs() < 1e-12 and gen.b.grad.abs() < 1e-12


@pytest.mark.parametrize("a0, b0, param, sign", [(1.0, 1.0, "a", 1), (0.25, 1.0, "a", -1), (1.0, 0.0, "b", -1),
                                                  (1.0, 2.0, "b", 1)])
def test_gaussian_generator_gradient_points_to_target(a0, b0, param, sign):
    """Sign/unit check of g: a too wide (narrow) generator at the right mean is narrowed (widened); a shifted one is
    moved toward the target mean (gradient descent moves against the sign of the gradient)."""
    torch.manual_seed(5)
    teacher = GaussianMixtureTeacher(torch.tensor([[TARGET_M]]), TARGET_S)
    gen = GaussianGenerator(a0, b0)
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=8, fake_depth=1)
    loss.setup(gen, teacher)
    loss.fake = ExactGaussianFake(gen)
    loss("student", gen, teacher, {"batch_size": 20000}, 0)["loss"].backward()
    assert sign * float(getattr(gen, param).grad) > 0


# ---------------------------------------------------------------------------------------------------------------
# (e) the fake score's DSM is minimised by the exact denoiser, with EDM's unit-variance weighting
# ---------------------------------------------------------------------------------------------------------------


def test_edm_weighted_dsm_of_exact_gaussian_denoiser_is_one():
    """For N(m, s^2) data with sigma_data = s the weighted DSM of the exact denoiser is exactly 1 at every sigma:
    lambda(sigma) * posterior variance = (sigma^2 + s^2) / (sigma s)^2 * s^2 sigma^2 / (s^2 + sigma^2) = 1."""
    torch.manual_seed(6)
    n = 200_000
    x0 = TARGET_M + TARGET_S * torch.randn(n, 1, dtype=F64)
    for sig in (0.01, 0.3, 2.0, 50.0):
        sigma = torch.full((n,), sig, dtype=F64)
        post_var = TARGET_S**2 * sig**2 / (TARGET_S**2 + sig**2)
        assert float(edm_loss_weight(sigma[:1], TARGET_S)) * post_var == pytest.approx(1.0, rel=1e-12)
        x_t = x0 + sig * torch.randn_like(x0)
        exact = dsm_loss(gaussian_denoiser(x_t, sigma, TARGET_M, TARGET_S), x0, sigma, TARGET_S).mean()
        assert abs(float(exact) - 1.0) < 0.02, (sig, float(exact))
        # A denoiser biased by half the posterior std pays lambda * delta^2 = 0.25 on top (the cross term has
        # zero mean): the exact denoiser is the minimiser, with a margin that is the same at every sigma.
        delta = 0.5 * TARGET_S * sig / math.sqrt(TARGET_S**2 + sig**2)
        biased = dsm_loss(gaussian_denoiser(x_t, sigma, TARGET_M, TARGET_S) + delta, x0, sigma, TARGET_S).mean()
        assert abs(float(biased) - 1.25) < 0.03, (sig, float(biased))


def test_critic_phase_dsm_prefers_the_exact_fake_score():
    torch.manual_seed(7)
    teacher = GaussianMixtureTeacher(torch.tensor([[TARGET_M]]), TARGET_S)  # sigma_data = 0.5 = s
    gen = GaussianGenerator(TARGET_S, TARGET_M)
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=8, fake_depth=1)
    loss.setup(gen, teacher)
    batch = {"batch_size": 100_000}
    loss.fake = ExactGaussianFake(gen)
    exact = float(loss("critic", gen, teacher, batch, 0)["dsm"])
    loss.fake = ExactGaussianFake(gen, shift=0.02)
    biased = float(loss("critic", gen, teacher, batch, 0)["dsm"])
    assert abs(exact - 1.0) < 0.03
    assert biased > exact + 0.05


# ---------------------------------------------------------------------------------------------------------------
# (d) multi-step students (backward simulation) and the GAN head on a tiny 8x8 UNet teacher
# ---------------------------------------------------------------------------------------------------------------


class ZeroGenerator(FlowMapStudent):
    """Outputs x0 = 0 (so the input of level k > 0 is pure fresh noise of std sigma_k); records graded calls."""

    kind = "generator"

    def __init__(self) -> None:
        super().__init__((2,), 0.002, 80.0, 1.0)
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[Tensor, Tensor, bool]] = []

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        self.calls.append((x.detach().clone(), sigma_from.detach().clone(), torch.is_grad_enabled()))
        return self.w * x


def test_backward_simulation_renoises_at_each_level():
    torch.manual_seed(8)
    levels = [80.0, 2.0, 0.5]
    gen = ZeroGenerator()
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=8, fake_depth=1, student_sigmas=levels)
    loss.setup(gen, ring())
    x = loss._generate(gen, ring(), 6000, None, torch.device("cpu"), torch.float32)
    assert x.requires_grad
    graded = [c for c in gen.calls if c[2]]
    assert len(graded) == 1 and all(not c[2] for c in gen.calls[:-1])  # simulation runs under no_grad
    x_in, sigma_in, _ = graded[0]
    for lvl in levels:
        rows = sigma_in == lvl
        assert rows.float().mean() > 0.25  # every level is drawn
        std = float(x_in[rows].std())
        assert std == pytest.approx(lvl, rel=0.05)  # input at level k is x0_prev + sigma_k * fresh noise


@pytest.fixture(scope="module")
def unet_teacher() -> DiffusersTeacher:
    return tiny_unet_teacher()


def _grads(params) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_unet_teacher_copy_gives_zero_gradient_at_init(unet_teacher):
    torch.manual_seed(9)
    student = build_student("generator", unet_teacher, init="teacher")
    loss = build_loss("dmd2", num_levels=50)
    loss.setup(student, unet_teacher)
    torch.manual_seed(99)
    out = loss("student", student, unet_teacher, {"batch_size": 2}, 0)
    # fake = copy of the teacher: mu_fake == mu_real up to float32 kernel differences (train vs eval mode)
    assert float(out["dm_grad_norm"]) < 1e-4
    assert not any(p.requires_grad for p in unet_teacher.parameters())
    with torch.no_grad():
        next(loss.fake.parameters()).add_(0.05)  # a fake score that no longer equals the teacher
    torch.manual_seed(99)
    assert float(loss("student", student, unet_teacher, {"batch_size": 2}, 0)["dm_grad_norm"]) > 1e-2


def test_multistep_student_with_gan_head_on_unet(unet_teacher):
    torch.manual_seed(10)
    student = build_student("generator", unet_teacher, init="teacher")
    loss = build_loss("dmd2", num_levels=50, gan_weight=0.1, student_sigmas=[80.0, 2.0, 0.5])
    assert loss.needs_data
    loss.setup(student, unet_teacher)
    assert isinstance(loss.gan_head, GANHead) and loss.gan_head.feature_shape == (32, 2, 2)
    critic_params = loss.phase_parameters("critic", student)
    assert {id(p) for p in critic_params} == {id(p) for p in list(loss.fake.parameters())
                                              + list(loss.gan_head.parameters())}
    batch = {"batch_size": 4, "x0": torch.randn(4, 1, 8, 8).clamp(-1, 1)}
    # critic: fake score + head get gradients, the student none
    out = loss("critic", student, unet_teacher, batch, 0)
    assert {"loss", "dsm", "gan_d"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(_grads(loss.gan_head.parameters())) and any(_grads(loss.fake.parameters()))
    assert not any(_grads(student.parameters()))
    loss.zero_grad(set_to_none=True)
    # student: the generator gets gradients (through the GAN term via the frozen fake encoder), nothing else does
    out = loss("student", student, unet_teacher, batch, 0)
    assert {"loss", "dm_loss", "dm_grad_norm", "gan_g"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(_grads(student.parameters()))
    assert all(p.grad is None for p in loss.parameters())
    assert all(p.requires_grad for p in loss.fake.parameters())  # restored after the student phase
    assert all(p.grad is None for p in unet_teacher.parameters())
    with pytest.raises(ValueError, match="x0"):
        loss("critic", student, unet_teacher, {"batch_size": 4}, 0)


def test_conditional_teacher_with_guidance_draws_labels():
    torch.manual_seed(11)
    teacher = tiny_unet_teacher(num_class_embeds=3)  # 2 classes + null class
    student = build_student("generator", teacher, init="teacher")
    loss = build_loss("dmd2", num_levels=50, guidance=2.0)
    loss.setup(student, teacher)
    out = loss("student", student, teacher, {"batch_size": 3}, 0)
    assert torch.isfinite(out["loss"]) and float(out["dm_grad_norm"]) > 0  # CFG makes mu_real != mu_fake


def test_mlp_gan_head_and_ttur_schedule():
    torch.manual_seed(12)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=16, fake_depth=2, gan_weight=0.5, critic_updates=5)
    loss.setup(student, teacher)
    assert loss.gan_head.feature_shape == (16,)
    assert loss.update_every() == {"critic": 1, "student": 5}
    assert [loss.phases_for_step(i) for i in (0, 1, 5)] == [["critic", "student"], ["critic"], ["critic", "student"]]
    batch = {"batch_size": 8, "x0": teacher.sample(8)}
    for phase in loss.phases:
        out = loss(phase, student, teacher, batch, 0)
        assert torch.isfinite(out["loss"])


def test_gan_losses_closed_form():
    logits = torch.tensor([0.0, 2.0, -1.0], dtype=F64)
    torch.testing.assert_close(gan_generator_loss(logits), -torch.log(torch.sigmoid(logits)))
    expected = (-torch.log(1 - torch.sigmoid(logits))).mean() + (-torch.log(torch.sigmoid(logits[:2]))).mean()
    torch.testing.assert_close(gan_critic_loss(logits, logits[:2]), expected)


# ---------------------------------------------------------------------------------------------------------------
# Configuration errors and the registry
# ---------------------------------------------------------------------------------------------------------------


def test_registered_and_tiny_config():
    assert LOSSES.get("dmd2") is DMD2 and DMD2.student_kind == "generator"
    assert DMD2.phases == ("critic", "student")
    DMD2(**DMD2.tiny_config())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dm_sigma": "uniform"}, "valid: grid, lognormal"),
        ({"fake_sigma": "x"}, "valid: grid, lognormal"),
        ({"fake_init": "copy"}, "valid: teacher, fresh"),
        ({"student_sigmas": [0.5, 2.0]}, "strictly descending"),
        ({"critic_updates": 0}, "critic_updates"),
        ({"t_min": 0.9, "t_max": 0.1}, "t_min"),
        ({"regression_steps": -1}, "regression_steps"),
        ({"regression_steps": 10, "regression_nfe": 4}, "odd"),
        ({"foo": 1}, "valid keys"),
    ],
)
def test_bad_config_raises_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_loss("dmd2", **kwargs)
    assert "\n" not in str(e.value)


def test_setup_errors():
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=8, depth=1)
    with pytest.raises(ConfigError, match="fake_init='fresh'"):
        build_loss("dmd2").setup(student, teacher)
    with pytest.raises(ConfigError, match="class-conditional"):
        build_loss("dmd2", fake_init="fresh", guidance=2.0).setup(student, teacher)
    with pytest.raises(RuntimeError, match="setup"):
        build_loss("dmd2")("student", student, teacher, {"batch_size": 2}, 0)


def test_grid_sigma_range():
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=8, fake_depth=1, num_levels=1000)
    loss.setup(build_student("generator", ring(), init="fresh", hidden=8, depth=1), ring())
    s = loss._sample_sigma("grid", 20000, torch.zeros(1))
    grid = karras_sigmas(1000, 0.002, 80.0, append_zero=False)
    assert float(s.max()) <= float(grid[math.floor(0.02 * 999)]) + 1e-4
    assert float(s.min()) >= float(grid[math.ceil(0.98 * 999)]) - 1e-6
    s = loss._sample_sigma("lognormal", 20000, torch.zeros(1))
    assert float(s.log().mean()) == pytest.approx(-1.2, abs=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Warm-start regression on teacher ODE pairs (DMD's regression loss / DMD2's one-step warm start)
# ---------------------------------------------------------------------------------------------------------------


def test_regression_warm_start_schedule():
    loss = build_loss("dmd2", critic_updates=5, regression_steps=3, fake_warmup=2)
    got = [loss.phases_for_step(i) for i in range(12)]
    assert got[:3] == [["student"]] * 3 and got[3:5] == [["critic"]] * 2
    assert got[5] == ["critic", "student"] and got[6:10] == [["critic"]] * 4 and got[10] == ["critic", "student"]


def test_teacher_ode_pairs_match_the_exact_gaussian_flow():
    """The PF-ODE of N(m, s^2) maps sigma_T z to m + (sigma_T z - m) s / sqrt(s^2 + sigma_T^2) (EDM VE flow)."""
    from losses.dmd2 import teacher_ode_pairs

    torch.manual_seed(13)
    teacher = GaussianMixtureTeacher(torch.tensor([[TARGET_M]]), TARGET_S)
    z, cond, x0 = teacher_ode_pairs(teacher, 500, dtype=F64, nfe=199)
    assert cond is None and z.shape == x0.shape == (500, 1)
    st = teacher.sigma_max
    exact = TARGET_M + (st * z - TARGET_M) * TARGET_S / math.sqrt(TARGET_S**2 + st**2)
    torch.testing.assert_close(x0, exact, atol=2e-3, rtol=0)


def test_regression_phase_fits_the_ode_map():
    torch.manual_seed(14)
    teacher = GaussianMixtureTeacher(torch.tensor([[TARGET_M]]), TARGET_S)
    gen = GaussianGenerator(1.0, 0.0)
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=8, fake_depth=1, regression_steps=10,
                      regression_pairs=2000, regression_nfe=199)
    loss.setup(gen, teacher)
    out = loss("student", gen, teacher, {"batch_size": 4}, 0)
    assert set(out) >= {"loss", "regression"} and "dm_grad_norm" not in out
    _fit_gaussian(lambda: loss("student", gen, teacher, {"batch_size": 512}, 0)["loss"], gen, steps=300, lr=5e-2)
    st = teacher.sigma_max
    root = math.sqrt(TARGET_S**2 + st**2)
    a_star, b_star = st * TARGET_S / root, TARGET_M * (1 - TARGET_S / root)  # G(sigma_T z) = b + a z = ODE(z)
    assert abs(gen.a.item() - a_star) < 5e-3 and abs(gen.b.item() - b_star) < 5e-3, (gen.a.item(), gen.b.item())
    assert "ode_z" in loss.state_dict()  # the pairs travel with checkpoints


def test_residual_fake_starts_at_the_teacher_and_learns_the_difference():
    from losses.dmd2 import ResidualFakeScore

    torch.manual_seed(15)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("dmd2", fake_init="residual", fake_hidden=16, fake_depth=2, gan_weight=0.1)
    loss.setup(student, teacher)
    assert isinstance(loss.fake, ResidualFakeScore)
    assert not any(k.startswith("fake.teacher") for k in loss.state_dict())  # the teacher is only referenced
    x = torch.randn(64, 2) * 2
    sigma = torch.rand(64) * 3 + 0.01
    assert torch.equal(loss.fake.denoise(x, sigma), teacher(x, sigma))  # mu_fake == mu_real exactly at init
    out = loss("student", student, teacher, {"batch_size": 32, "x0": teacher.sample(32)}, 0)
    assert float(out["dm_grad_norm"]) == 0.0
    out = loss("critic", student, teacher, {"batch_size": 32, "x0": teacher.sample(32)}, 0)
    out["loss"].backward()
    assert all(p.grad is not None for p in loss.fake.correction.net.mlp[-1].parameters())


def test_regression_term_kept_during_distribution_matching():
    torch.manual_seed(16)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("dmd2", fake_init="residual", fake_hidden=16, fake_depth=2, regression_weight=2.0,
                      regression_pairs=64)
    loss.setup(student, teacher)
    out = loss("student", student, teacher, {"batch_size": 32}, 0)
    torch.testing.assert_close(out["loss"].detach(), out["dm_loss"] + 2.0 * out["regression"])
    assert float(out["regression"]) > 0
