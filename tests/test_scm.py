"""sCM in TrigFlow (``losses/scm.py``, arXiv:2410.11081): the closed-form checks of docs/methods.md §4.3 in float64 -
g vanishes at the exact consistency map of Gaussian data (sCT at the ODE tangent, sCD with the exact teacher), the JVP
against a central difference, the sCD teacher tangent against the analytic trajectory, the tangent normalisation and
warm-up, the finite-difference fallback's loss gradient, identical dropout masks in the JVP and gradient passes."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import batch, ctx, gaussian_denoiser
from torch import nn

from distill.core.precond import trigflow_scalings
from distill.core.registry import ConfigError
from losses import build_loss
from losses.parts.jvp import normalize_tangent, tangent_warmup
from losses.scm import sct_velocity, tangent_g, teacher_velocity
from students import FlowMapStudent, build_student
from students.nets import sinusoidal_embedding
from teachers import GaussianMixtureTeacher, ring

torch.set_num_threads(1)

M, S, DIM = 1.0, 0.5, 2  # Gaussian data N(M, S^2) per dimension


def gaussian_teacher() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(torch.full((1, DIM), M, dtype=torch.float64), S)


def exact_f(x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """J*(x, sigma, 0) = M + (x - M) S / sqrt(S^2 + sigma^2), the PF-ODE's consistency map (VE units)."""
    return M + (x_ve - M) * (S / (S**2 + sigma**2).sqrt()).reshape(-1, *[1] * (x_ve.ndim - 1))


def exact_raw(sd: float):
    """The raw F that makes TrigFlow's f(x_t, t) = cos t x_t - sin t sd F(x_t/sd, t) the exact map: solving for F,
    F(y, t) = (cos t x_t - J*(x_t / cos t, sd tan t, 0)) / (sd sin t) with x_t = sd y."""

    def raw(y: torch.Tensor, t: torch.Tensor, t_to=None) -> torch.Tensor:
        c, s = (v.reshape(-1, *[1] * (y.ndim - 1)) for v in (torch.cos(t), torch.sin(t)))
        x_t = sd * y
        return (c * x_t - exact_f(x_t / c, sd * torch.tan(t))) / (sd * s)

    return raw


class TrigStudent(FlowMapStudent):
    """A TrigFlow student around a given raw function (the exact F, or a net with dropout)."""

    kind = "trigflow"

    def __init__(self, raw, sd: float, net: nn.Module | None = None) -> None:
        super().__init__((DIM,), 0.002, 80.0, sd)
        self._raw, self.net = raw, net

    def scalings(self, sigma):
        return trigflow_scalings(sigma, self.sigma_data)

    def raw_fn(self, cond=None):
        return self._raw

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        c_skip, c_out, c_in, c_noise = (v.reshape(-1, 1) for v in self.scalings(sigma_from))
        return c_skip * x + c_out * self._raw(c_in * x, c_noise.reshape(-1))


def gaussian_batch(n: int = 256, seed: int = 0, k: int = 0):
    g = torch.Generator().manual_seed(1000 + seed)
    return batch(M + S * torch.randn(n, DIM, generator=g, dtype=torch.float64), seed=seed, k=k)


def times(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.01 + (math.pi / 2 - 0.03) * torch.rand(n, generator=g, dtype=torch.float64)


def setup_loss(student, teacher, **kw):
    loss = build_loss("scm", **kw)
    loss.setup(student, teacher, ctx())
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Closed forms at the exact solution
# ---------------------------------------------------------------------------------------------------------------


def test_exact_student_is_the_consistency_map():
    student = TrigStudent(exact_raw(S), S)
    x = torch.randn(64, DIM, dtype=torch.float64) * 3
    sigma = torch.logspace(-2, 1.5, 64, dtype=torch.float64)
    assert torch.allclose(student.denoise(x, sigma), exact_f(x, sigma), atol=1e-12, rtol=0)


@pytest.mark.parametrize("sd", [S, 0.7])
def test_g_vanishes_at_the_exact_map_with_the_ode_tangent(sd):
    """g = cos t df/dt = 0 along the PF-ODE for the exact map; the tangent is the exact teacher's velocity (what
    sCT's one-sample tangent estimates without bias, and what sCD uses)."""
    n = 200
    t = times(n)
    x_t = torch.cos(t)[:, None] * (M + 2.0 * torch.randn(n, DIM, dtype=torch.float64))
    dxdt = teacher_velocity(gaussian_teacher(), x_t, t, sd)
    for method, h in (("autograd", 1e-3), ("finite_difference", 1e-5)):
        _, g = tangent_g(exact_raw(sd), x_t, t, dxdt, sd, r=1.0, method=method, h=h)
        assert g.abs().max() < (1e-8 if method == "autograd" else 1e-7), (method, g.abs().max())
    # a wrong tangent (the ODE velocity at another level) gives a clearly non-zero g: the check can fail
    _, g_bad = tangent_g(exact_raw(sd), x_t, t, 1.1 * dxdt, sd, r=1.0)
    assert g_bad.abs().max() > 1e-2


def test_scd_loss_path_has_zero_tangent_at_the_exact_map():
    teacher, student = gaussian_teacher(), TrigStudent(exact_raw(S), S)
    loss = setup_loss(student, teacher, mode="scd", warmup_iters=10)
    p = loss.pieces(student, teacher, gaussian_batch(), ctx(10))  # r = 1
    assert p["r"] == 1.0 and p["g_raw"].abs().max() < 1e-8
    # during the warm-up g is not zero (r < 1 drops part of cos t df/dt)
    p_half = loss.pieces(student, teacher, gaussian_batch(), ctx(5))
    assert p_half["r"] == 0.5 and p_half["g_raw"].abs().max() > 1e-3


def test_sct_tangent_is_the_one_sample_ode_tangent():
    """sCT's tangent is cos t z - sin t x0 = (cos t x_t - x0)/sin t: replacing x0 by E[x0 | x_t] = D*(x_t/cos t) gives
    the teacher's velocity, so it is unbiased; and it is what the loss uses."""
    teacher, student = gaussian_teacher(), TrigStudent(exact_raw(S), S)
    loss = setup_loss(student, teacher, mode="sct")
    b = gaussian_batch(seed=3)
    p = loss.pieces(student, teacher, b, ctx(0))
    twin = gaussian_batch(seed=3)
    z = S * twin.randn_like(twin.data)
    t = loss.draw_time(twin, twin.data)
    assert torch.equal(p["t"], t)
    assert torch.allclose(p["dxdt"], sct_velocity(b.data, z, t), atol=1e-14)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    assert torch.allclose(p["dxdt"], (c * p["x_t"] - b.data) / s, atol=1e-10)
    # posterior mean of the one-sample tangent, Monte Carlo over x0 | x_t for one x_t: the teacher's velocity
    n = 200_000
    t1 = torch.full((1,), 0.6, dtype=torch.float64)
    x_t = torch.tensor([[0.3, 1.4]], dtype=torch.float64)
    sig = S * math.tan(0.6)
    post_mean = gaussian_denoiser(x_t / math.cos(0.6), sig, M, S)  # E[x0 | x_t] = D*(x_VE, sigma)
    post_std = S * sig / math.sqrt(S**2 + sig**2)
    x0 = post_mean + post_std * torch.randn(n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = (x_t - math.cos(0.6) * x0) / math.sin(0.6)
    mc = sct_velocity(x0, z, t1.expand(n)).mean(0)
    exact = teacher_velocity(teacher, x_t, t1, S)[0]
    assert (mc - exact).abs().max() < 5 * post_std / math.sin(0.6) / math.sqrt(n)


def test_scd_teacher_tangent_matches_the_analytic_trajectory():
    """The ODE through x_VE at sigma for N(M, S^2) data is M + (x_VE - M) sqrt(S^2 + s^2)/sqrt(S^2 + sigma^2);
    in TrigFlow x_t(t) = cos t x_VE(sd tan t), differentiated by hand, for sd != S too."""
    sd, n = 0.7, 100
    t = times(n, seed=1)
    x_ve = M + 3 * torch.randn(n, DIM, dtype=torch.float64)
    sigma = sd * torch.tan(t)
    c_traj = (x_ve - M) / (S**2 + sigma**2).sqrt()[:, None]  # x_VE(s) = M + c sqrt(S^2 + s^2)
    cos, sin, tan = (v[:, None] for v in (torch.cos(t), torch.sin(t), torch.tan(t)))
    root = (S**2 + (sd * tan) ** 2).sqrt()
    analytic = -sin * (M + c_traj * root) + cos * c_traj * sd**2 * tan / (cos**2 * root)
    got = teacher_velocity(gaussian_teacher(), cos * x_ve, t, sd)
    assert torch.allclose(got, analytic, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# The JVP, normalisation, warm-up
# ---------------------------------------------------------------------------------------------------------------


def small_student(dtype=torch.float64, seed: int = 0, teacher=None):
    torch.manual_seed(seed)
    return build_student("trigflow", teacher or ring(), init="fresh", hidden=16, depth=2).to(dtype)


def test_jvp_g_equals_central_difference_of_f():
    """g (r = 1) = cos t df/dt along (dx_t/dt, 1), checked against a float64 central difference of TrigFlow's f built
    from the same raw network (a random, non-consistent one)."""
    student = small_student()
    sd = student.sigma_data
    raw = student.raw_fn(None)
    n = 64
    t = times(n, seed=2)
    x_t, dxdt = torch.randn(n, 2, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)

    def f(x, tt):
        return torch.cos(tt)[:, None] * x - torch.sin(tt)[:, None] * sd * raw(x / sd, tt)

    h = 1e-5
    ref = torch.cos(t)[:, None] * (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    with torch.no_grad():
        f_minus, g = tangent_g(raw, x_t, t, dxdt, sd, r=1.0)
    assert torch.allclose(f_minus, raw(x_t / sd, t))
    assert (g - ref).norm() < 1e-6 * ref.norm()
    _, g_fd = tangent_g(raw, x_t, t, dxdt, sd, r=1.0, method="finite_difference", h=1e-5)
    assert (g_fd - g).norm() < 1e-6 * g.norm()


def test_normalised_tangent_has_rms_norm_below_one():
    g = torch.randn(32, 1, 8, 8, dtype=torch.float64) * torch.logspace(-3, 3, 32, dtype=torch.float64)[:, None, None,
                                                                                                      None]
    gn, norm = normalize_tangent(g, 0.1)
    rms = gn.flatten(1).norm(dim=1) / 8.0
    assert torch.allclose(norm, g.flatten(1).norm(dim=1) / 8.0)
    assert (rms < 1).all() and torch.allclose(rms, norm / (norm + 0.1))
    # size invariance: the same per-pixel tangent on a 4x larger image gets the same normalisation
    big = g.repeat(1, 1, 2, 2)
    assert torch.allclose(normalize_tangent(big, 0.1)[1], norm)
    # and in the loss
    student = small_student()
    loss = setup_loss(student, ring(), mode="scd", warmup_iters=0)
    p = loss.pieces(student, ring(), batch(ring().sample(128).double(), seed=1), ctx(0))
    assert (p["g"].flatten(1).norm(dim=1) / math.sqrt(2) < 1).all()


def test_warmup_ramps_zero_to_one():
    h = 40
    r = [tangent_warmup(k, h) for k in range(2 * h)]
    assert r[0] == 0.0 and r[h // 2] == 0.5 and all(v == 1.0 for v in r[h:])
    assert all(b > a for a, b in zip(r[:h], r[1:h + 1]))
    assert tangent_warmup(0, 0) == 1.0
    student = small_student(torch.float32)
    loss = setup_loss(student, ring(), mode="scd", warmup_iters=h)
    data = ring().sample(16).float()
    assert [float(loss("student", student, ring(), batch(data, k=k), ctx(k, 200))["warmup_r"])
            for k in (0, 10, 40, 100)] == [0.0, 0.25, 1.0, 1.0]


@pytest.mark.parametrize("dtype,step", [(torch.float64, 1e-4), (torch.float32, 1e-3)])
def test_finite_difference_fallback_gives_the_autograd_gradient(dtype, step):
    """The loss gradient (student and weight net) with the central-difference JVP equals the autograd one to 1e-4
    relative, in float64 and in float32 with the default step."""
    grads = {}
    data = ring().sample(256).to(dtype)
    for method in ("autograd", "finite_difference"):
        student = small_student(dtype, seed=1)
        loss = setup_loss(student, ring(), mode="scd", warmup_iters=0, jvp=method, fd_step=step)
        torch.manual_seed(5)  # the weight net: identical in both
        for p in loss.weight.parameters():
            nn.init.normal_(p, std=0.1)
        loss.to(dtype)
        loss("student", student, ring(), batch(data, seed=2), ctx(3)).get("loss").backward()
        grads[method] = torch.cat([p.grad.flatten() for p in [*student.parameters(), *loss.weight.parameters()]])
    a, b = grads["autograd"], grads["finite_difference"]
    assert a.norm() > 0 and (a - b).norm() < 1e-4 * a.norm()


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.drop, self.lin2 = nn.Linear(DIM + 8, 64), nn.Dropout(0.5), nn.Linear(64, DIM)

    def forward(self, y, t, t_to=None):
        h = torch.cat([y, sinusoidal_embedding(t, 8)], 1)
        return self.lin2(self.drop(torch.tanh(self.lin1(h))))


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_dropout_masks_match_in_the_jvp_and_gradient_passes(method):
    torch.manual_seed(0)
    net = DropoutNet().double().train()
    student = TrigStudent(net, S, net)
    teacher = gaussian_teacher()
    loss = setup_loss(student, teacher, mode="scd", jvp=method)
    p = loss.pieces(student, teacher, gaussian_batch(), ctx(0))
    # same parameters and same mask: F_theta and F- are the same numbers
    assert torch.equal(p["F_theta"].detach(), p["F_minus"])
    # control: the net does drop units, so unmatched passes differ
    y, t = torch.randn(256, DIM, dtype=torch.float64), times(256)
    assert not torch.equal(net(y, t), net(y, t))


# ---------------------------------------------------------------------------------------------------------------
# Config, setup, sampling, teacher guidance
# ---------------------------------------------------------------------------------------------------------------


def test_bad_config_and_wrong_student_fail():
    for kw, match in (({"mode": "ct"}, "valid: sct, scd"), ({"jvp": "fwd"}, "valid: autograd, finite_difference"),
                      ({"prior_weight": "x"}, "valid: none, inv_sigma"), ({"tangent_c": 0}, "tangent_c")):
        with pytest.raises(ConfigError, match=match):
            build_loss("scm", **kw)
    cm = build_student("consistency", ring(), init="fresh", hidden=8, depth=1)
    with pytest.raises(ConfigError, match="TrigFlow student"):
        build_loss("scm").setup(cm, ring(), ctx())


def test_sampling_plan():
    teacher = ring()
    student = build_student("trigflow", teacher, init="fresh", hidden=8, depth=1)
    loss = setup_loss(student, teacher)
    plan = loss.sampling()
    sd = teacher.sigma_data
    assert plan.gamma == 1.0
    assert plan.levels[2] == pytest.approx((teacher.sigma_max, sd * math.tan(1.1)))
    low = setup_loss(student, teacher, t_mid=0.45).sampling()
    assert low.levels[2] == pytest.approx((teacher.sigma_max, sd * math.tan(0.45))) and low.levels[4] == plan.levels[4]
    with pytest.raises(ConfigError, match="t_mid"):
        build_loss("scm", t_mid=1.6)
    for k in (4, 8):
        lv = plan.levels[k]
        assert len(lv) == k and lv[0] == teacher.sigma_max and all(a > b for a, b in zip(lv, lv[1:]))


def test_guidance_reaches_the_teacher_and_weight_is_trained():
    seen = []

    class Spy(GaussianMixtureTeacher):
        def forward(self, x, sigma, cond=None, guidance=1.0):
            seen.append(guidance)
            return super().forward(x, sigma, cond, guidance)

    teacher = Spy(torch.full((1, DIM), M, dtype=torch.float64), S)
    student = small_student(seed=2, teacher=teacher)
    loss = setup_loss(student, teacher, mode="scd", guidance=2.5).double()
    out = loss("student", student, teacher, gaussian_batch(), ctx(0))
    assert seen == [2.5]
    out["loss"].backward()
    assert loss.student_phase_modules() == ("weight",)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.weight.parameters())
    assert {"tangent_norm", "warmup_r", "w_mean"} <= set(out)


def exact_denoiser_raw(sd: float):
    """The raw F whose f(x_t, t) = cos t x_t - sin t sd F is the exact Gaussian teacher's denoiser (not the
    consistency map): F = (cos t x_t - D*(x_t / cos t, sd tan t)) / (sd sin t), i.e. the teacher's velocity / sd."""
    teacher = gaussian_teacher()

    def raw(y: torch.Tensor, t: torch.Tensor, t_to=None) -> torch.Tensor:
        return teacher_velocity(teacher, sd * y, t, sd) / sd

    return raw


def test_denoiser_warm_start_is_trigflow_diffusion_then_the_tangent_warmup_starts():
    """For ``denoiser_iters`` iterations the loss is the TrigFlow diffusion regression (zero at the teacher's own
    denoiser, no JVP), then sCD with the tangent warm-up counted from the end of the warm start."""
    teacher = gaussian_teacher()
    exact_den = TrigStudent(exact_denoiser_raw(S), S)
    loss = setup_loss(exact_den, teacher, mode="scd", warmup_iters=10, denoiser_iters=20)
    b = gaussian_batch(seed=4)
    out = loss("student", exact_den, teacher, b, ctx(19, 100))
    assert float(out["loss"]) < 1e-20 and float(out["warmup_r"]) == 0.0 and "tangent_norm" not in out
    # the consistency map is not the denoiser: the warm-start loss sees the difference
    cm = TrigStudent(exact_raw(S), S)
    assert float(loss("student", cm, teacher, b, ctx(0, 100))["loss"]) > 1e-3
    # after it: the sCD pieces (JVP) with r = (k - 20) / 10, and g = 0 at the exact consistency map at r = 1
    assert loss.pieces(cm, teacher, b, ctx(25, 100))["r"] == 0.5
    assert loss.pieces(cm, teacher, b, ctx(30, 100))["g_raw"].abs().max() < 1e-8
    with pytest.raises(ConfigError, match="denoiser_iters"):
        build_loss("scm", denoiser_iters=-1)


def test_wide_noise_points_are_off_marginal_and_the_exact_map_still_has_zero_tangent():
    """``wide_frac``: that fraction of the batch is noised with ``wide_scale`` times the std. The consistency
    condition holds off the noising marginal too, so the exact map's g is still 0 there (sCD); sCT refuses it."""
    teacher, student = gaussian_teacher(), TrigStudent(exact_raw(S), S)
    b = gaussian_batch(n=400, seed=5)  # a batch's random stream advances per draw: one fresh batch per call
    plain = setup_loss(student, teacher, mode="scd", warmup_iters=0).pieces(student, teacher, gaussian_batch(
        n=400, seed=5), ctx(1))
    wide = setup_loss(student, teacher, mode="scd", warmup_iters=0, wide_frac=0.25, wide_scale=3.0)
    p = wide.pieces(student, teacher, b, ctx(1))
    assert torch.equal(p["t"], plain["t"])  # same draws, only the first quarter's noise is scaled
    c, s = torch.cos(p["t"])[:, None], torch.sin(p["t"])[:, None]
    z_plain = (plain["x_t"] - c * b.data) / s
    z_wide = (p["x_t"] - c * b.data) / s
    assert torch.allclose(z_wide[:100], 3.0 * z_plain[:100]) and torch.allclose(z_wide[100:], z_plain[100:])
    assert p["g_raw"].abs().max() < 1e-8  # the exact consistency map is consistent off the marginal too
    # the check can fail: a map exact only for other data has a non-zero tangent at those points
    wrong = TrigStudent(exact_raw(0.7), S)
    assert wide.pieces(wrong, teacher, gaussian_batch(n=400, seed=5), ctx(1))["g_raw"].abs().max() > 1e-3
    for kw, match in (({"mode": "sct", "wide_frac": 0.1}, "needs mode: scd"), ({"wide_frac": 1.5}, "wide_frac"),
                      ({"wide_scale": 0.5}, "wide_scale")):
        with pytest.raises(ConfigError, match=match):
            build_loss("scm", **kw)
