"""The config-defined ``mixture`` teacher (teachers/analytic.py) against closed forms: the exact denoiser for unequal
weights and widths (single-component closed form and finite-difference Jacobian, Monte-Carlo posterior mean from exact
samples, Tweedie by autograd of the exact log-density), exact sampling with the true weights, the class-conditional
mode, ring/grid as special cases, and one-line errors for bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from distill.config import load_config, to_container
from distill.core.registry import ConfigError
from teachers import TEACHERS, build_teacher, grid, mixture, ring
from teachers.analytic import GaussianMixtureTeacher

F64 = torch.float64
# The brief's example: two unbalanced modes of unequal width.
OVERRIDES = ["teacher.name=mixture", "teacher.means=[[0,0],[3,0]]", "teacher.stds=[0.1,0.3]",
             "teacher.weights=[0.8,0.2]"]


def _two_modes() -> GaussianMixtureTeacher:
    return build_teacher(to_container(load_config(None, OVERRIDES).teacher))


def _numpy_denoiser(means: np.ndarray, stds: np.ndarray, weights: np.ndarray, x: np.ndarray, sigma: np.ndarray):
    """Independent float64 numpy implementation of D* and log p_sigma (the module docstring's formula)."""
    d = x.shape[1]
    v = stds[None] ** 2 + sigma[:, None] ** 2  # [B, K]
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    logr = np.log(weights)[None] - 0.5 * sq / v - 0.5 * d * np.log(2 * np.pi * v)
    logp = logsumexp(logr, axis=1)
    r = np.exp(logr - logp[:, None])
    post = (stds[None, :, None] ** 2 * x[:, None, :] + sigma[:, None, None] ** 2 * means[None]) / v[..., None]
    return (r[..., None] * post).sum(1), logp


def test_config_built_mixture_has_the_right_per_mode_mass_and_std():
    t = _two_modes()
    assert TEACHERS.get("mixture") is mixture and isinstance(t, GaussianMixtureTeacher)
    assert t.data_shape == (2,) and t.num_classes is None and t.n_components == 2
    torch.testing.assert_close(t.weights, torch.tensor([0.8, 0.2], dtype=F64))
    torch.testing.assert_close(t.stds, torch.tensor([0.1, 0.3], dtype=F64))
    n = 40_000
    x, labels = t.sample(n, generator=torch.Generator().manual_seed(0), return_labels=True)
    # The modes are 3 apart = 15 (10) stds of the narrow (wide) one: the nearest mean is the component.
    assert torch.equal(torch.cdist(x.double(), t.means).argmin(1), labels)
    mass = torch.bincount(labels, minlength=2).double() / n
    se = math.sqrt(0.8 * 0.2 / n)  # binomial standard error of each mass, 0.002
    assert (mass - t.weights).abs().max() < 4 * se, mass
    for k, s in enumerate((0.1, 0.3)):
        xk = x[labels == k].double() - t.means[k]
        rel_se = 1 / math.sqrt(2 * xk.shape[0])  # std of a sample std, relative: 1/sqrt(2 n_k)
        assert ((xk.std(0) / s - 1).abs() < 4 * rel_se).all(), (k, xk.std(0))
        assert (xk.mean(0).abs() < 4 * s / math.sqrt(xk.shape[0])).all()
    # Weights given as unnormalised numbers are normalised; omitted weights are uniform.
    torch.testing.assert_close(mixture([[0.0], [1.0]], 0.1, [3, 1]).weights, torch.tensor([0.75, 0.25], dtype=F64))
    torch.testing.assert_close(mixture([[0.0], [1.0], [2.0]], 0.1).weights, torch.full((3,), 1 / 3, dtype=F64))


def test_single_component_denoiser_is_the_gaussian_posterior_mean():
    """K = 1: D*(x, sigma) = (s^2 x + sigma^2 m) / (s^2 + sigma^2), whose Jacobian is s^2 / (s^2 + sigma^2) I
    (checked by central finite differences, independent of the formula's code path)."""
    m, s = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64), 0.3
    t = mixture(m.tolist(), [s])
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(10, 3, generator=g, dtype=F64)
    sigma = torch.logspace(-3, 2, 10, dtype=F64)
    closed = (s**2 * x + sigma[:, None] ** 2 * m) / (s**2 + sigma[:, None] ** 2)
    torch.testing.assert_close(t(x, sigma), closed, rtol=1e-12, atol=1e-12)
    h = 1e-5
    for j in range(3):
        e = torch.zeros(3, dtype=F64)
        e[j] = h
        col = (t(x + e, sigma) - t(x - e, sigma)) / (2 * h)  # d D / d x_j
        expected = torch.zeros_like(x)
        expected[:, j] = s**2 / (s**2 + sigma**2)
        torch.testing.assert_close(col, expected, rtol=0, atol=1e-8)


def _mc_posterior_mean(x0: torch.Tensor, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised Monte-Carlo E[x0 | x] = sum_i x0_i N(x; x0_i, sigma^2) / sum_i N(...) over exact samples x0,
    with its delta-method standard error. Returns ``([Q, D], [Q, D])``."""
    logw = -0.5 * torch.cdist(x, x0).pow(2) / sigma**2  # [Q, N]
    w = torch.softmax(logw, dim=1)
    est = w @ x0
    se = ((w**2) @ x0.pow(2) - 2 * est * ((w**2) @ x0) + est.pow(2) * (w**2).sum(1, keepdim=True)).clamp_min(0).sqrt()
    return est, se


def test_denoiser_matches_the_monte_carlo_posterior_mean_of_exact_samples():
    t = _two_modes()
    x0 = t.sample(200_000, generator=torch.Generator().manual_seed(2)).double()
    # Query points where the posterior is mixed (between the modes) and typical points near each mode.
    queries = torch.tensor([[1.5, 0.0], [2.0, 0.3], [1.0, -0.5], [0.1, 0.05], [3.2, -0.2], [2.5, 0.0]], dtype=F64)
    uniform = mixture([[0, 0], [3, 0]], [0.1, 0.3])  # the wrong weights (what an equal-weight scorer would assume)
    common = mixture([[0, 0], [3, 0]], 0.2, [0.8, 0.2])  # the wrong widths (one std for both)
    worst = {"exact": 0.0, "uniform": 0.0, "common": 0.0}
    for sigma in (0.3, 1.0, 3.0):
        est, se = _mc_posterior_mean(x0, queries, sigma)
        assert float(se.max()) < 0.02, se  # enough effective samples at every query point (max 0.011 here)
        s = torch.full((6,), sigma, dtype=F64)
        for name, d in (("exact", t), ("uniform", uniform), ("common", common)):
            z = (d(queries, s) - est).abs() / (se + 1e-4)  # |D - MC| in Monte-Carlo standard errors
            worst[name] = max(worst[name], float(z.max()))
    # 36 comparisons: the exact denoiser stays within 5 standard errors (max 1.8 measured); the negative controls,
    # denoisers with uniform weights or one common width, are hundreds of standard errors away somewhere.
    assert worst["exact"] < 5.0 and worst["uniform"] > 50.0 and worst["common"] > 50.0, worst


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_mixture_denoiser_is_tweedie_and_log_prob_is_exact(dim):
    """D*(x, sigma) = x + sigma^2 grad_x log p_sigma(x) by autograd of the exact log-density, and log_prob and D*
    equal an independent numpy implementation, for unbalanced, unequal-width mixtures in 1, 2 and 5 dimensions."""
    g = torch.Generator().manual_seed(dim)
    k = 4
    means = (3 * torch.randn(k, dim, generator=g, dtype=F64)).tolist()
    stds, weights = [0.05, 0.2, 0.5, 0.01], [0.5, 0.1, 0.3, 0.1]
    t = mixture(means, stds, weights)
    x0 = t.sample(24, generator=g).double()
    sigma = torch.logspace(-3, 2, 24, dtype=F64)
    x = (x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)).requires_grad_()
    (grad,) = torch.autograd.grad(t.log_prob(x, sigma).sum(), x)
    x = x.detach()
    torch.testing.assert_close(t(x, sigma), x + sigma[:, None] ** 2 * grad, rtol=1e-9, atol=1e-9)
    d_np, logp_np = _numpy_denoiser(np.array(means), np.array(stds), np.array(weights), x.numpy(), sigma.numpy())
    torch.testing.assert_close(t(x, sigma), torch.from_numpy(d_np), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t.log_prob(x, sigma), torch.from_numpy(logp_np), rtol=1e-12, atol=1e-10)


def test_log_space_responsibilities_stay_finite_far_from_every_mode():
    """At sigma = 0.002 a point 40-50 away from both modes has N(x; m_k, .) ~ exp(-1e4) or less: in density space
    the posterior is 0/0. In log space it picks the component of largest log-responsibility: far out that is the
    WIDE mode (std 0.3), on either side, even where the narrow mode's mean is nearer (x = (-40, 1))."""
    t = _two_modes()
    x = torch.tensor([[50.0, 0.0], [-40.0, 1.0]], dtype=F64)
    sigma = torch.full((2,), 0.002, dtype=F64)
    out = t(x, sigma)
    assert torch.isfinite(out).all()
    v1 = 0.3**2 + 0.002**2
    expected = (0.3**2 * x + 0.002**2 * t.means[1]) / v1
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(t.log_prob(x, sigma)).all()


def test_conditional_mixture_labels_are_components():
    t = mixture([[0, 0], [3, 0], [0, 4]], [0.1, 0.3, 0.2], [0.5, 0.2, 0.3], conditional=True)
    assert t.num_classes == 3
    x, labels = t.sample(3000, generator=torch.Generator().manual_seed(3), return_labels=True)
    assert torch.equal(torch.cdist(x.double(), t.means).argmin(1), labels)
    g = torch.Generator().manual_seed(4)
    q = 3 * torch.randn(9, 2, generator=g, dtype=F64)
    sigma = torch.logspace(-2, 1, 9, dtype=F64)
    k = torch.arange(9) % 3
    s2 = t.stds[k, None] ** 2
    exact = (s2 * q + sigma[:, None] ** 2 * t.means[k]) / (s2 + sigma[:, None] ** 2)
    torch.testing.assert_close(t(q, sigma, k), exact, rtol=1e-12, atol=1e-12)
    d_u = t(q, sigma)
    torch.testing.assert_close(t(q, sigma, k, guidance=2.5), d_u + 2.5 * (exact - d_u), rtol=1e-12, atol=1e-12)


def test_ring_and_grid_are_special_cases_with_unchanged_outputs():
    """ring/grid = mixture(means, one std, equal weights), bit for bit; and both equal the independent numpy
    formula (their outputs were also compared before/after the mixture refactor on fixed inputs: identical)."""
    g = torch.Generator().manual_seed(5)
    x = 3 * torch.randn(40, 2, generator=g, dtype=F64)
    sigma = torch.logspace(-3, 2, 40, dtype=F64)
    angles = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    ring_means = (2.0 * torch.stack([angles.cos(), angles.sin()], 1)).tolist()
    c = [-2.0, -1.0, 0.0, 1.0, 2.0]
    grid_means = [[a, b] for a in c for b in c]
    for special, general in ((ring(), mixture(ring_means, 0.05)), (grid(), mixture(grid_means, [0.05] * 25))):
        assert torch.equal(special.means, general.means) and torch.equal(special.weights, general.weights)
        assert torch.equal(special(x, sigma), general(x, sigma))
        assert torch.equal(special.log_prob(x, sigma), general.log_prob(x, sigma))
        a = special.sample(100, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, general.sample(100, generator=torch.Generator().manual_seed(0)))
        assert special.info == general.info
        k = special.n_components
        d_np, logp_np = _numpy_denoiser(special.means.numpy(), np.full(k, 0.05), np.full(k, 1 / k), x.numpy(),
                                        sigma.numpy())
        torch.testing.assert_close(special(x, sigma), torch.from_numpy(d_np), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(special.log_prob(x, sigma), torch.from_numpy(logp_np), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"means": [[0, 0], [3, 0]], "weights": [0.5, 0.3, 0.2]},
         r"weights has 3 entries .* but means has 2 component\(s\); give one weight per component"),
        ({"means": [[0, 0], [3, 0]], "stds": [0.1, -0.2]}, r"stds\[1\] = -0.2: every std must be finite and >= 0"),
        ({"means": [[0, 0], [3, 0, 1]]},
         r"means is ragged: means\[0\] has 2 coordinates but means\[1\] has 3; every mean must have the same dim"),
        ({"means": [[0, 0], [3, 0]], "stds": [0.1, 0.2, 0.3]}, r"stds has 3 entries .* or a single number for all"),
        ({"means": [[0, 0], [3, 0]], "weights": [1.0, 0.0]},
         r"weights\[1\] = 0.0: every weight must be finite and > 0"),
        ({"means": [0, 3]},
         r"means must be K >= 1 points of dimension >= 1, shape \[K, D\] \(1-D data: \[\[0\], \[3\]\]\)"),
        ({"means": []}, r"means is empty"),
        ({}, r"'means' is required"),
        ({"means": [[0, "a"]]}, r"means must be numbers"),
        ({"means": [[0, float("inf")]]}, r"means must be finite"),
        ({"means": [[0, 0]], "sigma_min": 1.0, "sigma_max": 0.5}, r"need 0 < sigma_min < sigma_max"),
        ({"means": [[0, 0]], "std": 0.1}, r"unknown key\(s\) \['std'\] for teacher 'mixture'; valid keys: .*stds"),
    ],
    ids=["weights-len", "negative-std", "ragged", "stds-len", "zero-weight", "flat-means", "empty", "missing",
         "not-numbers", "inf", "sigma-range", "typo"],
)
def test_bad_mixture_config_fails_with_one_line(cfg, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_teacher({"name": "mixture", **cfg})
    msg = str(info.value)
    assert "\n" not in msg and (msg.startswith("mixture teacher: ") or "for teacher 'mixture'" in msg), msg
