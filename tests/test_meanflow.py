"""MeanFlow (``losses/meanflow.py``, arXiv:2505.13447) in float64: the identity's residual vanishes at the exact average
velocity of Gaussian data with the exact teacher (and not for a perturbed map), the RF average velocity is exactly the
flow map's secant ``(z_t - z_r)/(t - r)`` and its ``r = t`` limit the instantaneous velocity, the JVP equals a central
difference, the data-mode target is unbiased, the (r, t) sampler and the sampling plan, and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import batch, ctx

from distill.core.conversions import rf_t_from_sigma, sigma_from_rf_t
from distill.core.registry import ConfigError
from losses import LOSSES, build_loss
from losses.meanflow import adaptive_weight, average_velocity, rf_uniform_levels, teacher_velocity
from students import FlowMapStudent, build_student, sample_student
from teachers import GaussianMixtureTeacher

torch.set_num_threads(1)

M, S = 1.0, 0.5  # Gaussian data N(M, S^2) per dimension
DIM = 2


def gaussian_teacher(dim: int = DIM) -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(torch.full((1, dim), M, dtype=torch.float64), S)


def exact_flow_map(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float = S, m: float = M) -> torch.Tensor:
    """J*(x, a, b) = m + (x - m) sqrt(s^2 + b^2) / sqrt(s^2 + a^2): the PF-ODE of N(m, s^2) from level a to b."""
    return m + (x - m) * ((s**2 + b**2) / (s**2 + a**2)).sqrt()[:, None]


class GaussianFlowMap(FlowMapStudent):
    """A parameter-free flow-map student whose ``J`` is the exact map of ``N(m, s^2)``: ``D(x, a, b)`` solves
    ``J = (b/a) x + (1 - b/a) D`` for ``J*``, rationalised so it has no 0/0 at ``a = b`` (where it is the denoiser
    ``D*(x, a)``): ``D = m + (x - m) s^2 (a + b) / ((a sqrt(s^2 + b^2) + b sqrt(s^2 + a^2)) sqrt(s^2 + a^2))``.
    With ``s != S`` or ``m != M`` it is the (self-consistent) flow map of another Gaussian: a perturbed student."""

    kind = "flowmap"

    def __init__(self, s: float = S, m: float = M, dim: int = DIM) -> None:
        super().__init__((dim,), 0.002, 80.0, s)
        self.s, self.m = s, m

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        a, b, s2 = sigma_from, sigma_to, self.s**2
        ratio = s2 * (a + b) / ((a * (s2 + b**2).sqrt() + b * (s2 + a**2).sqrt()) * (s2 + a**2).sqrt())
        return self.m + (x - self.m) * ratio[:, None]


def mlp_student(dim: int = DIM, seed: int = 0) -> FlowMapStudent:
    torch.manual_seed(seed)
    return build_student("flowmap", gaussian_teacher(dim), init="fresh", hidden=32, depth=2).double()


def points(n: int = 512, seed: int = 0, r_eq_t: bool = False):
    """RF points ``z_t`` of the data (``x0 ~ N(M, S^2)``) with ``0.01 < r < t < 0.98`` (or ``r = t``), float64."""
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.93 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t if r_eq_t else (0.01 + (t - 0.01) * torch.rand(n, generator=g, dtype=torch.float64))
    x0 = M + S * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    eps = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    z = (1 - t[:, None]) * x0 + t[:, None] * eps
    return z, r, t, x0, eps


def built(student=None, **kwargs):
    loss = build_loss("meanflow", **kwargs)
    loss.setup(student, gaussian_teacher(), ctx())
    return loss


# ---------------------------------------------------------------------------------------------------------------


def test_the_gaussian_test_student_is_the_exact_flow_map():
    """The test's own fixture: J of GaussianFlowMap equals J* (for a != b) and D(x, a, a) is the exact denoiser."""
    st = GaussianFlowMap()
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(256, DIM, generator=g, dtype=torch.float64)
    a = 10 ** (4 * torch.rand(256, generator=g, dtype=torch.float64) - 2)
    b = a * torch.rand(256, generator=g, dtype=torch.float64)
    torch.testing.assert_close(st(x, a, b), exact_flow_map(x, a, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.x0_estimate(x, a, a), gaussian_teacher()(x, a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,tol", [("autograd", 1e-8), ("finite_difference", 1e-5)])
def test_identity_residual_vanishes_at_the_exact_average_velocity(method, tol):
    """u* - sg(v - (t - r) du*/dt) = 0 for the exact flow map and the exact teacher velocity (the MeanFlow identity,
    arXiv:2505.13447 eq. 6), at every (r, t) (r = t included) and through forward(); the finite-difference JVP
    (h = 1e-3) leaves an O(h^2) residual."""
    teacher, student = gaussian_teacher(), GaussianFlowMap()
    loss = built(student, jvp=method)
    for r_eq_t in (False, True):
        z, r, t, _, _ = points(r_eq_t=r_eq_t)
        v = teacher_velocity(teacher, z, t)
        u_tgt, dudt = loss.target(student, z, r, t, v)
        u = average_velocity(student, z, r, t)
        assert float((u - u_tgt).abs().max()) < tol
        assert float(dudt.abs().mean()) > 0.1  # the correction term is not trivially zero
    data = M + S * torch.randn(4096, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = loss("student", student, teacher, batch(data, seed=3), ctx())
    assert float(out["residual_sq"]) < tol**2 and float(out["loss"]) < tol**2 / 1e-3
    assert float(out["weight"]) == pytest.approx(1e3, rel=1e-6)  # w = 1/(0 + c)^1 at the exact map
    assert float(out["frac_r_ne_t"]) == pytest.approx(0.25, abs=0.03)  # 4.4 standard errors
    assert float(out["dudt_abs"]) > 0.1


def test_identity_residual_does_not_vanish_for_a_perturbed_map():
    """A flow map of another Gaussian (std 0.6, or mean 1.1) is self-consistent but not the teacher's: the residual
    is O(the perturbation), both through target() and forward(); p = 0 gives the plain mean squared residual."""
    teacher = gaussian_teacher()
    z, r, t, _, _ = points()
    for student in (GaussianFlowMap(s=0.6), GaussianFlowMap(m=1.1)):
        loss = built(student)
        u_tgt, _ = loss.target(student, z, r, t, teacher_velocity(teacher, z, t))
        res = (average_velocity(student, z, r, t) - u_tgt).pow(2).sum(1)
        assert float(res.sqrt().mean()) > 0.02, float(res.sqrt().mean())
        data = M + S * torch.randn(2048, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        out = loss("student", student, teacher, batch(data, seed=3), ctx())
        assert float(out["residual_sq"]) > 1e-4
        plain = built(student, norm_p=0.0)("student", student, teacher, batch(data, seed=3), ctx())
        assert float(plain["loss"]) == pytest.approx(float(out["residual_sq"]), rel=1e-12)
        assert float(plain["weight"]) == 1.0


def test_rf_average_velocity_is_the_flow_maps_secant():
    """u(z_t, r, t) = (z_t - D)/t equals (z_t - z_r)/(t - r) with z_r = J(x, sigma_t, sigma_r)/(1 + sigma_r) for any
    flow map (an untrained MLP student, float64), and for the exact map z_r is the exact RF ODE solution."""
    z, r, t, _, _ = points()
    sig_t, sig_r = sigma_from_rf_t(t), sigma_from_rf_t(r)
    for student in (GaussianFlowMap(), mlp_student()):
        with torch.no_grad():
            z_r = student(z / (1 - t[:, None]), sig_t, sig_r) / (1 + sig_r[:, None])
            torch.testing.assert_close(average_velocity(student, z, r, t), (z - z_r) / (t - r)[:, None],
                                       rtol=1e-9, atol=1e-9)
    exact_z_r = exact_flow_map(z / (1 - t[:, None]), sig_t, sig_r) * (1 - r[:, None])
    u = average_velocity(GaussianFlowMap(), z, r, t)
    torch.testing.assert_close(z - (t - r)[:, None] * u, exact_z_r, rtol=1e-12, atol=1e-12)


def test_u_at_r_equals_t_is_the_instantaneous_velocity():
    """At r = t the closed form has no 0/0: for the exact map u(z, t, t) is the teacher's RF velocity, and for an
    MLP student it is the limit of its secant (r = t - 1e-7, an O(1e-7) difference) and (z - D_theta(x, s, s))/t."""
    teacher = gaussian_teacher()
    z, _, t, _, _ = points()
    torch.testing.assert_close(average_velocity(GaussianFlowMap(), z, t, t), teacher_velocity(teacher, z, t),
                               rtol=1e-12, atol=1e-12)
    student = mlp_student()
    with torch.no_grad():
        u = average_velocity(student, z, t, t)
        assert torch.isfinite(u).all()
        near = average_velocity(student, z, t - 1e-7, t)
        s = sigma_from_rf_t(t)
        torch.testing.assert_close(u, (z - student.x0_estimate(z / (1 - t[:, None]), s, s)) / t[:, None])
    assert float((u - near).abs().max()) < 1e-5


def test_jvp_equals_a_float64_central_difference():
    """du/dt along (dz, dr, dt) = (v, 0, 1) from one autograd JVP equals an independent float64 central difference
    (h = 1e-5) of u(z + h v, r, t + h), and the finite-difference option agrees to its O(h^2)."""
    teacher, student = gaussian_teacher(), mlp_student(seed=3)
    z, r, t, _, _ = points(n=256, seed=4)
    v = teacher_velocity(teacher, z, t)
    _, dudt = built(student).target(student, z, r, t, v)
    h = 1e-5
    with torch.no_grad():
        plus = average_velocity(student, z + h * v, r, t + h)
        minus = average_velocity(student, z - h * v, r, t - h)
        # a wrong tangent (dr = 1, or dz = 0) must not pass
        wrong = (average_velocity(student, z + h * v, r + h, t + h) - average_velocity(student, z - h * v, r - h,
                                                                                         t - h)) / (2 * h)
    central = (plus - minus) / (2 * h)
    scale = float(central.abs().max())
    assert float((dudt - central).abs().max()) < 1e-7 * scale
    assert float((wrong - central).abs().max()) > 1e-3 * scale
    _, fd = built(student, jvp="finite_difference").target(student, z, r, t, v)
    assert float((fd - dudt).abs().max()) < 1e-4 * scale


def test_data_mode_target_is_unbiased_for_gaussian_data():
    """source: data uses v = eps - x0 = (z_t - x0)/t; with x0 drawn from its posterior given z_t (N(D*, s^2 sigma^2 /
    (s^2 + sigma^2)) in VE), the Monte Carlo mean of the data-mode target equals the teacher-mode target (the target
    is linear in v): 40,000 draws per point, a 5-standard-error tolerance (the standard errors are measured)."""
    teacher, student = gaussian_teacher(), mlp_student(seed=1)
    loss_d, loss_t = built(student, source="data"), built(student, source="teacher")
    z, r, t, _, _ = points(n=4, seed=5)
    k = 40_000
    zz, rr, tt = z.repeat_interleave(k, 0), r.repeat_interleave(k), t.repeat_interleave(k)
    sig = sigma_from_rf_t(tt)[:, None]
    x = zz / (1 - tt[:, None])
    post_mean, post_std = gaussian_teacher()(x, sig[:, 0]), S * sig / (S**2 + sig**2).sqrt()
    x0 = post_mean + post_std * torch.randn(zz.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    eps = (zz - (1 - tt[:, None]) * x0) / tt[:, None]
    v_data = loss_d.velocity(teacher, zz, tt, x0, eps)
    torch.testing.assert_close(v_data, eps - x0)
    tgt_data, _ = loss_d.target(student, zz, rr, tt, v_data)
    tgt_data = tgt_data.reshape(4, k, DIM)
    tgt_teacher, _ = loss_t.target(student, z, r, t, loss_t.velocity(teacher, z, t, None, None))
    err = (tgt_data.mean(1) - tgt_teacher).abs()
    se = tgt_data.std(1) / math.sqrt(k)
    assert bool((err < 5 * se).all()), (err, se)
    assert float(se.max()) < 0.02  # the test has power


def test_time_sampler_and_clipping():
    """(r, t): t the larger and r the smaller of two logit-normal draws (the median of logit t is P_mean + 0.545
    P_std, the max of two normals), a fraction `ratio` of r != t, both clipped to the teacher's RF range."""
    loss = built(None, ratio=0.25, p_mean=-0.4, p_std=1.0)
    like = torch.zeros(1, dtype=torch.float64)
    r, t, neq = loss.sample_times(batch(size=40_000, seed=7, dtype=torch.float64), like)
    assert bool((r <= t).all()) and bool((r[~neq] == t[~neq]).all()) and bool((r[neq] < t[neq]).all())
    assert float(neq.double().mean()) == pytest.approx(0.25, abs=0.01)
    assert float(torch.logit(t).median()) == pytest.approx(-0.4 + 0.5449, abs=0.03)
    assert float(torch.logit(r[neq]).median()) == pytest.approx(-0.4 - 0.5449, abs=0.05)
    lo, hi = 0.002 / 1.002, 80.0 / 81.0
    assert loss.t_lo == pytest.approx(lo) and loss.t_hi == pytest.approx(hi)
    wide = built(None, ratio=1.0, p_std=6.0)  # a wide sampler hits both clips
    r, t, neq = wide.sample_times(batch(size=4096, seed=8, dtype=torch.float64), like)
    assert float(t.min()) >= lo and float(t.max()) <= hi and float(r.min()) >= lo
    assert float((t == hi).double().mean()) > 0.1 and float((r == lo).double().mean()) > 0.1
    assert float(sigma_from_rf_t(t).max()) == pytest.approx(80.0)
    r, t, neq = built(None, time_dist="uniform", ratio=0.0).sample_times(batch(size=20_000, seed=9,
                                                                              dtype=torch.float64), like)
    assert not neq.any() and bool((r == t).all())
    assert float(t.mean()) == pytest.approx(2 / 3, abs=0.01)  # E max(U1, U2)
    # log_uniform: logit(t) = log(sigma) uniform over [log sigma_min, log sigma_max]; t the max of two draws, so the
    # median of logit(t) sits at 1/sqrt(2) of the range and r's (r != t) at 1 - 1/sqrt(2); both ends are reached
    r, t, neq = built(None, time_dist="log_uniform", ratio=0.5).sample_times(batch(size=40_000, seed=10,
                                                                                   dtype=torch.float64), like)
    a, b = math.log(0.002), math.log(80.0)
    assert float(torch.logit(t).median()) == pytest.approx(a + (b - a) / math.sqrt(2), abs=0.1)
    assert float(torch.logit(r[neq]).median()) == pytest.approx(a + (b - a) * (1 - 1 / math.sqrt(2)), abs=0.15)
    assert float(t.min()) >= lo and float(t.max()) <= hi and float(r.min()) >= lo
    assert float((sigma_from_rf_t(t) > 40).double().mean()) == pytest.approx(1 - (1 - math.log(2) / (b - a)) ** 2,
                                                                              abs=0.01)


def test_sampling_plan_is_deterministic_jumps_uniform_in_rf_time():
    """gamma 0; 1 NFE sigma_max -> 0; k NFE at t_i = 1 - i/k (sigma 1 at 2 NFE; 3, 1, 1/3 at 4). With the exact map
    every NFE gives the same samples (the flow map's semigroup), the exact ODE solution from sigma_max."""
    loss = built(None)
    plan = loss.sampling()
    assert plan.gamma == 0.0
    torch.testing.assert_close(plan.sigmas(1, 80.0), torch.tensor([80.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(plan.sigmas(2, 80.0), torch.tensor([80.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(plan.sigmas(4, 80.0), torch.tensor([80.0, 3.0, 1.0, 1 / 3, 0.0], dtype=torch.float64))
    t8 = rf_t_from_sigma(plan.sigmas(8, 80.0)[1:-1])
    torch.testing.assert_close(t8, torch.tensor([1 - i / 8 for i in range(1, 8)], dtype=torch.float64))
    assert rf_uniform_levels(3, 80.0) == (80.0, 2.0, 0.5)
    noise = torch.randn(512, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_flow_map(80.0 * noise, torch.full((512,), 80.0, dtype=torch.float64), torch.zeros(512,
                                                                                                     dtype=torch.float64))
    for nfe in (1, 2, 4, 8):
        x = sample_student(GaussianFlowMap(), noise, plan.sigmas(nfe, 80.0), plan.gamma)
        torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10)


def test_adaptive_weight_closed_form():
    sq = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    w = adaptive_weight(sq, 1.0, 1e-3)
    torch.testing.assert_close(w, 1 / (sq.detach() + 1e-3))
    assert not w.requires_grad
    torch.testing.assert_close(adaptive_weight(sq, 0.5, 1.0), 1 / (sq.detach() + 1.0).sqrt())


def test_short_training_run_learns_the_one_step_map():
    """300 MeanFlow distillation steps (exact Gaussian teacher; uniform times, 75% r != t, p = 0.5; fresh flow-map
    MLP 32x2, Adam 3e-3, batch 256): the 1-NFE map z -> J(80 z, 80, 0) moves towards the exact one (RMSE over 2048
    noises; measured 1.23 untrained -> 0.28). With ratio 0 (flow matching only: u(z, 0, 1) is never trained) it stays
    where it started (measured 1.31 after 150 steps)."""
    def run(ratio: float, steps: int) -> tuple[float, float]:
        torch.manual_seed(0)
        teacher = gaussian_teacher(1)
        student = build_student("flowmap", teacher, init="fresh", hidden=32, depth=2)
        loss = build_loss("meanflow", ratio=ratio, time_dist="uniform", norm_p=0.5)
        loss.setup(student, teacher, ctx())
        noise = torch.randn(2048, 1, generator=torch.Generator().manual_seed(1))
        exact = exact_flow_map(80.0 * noise.double(), torch.full((2048,), 80.0, dtype=torch.float64),
                               torch.zeros(2048, dtype=torch.float64))

        def rmse() -> float:
            with torch.no_grad():
                x = sample_student(student, noise, loss.sampling().sigmas(1, 80.0), 0.0).double()
            return float((x - exact).pow(2).mean().sqrt())

        init = rmse()
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(2)
        for k in range(steps):
            x0 = (M + S * torch.randn(256, 1, generator=g)).float()
            out = loss("student", student, teacher, batch(x0, k=k), ctx(k, steps))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        return init, rmse()

    init, final = run(0.75, 300)
    assert init > 0.8 and final < 0.4, (init, final)
    assert run(0.0, 150)[1] > 0.8


def test_config_errors_and_needs_data():
    with pytest.raises(ConfigError, match="unknown source 'ema'; valid: teacher, data"):
        build_loss("meanflow", source="ema")
    with pytest.raises(ConfigError, match="unknown jvp 'forward'; valid: autograd, finite_difference"):
        build_loss("meanflow", jvp="forward")
    with pytest.raises(ConfigError, match="time_dist"):
        build_loss("meanflow", time_dist="beta")
    with pytest.raises(ConfigError, match="ratio"):
        build_loss("meanflow", ratio=1.5)
    with pytest.raises(ConfigError, match="norm_eps"):
        build_loss("meanflow", norm_eps=0.0)
    with pytest.raises(ConfigError, match="valid keys: .*ratio.*source"):
        LOSSES.build("meanflow", flow_ratio=0.5)
    loss = build_loss("meanflow", source="data")
    assert loss.needs_data and loss.data_specs()["data"].source == "real" and loss.student_kind == "flowmap"
    with pytest.raises(ValueError, match="batch.data"):
        loss("student", GaussianFlowMap(), gaussian_teacher(), batch(size=4, dtype=torch.float64), ctx())


def test_off_marginal_points_keep_the_identity_at_the_exact_map_and_only_distil():
    """``wide_frac``: a share of the batch noised wider (off the marginal). The identity with the teacher's velocity
    holds everywhere, so the exact map's residual is still 0 and a perturbed map's is not; ``source: data`` refuses
    it (``eps - x0`` averages to the wider marginal's velocity)."""
    teacher = gaussian_teacher()
    data = M + S * torch.randn(2048, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wide = built(GaussianFlowMap(), wide_frac=0.5, wide_scale=3.0)
    out = wide("student", GaussianFlowMap(), teacher, batch(data, seed=3), ctx())
    assert float(out["residual_sq"]) < 1e-16
    bad = GaussianFlowMap(s=0.6)
    res_wide = float(built(bad, wide_frac=0.5, wide_scale=3.0)("student", bad, teacher, batch(data, seed=3),
                                                                 ctx())["residual_sq"])
    res_plain = float(built(bad)("student", bad, teacher, batch(data, seed=3), ctx())["residual_sq"])
    assert res_wide > 1e-4 and res_wide != pytest.approx(res_plain, rel=1e-3)  # the wider points are really used
    with pytest.raises(ConfigError, match="needs source: teacher"):
        build_loss("meanflow", source="data", wide_frac=0.1)
    with pytest.raises(ConfigError, match="wide_scale"):
        build_loss("meanflow", wide_scale=0.5)


def test_p_boundary_sends_that_share_of_long_jumps_to_the_data_end():
    """``p_boundary``: of the r != t samples that share has r = t(sigma_min) (the 1-NFE jump); everything else is
    the sampler's own draw."""
    like = torch.zeros(1, dtype=torch.float64)
    loss = built(None, ratio=0.5, p_boundary=0.4, time_dist="uniform")
    r, t, neq = loss.sample_times(batch(size=40_000, seed=7, dtype=torch.float64), like)
    at_end = r[neq] == loss.t_lo
    assert float(at_end.double().mean()) == pytest.approx(0.4, abs=0.01)
    assert float(neq.double().mean()) == pytest.approx(0.5, abs=0.01) and bool((r[~neq] == t[~neq]).all())
    # the rest of the draws is the sampler without it: same t, same r != t pattern, same r off the boundary share
    r0, t0, neq0 = built(None, ratio=0.5, time_dist="uniform").sample_times(batch(size=40_000, seed=7,
                                                                                  dtype=torch.float64), like)
    assert torch.equal(t, t0) and bool((neq | ~neq0).all())  # (a pair clipped to r = t = t_hi can now jump)
    keep = ~(neq & (r == loss.t_lo))
    assert torch.equal(r[keep], r0[keep]) and float((r0[~keep] > loss.t_lo).double().mean()) > 0.99
    with pytest.raises(ConfigError, match="p_boundary"):
        build_loss("meanflow", p_boundary=1.5)


def test_gap_warmup_caps_the_gap_short_to_long_and_then_leaves_the_sampler_alone():
    """``gap_warmup``: at progress p < gap_warmup the gap t - r is at most max(gap_min, p / gap_warmup) of the RF
    range (and reaches it: the cap binds), t and the r = t pattern untouched; from p = gap_warmup on the draws are
    the sampler's own, bit for bit."""
    like = torch.zeros(1, dtype=torch.float64)
    loss = built(None, ratio=0.5, time_dist="uniform", gap_warmup=0.5, gap_min=0.05)
    span = loss.t_hi - loss.t_lo
    free_r, free_t, free_neq = built(None, ratio=0.5, time_dist="uniform").sample_times(
        batch(size=20_000, seed=3, dtype=torch.float64), like)
    for progress, frac in ((0.0, 0.05), (0.01, 0.05), (0.2, 0.4), (0.45, 0.9)):
        r, t, neq = loss.sample_times(batch(size=20_000, seed=3, dtype=torch.float64), like, progress)
        gap = t - r
        assert float(gap.max()) <= frac * span + 1e-12 and float(gap.max()) > 0.95 * frac * span
        assert torch.equal(t, free_t) and bool((r[~free_neq] == t[~free_neq]).all())
        assert torch.equal(r[free_t - free_r <= frac * span], free_r[free_t - free_r <= frac * span])
    for progress in (0.5, 0.9, 1.0):
        r, t, neq = loss.sample_times(batch(size=20_000, seed=3, dtype=torch.float64), like, progress)
        assert torch.equal(r, free_r) and torch.equal(t, free_t) and torch.equal(neq, free_neq)
    assert loss.gap_cap(0.6) is None and built(None).gap_cap(0.0) is None
    both = built(None, ratio=0.5, time_dist="uniform", gap_warmup=0.5, p_boundary=0.5)  # the cap binds its jumps too
    r, t, _ = both.sample_times(batch(size=20_000, seed=3, dtype=torch.float64), like, 0.1)
    assert float((t - r).max()) <= 0.2 * span + 1e-12
    r, t, _ = both.sample_times(batch(size=20_000, seed=3, dtype=torch.float64), like, 0.5)
    assert float((r == both.t_lo).double().mean()) > 0.1
    for bad in ({"gap_warmup": 1.5}, {"gap_warmup": -0.1}, {"gap_min": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_loss("meanflow", **bad)
