"""f-divergences and the density-ratio weights of f-distill ("One-step Diffusion Models with f-Divergence Distribution
Matching", Xu, Nie & Vahdat 2025, arXiv:2502.15681).

Convention (the paper's): ``D_f(p || q) = E_q[ f(r) ]`` with ``p`` the teacher's (noised) distribution, ``q`` the
generator's and ``r = p / q``, ``f`` convex with ``f(1) = 0``. The paper's main theorem gives

    grad_theta D_f(p_t || q_t) = -E_q[ h(r) (grad log p_t - grad log q_t) dx_t/dtheta ],     h(r) = r^2 f''(r):

DMD's score difference weighted per sample by ``h``. Every function here takes the log-ratio ``l = log r`` (what a
discriminator's logit estimates), so no ``r`` is formed where it could overflow (``m = (p + q) / 2``):

==================== ======================= ================================== ============= ============== ==========
name                 divergence              f(r)                               f''(r)        h(r)           h(e^l)
==================== ======================= ================================== ============= ============== ==========
``reverse_kl``       KL(q||p) (= DMD)        -log r                             1/r^2         1              1
``forward_kl``       KL(p||q)                r log r                            1/r           r              e^l
``js``               (KL(p||m)+KL(q||m))/2   (r log r - (1+r) log((1+r)/2))/2   1/(2r(1+r))   r/(2(1+r))     sigm(l)/2
``squared_hellinger`` int (sqrt p-sqrt q)^2  (sqrt r - 1)^2                     r^(-3/2)/2    sqrt(r)/2      e^(l/2)/2
``jeffreys``         KL(p||q) + KL(q||p)     (r - 1) log r                      (r+1)/r^2     1 + r          1 + e^l
``neyman_chi2``      int (p-q)^2 / p         (1 - r)^2 / r                      2/r^3         2/r            2 e^-l
``pearson_chi2``     int (p-q)^2 / q         (r - 1)^2                          2             2 r^2          2 e^(2l)
==================== ======================= ================================== ============= ============== ==========

The paper's Table 1 lists reverse-KL, softened RKL, JS, squared Hellinger, forward-KL and Jeffreys, with ``h`` up to
constant factors; the two chi-square divergences are this project's additions. Constant factors cancel in the batch
normalisation below. An increasing ``h`` (forward-KL, Jeffreys, Pearson) up-weights samples where the generator
under-covers the teacher (``r > 1``): less mode seeking, more variance; JS's ``h`` saturates at 1/2.

:func:`fdistill_weights` builds the weights used in practice (the paper's two-stage normalisation, with the defaults
of NVIDIA's FastGen re-implementation): clamp the logit to ``[-10, 10]`` and ``r`` to ``[0.1, 20]``, divide ``r`` by its
(running) mean within its noise-level bin (``r``'s scale drifts with the noise level), compute ``h`` and divide it by
its batch mean, so that ``E_batch[h] = 1`` and ``reverse_kl`` is DMD exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIVERGENCES", "f_of_log_ratio", "h_of_log_ratio", "karras_bins", "fdistill_weights"]

_LOG2 = math.log(2.0)

#: name -> (f(r), h(r)) as functions of l = log r (see the module table)
_TABLE: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "reverse_kl": (lambda l: -l, torch.ones_like),
    "forward_kl": (lambda l: l * l.exp(), torch.exp),
    "js": (lambda l: 0.5 * (l * l.exp() - (1 + l.exp()) * (F.softplus(l) - _LOG2)), lambda l: 0.5 * torch.sigmoid(l)),
    "squared_hellinger": (lambda l: torch.expm1(0.5 * l) ** 2, lambda l: 0.5 * (0.5 * l).exp()),
    "jeffreys": (lambda l: torch.expm1(l) * l, lambda l: 1 + l.exp()),
    "neyman_chi2": (lambda l: torch.expm1(l) ** 2 * (-l).exp(), lambda l: 2 * (-l).exp()),
    "pearson_chi2": (lambda l: torch.expm1(l) ** 2, lambda l: 2 * (2 * l).exp()),
}
DIVERGENCES = tuple(_TABLE)


def _entry(name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    if name not in _TABLE:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}")
    return _TABLE[name]


def f_of_log_ratio(name: str, log_r: Tensor) -> Tensor:
    """The divergence's ``f(r)`` at ``r = exp(log_r)`` (elementwise)."""
    return _entry(name)[0](log_r)


def h_of_log_ratio(name: str, log_r: Tensor) -> Tensor:
    """The gradient weight ``h(r) = r^2 f''(r)`` at ``r = exp(log_r)`` (elementwise, unnormalised)."""
    return _entry(name)[1](log_r)


def karras_bins(sigma: Tensor, sigma_min: float, sigma_max: float, n_bins: int, rho: float = 7.0) -> Tensor:
    """Bin index ``[B]`` (long) of each level: ``n_bins`` equal slices of the Karras grid's index fraction
    ``(sigma_max^(1/rho) - sigma^(1/rho)) / (sigma_max^(1/rho) - sigma_min^(1/rho))`` (0 = ``sigma_max``), the "time"
    that DMD2's grid density is uniform in, so the bins are equally populated under ``dm_sigma: grid``."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    frac = (hi - sigma.double().clamp(sigma_min, sigma_max) ** (1 / rho)) / (hi - lo)
    return (frac * n_bins).floor().long().clamp(0, n_bins - 1)


def _global_sum(t: Tensor) -> Tensor:
    """Sum over processes (DDP), so that statistics of the global batch do not depend on the process count."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def fdistill_weights(name: str, logit: Tensor, bins: Tensor, running: Tensor | None, ema: float = 0.0,
                     logit_clamp: float = 10.0, ratio_min: float = 0.1, ratio_max: float = 20.0
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample f-distill weights ``h_hat: [B]`` with batch mean 1 from discriminator logits (the paper's two-stage
    normalisation):

    1. ``l = clamp(logit, -logit_clamp, logit_clamp)``, then ``r = exp(l)`` clamped to ``[ratio_min, ratio_max]``;
    2. per noise-level bin ``b``: ``m_b <- ema m_b + (1 - ema) mean_{rows in b} r`` (bins absent from the batch keep
       their value; ``ema = 0`` uses the batch alone), and ``r <- r / m_b`` (skipped when ``running`` is ``None``);
    3. ``h = h(r)`` (:func:`h_of_log_ratio`), ``h_hat = h / mean_batch h``.
    Means are over the global batch (summed over DDP processes). A row whose logit is NaN/Inf is excluded from every
    statistic and gets weight 0.

    Args:
        name: one of :data:`DIVERGENCES`.
        logit: ``[B]`` discriminator logits (estimates of ``log p/q``; detached here).
        bins: ``[B]`` long bin indices (:func:`karras_bins`).
        running: ``[n_bins]`` running bin means of ``r`` (updated in place), or ``None`` to skip step 2.
        ema: the running means' decay (FastGen: 0 on CIFAR-10, 0.5 on ImageNet-64).
    Returns:
        ``(h_hat [B], bad [B] bool, log_r [B])`` with ``log_r`` the clamped, bin-normalised log-ratio fed to ``h``.
    """
    bad = ~torch.isfinite(logit)
    log_r = torch.where(bad, torch.zeros_like(logit), logit).double()
    log_r = log_r.clamp(-logit_clamp, logit_clamp).clamp(math.log(ratio_min), math.log(ratio_max))
    good = (~bad).double()
    if running is not None:
        n = running.numel()
        cnt = _global_sum(torch.bincount(bins, weights=good, minlength=n))
        tot = _global_sum(torch.bincount(bins, weights=good * log_r.exp(), minlength=n))
        seen = cnt > 0
        new = torch.where(seen, ema * running.double() + (1 - ema) * tot / cnt.clamp_min(1), running.double())
        running.copy_(new.to(running.dtype))
        log_r = log_r - new[bins].log()
    h = h_of_log_ratio(name, log_r) * good
    mean = _global_sum(torch.stack([h.sum(), good.sum()]))
    h_hat = h / (mean[0] / mean[1].clamp_min(1)).clamp_min(1e-12)
    return h_hat.to(logit.dtype), bad, log_r.to(logit.dtype)
