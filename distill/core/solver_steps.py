"""Single-step update math of the teacher ODE solvers, in VE/EDM coordinates (``dx/dsigma = (x - D(x, sigma))/sigma``).

One step each of Euler (= DDIM), Heun, DPM-Solver++(2M), UniPC (predictor and corrector), DEIS (its integrated
Lagrange weights) and iPNDM. :func:`euler_step` and :func:`heun_step` call the denoiser and take per-sample noise
levels (losses call them: a consistency-distillation teacher step uses a random grid index per row); the multistep
updates are pure functions of tensors whose coefficients are float64 functions of the grid. The samplers that walk
a whole grid with them, and the sampler registry, are in :mod:`distill.core.samplers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from numpy.polynomial import Polynomial
from torch import Tensor

from distill.core.conversions import append_dims, as_sigma

__all__ = [
    "DenoiserFn",
    "AB_WEIGHTS",
    "euler_step",
    "heun_step",
    "dpmpp_2m_update",
    "unipc_update",
    "deis_coefficients",
    "ipndm_update",
]

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


# ---------------------------------------------------------------------------------------------------------------
# Multistep updates (pure functions of tensors; coefficients are float64 functions of the grid)
# ---------------------------------------------------------------------------------------------------------------


def dpmpp_2m_update(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None, sigma: float, sigma_next: float, sigma_prev: float | None = None
) -> Tensor:
    """One DPM-Solver++(2M) step in VE coordinates (alpha = 1, lambda = -log sigma).

    Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095), Alg. 2:
    ``x' = (sigma'/sigma) x + (1 - sigma'/sigma) D~`` with ``D~ = (1 + 1/(2r)) D_i - (1/(2r)) D_{i-1}``,
    ``h = log(sigma/sigma')``, ``r = log(sigma_prev/sigma) / h``. With no history (``x0_prev=None``) or
    ``sigma_next = 0`` (h infinite) it is the first-order DDIM update, which returns ``D_i`` at 0.

    Args:
        x: ``[B, ...]`` sample at ``sigma``.
        x0: ``[B, ...]`` denoiser output at ``(x, sigma)``.
        x0_prev: ``[B, ...]`` denoiser output at the previous grid level ``sigma_prev``, or ``None``.
        sigma, sigma_next, sigma_prev: grid levels (floats), ``sigma_prev > sigma > sigma_next >= 0``.
    """
    ratio = sigma_next / sigma
    if x0_prev is None or sigma_next == 0:
        return ratio * x + (1 - ratio) * x0
    r = math.log(sigma_prev / sigma) / math.log(sigma / sigma_next)
    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return ratio * x + (1 - ratio) * d


def _h_phis(hh: float, n: int) -> list[float]:
    """``[k! * hh * phi_{k+1}(hh) for k = 1..n]`` with ``phi_1(z) = (e^z - 1)/z``, ``phi_{k+1} = (phi_k - 1/k!)/z``.

    Small ``|hh|`` uses the series ``phi_k(z) = sum_j z^j/(j+k)!`` (the recursion cancels catastrophically there).
    """
    out = []
    for k in range(1, n + 1):
        if abs(hh) < 0.5:
            phi = sum(hh**j / math.factorial(j + k + 1) for j in range(30))
        else:
            phi = math.expm1(hh) / hh  # phi_1
            for j in range(1, k + 1):
                phi = (phi - 1 / math.factorial(j)) / hh
        out.append(math.factorial(k) * hh * phi)
    return out


def unipc_update(
    x: Tensor,
    x0s: list[Tensor],
    sigmas: list[float],
    sigma_next: float,
    order: int,
    x0_next: Tensor | None = None,
    variant: str = "bh2",
) -> Tensor:
    """One UniPC step in data-prediction form, VE coordinates (alpha = 1, lambda = -log sigma).

    Zhao et al. 2023, UniPC (arXiv:2302.04867), Alg. 2/3 with the B(h) of §3.3 (``bh1``: ``B = -h``;
    ``bh2``: ``B = e^{-h} - 1``). With ``x0_next=None`` this is the predictor UniP-``order``; with the denoiser's
    output at the predicted point it is the corrector UniC-``order`` (accuracy ``order + 1``), which reuses the
    evaluation the next step needs anyway. Writing ``h = lambda' - lambda_0``, ``r_k = (lambda_k - lambda_0)/h`` and
    ``D_k = (x0_k - x0_0)/r_k``:

        x' = (sigma'/sigma_0) x + (1 - sigma'/sigma_0) x0_0 - B(h) sum_k a_k D_k,

    where ``a`` solves the Vandermonde system ``sum_k a_k r_k^(m-1) = m! (-h) phi_{m+1}(-h) / B(h)``. The
    order-2 predictor uses ``a = 1/2`` (the paper's simplification; it keeps the order).

    Args:
        x: ``[B, ...]`` sample at ``sigmas[0]``.
        x0s: denoiser outputs at ``sigmas`` (newest first), at least ``order`` of them.
        sigmas: grid levels of ``x0s``, newest first (``sigmas[0]`` is the current level).
        sigma_next: target level, > 0 unless ``order == 1`` (h is infinite at 0).
        order: 1, 2 or 3.
        x0_next: denoiser output at the predicted sample at ``sigma_next`` (corrector), or ``None`` (predictor).
        variant: ``"bh1"`` or ``"bh2"``.
    """
    s0 = sigmas[0]
    ratio = sigma_next / s0
    x_lin = ratio * x + (1 - ratio) * x0s[0]
    corrector = x0_next is not None
    n_prev = order - 1  # previous points used besides the current one
    if not corrector and n_prev == 0:
        return x_lin
    if sigma_next == 0:
        raise ValueError("unipc_update: a step to sigma = 0 must be first order (lambda is infinite there)")
    lam0 = -math.log(s0)
    h = -math.log(sigma_next) - lam0
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(-math.log(sigmas[k]) - lam0) / h for k in range(1, n_prev + 1)]
    diffs = [(x0s[k] - x0s[0]) / rks[k - 1] for k in range(1, n_prev + 1)]
    n = order if corrector else n_prev
    b = np.array(_h_phis(hh, n)) / b_h
    if corrector:
        rks, diffs = rks + [1.0], diffs + [x0_next - x0s[0]]
    if n == 1:
        rhos = [0.5]  # UniC-1 and UniP-2: the paper's simplified coefficient
    else:
        mat = np.array([[r**m for r in rks] for m in range(n)], dtype=np.float64)
        rhos = np.linalg.solve(mat, b).tolist()
    res = sum(float(a) * d for a, d in zip(rhos, diffs))
    return x_lin - b_h * res


def _lagrange_basis(nodes: list[float], j: int) -> Polynomial:
    """The Lagrange basis polynomial that is 1 at ``nodes[j]`` and 0 at the other nodes."""
    p = Polynomial([1.0])
    for k, u in enumerate(nodes):
        if k != j:
            p = p * Polynomial([-u, 1.0]) / (nodes[j] - u)
    return p


def deis_coefficients(sigmas: list[float], sigma_next: float, basis: str = "sigma") -> list[float]:
    """Weights ``c_j`` of the DEIS multistep update ``x' = x + sum_j c_j eps_j`` in VE coordinates.

    Zhang & Chen 2022, DEIS (arXiv:2204.13902) §4: in VE coordinates the exponential integrator of
    ``dx/dsigma = eps(x, sigma)`` has no linear part, so ``c_j = int_sigma^sigma' l_j(u(s)) ds`` with ``l_j`` the
    Lagrange basis through the past levels. ``basis="sigma"`` interpolates in ``u = sigma`` (tAB-DEIS with the
    EDM time ``t = sigma``); ``basis="log_sigma"`` in ``u = log sigma`` (rho-AB, diffusers' DEIS), integrated in
    closed form as ``int l(u) e^u du = e^u sum_k (-1)^k l^(k)(u)``.

    Args:
        sigmas: levels where ``eps`` is known, newest first (``sigmas[0]`` is the current level).
        sigma_next: target level (may be 0).
        basis: ``"sigma"`` or ``"log_sigma"``.
    Returns:
        ``[len(sigmas)]`` weights, one per past ``eps``.
    """
    s0 = sigmas[0]
    if basis == "sigma":
        out = []
        for j in range(len(sigmas)):
            prim = _lagrange_basis(sigmas, j).integ()
            out.append(float(prim(sigma_next) - prim(s0)))
        return out
    if basis == "log_sigma":
        nodes = [math.log(s) for s in sigmas]
        out = []
        for j in range(len(sigmas)):
            p = _lagrange_basis(nodes, j)

            def prim(sig: float, p: Polynomial = p) -> float:
                if sig == 0:
                    return 0.0  # e^u * poly(u) -> 0 as u -> -inf
                u, total, q, sign = math.log(sig), 0.0, p, 1.0
                while True:
                    total += sign * q(u)
                    if q.degree() == 0:
                        break
                    q, sign = q.deriv(), -sign
                return sig * total

            out.append(prim(sigma_next) - prim(s0))
        return out
    raise ValueError(f"unknown DEIS basis {basis!r}; valid: 'sigma', 'log_sigma'")


# Adams-Bashforth weights for equal steps, newest first (iPNDM uses them regardless of the grid's spacing).
AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_update(x: Tensor, ds: list[Tensor], sigma: float, sigma_next: float) -> Tensor:
    """One iPNDM step: ``x' = x + (sigma' - sigma) sum_k w_k d_k`` with the equal-step Adams-Bashforth weights of
    order ``len(ds)`` (1-4) applied to the PF-ODE slopes ``d = (x - D)/sigma``, newest first.

    Zhang & Chen 2022, DEIS (arXiv:2204.13902) App. "iPNDM" (PNDM's linear multistep with a lower-order warm start
    instead of Runge-Kutta); used in EDM coordinates as in Zhou et al. 2024 (arXiv:2311.18508).
    """
    w = AB_WEIGHTS[len(ds)]
    return x + (sigma_next - sigma) * sum(wk * d for wk, d in zip(w, ds))
