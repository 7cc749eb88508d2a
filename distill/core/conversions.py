"""One broadcasting helper and every conversion between diffusion coordinates and predictions.

The project's single convention is the variance-exploding (EDM) one: ``x = x0 + sigma * eps`` and a denoiser
``D(x, sigma, cond) -> x0_hat`` with ``sigma`` of shape ``[B]`` (docs/methods.md §0.1). Other parameterisations map onto
it exactly:

* VP / DDPM (``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``): ``x_ve = x_t / sqrt(abar)``,
  ``sigma = sqrt((1 - abar) / abar)``.
* Rectified flow (``x_t = (1 - t) x0 + t eps``): ``x_ve = x_t / (1 - t)``, ``sigma = t / (1 - t)``.
* TrigFlow (``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2)``): ``sigma = sigma_d tan(t)``,
  ``x_ve = x_t / cos(t)``.

Everything is a pure function of tensors; per-sample scalars are ``[B]`` and broadcast with :func:`append_dims`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "append_dims",
    "as_sigma",
    "sigma_from_alpha_bar",
    "alpha_bar_from_sigma",
    "vp_to_ve",
    "ve_to_vp",
    "sigma_from_rf_t",
    "rf_t_from_sigma",
    "rf_to_ve",
    "ve_to_rf",
    "sigma_from_trig_t",
    "trig_t_from_sigma",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0",
    "x0_to_v",
    "rf_velocity_to_x0",
    "x0_to_rf_velocity",
    "score_from_x0",
    "x0_from_score",
    "ode_derivative",
]


def append_dims(x: Tensor, target_ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample ``[B]`` tensor broadcasts against ``[B, ...]``.

    Args:
        x: ``[B]`` (or any tensor with ``x.ndim <= target_ndim``).
        target_ndim: number of dims of the tensor it must broadcast with.
    """
    extra = target_ndim - x.ndim
    if extra < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than the target {target_ndim}")
    return x.reshape(*x.shape, *((1,) * extra))


def as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return ``sigma`` as a ``[B]`` tensor on ``x``'s device/dtype (scalars are broadcast to the batch)."""
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [B]=[{x.shape[0]}], got {tuple(s.shape)}")
    return s


# ---------------------------------------------------------------------------------------------------------------
# Coordinates: VP (DDPM), rectified flow, TrigFlow <-> VE (EDM)
# ---------------------------------------------------------------------------------------------------------------


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """VE noise level of a VP marginal: ``sigma = sqrt((1 - abar) / abar)``."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """Inverse of :func:`sigma_from_alpha_bar`: ``abar = 1 / (1 + sigma^2)``."""
    return 1.0 / (1.0 + sigma**2)


def vp_to_ve(x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x_ve = x_t / sqrt(abar)``. Args: ``x_t: [B, ...]``, ``alpha_bar: [B]``."""
    return x_t / append_dims(alpha_bar.sqrt(), x_t.ndim)


def ve_to_vp(x: Tensor, sigma: Tensor) -> Tensor:
    """``x_t = x_ve * sqrt(abar) = x_ve / sqrt(1 + sigma^2)``. Args: ``x: [B, ...]``, ``sigma: [B]``."""
    return x * append_dims(alpha_bar_from_sigma(sigma).sqrt(), x.ndim)


def sigma_from_rf_t(t: Tensor) -> Tensor:
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` has VE noise level ``sigma = t / (1 - t)``."""
    return t / (1 - t)


def rf_t_from_sigma(sigma: Tensor) -> Tensor:
    """Inverse of :func:`sigma_from_rf_t`: ``t = sigma / (1 + sigma)``."""
    return sigma / (1 + sigma)


def rf_to_ve(x_t: Tensor, t: Tensor) -> Tensor:
    """``x_ve = x_t / (1 - t)``. Args: ``x_t: [B, ...]``, ``t: [B]`` in ``[0, 1)``."""
    return x_t / append_dims(1 - t, x_t.ndim)


def ve_to_rf(x: Tensor, sigma: Tensor) -> Tensor:
    """``x_t = x_ve * (1 - t) = x_ve / (1 + sigma)``."""
    return x / append_dims(1 + sigma, x.ndim)


def sigma_from_trig_t(t: Tensor, sigma_data: float = 0.5) -> Tensor:
    """TrigFlow time to VE noise level: ``sigma = sigma_d tan(t)`` (sCM, arXiv:2410.11081)."""
    return sigma_data * torch.tan(t)


def trig_t_from_sigma(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """``t = arctan(sigma / sigma_d)``."""
    return torch.atan(sigma / sigma_data)


# ---------------------------------------------------------------------------------------------------------------
# Predictions: eps, v, x0, rectified-flow velocity, score — all in VE coordinates unless said otherwise
# ---------------------------------------------------------------------------------------------------------------


def eps_to_x0(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """``x0 = x - sigma * eps`` (VE; eps-prediction is coordinate-free)."""
    return x - append_dims(sigma, x.ndim) * eps


def x0_to_eps(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """``eps = (x - x0) / sigma``."""
    return (x - x0) / append_dims(sigma, x.ndim)


def v_to_x0(x_t: Tensor, alpha_bar: Tensor, v: Tensor) -> Tensor:
    """VP v-prediction (Salimans & Ho, arXiv:2202.00512): ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``.

    ``x_t`` is in **VP** coordinates here, because that is what a v-prediction network sees.
    """
    a = append_dims(alpha_bar.sqrt(), x_t.ndim)
    s = append_dims((1 - alpha_bar).sqrt(), x_t.ndim)
    return a * x_t - s * v


def x0_to_v(x_t: Tensor, alpha_bar: Tensor, x0: Tensor) -> Tensor:
    """Inverse of :func:`v_to_x0`: ``v = (sqrt(abar) x_t - x0) / sqrt(1 - abar)``."""
    a = append_dims(alpha_bar.sqrt(), x_t.ndim)
    s = append_dims((1 - alpha_bar).sqrt(), x_t.ndim)
    return (a * x_t - x0) / s


def rf_velocity_to_x0(x_t: Tensor, t: Tensor, u: Tensor) -> Tensor:
    """Rectified flow velocity ``u = eps - x0`` (FastGen/SD3 convention) to x0: ``x0 = x_t - t u``.

    ``x_t`` is in RF coordinates ``(1 - t) x0 + t eps``.
    """
    return x_t - append_dims(t, x_t.ndim) * u


def x0_to_rf_velocity(x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """``u = (x_t - x0) / t`` (= ``eps - x0``)."""
    return (x_t - x0) / append_dims(t, x_t.ndim)


def score_from_x0(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """Tweedie: ``grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2``."""
    return (x0 - x) / append_dims(sigma, x.ndim) ** 2


def x0_from_score(x: Tensor, sigma: Tensor, score: Tensor) -> Tensor:
    """``D = x + sigma^2 * score``."""
    return x + append_dims(sigma, x.ndim) ** 2 * score


def ode_derivative(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """Probability-flow ODE in VE/EDM form (Karras et al. 2022, eq. 3 with s(t)=1, sigma(t)=t):
    ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    return (x - x0) / append_dims(sigma, x.ndim)

