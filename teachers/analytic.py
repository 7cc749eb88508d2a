"""Analytic teachers: isotropic Gaussian mixtures in any dimension, with exact denoiser, samples and log-density.

For ``p(x0) = sum_k pi_k N(mu_k, s_k^2 I)`` the noised marginal is ``sum_k pi_k N(mu_k, (s_k^2 + sigma^2) I)`` and the
ideal denoiser is the posterior-weighted mix of per-component Gaussian denoisers (methods.md §4)

    D*(x, sigma) = sum_k w_k(x, sigma) (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2),
    w_k ∝ pi_k N(x; mu_k, (s_k^2 + sigma^2) I).

An empirical-data teacher is the same mixture with ``s_k = 0`` at every data point (the exact denoiser of the
empirical distribution: it memorises, which is what makes it a closed form). With ``conditional=True`` the class
label is the component index, ``D(x, sigma, k)`` is component ``k``'s denoiser, and the unconditional denoiser is the
full mixture, so classifier-free guidance has an exact reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.core.conversions import append_dims, as_sigma

from .base import Teacher, TeacherInfo

__all__ = ["GaussianMixtureTeacher", "ring", "grid", "empirical"]


class GaussianMixtureTeacher(Teacher):
    """Exact teacher for an isotropic Gaussian mixture.

    Args:
        means: ``[K, *data_shape]`` component means.
        stds: ``[K]`` (or scalar) per-component standard deviations; 0 gives point masses.
        weights: ``[K]`` mixture weights (normalised here); uniform if omitted.
        conditional: expose the component index as a class label.
        sigma_min, sigma_max: the noise range samplers use.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor | None = None,
        conditional: bool = False,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64) / weights.sum()
        flat = means.reshape(k, -1)
        mean = (weights[:, None] * flat).sum(0)
        var = (weights[:, None] * ((flat - mean) ** 2 + stds[:, None] ** 2)).sum(0).mean()
        info = TeacherInfo(
            data_shape=tuple(means.shape[1:]),
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=float(var.sqrt()),
            num_classes=k if conditional else None,
            extra={"kind": "gaussian_mixture", "components": k},
        )
        super().__init__(info)
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights)
        self.freeze()

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def _log_resp(self, xf: Tensor, sigma: Tensor) -> Tensor:
        """Unnormalised log posterior component weights ``[B, K]`` of flattened ``xf: [B, D]`` at ``sigma: [B]``."""
        d = xf.shape[1]
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
        sq = torch.cdist(xf, self.means.reshape(self.n_components, -1).to(xf.dtype)) ** 2  # [B, K]
        return self.weights.log()[None] - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        self.check_input(x)
        dtype = x.dtype
        sigma = as_sigma(sigma, x).to(torch.float64)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        mu = self.means.reshape(self.n_components, -1)  # [K, D]
        s2 = self.stds**2  # [K]
        var = s2[None, :] + sigma[:, None] ** 2  # [B, K]
        if cond is None:
            resp = torch.softmax(self._log_resp(xf, sigma), dim=1)  # [B, K]
        else:
            resp = torch.nn.functional.one_hot(cond.long(), self.n_components).to(torch.float64)
        # Per-component Gaussian posterior mean: (s^2 x + sigma^2 mu) / (s^2 + sigma^2)
        a = resp * s2[None] / var  # coefficient on x
        b = resp * (sigma[:, None] ** 2) / var  # coefficients on mu_k
        out = a.sum(1, keepdim=True) * xf + b @ mu
        return out.reshape(x.shape).to(dtype)

    def null_cond(self, cond: Tensor) -> None:
        return None

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """Exact ``log p_sigma(x)`` of the noised mixture. Returns ``[B]``."""
        sigma = as_sigma(sigma, x).to(torch.float64)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        return torch.logsumexp(self._log_resp(xf, sigma), dim=1)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Exact samples ``[n, *data_shape]`` (float32), optionally with their component labels ``[n]``."""
        labels = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.data_shape), generator=generator, dtype=torch.float64)
        x = self.means[labels] + append_dims(self.stds[labels], z.ndim) * z
        x = x.float()
        return (x, labels) if return_labels else x


def ring(
    n_modes: int = 8, radius: float = 2.0, std: float = 0.05, conditional: bool = False
) -> GaussianMixtureTeacher:
    """The benchmark ring: ``n_modes`` equal-weight modes on a circle (defaults of shared/benchmarks.md)."""
    angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixtureTeacher(means, std, conditional=conditional)


def grid(side: int = 5, spacing: float = 1.0, std: float = 0.05, conditional: bool = False) -> GaussianMixtureTeacher:
    """A ``side x side`` grid of modes centred at the origin (25 modes by default)."""
    c = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.stack(torch.meshgrid(c, c, indexing="ij"), dim=-1).reshape(-1, 2)
    return GaussianMixtureTeacher(means, std, conditional=conditional)


def empirical(data: Tensor, std: float = 0.0) -> GaussianMixtureTeacher:
    """The exact denoiser of an empirical data set ``data: [N, *shape]`` (optionally smoothed by ``std``)."""
    return GaussianMixtureTeacher(torch.as_tensor(data, dtype=torch.float64), std)
