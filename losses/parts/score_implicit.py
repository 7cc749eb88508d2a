"""SIM's score-divergence gradient (Luo et al. 2024, "One-Step Diffusion Distillation through Score Implicit
Matching", arXiv:2410.16794, Theorem 3.1 / §3.3), as a function of a generator sample: shared by the ``sim`` loss
(:mod:`losses.sim`, whose docstring derives it in x0 units) and the distribution-matching regulariser
(:mod:`.dm_regulariser`, ``dm_divergence="sim"``).

Per sample, with ``x_t = x_0 + sigma n``, ``Delta = D_fake(x_t) - D_real(x_t)`` and a distance ``d``:
``l = -d'(Delta)^T (D_fake(x_t) - x_0)``, differentiated through ``x_0`` and ``x_t`` into both denoisers (their
parameters frozen) and into ``d'``; the resulting per-sample gradient ``dl/dx_0`` is injected into the generator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims

from .gan import no_param_grad
from .input_grad import fake_denoise_with_input_grad

__all__ = ["SIM_DISTANCES", "distance_grad", "sim_rows", "sim_sample_grad", "sum_dims"]

SIM_DISTANCES = ("l2", "pseudo_huber")


def sum_dims(x: Tensor) -> Tensor:
    """``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def distance_grad(delta: Tensor, distance: str, c: float) -> Tensor:
    """``d'(Delta)`` per sample, ``[B, ...] -> [B, ...]``: ``2 Delta`` (``l2``) or ``Delta / sqrt(||Delta||^2 + c^2)``
    (``pseudo_huber``, SIM §3.3; the norm is over all of a sample's dims)."""
    if distance == "l2":
        return 2.0 * delta
    norm = (sum_dims(delta**2) + c * c).sqrt()
    return delta / append_dims(norm, delta.ndim)


def sim_rows(x0: Tensor, d_real: Tensor, d_fake: Tensor, distance: str, c: float) -> Tensor:
    """SIM's per-sample loss ``-d'(D_fake - D_real)^T (D_fake - x_0)`` (Theorem 3.1 in x0 units), ``[B]``.

    Args: ``x0: [B, ...]`` generator samples; ``d_real, d_fake: [B, ...]`` teacher and fake denoisers at
    ``x_t = x0 + sigma n``. All three carry the gradients the caller wants (SIM differentiates through all of them).
    """
    return -sum_dims(distance_grad(d_fake - d_real, distance, c) * (d_fake - x0))


def sim_sample_grad(x0: Tensor, sigma: Tensor, noise: Tensor, teacher: nn.Module, fake: nn.Module,
                    cond: Tensor | None, guidance: float, distance: str, c: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SIM's per-sample loss and its gradient with respect to the sample, ``(rows [B], g [B, ...], bad [B],
    gap [B])``, from ``x0: [B, ...]`` (detached here) noised to ``x0 + sigma n`` (``sigma: [B]``, ``noise`` like
    ``x0``); ``gap`` is ``||D_fake - D_real||``. Rows with a NaN/Inf are zeroed in all four and flagged in ``bad``."""
    x0 = x0.detach().requires_grad_(True)
    x_t = x0 + append_dims(sigma, x0.ndim) * noise
    with torch.enable_grad(), no_param_grad(fake):  # first-order VJPs through the frozen nets
        d_real = teacher(x_t, sigma, cond, guidance).to(x0.dtype)
        d_fake = fake_denoise_with_input_grad(fake, x_t, sigma, cond, d_real).to(x0.dtype)
        rows = sim_rows(x0, d_real, d_fake, distance, c)
        (g,) = torch.autograd.grad(rows.sum(), x0)  # row b of g is d rows[b] / d x0[b]
    gap = sum_dims((d_fake - d_real).detach() ** 2).sqrt()
    bad = ~(torch.isfinite(rows.detach()) & torch.isfinite(g).flatten(1).all(dim=1) & torch.isfinite(gap))
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    return (torch.where(bad, zero, rows.detach()), torch.where(append_dims(bad, g.ndim), zero, g), bad,
            torch.where(bad, zero, gap))
