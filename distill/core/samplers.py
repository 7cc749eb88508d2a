"""Teacher-side ODE solvers in VE/EDM coordinates: Euler (= DDIM), Heun, DPM-Solver++(2M), UniPC, DEIS, iPNDM.

Every solver integrates the probability-flow ODE of Karras et al. 2022 (arXiv:2206.00364, eq. 3 with
``s(t) = 1, sigma(t) = t``)

    dx/dsigma = (x - D(x, sigma)) / sigma

with a denoiser ``D(x, sigma[B], cond) -> x0_hat``. They share one signature (docs/design.md §2.3, §3.5)::

    sample_<name>(denoiser, noise, sigmas, cond=None, *, generator=None, **options) -> x0

``noise`` is standard normal ``[B, ...]``; the solver starts from ``x = sigmas[0] * noise`` and walks the descending
grid ``sigmas`` (``[N + 1]``, normally ending in 0, as built by :mod:`distill.core.schedules`). Classifier-free guidance
is the caller's business (``functools.partial(teacher, guidance=w)``).

The single-step updates the samplers are built from (:func:`euler_step`, :func:`heun_step` -- the ones losses call,
with per-sample noise levels -- and the multistep updates) live in :mod:`distill.core.solver_steps` and are
re-exported here, so ``from distill.core.samplers import euler_step, heun_step`` keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from distill.core.registry import ConfigError, Registry, check_kwargs
from distill.core.schedules import GRIDS, make_grid
from distill.core.solver_steps import (
    AB_WEIGHTS,
    DenoiserFn,
    deis_coefficients,
    dpmpp_2m_update,
    euler_step,
    heun_step,
    ipndm_update,
    unipc_update,
)
from distill.core.streams import randn_like

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
    # tqdm is optional here: distill.core depends only on torch, numpy and the standard library, and a progress
    # bar is asked for explicitly.
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
            eps = randn_like(x, generator)
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
    if order not in AB_WEIGHTS:
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
