"""Consistency training / tuning from data (``losses/ct.py``, iCT arXiv:2310.14189 and ECT arXiv:2406.14548).

What is tested, and why it tests the math rather than "it runs":

* the schedules in closed form: iCT's doubling curriculum N(k) and its log-normal index distribution (against an
  independent quadrature of the log-normal density), ECT's r(t) (monotone, 0 <= r <= 0.999 t, exact values) and stage;
* the per-sample plumbing, exactly: with a student whose f is a known closed-form function of (x, sigma), forward()
  must equal the loss written out from the batch's draws, in an algebraically different form (levels, shared z, the
  r < sigma_min clean target, the full-norm pseudo-Huber, c = 0.00054 sqrt(dim), the 1/(s_hi - s_lo) weight);
* the fixed point: for Gaussian data the true consistency map is NOT constant along x0 + s z (the map is of the ODE,
  not of the forward noising), so the loss is not 0 there; instead its gradient along a one-parameter family that
  contains the exact map must vanish at the exact map (up to the grid's O(Delta s) bias) and pull towards it;
* the shared dropout mask of both passes (recorded), with controls that differ;
* the boundary f(x, sigma_min) = x of the consistency student, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import batch, ctx
from torch import nn

from distill.core.registry import ConfigError
from losses import LOSSES, build_loss
from losses.ct import ect_r, ect_stage, ict_index_probs, ict_num_levels, ict_sigmas
from losses.parts.functional import ict_huber_c, pseudo_huber
from students import FlowMapStudent, build_student
from teachers import GaussianMixtureTeacher, ring

torch.set_num_threads(1)

M, S, SMIN, SMAX = 1.0, 0.5, 0.002, 80.0  # Gaussian data N(M, S^2) per dimension


def gaussian_teacher(dim: int = 1) -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(torch.full((1, dim), M, dtype=torch.float64), S)


class GaussianFamilyStudent(FlowMapStudent):
    """``f_a(x, s) = M + (x - M) g(s)^a``, ``g(s) = sqrt((S^2 + sigma_min^2) / (S^2 + s^2))``: meets the boundary
    ``f(x, sigma_min) = x`` for every ``a``, and ``a = 1`` is the exact consistency map of N(M, S^2) (the PF-ODE from
    ``s`` to ``sigma_min``, J*(x, s, sigma_min)). One float64 parameter ``a``."""

    kind = "consistency"

    def __init__(self, a: float, dim: int = 1) -> None:
        super().__init__((dim,), SMIN, SMAX, S)
        self.a = nn.Parameter(torch.tensor(float(a), dtype=torch.float64))

    def gain(self, s: torch.Tensor) -> torch.Tensor:
        return ((S**2 + SMIN**2) / (S**2 + s.to(torch.float64) ** 2)) ** (self.a / 2)

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        return M + (x - M) * self.gain(sigma_from)[:, None]


def gaussian_data(size: int, dim: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return M + S * torch.randn(size, dim, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def test_ict_curriculum_doubles_from_s0_to_s1():
    """iCT eq. 8 with s0 = 10, s1 = 1280: log2 floor(128) + 1 = 8 stages of K' = floor(K / 8) iterations, N = 11, 21,
    41, ..., 1281 (N - 1 doubles), and it stays at s1 + 1 past the last stage."""
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    assert [ict_num_levels(k, 800) for k in range(0, 800, 100)] == expected
    assert [ict_num_levels(k, 800) for k in range(99, 800, 100)] == expected  # the last iteration of each stage
    assert ict_num_levels(10_000, 800) == 1281
    assert [ict_num_levels(k, 1000) for k in (0, 124, 125, 249, 250, 874, 875, 999)] == [11, 11, 21, 21, 41, 641, 1281,
                                                                                         1281]  # K' = floor(1000/8)
    # s1/s0 not a power of 2: K' = floor(K / (log2 floor(1000/10) + 1)) = floor(700 / 7.644) = 91
    assert [ict_num_levels(k, 700, 10, 1000) for k in (90, 91, 182, 545, 546, 637, 699)] == [11, 21, 41, 321, 641,
                                                                                          1001, 1001]
    assert [ict_num_levels(k, 3) for k in (0, 1, 5, 7)] == [11, 21, 321, 1281]  # K < 8 stages: K' = 1, no 0 division
    loss = build_loss("ct", mode="ict")
    loss.setup(None, gaussian_teacher(), ctx())
    assert loss.num_levels(ctx(350, 800)) == 81


def test_ict_index_distribution_is_the_lognormal_mass_of_each_interval():
    """p(i) of iCT eq. 9 on the 1281-level Karras grid sums to 1 and equals the log-normal mass of each interval by an
    independent quadrature (Simpson on the normal density of log sigma); per unit log sigma it peaks on the interval
    holding P_mean = -1.1 (the density's mode), while p itself peaks lower because the rho = 7 grid's intervals widen
    in log sigma towards sigma_min. The sampler of forward() draws those frequencies (chi-square over 50 bins)."""
    grid = ict_sigmas(1281, SMIN, SMAX)
    assert float(grid[0]) == pytest.approx(SMIN) and float(grid[-1]) == pytest.approx(SMAX)
    assert torch.all(grid[1:] > grid[:-1])
    p = ict_index_probs(grid)
    assert p.shape == (1280,) and float(p.sum()) == pytest.approx(1.0, abs=1e-12) and bool((p > 0).all())
    lg = grid.log()
    u = torch.linspace(0, 1, 21, dtype=torch.float64)
    pts = lg[:-1, None] + u[None] * (lg[1:] - lg[:-1])[:, None]
    dens = torch.exp(-0.5 * ((pts + 1.1) / 2.0) ** 2) / (2.0 * math.sqrt(2 * math.pi))
    w = torch.ones(21, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    mass = (dens * w).sum(1) * (lg[1:] - lg[:-1]) / 60.0
    cdf = [0.5 * math.erf((math.log(s) + 1.1) / (2 * math.sqrt(2))) for s in (SMIN, SMAX)]
    total = cdf[1] - cdf[0]  # the normalisation: the mass on [log sigma_min, log sigma_max]
    torch.testing.assert_close(p, mass / total, rtol=1e-9, atol=1e-15)
    per_log = p / (lg[1:] - lg[:-1])
    i = int(per_log.argmax())
    assert float(lg[i]) <= -1.1 <= float(lg[i + 1])
    assert float(lg[int(p.argmax())]) < -1.1 - 0.1  # the mass itself peaks below exp(P_mean)
    # forward()'s index sampler (inverse CDF of one uniform draw) reproduces p
    loss = build_loss("ct", mode="ict")
    loss.setup(None, gaussian_teacher(), ctx())
    s_hi, s_lo = loss.levels(batch(size=200_000, seed=1, dtype=torch.float64), ctx(799, 800))
    idx = torch.searchsorted(grid, s_lo.contiguous())
    torch.testing.assert_close(grid[idx], s_lo, rtol=1e-12, atol=0)
    torch.testing.assert_close(grid[idx + 1], s_hi, rtol=1e-12, atol=0)  # adjacent levels, hi above lo
    edges = torch.linspace(0, 1280, 51).long()
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0)])
    expected = (cdf[edges[1:]] - cdf[edges[:-1]]) * 200_000
    counts = torch.stack([((idx >= a) & (idx < b)).sum() for a, b in zip(edges[:-1], edges[1:])]).to(torch.float64)
    keep = expected > 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 100, chi2  # ~50 degrees of freedom: the 1e-6 tail is at ~100


def test_ect_mapping_function_and_stages():
    """ECT's r(t) = t (1 - 2^-(stage+1) (1 + 8 sigmoid(-t))), clamped to [0, 0.999 t]: non-decreasing in t on a fine
    log grid for every stage 0..20, r >= 0, r/t <= 0.999 (binding from stage 10 at t = 2, 12 at small t), the
    stage-0 behaviour of the official code (r = 0 for t <= ln 7: pure denoising; r/t -> 1/2 at large t) and exact
    values."""
    t = torch.logspace(-3, 2.5, 20001, dtype=torch.float64)
    for stage in range(21):
        r = ect_r(t, stage)
        assert bool((r >= 0).all()) and bool((r <= 0.999 * t * (1 + 1e-15)).all()), stage
        assert bool((r[1:] >= r[:-1]).all()), stage
        # 1 - r/t shrinks with the stage at every t (Delta t halves, up to the cap)
        if stage:
            assert bool((ect_r(t, stage) >= ect_r(t, stage - 1)).all())
    r0 = ect_r(t, 0)
    assert float(r0[t <= math.log(7)].abs().max()) == 0.0 and float(r0[t > math.log(7) * 1.0001].min()) > 0.0
    assert float(r0[-1] / t[-1]) == pytest.approx(0.5, abs=1e-6)
    two = torch.tensor([2.0], dtype=torch.float64)
    assert float(ect_r(two, 3)) == pytest.approx(2.0 * (1 - (1 + 8 / (1 + math.exp(2.0))) / 16), rel=1e-14)
    expected = 2.0 * (1 - (1 + 2 / (1 + math.e)) / 256)
    assert float(ect_r(two, 3, q=4.0, k=2.0, b=0.5)) == pytest.approx(expected, rel=1e-14)
    assert float(ect_r(two, 15) / two) == pytest.approx(0.999)  # capped
    assert float(ect_r(two, 9) / two) == pytest.approx(1 - (1 + 8 / (1 + math.exp(2.0))) / 1024, rel=1e-14)  # not yet
    assert [ect_stage(k, 100) for k in (0, 12, 13, 25, 26, 99)] == [0, 0, 1, 1, 2, 7]  # ceil(100/8) = 13
    assert [ect_stage(k, 100, stage_iters=30) for k in (29, 30, 99)] == [0, 1, 3]


# ---------------------------------------------------------------------------------------------------------------
# The per-sample plumbing, exactly
# ---------------------------------------------------------------------------------------------------------------


def family_residual(a: float, x0, z, s_hi, s_lo, clean):
    """``f_a(x0 + s_hi z, s_hi) - target`` written out: ``(x0 - M)(g_hi - g_lo) + z (s_hi g_hi - s_lo g_lo)`` with
    ``g = g(s)^a``, and ``g_lo = 1, s_lo = 0`` where the target is the clean ``x0``."""
    g = lambda s: (((S**2 + SMIN**2) / (S**2 + s**2)) ** (a / 2))[:, None]  # noqa: E731
    g_lo = torch.where(clean[:, None], torch.ones_like(g(s_lo)), g(s_lo))
    s_lo = torch.where(clean, torch.zeros_like(s_lo), s_lo)
    return (x0 - M) * (g(s_hi) - g_lo) + z * (s_hi[:, None] * g(s_hi) - s_lo[:, None] * g_lo)


@pytest.mark.parametrize("mode,huber_c,k", [("ict", None, 0), ("ict", None, 799), ("ict", 0.3, 450),
                                            ("ect", None, 0), ("ect", None, 799), ("ect", 0.3, 450)])
def test_forward_equals_the_closed_form_loss(mode, huber_c, k):
    """forward() on 3-D Gaussian data with the family student at a = 0.7 equals the loss written from the batch's draws
    in another algebraic form (float64, rtol 1e-10). The levels are re-derived independently: iCT's pair must be two
    adjacent levels of the N(k) grid (the index law is tested above); ECT's t is exp(-1.1 + 2 n) of the batch's first
    normal draw, clipped, and r = ect_r(t, stage). A target at the wrong level, a fresh z, the clean target used
    everywhere or nowhere, a mean instead of a sum in the norm, or a c of the wrong size all break the equality."""
    dim, size, total = 3, 4096, 800
    student, teacher = GaussianFamilyStudent(0.7, dim), gaussian_teacher(dim)
    loss = build_loss("ct", mode=mode, huber_c=huber_c)
    loss.setup(student, teacher, ctx())
    x0 = gaussian_data(size, dim)
    out = loss("student", student, teacher, batch(x0, seed=4, k=k), ctx(k, total))
    twin = batch(size=size, seed=4, k=k, dtype=torch.float64)
    if mode == "ict":
        s_hi, s_lo = loss.levels(twin, ctx(k, total))
        grid = ict_sigmas(ict_num_levels(k, total), SMIN, SMAX)
        j = torch.searchsorted(grid, s_lo.contiguous())
        assert torch.equal(grid[j], s_lo) and torch.equal(grid[j + 1], s_hi)
    else:
        n = twin.randn(dtype=torch.float64)
        s_hi = (-1.1 + 2.0 * n).exp().clamp(SMIN, SMAX)
        s_lo = ect_r(s_hi, k // 100)  # 8 stages over 800 iterations
    z = twin.randn(dim, dtype=torch.float64)
    clean = s_lo < SMIN
    if mode == "ect" and k == 0:
        assert 0.4 < float(clean.double().mean()) < 0.9  # stage 0: mostly denoising
    if mode == "ict":
        assert not bool(clean.any())
    res = family_residual(0.7, x0, z, s_hi, s_lo, clean)
    c = {None: 0.00054 * math.sqrt(dim) if mode == "ict" else 0.0, 0.3: 0.3}[huber_c]
    dist = (res.pow(2).sum(1) + c**2).sqrt() - c
    expected = (dist / (s_hi - s_lo)).mean()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(out["weight"], (1 / (s_hi - s_lo)).mean(), rtol=1e-10, atol=0)
    if mode == "ict":
        assert float(out["num_levels"]) == ict_num_levels(k, total)
    else:
        assert float(out["stage"]) == k // 100
        torch.testing.assert_close(out["dt_ratio"], ((s_hi - s_lo) / s_hi).mean(), rtol=1e-10, atol=0)
        assert float(out["denoise_frac"]) == pytest.approx(float(clean.double().mean()))


def test_pseudo_huber_and_c():
    a, b = torch.tensor([[3.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(pseudo_huber(a, b, 1.0), torch.tensor([math.sqrt(26.0) - 1.0], dtype=torch.float64))
    torch.testing.assert_close(pseudo_huber(a, b, 0.0), torch.tensor([5.0], dtype=torch.float64))
    assert ict_huber_c(3072) == pytest.approx(0.0299, abs=1e-4)  # iCT's CIFAR-10 value
    # c = 0 at a zero residual: value 0 and a zero (not NaN) gradient
    p = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    pseudo_huber(p, torch.zeros(1, 2, dtype=torch.float64), 0.0).sum().backward()
    assert torch.equal(p.grad, torch.zeros(1, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# The fixed point
# ---------------------------------------------------------------------------------------------------------------


def family_grad(loss, a: float, k: int, size: int = 50_000, seed: int = 0) -> float:
    student, teacher = GaussianFamilyStudent(a), gaussian_teacher()
    out = loss("student", student, teacher, batch(gaussian_data(size, seed=seed), seed=seed, k=k), ctx(k, 800))
    out["loss"].backward()
    return float(student.a.grad)


@pytest.mark.parametrize("mode", ["ict", "ect"])
def test_gradient_vanishes_at_the_exact_consistency_map(mode):
    """Gaussian data N(1, 0.5^2), the family f_a (a = 1: the exact consistency map). Why the gradient vanishes at
    a = 1 although the loss does not: f_a is affine in x, so E[target | x_hi] = f(E[x0 + s_lo z | x_hi], s_lo), and
    E[x0 + s_lo z | x_hi] = x_hi - (s_hi - s_lo)(x_hi - D*(x_hi, s_hi))/s_hi is one exact-score Euler step of the
    PF-ODE; the exact map is invariant under it up to O(Delta s^2), and the conditional law of the target is Gaussian
    (symmetric), so even ECT's c = 0 norm (a median) sees the same centre. At the end of the curriculum (iCT N = 1281,
    ECT stage 7: Delta t / t ~ 0.4-2%) d loss/da is < 0 at a = 0.98 and > 0 at a = 1.02 (measured roots
    1.0004-1.0023 iCT, 0.9998-1.0013 ECT over 3 seeds of 200k samples; 50k samples here, common random numbers), and
    the margin is wide (|grad| ~ 0.6-2). At the start (iCT N = 11) the coarse grid's Euler bias moves the root to ~1.106
    (so a = 1.02 still pulls up), the bias the curriculum removes. Checked to fail: drawing the target's noise
    independently of z (the target becomes f(D*(x_hi))) puts the iCT root beyond 1.5."""
    loss = build_loss("ct", mode=mode)
    loss.setup(GaussianFamilyStudent(1.0), gaussian_teacher(), ctx())
    for seed in (0, 1):
        assert family_grad(loss, 0.98, 799, seed=seed) < -0.2
        assert family_grad(loss, 1.02, 799, seed=seed) > 0.2
    assert family_grad(loss, 0.8, 799) < family_grad(loss, 0.98, 799)  # pulls harder from further away
    if mode == "ict":
        assert family_grad(loss, 1.02, 0) < 0 < family_grad(loss, 1.2, 0)  # N = 11: root ~1.106


# ---------------------------------------------------------------------------------------------------------------
# Dropout, boundary, errors
# ---------------------------------------------------------------------------------------------------------------


class RecordingDropout(nn.Module):
    """Dropout drawn from torch's global RNG (as nn.Dropout) that records each mask it applies."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p, self.masks = p, []

    def forward(self, x):
        if not self.training:
            return x
        mask = torch.rand_like(x) >= self.p
        self.masks.append(mask.clone())
        return x * mask / (1 - self.p)


def dropout_student():
    torch.manual_seed(0)
    student = build_student("consistency", ring(), init="fresh", hidden=16, depth=2)
    drop = RecordingDropout(0.5)
    layers = list(student.net.mlp)
    student.net.mlp = nn.Sequential(*layers[:2], drop, *layers[2:])  # after the first Linear + SiLU
    return student, drop


@pytest.mark.parametrize("mode,kwargs", [("ect", {"stage_iters": 1}), ("ict", {})])
def test_both_passes_share_one_dropout_mask(mode, kwargs):
    """With dropout on, the prediction pass and the no-grad target pass draw the same mask (ECT's shared dropout RNG,
    used for iCT too); the masks are random (a second step draws other masks), and two plain calls without the shared
    seed differ (so the equality is not vacuous)."""
    student, drop = dropout_student()
    teacher = ring()
    loss = build_loss("ct", mode=mode, **kwargs)
    loss.setup(student, teacher, ctx())
    data = teacher.sample(64).float()
    loss("student", student, teacher, batch(data, seed=1), ctx(10, 100))
    assert len(drop.masks) == 2
    first, second = drop.masks
    assert torch.equal(first, second)
    assert 0.3 < float(first.float().mean()) < 0.7
    loss("student", student, teacher, batch(data, seed=2, k=1), ctx(11, 100))
    assert len(drop.masks) == 4 and torch.equal(drop.masks[2], drop.masks[3])
    assert not torch.equal(drop.masks[0], drop.masks[2])
    x = torch.randn(64, 2)
    student.denoise(x, 1.0)
    student.denoise(x, 1.0)
    assert not torch.equal(drop.masks[4], drop.masks[5])


def test_boundary_is_exact():
    """The consistency student meets f(x, sigma_min) = x bit for bit (fresh MLP, also with dropout in its network), so
    iCT's lowest target f(x0 + sigma_min z, sigma_min) is the noisy point itself: with N = 2 (one interval, s0 = s1 = 1)
    the target is exactly x0 + sigma_min z."""
    teacher = ring()
    student, _ = dropout_student()
    x = torch.randn(256, 2) * 3
    assert torch.equal(student.denoise(x, torch.full((256,), teacher.sigma_min)), x)
    student.eval()
    assert torch.equal(student.denoise(x, teacher.sigma_min), x)
    loss = build_loss("ct", mode="ict", s0=1, s1=1)
    loss.setup(student, teacher, ctx())
    s_hi, s_lo = loss.levels(batch(size=8), ctx(0, 10))
    assert torch.equal(s_lo, torch.full((8,), teacher.sigma_min, dtype=torch.float64))
    assert torch.equal(s_hi, torch.full((8,), teacher.sigma_max, dtype=torch.float64))
    x0, z = teacher.sample(8).float(), torch.randn(8, 2)
    _, target = loss.pair(student, x0, z, s_hi, s_lo, seed=0)
    torch.testing.assert_close(target, x0 + teacher.sigma_min * z, rtol=0, atol=0)


def test_sampling_plan_and_config_errors():
    assert build_loss("ct").sampling().gamma == 1.0
    assert build_loss("ct").student_kind == "consistency" and build_loss("ct").needs_data
    with pytest.raises(ConfigError, match="valid keys: .*mode"):
        LOSSES.build("ct", N=18)
    with pytest.raises(ConfigError, match="unknown mode 'sct'; valid: ict, ect"):
        build_loss("ct", mode="sct")
    for bad in (-1.0, "big"):
        with pytest.raises(ConfigError, match="huber_c"):
            build_loss("ct", huber_c=bad)
    with pytest.raises(ConfigError, match="stages"):
        build_loss("ct", stages=0)
    with pytest.raises(ConfigError, match="q must be > 1"):
        build_loss("ct", q=1.0)
    with pytest.raises(ConfigError, match="s0 <= s1"):
        build_loss("ct", s0=20, s1=10)
    with pytest.raises(ConfigError, match="max_ratio"):
        build_loss("ct", max_ratio=1.0)
    with pytest.raises(ConfigError, match="below the student's boundary"):
        build_loss("ct", sigma_min=0.001).setup(GaussianFamilyStudent(1.0), gaussian_teacher(), ctx())
    loss = build_loss("ct")
    with pytest.raises(RuntimeError, match="setup"):
        loss.levels(batch(size=2), ctx())
    loss.setup(None, gaussian_teacher(), ctx())
    with pytest.raises(ValueError, match="batch.data"):
        loss("student", GaussianFamilyStudent(1.0), gaussian_teacher(), batch(size=2), ctx())
