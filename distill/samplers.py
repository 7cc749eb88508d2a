"""Teacher-side ODE solvers in VE/EDM coordinates: Euler (= DDIM), Heun, DPM-Solver++(2M), UniPC, DEIS, iPNDM.

Every solver integrates the probability-flow ODE of Karras et al. 2022 (arXiv:2206.00364, eq. 3 with
``s(t) = 1, sigma(t) = t``)

    dx/dsigma = (x - D(x, sigma)) / sigma

with a denoiser ``D(x, sigma[B], cond) -> x0_hat``. They share one signature (design.md §3, style.md §7)::

    sample_<name>(denoiser, noise, sigmas, cond=None, *, generator=None, **options) -> x0

``noise`` is standard normal ``[B, ...]``; the solver starts from ``x = sigmas[0] * noise`` and walks the descending
grid ``sigmas`` (``[N + 1]``, normally ending in 0, as built by :mod:`distill.schedules`). Classifier-free guidance
is the caller's business (``functools.partial(teacher, guidance=w)``). The single-step functions
:func:`euler_step` and :func:`heun_step` take per-sample noise levels and are the ones losses call (a consistency
distillation teacher step uses a random grid index per row).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from distill.conversions import append_dims, as_sigma

__all__ = ["DenoiserFn", "euler_step", "heun_step"]

DenoiserFn = Callable[..., Tensor]  # D(x: [B, ...], sigma: [B], cond) -> x0_hat: [B, ...]


def _level(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A noise level as a ``[B]`` tensor in ``x``'s dtype/device (scalars and 0-d tensors are broadcast)."""
    if isinstance(sigma, Tensor):
        sigma = sigma.to(device=x.device, dtype=x.dtype)
    return as_sigma(sigma, x)


def euler_step(
    denoiser: DenoiserFn, x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, cond: Tensor | None = None
) -> Tensor:
    """One Euler step of the PF-ODE from ``sigma`` to ``sigma_next`` (1 NFE); in VE coordinates this is DDIM, eta=0.

    Karras et al. 2022 (arXiv:2206.00364) Alg. 1 line 5 without the corrector; Song et al. (arXiv:2010.02502) eq. 12:
    ``x' = D + (sigma'/sigma) (x - D)``, which equals ``x + (sigma' - sigma) (x - D)/sigma`` and is exact for
    point-mass data. Written in the DDIM form so that ``sigma_next = 0`` returns ``D`` exactly.

    Args:
        denoiser: ``D(x, sigma[B], cond) -> x0_hat``.
        x: ``[B, ...]`` sample at ``sigma``.
        sigma: ``[B]`` or scalar, > 0 (rows may sit at different levels).
        sigma_next: ``[B]`` or scalar, >= 0.
        cond: conditioning passed through to the denoiser.
    Returns:
        ``[B, ...]`` sample at ``sigma_next``.
    """
    s, s_next = _level(sigma, x), _level(sigma_next, x)
    x0 = denoiser(x, s, cond)
    return x0 + append_dims(s_next / s, x.ndim) * (x - x0)


def heun_step(
    denoiser: DenoiserFn, x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, cond: Tensor | None = None
) -> Tensor:
    """One Heun (trapezoidal) step of the PF-ODE from ``sigma`` to ``sigma_next`` (2 NFE).

    Karras et al. 2022 (arXiv:2206.00364) Alg. 1 lines 5-8: Euler predictor ``x_e = x + (s' - s) d``,
    ``d = (x - D(x, s))/s``, then ``x' = x + (s' - s) (d + d')/2`` with ``d' = (x_e - D(x_e, s'))/s'``. Rows whose
    ``sigma_next`` is 0 fall back to the Euler predictor (``d'`` is undefined there), chosen per row with
    ``torch.where`` so that a batch mixing levels costs one evaluation per stage. (Samplers skip the second
    evaluation entirely on a final step to 0 by calling :func:`euler_step`; this function always spends 2 NFE.)

    Args:
        denoiser: ``D(x, sigma[B], cond) -> x0_hat``.
        x: ``[B, ...]`` sample at ``sigma``.
        sigma: ``[B]`` or scalar, > 0.
        sigma_next: ``[B]`` or scalar, >= 0.
        cond: conditioning passed through to the denoiser.
    Returns:
        ``[B, ...]`` sample at ``sigma_next``.
    """
    s, s_next = _level(sigma, x), _level(sigma_next, x)
    x0 = denoiser(x, s, cond)
    d = (x - x0) / append_dims(s, x.ndim)
    dt = append_dims(s_next - s, x.ndim)
    x_euler = x0 + append_dims(s_next / s, x.ndim) * (x - x0)  # = x + dt * d, exact D on rows going to 0
    last = s_next == 0
    # Rows going to 0 are evaluated at a harmless level (their own sigma) and discarded, so no 0/0 or log(0)
    # reaches the network and no NaN leaks into gradients through the unselected branch of torch.where.
    s_eval = torch.where(last, s, s_next)
    x0_next = denoiser(x_euler, s_eval, cond)
    d_next = (x_euler - x0_next) / append_dims(s_eval, x.ndim)
    x_heun = x + dt * (d + d_next) / 2
    return torch.where(append_dims(last, x.ndim), x_euler, x_heun)
