"""Teacher ODE pairs: noise ``z`` -> the teacher's probability-flow ODE endpoint from ``sigma_max z``.

DMD (Yin et al. 2023, arXiv:2311.18828 §3.3) regresses its generator onto such pairs; DMD2 (arXiv:2405.14867 §5)
warm-starts its one-step SDXL generator on 10k of them; reflow (Liu et al. 2022, arXiv:2209.03003) and knowledge
distillation (Luhman & Luhman 2021, arXiv:2101.02388) train on them directly. The system caches them per run
(``distill.data_sources``); this is the pure generator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from distill.core.samplers import get_sampler, steps_for_nfe
from distill.core.schedules import karras_sigmas

__all__ = ["teacher_ode_pairs"]


@torch.no_grad()
def teacher_ode_pairs(denoiser: Callable[..., Tensor], z: Tensor, sigma_min: float, sigma_max: float,
                      cond: Tensor | None = None, nfe: int = 35, solver: str = "heun") -> Tensor:
    """The ODE endpoints of ``z: [n, ...]`` (standard normal): ``solver`` at ``nfe`` evaluations on the Karras grid
    (Heun 35 NFE = 18 steps, EDM's reference accuracy).

    Args:
        denoiser: ``D(x, sigma[B], cond) -> x0`` (guidance already applied).
        z: ``[n, ...]`` standard-normal noise; the ODE starts at ``sigma_max z``.
        sigma_min, sigma_max: the grid's ends.
        cond: ``[n]`` labels or ``None``.
        nfe: network evaluations of the solve.
        solver: a ``distill.core.samplers`` name.
    Returns:
        ``x0: [n, ...]``.
    """
    sigmas = karras_sigmas(steps_for_nfe(solver, nfe), sigma_min, sigma_max)
    return get_sampler(solver)(denoiser, z, sigmas, cond)
