"""Low-dimensional distances (sliced W1, MMD, mode mass, off-mode fraction) against closed forms and independent
implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from distill.distances import mmd_rbf, mode_mass, off_mode_fraction, ring_report, sliced_wasserstein
from teachers.analytic import grid, ring

# ---------------------------------------------------------------------------------------------------------------
# Low-dimensional distances
# ---------------------------------------------------------------------------------------------------------------


def test_sliced_wasserstein_identity_shift_and_symmetry():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 2, generator=g)
    b = torch.randn(300, 2, generator=g) * 0.5 + 1.0
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a), rel=1e-12)
    x = torch.randn(500, 1, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x, x + 0.7) == pytest.approx(0.7, rel=1e-12)  # 1-D: every direction is +-1
    # 2-D shift by c: mean_theta |<c, theta>| -> 2|c|/pi over uniform directions.
    c = torch.tensor([0.6, -0.8])
    assert sliced_wasserstein(a, a + c) == pytest.approx(2 / math.pi, rel=0.05)
    # Directions are fixed by the seed.
    assert sliced_wasserstein(a, b, seed=5) == sliced_wasserstein(a, b, seed=5) != sliced_wasserstein(a, b, seed=6)


def test_sliced_wasserstein_unequal_sizes_is_exact_w1():
    # uniform{0, 1} vs uniform{0, 1, 2}: W1 = 1/6 + 1/3 = 1/2
    assert sliced_wasserstein(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0], [2.0]])) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(37, 1, generator=g), torch.randn(53, 1, generator=g) * 2 + 0.3
    assert sliced_wasserstein(a, b) == pytest.approx(wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy()), rel=1e-9)
    pts = torch.randn(40, 2, generator=g)
    assert sliced_wasserstein(pts, pts.repeat(3, 1)) == pytest.approx(0.0, abs=1e-12)


def test_ring_two_exact_sets_sit_at_the_noise_floor():
    t = ring()
    a = t.sample(2000, generator=torch.Generator().manual_seed(0))
    b = t.sample(2000, generator=torch.Generator().manual_seed(1))
    far = grid().sample(2000, generator=torch.Generator().manual_seed(2))
    assert sliced_wasserstein(a, b) < 0.1 < sliced_wasserstein(a, far)


def _mmd_loops(a: np.ndarray, b: np.ndarray, h: float) -> float:
    """Unbiased MMD^2 by explicit double loops (tiny sets only)."""

    def k(x, y):
        return math.exp(-((x - y) ** 2).sum() / (2 * h * h))

    n, m = len(a), len(b)
    kaa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return kaa + kbb - 2 * kab


def test_mmd_matches_explicit_formula_and_separates_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 2)), rng.standard_normal((9, 2)) + 0.5
    expected = _mmd_loops(a, b, 0.3) + _mmd_loops(a, b, 1.5)
    assert mmd_rbf(a, b, bandwidths=(0.3, 1.5)) == pytest.approx(expected, rel=1e-10)
    t = ring()
    x = t.sample(800, generator=torch.Generator().manual_seed(0))
    y = t.sample(800, generator=torch.Generator().manual_seed(1))
    other = grid().sample(800, generator=torch.Generator().manual_seed(2))
    same, diff = mmd_rbf(x, y), mmd_rbf(x, other)
    assert abs(same) < 0.02 and diff > 0.3 and diff > 20 * abs(same)


def test_mode_mass_and_off_fraction_closed_forms():
    t = ring()  # std 0.05, modes 2 sin(pi/8) ~ 1.53 apart: the nearest mean is the true component
    x, labels = t.sample(20_000, generator=torch.Generator().manual_seed(0), return_labels=True)
    mass = mode_mass(x, t.means)
    assert mass.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(mass, torch.bincount(labels, minlength=8).double() / 20_000)
    assert off_mode_fraction(x, t.means, 0.25) == 0.0  # 5 std: P = exp(-12.5) ~ 4e-6 per sample
    # 2-D isotropic Gaussian: P(|x - mu| > r) = exp(-r^2 / (2 s^2)); r = s gives e^{-1/2}.
    assert off_mode_fraction(x, t.means, 0.05) == pytest.approx(math.exp(-0.5), abs=0.01)
    assert off_mode_fraction(torch.zeros(5, 2), t.means, 0.25) == 1.0


def test_ring_report_on_exact_samples():
    t = ring()
    rep = ring_report(
        t.sample(4000, generator=torch.Generator().manual_seed(0)),
        t.means,
        t.sample(4000, generator=torch.Generator().manual_seed(1)),
    )
    assert rep["sw1"] < 0.06 and rep["off"] == 0.0 and len(rep["mode_mass"]) == 8
    assert 0.10 < rep["min_mode_mass"] <= 0.125 <= rep["max_mode_mass"] < 0.15
    collapsed = ring_report(t.means[:1].float().repeat(100, 1), t.means, t.sample(400))
    assert collapsed["max_mode_mass"] == 1.0 and collapsed["min_mode_mass"] == 0.0 and collapsed["sw1"] > 1.0
