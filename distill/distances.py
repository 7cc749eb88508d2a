"""Exact distances between low-dimensional point sets, for analytic (Gaussian-mixture) teachers.

shared/benchmarks.md "Ring": sliced Wasserstein-1 with fixed seeded directions, unbiased multi-bandwidth RBF MMD^2,
per-mode mass and the off-mode fraction, and :func:`ring_report`, which bundles the ring benchmark's numbers. FID for
image data lives in :mod:`distill.fid`.

Point sets are ``[N, D]`` tensors or arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "sliced_wasserstein",
    "mmd_rbf",
    "mode_mass",
    "off_mode_fraction",
    "ring_report",
]

ArrayLike = Tensor | np.ndarray


def _points(x: ArrayLike, name: str, min_n: int = 1) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2 or t.shape[0] < min_n:
        raise ValueError(f"{name} must be points [N, D] with N >= {min_n}, got shape {list(t.shape)}")
    return t


def _same_dim(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: point sets have different dimensions {a.shape[1]} and {b.shape[1]}")


def sliced_wasserstein(a: ArrayLike, b: ArrayLike, n_dirs: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between point sets ``a: [N, D]`` and ``b: [M, D]``.

    The mean over ``n_dirs`` random unit directions (fixed by ``seed`` through a private ``torch.Generator``,
    so every call with the same seed uses the same directions) of the exact 1-D W1 between the projected
    empirical distributions, ``int_0^1 |F_a^{-1}(q) - F_b^{-1}(q)| dq``. For ``N == M`` that is the mean
    absolute difference of sorted projections; otherwise the two step quantile functions are integrated exactly
    on the union of their breakpoints ``{i/N} U {j/M}``.
    """
    a, b = _points(a, "a"), _points(b, "b")
    _same_dim(a, b, "sliced_wasserstein")
    if n_dirs < 1:
        raise ValueError(f"n_dirs must be >= 1, got {n_dirs}")
    gen = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(n_dirs, a.shape[1], generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa = torch.sort(a @ dirs.T, dim=0).values  # [N, n_dirs]
    pb = torch.sort(b @ dirs.T, dim=0).values  # [M, n_dirs]
    n, m = pa.shape[0], pb.shape[0]
    if n == m:
        return float((pa - pb).abs().mean())
    # Breakpoints k/(N*M) in integers: i*M for a's steps, j*N for b's. On (k_prev, k] the quantile of a is its
    # ceil(k/M)-th order statistic and that of b its ceil(k/N)-th, since no other breakpoint lies inside.
    k = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))  # sorted, int64
    widths = torch.diff(k, prepend=torch.zeros(1, dtype=k.dtype)).to(torch.float64) / (n * m)
    ia = (k + m - 1) // m - 1
    ib = (k + n - 1) // n - 1
    return float((widths[:, None] * (pa[ia] - pb[ib]).abs()).sum(0).mean())


def _kernel_sum(x: Tensor, y: Tensor, gammas: Tensor, chunk: int = 1024) -> Tensor:
    """``sum_{i,j} sum_h exp(-gamma_h ||x_i - y_j||^2)`` computed in row chunks (10k x 10k fits in memory)."""
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        d2 = torch.cdist(x[s : s + chunk], y).pow(2)  # [c, M]
        total += torch.exp(-d2[None] * gammas[:, None, None]).sum()
    return total


def mmd_rbf(a: ArrayLike, b: ArrayLike, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with the sum of RBF kernels ``exp(-||x - y||^2 / (2 h^2))``.

    Args:
        a: ``[N, D]``, b: ``[M, D]`` with N, M >= 2.
        bandwidths: the kernel widths ``h``; several, so both within-mode shape and mode weights register
            (the defaults span the ring's 0.05 mode std to its radius 2).
    Returns the estimate of ``MMD^2``; it is unbiased, so it can be slightly negative when the sets match.
    """
    a, b = _points(a, "a", 2), _points(b, "b", 2)
    _same_dim(a, b, "mmd_rbf")
    h = torch.as_tensor(list(bandwidths), dtype=torch.float64)
    if h.ndim != 1 or h.numel() == 0 or bool((h <= 0).any()):
        raise ValueError(f"bandwidths must be a non-empty list of positive floats, got {list(bandwidths)}")
    gammas = 1.0 / (2.0 * h**2)
    n, m, k = a.shape[0], b.shape[0], h.numel()
    # Off-diagonal sums: the diagonal of each self-kernel is exactly 1 per bandwidth.
    kaa = (_kernel_sum(a, a, gammas) - n * k) / (n * (n - 1))
    kbb = (_kernel_sum(b, b, gammas) - m * k) / (m * (m - 1))
    kab = _kernel_sum(a, b, gammas) / (n * m)
    return float(kaa + kbb - 2 * kab)


def _nearest(samples: ArrayLike, means: ArrayLike) -> tuple[Tensor, Tensor]:
    x = _points(samples, "samples")
    mu = _points(means, "means")
    _same_dim(x, mu, "mode assignment")
    d = torch.cdist(x, mu)  # [N, K]
    dist, idx = d.min(dim=1)
    return dist, idx


def mode_mass(samples: ArrayLike, means: ArrayLike) -> Tensor:
    """Fraction of ``samples: [N, D]`` whose nearest mean (of ``means: [K, D]``) is each mode. Returns ``[K]``."""
    _, idx = _nearest(samples, means)
    k = torch.as_tensor(means).shape[0]
    return torch.bincount(idx, minlength=k).to(torch.float64) / idx.numel()


def off_mode_fraction(samples: ArrayLike, means: ArrayLike, radius: float) -> float:
    """Fraction of ``samples: [N, D]`` farther than ``radius`` from every mean in ``means: [K, D]``."""
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    dist, _ = _nearest(samples, means)
    return float((dist > radius).double().mean())


def ring_report(
    samples: ArrayLike,
    means: ArrayLike,
    reference_samples: ArrayLike,
    off_radius: float = 0.25,
    n_dirs: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """The ring benchmark's numbers (shared/benchmarks.md): SW1 to exact samples, per-mode mass, off-mode fraction.

    Args:
        samples: ``[N, 2]`` generated points; means: ``[K, 2]`` the teacher's mode means;
        reference_samples: ``[M, 2]`` a fixed set of exact teacher samples.
        off_radius: "off" = farther than this from every mean (0.25 = 5 std for the benchmark ring).
    """
    mass = mode_mass(samples, means)
    return {
        "sw1": sliced_wasserstein(samples, reference_samples, n_dirs=n_dirs, seed=seed),
        "mode_mass": mass.tolist(),
        "max_mode_mass": float(mass.max()),
        "min_mode_mass": float(mass.min()),
        "off": off_mode_fraction(samples, means, off_radius),
        "n_samples": int(torch.as_tensor(samples).shape[0]),
        "n_reference": int(torch.as_tensor(reference_samples).shape[0]),
        "n_dirs": n_dirs,
        "sw_seed": seed,
        "off_radius": off_radius,
    }
