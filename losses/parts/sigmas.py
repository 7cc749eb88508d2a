"""Training noise-level densities, drawn through the batch (one draw per call, so the result does not depend on the
number of processes).

* ``"grid"``: uniform over the indices of a Karras grid (EDM arXiv:2206.00364 eq. 5) of ``num_levels`` levels,
  restricted to the fraction ``[t_min, t_max]`` of it (0 = sigma_max end): DMD2's ``t ~ U[0.02 T, 0.98 T]``
  (arXiv:2405.14867 §4, App. C).
* ``"lognormal"``: EDM's ``log sigma ~ N(p_mean, p_std^2)`` (Table 1), clamped to the grid's range.

Off-marginal points (:func:`widen_noise`, the ``wide_frac`` / ``wide_scale`` options of ``scm``, ``meanflow`` and
``ayf``; not in their papers): a fraction of each batch draws its noise with a larger std. A distillation objective
that is the residual of an identity along the teacher's PF-ODE (sCD's ``df/dt = 0``, MeanFlow's ``u = v - (t - r)
du/dt`` with the teacher's ``v``, AYF's Eulerian and Lagrangian conditions) holds at every point, not only on the
noising marginal, so such points train the same map where a sampler can land but the marginal almost never goes: the
noise tails the one-step sampler starts from and the off-data inputs of later steps. Objectives whose target is a
data pair's conditional velocity (sCT, MeanFlow from data) average to the velocity of the marginal the noise came
from, so they refuse it (:func:`check_wide`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.core.registry import ConfigError
from distill.core.schedules import discrete_index_sigma_from_uniform, karras_sigmas, lognormal_sigma_from_normal

from ..base import Batch

__all__ = ["SIGMA_DENSITIES", "SigmaSampler", "check_sigma_config", "check_wide", "widen_noise"]

SIGMA_DENSITIES = ("grid", "lognormal")


def check_sigma_config(owner: str, densities: dict[str, str], t_min: float, t_max: float, num_levels: int,
                       p_std: float) -> None:
    """One-line :class:`ConfigError` for a bad density name (key -> value in ``densities``) or range."""
    for value in densities.values():
        if value not in SIGMA_DENSITIES:
            raise ConfigError(f"{owner}: unknown sigma density {value!r}; valid: {', '.join(SIGMA_DENSITIES)}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ConfigError(f"{owner}: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if num_levels < 2:
        raise ConfigError(f"{owner}: num_levels must be >= 2, got {num_levels}")
    if p_std <= 0:
        raise ConfigError(f"{owner}: p_std must be > 0, got {p_std}")


class SigmaSampler:
    """Draws ``[B]`` noise levels from one batch draw.

    Args:
        density: ``"grid"`` or ``"lognormal"``.
        sigma_min, sigma_max: the teacher's range (the Karras grid's ends; the log-normal is clamped to them).
        num_levels: the grid's size.
        t_min, t_max: the grid fraction range of ``"grid"``.
        p_mean, p_std: the log-normal's parameters.
    """

    def __init__(self, density: str, sigma_min: float, sigma_max: float, num_levels: int = 1000,
                 t_min: float = 0.02, t_max: float = 0.98, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        if density not in SIGMA_DENSITIES:
            raise ValueError(f"unknown sigma density {density!r}; valid: {', '.join(SIGMA_DENSITIES)}")
        self.density = density
        self.grid = karras_sigmas(num_levels, sigma_min, sigma_max, append_zero=False)  # [num_levels] float64, desc.
        self.t_min, self.t_max, self.p_mean, self.p_std = t_min, t_max, p_mean, p_std

    def __call__(self, batch: Batch, like: Tensor, floor: Tensor | None = None) -> Tensor:
        """``[B]`` levels on ``like``'s device and dtype (computed in float64).

        ``floor: [B]`` (``"grid"`` only): per-row lower bounds; row ``i`` draws uniformly among the grid levels of
        ``[t_min, t_max]`` that are ``>= floor_i`` (the largest level in range when none is; ``0`` = no bound). The
        draws are the same as without it, so rows whose bound cuts nothing get the same level."""
        if self.density == "grid":
            _, sigma = discrete_index_sigma_from_uniform(batch.rand(dtype=torch.float64), self.grid, self.t_min,
                                                         self.t_max, floor)
        else:
            if floor is not None:
                raise ValueError("SigmaSampler: per-row floors need the 'grid' density")
            lo, hi = float(self.grid[-1]), float(self.grid[0])
            sigma = lognormal_sigma_from_normal(batch.randn(dtype=torch.float64), self.p_mean, self.p_std)
            sigma = sigma.clamp(lo, hi)
        return sigma.to(device=like.device, dtype=like.dtype)


def check_wide(owner: str, frac: float, scale: float, refuse: str | None = None) -> None:
    """One-line :class:`ConfigError` for bad off-marginal settings: ``frac`` in ``[0, 1]``, ``scale >= 1``; and, when
    the loss's setting makes its target valid only on the marginal, ``refuse`` (the reason) for any ``frac > 0``."""
    if not 0 <= frac <= 1 or not scale >= 1:
        raise ConfigError(f"{owner}: wide_frac must lie in [0, 1] and wide_scale be >= 1, got {frac}, {scale}")
    if frac > 0 and refuse:
        raise ConfigError(f"{owner}: wide_frac > 0 {refuse}")


def widen_noise(noise: Tensor, frac: float, scale: float) -> Tensor:
    """``noise`` with its first ``round(frac B)`` rows multiplied by ``scale`` (the rows are i.i.d., so which rows is
    immaterial; the count is fixed, so every batch has the same share)."""
    if frac <= 0:
        return noise
    n = round(frac * noise.shape[0])
    return torch.cat([noise[:n] * scale, noise[n:]])
