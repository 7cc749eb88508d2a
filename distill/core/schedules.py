"""Noise-level grids for sampling and noise-level densities for training.

Grids are descending ``[N (+1)]`` tensors of VE noise levels; with ``append_zero=True`` a final ``0`` is appended,
so a grid of ``N`` levels drives ``N`` solver steps. Densities draw ``[B]`` noise levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "karras_sigmas",
    "logsnr_sigmas",
    "uniform_sigmas",
    "GRIDS",
    "make_grid",
    "sample_lognormal_sigma",
    "sample_discrete_index_sigma",
    "karras_index_to_sigma",
    "lognormal_sigma_from_normal",
    "discrete_index_sigma_from_uniform",
]


def _ramp(n: int, dtype: torch.dtype) -> Tensor:
    """``[n]`` points uniform in ``[0, 1]`` (0 = sigma_max end); every grid is a monotone warp of this ramp."""
    if n < 1:
        raise ValueError(f"a grid needs n >= 1 noise levels, got {n}")
    return torch.linspace(0, 1, n, dtype=dtype) if n > 1 else torch.zeros(1, dtype=dtype)


def _finish(sigmas: Tensor, append_zero: bool) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    append_zero: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5:
    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.

    Returns ``[n + append_zero]``, descending.
    """
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + _ramp(n, dtype) * (lo - hi)) ** rho, append_zero)


def logsnr_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    append_zero: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Uniform in log-SNR, i.e. uniform in ``log sigma`` (VE log-SNR is ``-2 log sigma``); DPM-Solver's grid."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    sigmas = (hi + _ramp(n, dtype) * (lo - hi)).exp()
    sigmas[0] = sigma_max  # exact end points (exp(log(s)) is not always s in floating point)
    if n > 1:
        sigmas[-1] = sigma_min
    return _finish(sigmas, append_zero)


def uniform_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    append_zero: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Uniform in sigma (the VE "time" of EDM)."""
    return _finish(sigma_max + _ramp(n, dtype) * (sigma_min - sigma_max), append_zero)


GRIDS: dict[str, Callable[..., Tensor]] = {
    "karras": karras_sigmas,
    "logsnr": logsnr_sigmas,
    "uniform": uniform_sigmas,
}


def make_grid(name: str, n: int, sigma_min: float, sigma_max: float, **kwargs) -> Tensor:
    """Build a named grid (``karras``, ``logsnr``, ``uniform``) of ``n`` levels plus a final zero."""
    if name not in GRIDS:
        raise KeyError(f"unknown grid {name!r}; valid grids: {', '.join(sorted(GRIDS))}")
    return GRIDS[name](n, sigma_min=sigma_min, sigma_max=sigma_max, **kwargs)


def sample_lognormal_sigma(
    batch: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """EDM training density: ``log sigma ~ N(p_mean, p_std^2)``. Returns ``[batch]``."""
    z = torch.randn(batch, generator=generator, device=device, dtype=dtype)
    return (p_mean + p_std * z).exp()


def karras_index_to_sigma(
    u: Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """Continuous Karras index ``u in [0, 1]`` (0 = sigma_max, 1 = sigma_min) to a noise level."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho


def sample_discrete_index_sigma(
    batch: int,
    grid: Tensor,
    lo: float = 0.0,
    hi: float = 1.0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Uniform over the indices of a (descending, zero-free) grid restricted to the fraction ``[lo, hi]``.

    DMD2 draws ``t ~ U[0.02 T, 0.98 T]`` on the teacher's grid; pass ``lo=0.02, hi=0.98``.
    Returns ``(index [batch] long, sigma [batch])``.
    """
    n = grid.numel()
    i_lo = int(math.floor(lo * (n - 1)))
    i_hi = int(math.ceil(hi * (n - 1)))
    idx = torch.randint(i_lo, i_hi + 1, (batch,), generator=generator, device=grid.device)
    return idx, grid[idx]


# Pure variants of the two densities: they map draws made elsewhere (e.g. through ``losses.base.Batch``, whose draws
# do not depend on the process count) to noise levels, and use no RNG of their own.


def lognormal_sigma_from_normal(z: Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """EDM's log-normal density (arXiv:2206.00364 Table 1) from standard-normal draws: ``exp(p_mean + p_std z)``.

    Args: ``z: [B]`` standard normal. Returns ``[B]`` (same dtype/device as ``z``).
    """
    return (p_mean + p_std * z).exp()


def discrete_index_sigma_from_uniform(u: Tensor, grid: Tensor, lo: float = 0.0, hi: float = 1.0,
                                      floor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sample_discrete_index_sigma` from uniform draws: index ``i_lo + floor(u (i_hi - i_lo + 1))``, uniform
    over the integers of ``[floor(lo (n - 1)), ceil(hi (n - 1))]`` of the descending, zero-free ``grid: [n]``.

    Args: ``u: [B]`` uniform in ``[0, 1)``; ``floor: [B]`` optional per-row lower bounds on the level: row ``i``'s
    upper index is then the last one in range whose level is ``>= floor_i`` (``i_lo`` when none is; a floor of 0
    changes nothing, the same draw giving the same index). Returns ``(index [B] long, sigma [B])`` on ``u``'s device;
    ``sigma`` has the grid's dtype.
    """
    grid = grid.to(u.device)
    n = grid.numel()
    i_lo = int(math.floor(lo * (n - 1)))
    i_hi = int(math.ceil(hi * (n - 1)))
    if floor is None:
        idx = (i_lo + (u.double() * (i_hi - i_lo + 1)).floor().long()).clamp(i_lo, i_hi)
        return idx, grid[idx]
    # the grid is descending: the levels >= floor are its first ``count`` entries
    count = (grid.unsqueeze(0) >= floor.to(u.device, grid.dtype).unsqueeze(1)).sum(1)
    top = (count - 1).clamp(i_lo, i_hi)
    idx = torch.minimum((i_lo + (u.double() * (top - i_lo + 1)).floor().long()).clamp_min(i_lo), top)
    return idx, grid[idx]
