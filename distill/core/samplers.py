"""Teacher-side ODE solvers in VE/EDM coordinates: Euler (= DDIM), Heun, DPM-Solver++(2M), UniPC, DEIS, iPNDM.

Every solver integrates the probability-flow ODE of Karras et al. 2022 (arXiv:2206.00364, eq. 3 with
``s(t) = 1, sigma(t) = t``)

    dx/dsigma = (x - D(x, sigma)) / sigma

with a denoiser ``D(x, sigma[B], cond) -> x0_hat``. They share one signature (design.md §3, style.md §7)::

    sample_<name>(denoiser, noise, sigmas, cond=None, *, generator=None, **options) -> x0

``noise`` is standard normal ``[B, ...]``; the solver starts from ``x = sigmas[0] * noise`` and walks the descending
grid ``sigmas`` (``[N + 1]``, normally ending in 0, as built by :mod:`distill.core.schedules`). Classifier-free guidance
is the caller's business (``functools.partial(teacher, guidance=w)``). The single-step functions
:func:`euler_step` and :func:`heun_step` take per-sample noise levels and are the ones losses call (a consistency
distillation teacher step uses a random grid index per row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from numpy.polynomial import Polynomial
from torch import Tensor

from distill.core.conversions import append_dims, as_sigma
from distill.core.registry import ConfigError, Registry, check_kwargs
from distill.core.schedules import GRIDS, make_grid

__all__ = [
    "DenoiserFn",
    "SAMPLERS",
    "euler_step",
    "heun_step",
    "dpmpp_2m_update",
    "unipc_update",
    "deis_coefficients",
    "ipndm_update",
    "sample_euler",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_unipc",
    "sample_deis",
    "sample_ipndm",
    "get_sampler",
    "steps_for_nfe",
    "sample_at_nfe",
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
_AB_WEIGHTS = {
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
    w = _AB_WEIGHTS[len(ds)]
    return x + (sigma_next - sigma) * sum(wk * d for wk, d in zip(w, ds))


# ---------------------------------------------------------------------------------------------------------------
# Samplers: one signature, sample_<name>(denoiser, noise, sigmas, cond=None, *, generator=None, **options) -> x0
# ---------------------------------------------------------------------------------------------------------------

SAMPLERS: Registry = Registry("sampler")


def _start(noise: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor, list[float]]:
    """Validate ``noise``/``sigmas``; return ``x = sigmas[0] * noise``, the grid in noise's dtype, and as floats."""
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1 or noise.shape[0] == 0:
        got = f"{noise.dtype} {list(noise.shape)}" if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a non-empty floating tensor [B, ...] of standard normal draws, got {got}")
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 levels (e.g. karras_sigmas(n)), got shape "
                         f"{list(sigmas.shape)}")
    grid = sigmas.to(device=noise.device, dtype=noise.dtype)
    floats = [float(s) for s in grid.tolist()]
    ok = all(math.isfinite(s) for s in floats) and floats[-1] >= 0 and all(
        a > b for a, b in zip(floats[:-1], floats[1:])
    )
    if not ok:
        head = ", ".join(f"{s:.4g}" for s in floats[:4])
        raise ValueError(f"sigmas must be finite, strictly decreasing and >= 0 (only the last may be 0) in "
                         f"{noise.dtype}, got [{head}{', ...' if len(floats) > 4 else ''}]")
    return grid[0] * noise, grid, floats


def _steps(n: int, progress: bool, name: str) -> Iterable[int]:
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=name, leave=False)


def _level_b(sigma: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


@SAMPLERS.register("euler")
def sample_euler(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler on the PF-ODE = DDIM with eta = 0 (Song et al., arXiv:2010.02502; Karras et al. 2022 §3). 1 NFE/step.

    Args:
        denoiser: ``D(x, sigma[B], cond) -> x0_hat``.
        noise: ``[B, ...]`` standard normal; the solver starts from ``sigmas[0] * noise``.
        sigmas: ``[N + 1]`` descending grid, normally ending in 0.
        cond: conditioning passed to every denoiser call.
        generator: unused (deterministic); accepted for the shared signature.
        progress: show a tqdm bar over steps.
    Returns:
        ``[B, ...]`` samples at ``sigmas[-1]``.
    """
    x, grid, _ = _start(noise, sigmas)
    for i in _steps(len(grid) - 1, progress, "euler"):
        x = euler_step(denoiser, x, grid[i], grid[i + 1], cond)
    return x


@SAMPLERS.register("heun")
def sample_heun(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """EDM's Heun sampler (Karras et al. 2022, arXiv:2206.00364, Alg. 1; Alg. 2 when ``s_churn > 0``).

    The last step to ``sigma = 0`` is plain Euler, so ``N`` steps cost ``2N - 1`` NFE (18 steps -> 35 NFE).
    With ``s_churn > 0`` each step whose level lies in ``[s_min, s_max]`` first raises the level to
    ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(s_churn / N, sqrt(2) - 1)``, by adding fresh noise of std
    ``s_noise * sqrt(sigma_hat^2 - sigma^2)`` drawn from ``generator`` (EDM's ImageNet setting: 40, 0.05, 50, 1.003).

    Args: as :func:`sample_euler`, plus the four EDM stochasticity parameters.
    """
    if s_churn < 0 or s_noise < 0 or s_min > s_max:
        raise ValueError(f"heun stochasticity needs s_churn >= 0, s_noise >= 0 and s_min <= s_max, got "
                         f"s_churn={s_churn}, s_noise={s_noise}, s_min={s_min}, s_max={s_max}")
    x, grid, fl = _start(noise, sigmas)
    n = len(grid) - 1
    for i in _steps(n, progress, "heun"):
        sigma = grid[i]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_churn > 0 and s_min <= fl[i] <= s_max else 0.0
        if gamma > 0:
            sigma = grid[i] * (1 + gamma)
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + s_noise * (sigma**2 - grid[i] ** 2).sqrt() * eps
        step = euler_step if fl[i + 1] == 0 else heun_step
        x = step(denoiser, x, sigma, grid[i + 1], cond)
    return x


def _multistep_order(n: int, i: int, order: int, lower_order_final: bool, last_is_zero: bool) -> int:
    """Multistep order at step ``i`` of ``n``: warm-up from 1, and DPM-Solver's lower_order_final rule (the last
    step first order and the one before at most second order when fewer than 15 steps; always first order for a
    final step to 0, where ``lambda`` is infinite)."""
    p = min(order, i + 1)
    if i == n - 1 and (last_is_zero or (lower_order_final and n < 15)):
        p = 1
    elif i == n - 2 and lower_order_final and n < 15:
        p = min(p, 2)
    return p


@SAMPLERS.register("dpmpp_2m")
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2), data prediction in ``lambda = -log sigma``.

    The first step is first order (no history); the last step is first order when it goes to 0 (always) or, with
    ``lower_order_final``, when the grid has fewer than 15 steps — diffusers' ``DPMSolverMultistepScheduler`` rule,
    so both agree step for step. 1 NFE per step.

    Args: as :func:`sample_euler`, plus ``lower_order_final``.
    """
    x, grid, fl = _start(noise, sigmas)
    n = len(grid) - 1
    x0_prev = None
    for i in _steps(n, progress, "dpmpp_2m"):
        x0 = denoiser(x, _level_b(fl[i], x), cond)
        p = _multistep_order(n, i, 2, lower_order_final, fl[-1] == 0)
        x = dpmpp_2m_update(x, x0, x0_prev if p == 2 else None, fl[i], fl[i + 1], fl[i - 1] if i > 0 else None)
        x0_prev = x0
    return x


@SAMPLERS.register("unipc")
def sample_unipc(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    order: int = 3,
    variant: str = "bh2",
    lower_order_final: bool = True,
    use_corrector: bool = True,
) -> Tensor:
    """UniPC (Zhao et al. 2023, arXiv:2302.04867): predictor UniP-p plus corrector UniC-p, data prediction.

    At step ``i`` the denoiser is evaluated at the predicted ``x_i``; that output first corrects ``x_i`` (UniC,
    using the previous step's order) and is then the newest history entry for the next predictor, so the cost is
    **1 NFE per step**; the final step has no corrector. Orders warm up from 1; with ``lower_order_final`` the order
    is capped at ``N - i`` (diffusers' rule), and a final step to 0 is always first order.

    Args: as :func:`sample_euler`, plus ``order`` (1-3), ``variant`` (``"bh1"``/``"bh2"``), ``lower_order_final``
    and ``use_corrector``.
    """
    if order not in (1, 2, 3) or variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc needs order in (1, 2, 3) and variant in ('bh1', 'bh2'), got order={order!r}, "
                         f"variant={variant!r}")
    x, grid, fl = _start(noise, sigmas)
    n = len(grid) - 1
    x0s: list[Tensor] = []  # newest first
    levels: list[float] = []
    x_prev, p_prev = x, 0
    for i in _steps(n, progress, "unipc"):
        x0 = denoiser(x, _level_b(fl[i], x), cond)
        if use_corrector and i > 0:
            # UniC: correct x_i with the evaluation at the predicted x_i (reused below as history: no extra NFE)
            x = unipc_update(x_prev, x0s, levels, fl[i], p_prev, x0_next=x0, variant=variant)
        x0s, levels = [x0] + x0s[:2], [fl[i]] + levels[:2]
        p = min(order, i + 1, n - i if lower_order_final else order)
        if fl[i + 1] == 0:
            p = 1
        x_prev, p_prev = x, p
        x = unipc_update(x, x0s, levels, fl[i + 1], p, variant=variant)
    return x


@SAMPLERS.register("deis")
def sample_deis(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    order: int = 3,
    basis: str = "sigma",
    lower_order_final: bool = True,
) -> Tensor:
    """DEIS multistep (Zhang & Chen 2022, arXiv:2204.13902): Adams-Bashforth on ``eps = (x - D)/sigma`` with
    exactly integrated Lagrange weights (:func:`deis_coefficients`), 1 NFE per step.

    ``basis="sigma"`` is tAB-DEIS in EDM time (Zhou et al. 2024's "DEIS tAB"); ``basis="log_sigma"`` is rho-AB,
    diffusers' ``DEISMultistepScheduler``. Orders warm up from 1; ``lower_order_final`` lowers the last two steps
    on grids of fewer than 15 steps (diffusers' rule).

    Args: as :func:`sample_euler`, plus ``order`` (1-3; higher orders work but are not recommended),
    ``basis`` and ``lower_order_final``.
    """
    if order < 1 or basis not in ("sigma", "log_sigma"):
        raise ValueError(f"deis needs order >= 1 and basis in ('sigma', 'log_sigma'), got order={order!r}, "
                         f"basis={basis!r}")
    x, grid, fl = _start(noise, sigmas)
    n = len(grid) - 1
    eps_hist: list[Tensor] = []  # newest first
    for i in _steps(n, progress, "deis"):
        x0 = denoiser(x, _level_b(fl[i], x), cond)
        eps_hist = [(x - x0) / fl[i]] + eps_hist[: order - 1]
        p = _multistep_order(n, i, order, lower_order_final, False)
        coef = deis_coefficients([fl[i - k] for k in range(p)], fl[i + 1], basis)
        x = x + sum(c * e for c, e in zip(coef, eps_hist[:p]))
    return x


@SAMPLERS.register("ipndm")
def sample_ipndm(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    order: int = 4,
) -> Tensor:
    """iPNDM (Zhang & Chen 2022, arXiv:2204.13902): equal-step Adams-Bashforth of order up to 4 on the PF-ODE
    slope, warm-started with lower orders (:func:`ipndm_update`). 1 NFE per step. The weights ignore the grid's
    spacing, which is what makes it robust (and its formal order grid-dependent).

    Args: as :func:`sample_euler`, plus ``order`` (1-4).
    """
    if order not in _AB_WEIGHTS:
        raise ValueError(f"ipndm needs order in (1, 2, 3, 4), got {order!r}")
    x, grid, fl = _start(noise, sigmas)
    n = len(grid) - 1
    ds: list[Tensor] = []
    for i in _steps(n, progress, "ipndm"):
        x0 = denoiser(x, _level_b(fl[i], x), cond)
        ds = [(x - x0) / fl[i]] + ds[: order - 1]
        x = ipndm_update(x, ds, fl[i], fl[i + 1])
    return x


# ---------------------------------------------------------------------------------------------------------------
# Lookup and fixed-NFE convenience
# ---------------------------------------------------------------------------------------------------------------


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered as ``name`` (raises :class:`ConfigError` listing the valid names)."""
    return SAMPLERS.get(name)


def steps_for_nfe(sampler_name: str, nfe: int) -> int:
    """Grid steps ``N`` whose measured NFE equals ``nfe`` (per sample, without guidance).

    Every sampler here costs 1 NFE per step except Heun, which costs ``2N - 1``: ``N = (nfe + 1) // 2``, exact for
    odd ``nfe`` only (an even budget gets ``nfe - 1``); Heun at NFE 1 is a single Euler step. 35 NFE -> 18 steps.
    CFG doubles the measured count; divide the budget by 2 first if it must include guidance.
    """
    get_sampler(sampler_name)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    return (nfe + 1) // 2 if sampler_name == "heun" else nfe


def sample_at_nfe(
    denoiser: DenoiserFn,
    noise: Tensor,
    sampler: str,
    nfe: int,
    grid: str = "karras",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options,
) -> Tensor:
    """Run ``sampler`` on a ``grid`` (``karras``/``logsnr``/``uniform``, ending in 0) sized by :func:`steps_for_nfe`.

    Args:
        denoiser: ``D(x, sigma[B], cond) -> x0_hat``.
        noise: ``[B, ...]`` standard normal.
        sampler: a registered sampler name.
        nfe: network evaluations per sample.
        grid, sigma_min, sigma_max: the noise-level grid.
        options: extra sampler options (e.g. ``order=2``), checked against the sampler's signature.
    Returns:
        ``[B, ...]`` samples.
    """
    fn = get_sampler(sampler)
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}; valid grids: {', '.join(sorted(GRIDS))}")
    check_kwargs(fn, options, f"sampler {sampler!r}")
    sigmas = make_grid(grid, steps_for_nfe(sampler, nfe), sigma_min, sigma_max, dtype=torch.float64)
    return fn(denoiser, noise, sigmas, cond, generator=generator, progress=progress, **options)
