"""Closed-form checks of the TDM loss (arXiv:2503.06674; /work/shared/methods.md §2.9, §4 "TDM"): the importance
weight is exactly 1 for fresh noise and averages to its closed form when ``eps_hat`` is Gaussian; with separate
intervals every ``tau`` stays inside its segment; the segment jump reproduces the stored rollout; with the exact fake
score of a Gaussian K-step student the generator gradient vanishes at the target (and not away from it), and a
2-step student trained with it reaches the teacher's marginals at every segment boundary; the sampling plan is the
training chain; bad config values fail in one line."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import fit, gaussian_denoiser
from torch import Tensor, nn

from distill.core.registry import ConfigError
from losses import LOSSES, build_loss
from losses.base import NONFINITE_ROWS, Batch, DataSpec, StepContext
from losses.tdm import TDM, draw_levels, importance_weight, rollout_states, segment_jump, tdm_levels
from students import FlowMapStudent, build_student
from teachers import GaussianMixtureTeacher, ring

torch.set_num_threads(1)

F64 = torch.float64
M, S = 1.0, 0.5


def ctx(i: int = 0, dtype: torch.dtype = F64) -> StepContext:
    return StepContext(i, 100, device=torch.device("cpu"), dtype=dtype)


def batch(n: int, *, seed: int = 0, i: int = 0, dtype=F64) -> Batch:
    return Batch(n, None, seed=seed, iteration=i, dtype=dtype)


class GaussianKStep(FlowMapStudent):
    """A 1-D K-step generator with an affine denoiser per training level, ``D(x, s_j) = b_j + a_j (x - c_j) / d_j``
    (float64), its input standardised by the target chain's mean ``c_j`` and std ``d_j`` at ``s_j`` (so that ``a`` and
    ``b`` are decoupled and of order one at every level, as Adam likes them)."""

    kind = "generator"

    def __init__(self, levels: list[float], a: list[float], b: list[float]) -> None:
        super().__init__((1,), 0.002, levels[0], S)
        self.register_buffer("lv", torch.tensor(levels[:-1], dtype=F64))
        self.register_buffer("c", torch.tensor([0.0] + [M] * (len(levels) - 2), dtype=F64))
        self.register_buffer("d", torch.tensor([levels[0]] + [math.hypot(S, t) for t in levels[1:-1]], dtype=F64))
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))
        self.b = nn.Parameter(torch.tensor(b, dtype=F64))

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        j = (sigma_from[:, None] - self.lv[None]).abs().argmin(dim=1)
        return self.b[j][:, None] + self.a[j][:, None] * (x - self.c[j][:, None]) / self.d[j][:, None]

    def boundary_marginals(self, levels: list[float]) -> tuple[list[Tensor], list[Tensor]]:
        """Means and variances of the deterministic chain's states ``x_{s_0..s_K}`` from ``s_0 z`` (detached):
        ``x_{j+1} = alpha_j x_j + beta_j``, ``alpha = r + (1 - r) a / d``, ``beta = (1 - r)(b - a c / d)``,
        ``r = s_{j+1} / s_j``."""
        mu, var = [torch.zeros((), dtype=F64)], [torch.tensor(levels[0] ** 2, dtype=F64)]
        for j in range(len(levels) - 1):
            r, a = levels[j + 1] / levels[j], self.a[j].detach() / self.d[j]
            alpha, beta = r + (1 - r) * a, (1 - r) * (self.b[j].detach() - a * self.c[j])
            mu.append(alpha * mu[-1] + beta)
            var.append(alpha**2 * var[-1])
        return mu, var


def target_params(levels: list[float]) -> tuple[list[float], list[float]]:
    """The affine maps whose chain hits ``N(M, S^2 + s_{k+1}^2)`` exactly at every segment end."""
    a, b, mu, var = [], [], 0.0, levels[0] ** 2
    for j in range(len(levels) - 1):
        r, c, d = levels[j + 1] / levels[j], (0.0 if j == 0 else M), math.sqrt(var)
        alpha = math.sqrt((S**2 + levels[j + 1] ** 2) / var)
        slope = (alpha - r) / (1 - r)
        a.append(slope * d)
        b.append((M - alpha * mu) / (1 - r) + slope * c)
        mu, var = M, S**2 + levels[j + 1] ** 2
    return a, b


class ExactSegmentFake(nn.Module):
    """The exact fake denoiser at ``tau`` for separate intervals without ``random_mid``: ``tau`` in ``[s_{k+1}, s_k]``
    names segment ``k``, whose outputs ``x_{s_{k+1}} ~ N(mu, v)`` diffused to ``tau`` are ``N(mu, v + tau^2 -
    s_{k+1}^2)``; in x0 units ``D = x + tau^2 score = x - tau^2 (x - mu) / (v + tau^2 - s_{k+1}^2)``."""

    def __init__(self, gen: GaussianKStep, levels: list[float]) -> None:
        super().__init__()
        self.__dict__["gen"] = gen
        self.levels = levels

    def denoise(self, x, tau, cond=None):
        mu, var = (torch.stack(v) for v in self.gen.boundary_marginals(self.levels))
        lv = torch.tensor(self.levels, dtype=F64)
        k = (lv[None, 1:] > tau[:, None]).sum(dim=1)
        m, v, end = mu[k + 1][:, None], var[k + 1][:, None], lv[k + 1][:, None]
        t2 = tau[:, None] ** 2
        return x - t2 * (x - m) / (v + t2 - end**2)


def gaussian_setup(steps: int = 3, **kw) -> tuple[TDM, GaussianMixtureTeacher, GaussianKStep, list[float]]:
    teacher = GaussianMixtureTeacher(torch.tensor([[M]]), S)
    loss = build_loss("tdm", steps=steps, fake_init="fresh", fake_hidden=4, fake_depth=1, **kw)
    a, b = target_params(loss.levels)
    gen = GaussianKStep(loss.levels, a, b)
    loss.setup(gen, teacher, ctx())
    loss.fake = ExactSegmentFake(gen, loss.levels)
    return loss, teacher, gen, loss.levels


# -- (1) importance weights -------------------------------------------------------------------------------------
def test_importance_weight_is_one_for_fresh_noise_and_averages_to_its_closed_form():
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.randn(1, 64, dtype=F64).expand(n, 64)  # x0_hat fixed
    tau = torch.rand(n, dtype=F64) * 5 + 0.1
    s = tau * torch.rand(n, dtype=F64)
    eps, xi = torch.randn(n, 64, dtype=F64), torch.randn(n, 64, dtype=F64)
    fresh = importance_weight(x0 + tau[:, None] * xi, x0, xi, tau)  # s = 0: x_tau = x0_hat + tau xi exactly
    torch.testing.assert_close(fresh, torch.ones_like(fresh), rtol=1e-12, atol=1e-12)
    x_tau = x0 + s[:, None] * eps + (tau**2 - s**2).sqrt()[:, None] * xi
    omega = importance_weight(x_tau, x0, xi, tau)
    assert abs(float(omega.mean()) - 1) < 0.05, float(omega.mean())
    # per data dim xi_mix^2 - xi^2 is a quadratic form with eigenvalues +-a (a = s/tau), so with d dims
    # E[omega] = (1 - a^2/d^2)^(-d/2) exactly (1.085 at d = 4, a = 0.8; a sum instead of the mean would give 7.7)
    d, a = 4, 0.8
    eps, xi = torch.randn(n, d, dtype=F64), torch.randn(n, d, dtype=F64)
    tau = torch.full((n,), 2.0, dtype=F64)
    x_tau = a * 2.0 * eps + math.sqrt(1 - a**2) * 2.0 * xi
    omega = importance_weight(x_tau, torch.zeros_like(x_tau), xi, tau)
    assert float(omega.mean()) == pytest.approx((1 - a**2 / d**2) ** (-d / 2), abs=0.01)


# -- (2) separate intervals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("random_mid", [False, True])
def test_separate_intervals_keep_tau_inside_its_segment(random_mid):
    levels = tdm_levels(4, 80.0, 0.4)
    lv = torch.tensor(levels, dtype=F64)
    n, tau_min = 20_000, 0.002
    b = batch(n, seed=3)
    k = b.randint(4)
    s, tau = draw_levels(b, lv, k, random_mid=random_mid, separate=True, tau_min=tau_min)
    start, end = lv[k], lv[k + 1]
    assert bool((s >= end).all() and (s <= start).all() and (tau >= s).all() and (tau <= start).all())
    assert bool((tau >= tau_min).all()) and float(tau[k == 3].max()) <= 0.4
    if not random_mid:
        assert torch.equal(s, end)
    else:
        assert bool((s > end).float().mean() > 0.99)
    for j in range(4 if not random_mid else 0):  # uniform on the Karras curve: tau^(1/7) fills its interval
        lo, hi = max(levels[j + 1], tau_min) ** (1 / 7), levels[j] ** (1 / 7)
        r = (tau[k == j] ** (1 / 7) - lo) / (hi - lo)
        assert float(r.mean()) == pytest.approx(0.5, abs=0.03) and float(r.min()) < 0.01 < 0.99 < float(r.max())
    _, tau_all = draw_levels(batch(n, seed=4), lv, k, random_mid=random_mid, separate=False, tau_min=tau_min)
    assert float(tau_all.max()) <= 80.0 and bool((tau_all > lv[k]).float().mean() > 0.3)


# -- (4) the segment jump reproduces the rollout ----------------------------------------------------------------
def test_segment_jump_reproduces_the_stored_rollout():
    torch.manual_seed(1)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2).double()
    loss = build_loss("tdm", steps=4, fake_init="residual", fake_hidden=8, fake_depth=1)
    loss.setup(student, teacher, ctx())
    lv = torch.tensor(loss.levels, dtype=F64)
    b = batch(256, seed=5)
    x = lv[0] * b.randn(2)
    with torch.no_grad():
        states = rollout_states(student, x, lv)
        k = b.randint(4)
        _, _, x_s = segment_jump(student, states, lv, k, lv[k + 1])
    torch.testing.assert_close(x_s, states[k + 1, torch.arange(256)], rtol=1e-10, atol=1e-10)
    # the loss's own construction draws z first: x_tau minus its forward noise is the rollout's state at s_{k+1}
    c = loss.construct(student, teacher, batch(256, seed=5), ctx(), grad=False)
    x_s = c["x_tau"] - (c["tau"] ** 2 - c["s"] ** 2).sqrt()[:, None] * c["xi"]
    torch.testing.assert_close(x_s, states[c["k"] + 1, torch.arange(256)], rtol=1e-9, atol=1e-9)
    # and the K-step sampling plan is the same chain (evaluation samples as trained)
    plan = loss.sampling()
    assert plan.gamma == 0.0 and plan.sigmas(4, 80.0).tolist() == loss.levels
    with torch.no_grad():
        torch.testing.assert_close(plan.sample(student, x / lv[0], 4), states[-1], rtol=1e-10, atol=1e-10)
    assert plan.sigmas(1, 80.0).tolist() == [80.0, 0.0]
    assert plan.sigmas(2, 80.0).tolist() == pytest.approx([80.0, 0.4, 0.0])


# -- (3) the generator gradient at and away from the target -----------------------------------------------------
def test_exact_fake_gives_zero_gradient_at_the_target_and_not_away():
    loss, teacher, gen, levels = gaussian_setup(3)
    mu, var = gen.boundary_marginals(levels)  # the target student's chain hits the teacher's marginals
    for j in range(1, 4):
        assert float(mu[j]) == pytest.approx(M, abs=1e-12)
        assert float(var[j]) == pytest.approx(S**2 + levels[j] ** 2, rel=1e-12)
    out = loss("student", gen, teacher, batch(4096, seed=7), ctx())
    out["loss"].backward()
    assert float(gen.a.grad.abs().max()) < 1e-10 and float(gen.b.grad.abs().max()) < 1e-10, (gen.a.grad, gen.b.grad)
    assert float(out["tdm_grad_norm"]) < 1e-10 and int(out[NONFINITE_ROWS]) == 0
    for j in range(3):  # shift one segment's output mean up: its b gets a gradient that moves it back down
        with torch.no_grad():
            gen.b[j] += 0.3 / (1 - levels[j + 1] / levels[j])
        gen.zero_grad()
        loss("student", gen, teacher, batch(4096, seed=8), ctx())["loss"].backward()
        assert float(gen.b.grad[j]) > 1e-4, (j, gen.b.grad)
        with torch.no_grad():
            gen.b[j] -= 0.3 / (1 - levels[j + 1] / levels[j])


def test_huber_distance_also_vanishes_at_the_target():
    loss, teacher, gen, _ = gaussian_setup(2, distance="huber")
    loss("student", gen, teacher, batch(2048, seed=9), ctx())["loss"].backward()
    assert float(gen.a.grad.abs().max()) < 1e-10 and float(gen.b.grad.abs().max()) < 1e-10


def test_two_step_student_reaches_the_teacher_marginals_at_the_segment_ends():
    """The card's check: trained with the exact fake from a wrong start, a 2-step Gaussian student's segment outputs
    match the teacher's marginals ``N(M, S^2 + s^2)`` at ``s = floor`` and ``s = 0``."""
    loss, teacher, gen, levels = gaussian_setup(2)
    with torch.no_grad():
        gen.a.mul_(0.6)
        gen.b.add_(torch.tensor([-0.5, 0.3], dtype=F64))
    c = ctx()
    fit(lambda i: loss("student", gen, teacher, batch(512, i=i), c)["loss"], gen.parameters(), 500, 3e-2)
    mu, var = gen.boundary_marginals(levels)
    for j in (1, 2):
        assert float(mu[j]) == pytest.approx(M, abs=0.02), (j, mu, var)
        assert math.sqrt(float(var[j])) == pytest.approx(math.sqrt(S**2 + levels[j] ** 2), rel=0.02), (j, mu, var)


# -- the critic's weighted regression ---------------------------------------------------------------------------
def test_critic_loss_is_the_weighted_x0_regression():
    loss, teacher, gen, _ = gaussian_setup(3)
    fake = nn.Module()
    fake.denoise = lambda x, tau, cond=None: gaussian_denoiser(x, tau, M, S)
    loss.fake = fake
    out = loss("critic", gen, teacher, batch(512, seed=2), ctx())
    c = loss.construct(gen, teacher, batch(512, seed=2), ctx(), grad=False)
    omega = importance_weight(c["x_tau"], c["x0_hat"], c["xi"], c["tau"])
    w = torch.minimum(1 / c["tau"] ** 2, torch.full_like(c["tau"], 5.0))
    mse = ((gaussian_denoiser(c["x_tau"], c["tau"], M, S) - c["x0_hat"]) ** 2).mean(1)
    torch.testing.assert_close(out["loss"], (w * omega * mse).mean(), rtol=1e-12, atol=0)
    assert float(w.max()) == 5.0 and float(w.min()) < 1e-3  # the clamp binds low and SNR decays high


# -- (5) declarations and config errors -------------------------------------------------------------------------
def test_defaults_and_config_errors():
    assert LOSSES.get("tdm") is TDM and TDM.phases == ("critic", "student") and TDM.student_kind == "generator"
    loss = build_loss("tdm")
    assert loss.steps == 4 and loss.separate and not loss.random_mid and loss.distance == "l2"
    assert loss.data_specs() == {"data": DataSpec("noise")} and loss.update_every() == {"critic": 1, "student": 1}
    assert loss.levels[0] == 80.0 and loss.levels[-2:] == [pytest.approx(0.4), 0.0] and len(loss.levels) == 5
    assert tdm_levels(1, 80.0, 0.4) == [80.0, 0.0]
    warm = build_loss("tdm", regression_steps=10, fake_warmup=5)
    assert "pairs" in warm.data_specs() and warm.phases_for_step(3) == ["student"]
    assert warm.phases_for_step(12) == ["critic"] and warm.phases_for_step(15) == ["critic", "student"]
    for kwargs, match in [({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"floor": 0.0}, "floor"),
                          ({"floor": 90.0}, "floor"), ({"distance": "l1"}, "valid: l2, huber"),
                          ({"huber_c": 0.0}, "huber_c"), ({"tau_min": 0.5}, "tau_min"),
                          ({"fake_init": "copy"}, "valid: teacher"), ({"foo": 1}, "valid keys")]:
        with pytest.raises(ConfigError, match=match) as e:
            build_loss("tdm", **kwargs)
        assert "\n" not in str(e.value)
    teacher = ring()
    with pytest.raises(ConfigError, match="sigma_max"):
        build_loss("tdm", sigma_max=100.0, fake_init="fresh").setup(None, teacher, ctx())


def test_warm_start_regresses_the_k_step_chain_endpoint():
    """With regression_steps > 0 the student phase regresses the K-step deterministic chain's endpoint (every level
    trained), not the 1-step map: its loss is the MSE of the plan's own K-step sample against the pair endpoint."""
    from students import sample_student

    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("tdm", steps=3, regression_steps=5, regression_pairs=8, fake_init="residual", fake_hidden=8,
                      fake_depth=1)
    c = StepContext(0, 10, torch.device("cpu"))
    loss.setup(student, teacher, c)
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    b = Batch(8, extras={"pairs.z": z, "pairs.x0": x0})
    out = loss("student", student, teacher, b, c)
    chain = torch.tensor(loss.levels)
    want = ((sample_student(student, z, chain, 0.0) - x0) ** 2).mean()
    torch.testing.assert_close(out["loss"], want)
    one_step = ((student(80.0 * z, torch.full((8,), 80.0), torch.zeros(8)) - x0) ** 2).mean()
    assert not torch.allclose(out["loss"], one_step)
    out["loss"].backward()  # every level of the chain gets a gradient through the generator
    assert all(p.grad is not None for p in student.parameters())
