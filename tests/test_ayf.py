"""Align Your Flow (``losses/ayf.py``), float64 closed forms on Gaussian data N(M, S^2):

* at the exact flow map J*(x, a, b) = M + (x - M) q(b)/q(a), q(sigma) = sqrt(S^2 + sigma^2), with the exact teacher,
  the full (r = 1) Eulerian and Lagrangian tangents vanish; a perturbed map's do not;
* the tangents equal independent central differences: the Eulerian one of J along the exact ODE trajectory in its
  start point, the Lagrangian one of J in its end point minus the exact velocity; the forward-mode JVP equals a
  float64 central difference; the ``rf`` units equal the paper's rectified-flow tangent (Algorithm 1's
  ``(F - v) + r (t - s) dF/dt`` and its Lagrangian analogue) computed from scratch in RF coordinates;
* the normalised tangent has norm < 1 (n / (n + c) exactly), the warm-up ramps 0 -> r_max, the (a, b) density and the
  weight are as documented, the sampling plan chains exact jumps into the exact map;
* a few gradient steps on a one-parameter family J_theta = M + (x - M) (q(b)/q(a))^theta move theta to 1 under
  each objective (the sign check).
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import batch, ctx
from torch import nn

from distill.core.registry import ConfigError
from losses import build_loss
from losses.ayf import rf_uniform_levels
from losses.parts.jvp import normalize_tangent, tangent_warmup
from students import FlowMapStudent
from teachers import GaussianMixtureTeacher

torch.set_num_threads(1)

M, S = 0.7, 0.5
DT = torch.float64


def q(sigma: torch.Tensor) -> torch.Tensor:
    return (S**2 + sigma**2).sqrt()


def teacher(dim: int = 2) -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(torch.full((1, dim), M, dtype=DT), S)


class PowerFlowMap(FlowMapStudent):
    """J_theta(x, a, b) = M + (x - M) (q(b)/q(a))^theta + shift (a - b) / (1 + a): theta = 1, shift = 0 is the exact
    flow map.
    ``x0_estimate`` returns the D with J = (b/a) x + (1 - b/a) D, i.e. D = (a J - b x) / (a - b)."""

    kind = "flowmap"

    def __init__(self, theta: float = 1.0, shift: float = 0.0, dim: int = 2) -> None:
        super().__init__((dim,), 0.002, 80.0, S)
        self.theta = nn.Parameter(torch.tensor(theta, dtype=DT))
        self.shift = shift

    def jmap(self, x, a, b):
        ratio = (q(b) / q(a)) ** self.theta
        return M + (x - M) * ratio[:, None] + self.shift * ((a - b) / (1 + a))[:, None]

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        a, b = sigma_from[:, None], sigma_to[:, None]
        return (a * self.jmap(x, sigma_from, sigma_to) - b * x) / (a - b)


def points(n: int = 64, dim: int = 2, seed: int = 0, b_zero: bool = False):
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(torch.randn(n, generator=g, dtype=DT) * 1.2)
    b = a * torch.rand(n, generator=g, dtype=DT) * 0.95
    if b_zero:
        b[: n // 2] = 0.0
    x0 = M + S * torch.randn(n, dim, generator=g, dtype=DT)
    x = x0 + a[:, None] * torch.randn(n, dim, generator=g, dtype=DT)
    return x, a, b


def loss_for(objective: str, **kw):
    cfg = {"objective": objective, "warmup": 0, "warmup_max": 1.0, "units": "ve"}
    cfg.update(kw)
    loss = build_loss("ayf", **cfg)
    loss.setup(PowerFlowMap(), teacher(), ctx())
    return loss


def exact_traj(x, a, a_new):
    """The exact PF-ODE solution of N(M, S^2) from (x, a) to level a_new."""
    return M + (x - M) * (q(a_new) / q(a))[:, None]


def exact_v(x, sigma):
    """Exact velocity dx/dsigma = sigma (x - M) / q(sigma)^2."""
    return (sigma / q(sigma) ** 2)[:, None] * (x - M)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["eulerian", "lagrangian"])
@pytest.mark.parametrize("units", ["ve", "rf"])
def test_tangent_vanishes_at_exact_flow_map_and_not_for_perturbed(objective, units):
    loss, te = loss_for(objective, units=units), teacher()
    x, a, b = points(b_zero=objective == "eulerian")
    if objective == "lagrangian":
        b = b.clamp_min(0.002)
    raw, g = loss.tangent(PowerFlowMap(), te, x, a, b, 1.0)
    assert raw.abs().max() < 1e-8 and g.abs().max() < 1e-8
    for student in (PowerFlowMap(theta=1.2), PowerFlowMap(shift=0.3)):
        raw_p, _ = loss.tangent(student, te, x, a, b, 1.0)
        per_sample = raw_p.norm(dim=1)
        assert per_sample.median() > 1e-3, per_sample.median()


def test_eulerian_tangent_is_dJ_da_along_the_exact_trajectory():
    """units ve, r = 1: raw = d/da J(x_a, a, b) along the teacher ODE, checked by a float64 central difference of J on
    the exact trajectory (independent of the loss's D-based formula); jvp autograd == finite difference."""
    te, st = teacher(), PowerFlowMap(theta=1.3, shift=0.2)
    x, a, b = points(b_zero=True)
    h = 1e-5 * a
    jp = st(exact_traj(x, a, a + h), a + h, b)
    jm = st(exact_traj(x, a, a - h), a - h, b)
    fd = (jp - jm) / (2 * h[:, None])
    raw, _ = loss_for("eulerian").tangent(st, te, x, a, b, 1.0)
    torch.testing.assert_close(raw, fd, rtol=1e-6, atol=1e-8)
    raw_fd, _ = loss_for("eulerian", jvp="finite_difference", jvp_h=1e-5).tangent(st, te, x, a, b, 1.0)
    torch.testing.assert_close(raw, raw_fd, rtol=1e-6, atol=1e-8)


def test_lagrangian_tangent_is_dJ_db_minus_velocity():
    te, st = teacher(), PowerFlowMap(theta=0.8, shift=-0.2)
    x, a, b = points()
    b = b.clamp_min(0.01)
    h = 1e-6 * b
    fd = (st(x, a, b + h) - st(x, a, b - h)) / (2 * h[:, None])
    expected = fd - exact_v(st(x, a, b), b)
    raw, g = loss_for("lagrangian").tangent(st, te, x, a, b, 1.0)
    torch.testing.assert_close(raw, expected, rtol=1e-6, atol=1e-8)
    # the injected g points against the residual (sign(b - a) = -1)
    assert torch.all((g * raw).sum(1) <= 0)
    raw_fd, _ = loss_for("lagrangian", jvp="finite_difference", jvp_h=1e-6).tangent(st, te, x, a, b, 1.0)
    torch.testing.assert_close(raw, raw_fd, rtol=1e-6, atol=1e-8)


def test_jvp_equals_float64_central_difference_of_the_student_denoiser():
    from losses.parts.jvp import jvp

    st = PowerFlowMap(theta=1.4, shift=0.1)
    x, a, b = points()
    v = torch.randn_like(x)

    def den(x_, a_):
        return st.x0_estimate(x_, a_, b)

    with torch.no_grad():
        _, auto = jvp(den, (x, a), (v, torch.ones_like(a)))
        h = 1e-6
        fd = (den(x + h * v, a + h) - den(x - h * v, a - h)) / (2 * h)
    torch.testing.assert_close(auto, fd, rtol=1e-6, atol=1e-7)


def rf_F(st, y, t, s):
    """The paper's F in RF coordinates: f_RF(y, t, s) = (1 - s) J(y / (1 - t), sigma(t), sigma(s)),
    F_RF = (f_RF - y) / (s - t)."""
    sig = lambda u: u / (1 - u)  # noqa: E731
    f = (1 - s)[:, None] * st(y / (1 - t)[:, None], sig(t), sig(s))
    return (f - y) / (s - t)[:, None]


def rf_v(y, t):
    """Exact RF velocity of N(M, S^2): dy/dt = -x_ve + v_ve(x_ve, sigma) / (1 - t), x_ve = y / (1 - t)."""
    x = y / (1 - t)[:, None]
    return -x + exact_v(x, t / (1 - t)) / (1 - t)[:, None]


@pytest.mark.parametrize("r", [0.0, 0.4, 1.0])
def test_rf_units_equal_the_papers_rectified_flow_tangents(r):
    """Algorithm 1 in RF time: g = (F - v) + r (t - s) dF/dt (total derivative along the ODE); the loss's rf raw
    Eulerian tangent must be exactly -g (J-space sign), and the rf Lagrangian tangent the RF
    (F - v(f, s)) + r (s - t) dF/ds."""
    te, st = teacher(), PowerFlowMap(theta=1.3, shift=0.2)
    x, a, b = points(b_zero=True)
    t, s = a / (1 + a), b / (1 + b)
    y = x * (1 - t)[:, None]
    ht = 1e-6
    y_p = exact_traj(x, a, (t + ht) / (1 - t - ht)) * (1 - t - ht)[:, None]
    y_m = exact_traj(x, a, (t - ht) / (1 - t + ht)) * (1 - t + ht)[:, None]
    dF_dt = (rf_F(st, y_p, t + ht, s) - rf_F(st, y_m, t - ht, s)) / (2 * ht)
    g_rf = (rf_F(st, y, t, s) - rf_v(y, t)) + r * (t - s)[:, None] * dF_dt
    raw, _ = loss_for("eulerian", units="rf").tangent(st, te, x, a, b, r)
    torch.testing.assert_close(raw, -g_rf, rtol=1e-6, atol=1e-7)

    b = b.clamp_min(0.01)
    s = b / (1 + b)
    f_end = (1 - s)[:, None] * st(x, a, b)
    dF_ds = (rf_F(st, y, t, s + ht) - rf_F(st, y, t, s - ht)) / (2 * ht)
    g_l = (rf_F(st, y, t, s) - rf_v(f_end, s)) + r * (s - t)[:, None] * dF_ds
    raw_l, _ = loss_for("lagrangian", units="rf").tangent(st, te, x, a, b, r)
    torch.testing.assert_close(raw_l, g_l, rtol=1e-6, atol=1e-7)


def test_normalised_tangent_has_norm_below_one():
    g = torch.randn(16, 3, 4, 4, dtype=DT) * torch.logspace(-3, 3, 16, dtype=DT)[:, None, None, None]
    out, n = normalize_tangent(g, 0.1)
    rms = out.flatten(1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(n, g.flatten(1).pow(2).mean(1).sqrt())
    torch.testing.assert_close(rms, n / (n + 0.1))
    assert torch.all(rms < 1)
    # size invariance: the same per-element tangent on a 4x larger image normalises to the same values
    big, _ = normalize_tangent(g.repeat(1, 1, 2, 2), 0.1)
    torch.testing.assert_close(big[..., :4, :4], out)


def test_warmup_ramps_from_zero_to_r_max():
    rs = [tangent_warmup(k, 100, 1.0) for k in range(0, 151, 10)]
    assert rs[0] == 0.0 and rs[5] == pytest.approx(0.5) and rs[10] == 1.0 and rs[-1] == 1.0
    assert all(x <= y for x, y in zip(rs, rs[1:]))
    assert tangent_warmup(10_000, 100, 0.99) == 0.99 and tangent_warmup(5, 0, 0.99) == 0.99
    # forward() logs it from ctx.iteration
    loss = build_loss("ayf", warmup=10, warmup_max=1.0)
    st, te = PowerFlowMap(), teacher()
    loss.setup(st, te, ctx())
    data = M + S * torch.randn(8, 2, dtype=DT)
    for k, want in ((0, 0.0), (5, 0.5), (40, 1.0)):
        assert float(loss("student", st, te, batch(data, k=k), ctx(k, 100))["warmup_r"]) == pytest.approx(want)


def test_forward_at_exact_map_injects_nothing_and_logs():
    st, te = PowerFlowMap(), teacher()
    for objective in ("eulerian", "lagrangian"):
        loss = loss_for(objective, p_boundary=0.3)
        terms = loss("student", st, te, batch(M + S * torch.randn(256, 2, dtype=DT)), ctx())
        assert set(terms) >= {"loss", "tangent_norm", "warmup_r", "gap_mean", "weight_mean", "nonfinite_rows"}
        assert float(terms["loss"]) < 1e-15 and float(terms["tangent_norm"]) < 1e-8
        assert float(terms["gap_mean"]) > 0 and float(terms["nonfinite_rows"]) == 0


def test_level_density_and_weight():
    te = teacher()
    for objective in ("eulerian", "lagrangian"):
        loss = loss_for(objective, units="rf")
        a, b = loss.draw_levels(batch(size=20000, dtype=DT, seed=3), te)
        assert torch.all(a > b) and torch.all(a <= 80.0) and torch.all(a >= 0.002) and torch.all(b >= 0)
        if objective == "lagrangian":
            assert torch.all(b >= 0.002)
        # RF gap t - s = t_hi sigmoid(tau): its median is t_hi sigmoid(p_mean)
        gap = a / (1 + a) - b / (1 + b)
        t_hi = 80 / 81
        assert float(gap.median()) == pytest.approx(t_hi / (1 + math.exp(0.8)), abs=0.01)
        torch.testing.assert_close(loss.weight(a, b), (1 + a) / (a - b))
    loss = loss_for("eulerian", p_boundary=1.0)
    _, b0 = loss.draw_levels(batch(size=100, dtype=DT), te)
    assert torch.all(b0 == 0)
    assert torch.all(loss_for("eulerian", weighting="uniform").weight(a, b) == 1)
    torch.testing.assert_close(loss_for("eulerian", units="ve").weight(a, b), 1 / (a - b))


def test_sampling_plan_chains_exact_jumps_into_the_exact_map():
    loss = loss_for("eulerian")
    plan = loss.sampling()
    assert plan.gamma == 0.0
    lv = rf_uniform_levels(4, 80.0)
    assert lv[0] == 80.0 and all(x > y for x, y in zip(lv, lv[1:]))
    assert lv[2] == pytest.approx((80 / 81 * 0.5) / (1 - 80 / 81 * 0.5))
    noise = torch.randn(32, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    st = PowerFlowMap()
    one = plan.sample(st, noise, 1)
    exact = M + (80.0 * noise - M) * S / q(torch.tensor(80.0, dtype=DT))
    torch.testing.assert_close(one, exact)
    for nfe in (2, 4, 8, 20):
        torch.testing.assert_close(plan.sample(st, noise, nfe), exact)


@pytest.mark.parametrize("objective", ["eulerian", "lagrangian"])
@pytest.mark.parametrize("theta0", [0.5, 1.6])
def test_gradient_steps_move_toward_the_exact_map(objective, theta0):
    """Sign check: SGD on forward()'s surrogate moves theta of J_theta = M + (x - M)(q(b)/q(a))^theta toward 1."""
    st, te = PowerFlowMap(theta=theta0), teacher()
    loss = loss_for(objective, units="rf")
    opt = torch.optim.SGD(st.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(0)
    hist = [float(st.theta)]
    for k in range(30):
        data = M + S * torch.randn(256, 2, dtype=DT, generator=g)
        opt.zero_grad()
        loss("student", st, te, batch(data, k=k), ctx(k))["loss"].backward()
        opt.step()
        hist.append(float(st.theta))
    assert abs(hist[-1] - 1) < 0.5 * abs(theta0 - 1), hist
    assert abs(hist[3] - 1) < abs(theta0 - 1), hist


def test_config_errors():
    for bad in ({"objective": "eul"}, {"units": "vp"}, {"weighting": "x"}, {"jvp": "fd"}, {"warmup_max": 0.0},
                {"p_boundary": 2.0}, {"sampling_levels": "linear"}, {"norm_c": 0.0}):
        with pytest.raises(ConfigError, match="ayf"):
            build_loss("ayf", **bad)


def test_off_marginal_points_keep_the_exact_map_a_fixed_point():
    """``wide_frac``: a share of the batch noised wider. Both objectives are identities along the teacher's ODE, so
    the exact map still injects nothing there; a perturbed map's tangent changes with the wider points."""
    st, te = PowerFlowMap(), teacher()
    data = M + S * torch.randn(256, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    for objective in ("eulerian", "lagrangian"):
        loss = loss_for(objective, wide_frac=0.5, wide_scale=3.0)
        terms = loss("student", st, te, batch(data, seed=1), ctx())
        assert float(terms["loss"]) < 1e-15 and float(terms["tangent_norm"]) < 1e-8
        bad = PowerFlowMap(theta=1.2)  # (the normalised loss saturates; the raw tangent's norm does not)
        wide = float(loss("student", bad, te, batch(data, seed=1), ctx())["tangent_norm"])
        plain = float(loss_for(objective)("student", bad, te, batch(data, seed=1), ctx())["tangent_norm"])
        assert wide > 1e-3 and wide != pytest.approx(plain, rel=1e-3)
    for bad_kw in ({"wide_frac": -0.1}, {"wide_scale": 0.9}):
        with pytest.raises(ConfigError, match="ayf: wide_frac"):
            build_loss("ayf", **bad_kw)
