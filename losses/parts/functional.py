"""Pure math of distribution-matching distillation (no modules, no randomness).

* DMD: "One-step Diffusion with Distribution Matching Distillation", Yin et al. 2023, arXiv:2311.18828.
* DMD2: "Improved Distribution Matching Distillation for Fast Image Synthesis", Yin et al. 2024, arXiv:2405.14867.
* EDM: "Elucidating the Design Space of Diffusion-Based Generative Models", Karras et al. 2022, arXiv:2206.00364.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.core.conversions import append_dims

__all__ = ["mean_dims", "dmd_gradient", "gradient_injection_loss", "edm_loss_weight", "dsm_loss", "pseudo_huber",
           "ict_huber_c"]


def mean_dims(x: Tensor) -> Tensor:
    """Mean over every dim but the batch: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance ``sqrt(||a - b||^2 + c^2) - c`` per sample over the full squared norm (iCT,
    arXiv:2310.14189 §3.3; cd, kd, ct). ``c = 0`` is the L2 norm ``||a - b||``, with a zero gradient at ``a = b``.

    Args: ``a, b: [B, ...]``, ``c >= 0``. Returns ``[B]``.
    """
    sq = (a - b).pow(2).flatten(1).sum(1)
    if c == 0:
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
    return (sq + c * c).sqrt() - c


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber ``c = 0.00054 sqrt(dim)`` (arXiv:2310.14189 §3.3; 0.03 for CIFAR-10's 3072 dims)."""
    return 0.00054 * math.sqrt(dim)


def dmd_gradient(x: Tensor, mu_real: Tensor, mu_fake: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """The normalised distribution-matching gradient ``g = (mu_fake - mu_real) / mean_dims|x - mu_real|``.

    The reverse-KL gradient w.r.t. a generated sample is ``s_fake - s_real`` (DMD eq. 7); in x0 units (Tweedie,
    ``s = (D - x_t) / sigma^2``) it is ``(mu_fake - mu_real) / sigma^2``. DMD eq. 8 / DMD2 §4 replace ``1/sigma^2`` by
    the per-sample normaliser ``1 / mean|x - mu_real|`` (docs/methods.md §0.6). ``g`` is exactly zero
    wherever the fake and real denoisers agree, i.e. when the generator matches the teacher.

    Args:
        x: ``[B, ...]`` clean generated samples (detached).
        mu_real: ``[B, ...]`` teacher denoiser at the noised sample.
        mu_fake: ``[B, ...]`` fake-score denoiser at the same noised sample.
        eps: floor of the normaliser, so a sample the teacher already reproduces exactly gives no 0/0.
    Returns:
        ``(g, bad)``: ``g: [B, ...]`` with every row that holds a NaN/Inf set to zero, and ``bad: [B]`` bool marking
        those rows. The caller reports ``bad.sum()`` as its ``"nonfinite_rows"`` term, so the system counts and logs
        them and its guard policy decides (skip the step, or drop the rows: ``trainer.nonfinite_rows``).
    """
    norm = mean_dims((x - mu_real).abs()).clamp_min(eps)
    g = (mu_fake - mu_real) / append_dims(norm, x.ndim)
    bad = ~torch.isfinite(g).flatten(1).all(dim=1)
    return torch.where(append_dims(bad, g.ndim), torch.zeros_like(g), g), bad


def gradient_injection_loss(x: Tensor, g: Tensor) -> Tensor:
    """Surrogate whose gradient w.r.t. ``x`` is ``g / x.numel()``: ``0.5 * mean((x - sg(x - g))^2)``.

    docs/methods.md §0.7 (DMD2's code, DMD eq. 8 as a loss): the target ``sg(x - g)`` carries no gradient, so
    back-propagating this scalar pushes ``x`` along ``-g`` through the generator without differentiating the teacher
    or the fake score. The value (``0.5 * mean(g^2)``) says nothing about progress; log the norm of ``g`` instead.

    Args:
        x: ``[B, ...]`` generated samples (with grad).
        g: ``[B, ...]`` the gradient to inject (treated as a constant).
    Returns:
        scalar loss.
    """
    return 0.5 * F.mse_loss(x, (x - g).detach(), reduction="mean")


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's x0-loss weight ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`` (EDM Table 1): with it the
    preconditioned network's regression target has unit variance at every noise level. ``sigma: [B]`` -> ``[B]``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def dsm_loss(x0_hat: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """Per-sample EDM-weighted denoising score matching in x0 units: ``lambda(sigma) * mean_dims((x0_hat - x0)^2)``.

    Minimised over denoisers by the posterior mean ``E[x0 | x_sigma]`` (Vincent 2011; EDM eq. 2), which is why it
    trains a fake score of whatever distribution ``x0`` comes from (DMD eq. 6, DMD2 §3).
    Args: ``x0_hat, x0: [B, ...]``, ``sigma: [B]``. Returns ``[B]``.
    """
    return edm_loss_weight(sigma, sigma_data) * mean_dims((x0_hat - x0) ** 2)
