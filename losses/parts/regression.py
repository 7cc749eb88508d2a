"""Regression of a one-step generator onto cached teacher ODE pairs: DMD's regression loss (arXiv:2311.18828 eq. 9,
with L2 instead of LPIPS so that it applies to any data) and DMD2's one-step warm start (arXiv:2405.14867 §4.4).

    L_reg = mean( (G(sigma_max z; sigma_max -> 0) - ODE(z))^2 ),

with ``(z, ODE(z))`` from the run's teacher-pair cache (data spec ``"pairs"``, source ``teacher_pairs``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.registry import ConfigError

from ..base import Batch, DataSpec, StepContext

__all__ = ["check_regression_config", "pairs_spec", "pair_regression", "warm_start_phases"]


def check_regression_config(owner: str, steps: int, pairs: int, nfe: int, weight: float) -> None:
    """One-line :class:`ConfigError` for bad ``regression_steps/_pairs/_nfe/_weight``."""
    if int(steps) != steps or steps < 0:
        raise ConfigError(f"{owner}: regression_steps must be an integer >= 0, got {steps!r}")
    if weight < 0:
        raise ConfigError(f"{owner}: regression_weight must be >= 0, got {weight}")
    if (steps > 0 or weight > 0) and (int(pairs) != pairs or pairs < 1):
        raise ConfigError(f"{owner}: regression_pairs must be an integer >= 1, got {pairs!r}")
    if int(nfe) != nfe or nfe < 3 or nfe % 2 == 0:
        raise ConfigError(f"{owner}: regression_nfe must be an odd integer >= 3 (Heun: 2N - 1), got {nfe!r}")


def pairs_spec(n: int, nfe: int, guidance: float) -> DataSpec:
    """The data spec of ``n`` Heun pairs at ``nfe`` (odd) with the teacher's ``guidance``."""
    return DataSpec("teacher_pairs", options={"n": int(n), "nfe": int(nfe), "guidance": float(guidance)})


def pair_regression(owner: str, student: nn.Module, batch: Batch, ctx: StepContext, sigma_max: float
                    ) -> tuple[Tensor, Tensor]:
    """``(L_reg, sg(G(sigma_max z)))`` on the batch's ``pairs.z, pairs.x0: [B, ...]`` (``pairs.labels: [B]``)."""
    if "pairs.z" not in batch.extras:
        raise ValueError(f"{owner}: regression needs teacher pairs in batch.extras ('pairs.z', 'pairs.x0')")
    z = batch.extras["pairs.z"].to(device=ctx.device, dtype=ctx.dtype)
    x0 = batch.extras["pairs.x0"].to(device=ctx.device, dtype=ctx.dtype)
    s = torch.full((z.shape[0],), float(sigma_max), device=ctx.device, dtype=ctx.dtype)
    x = student(s[0] * z, s, torch.zeros_like(s), batch.extras.get("pairs.labels"))
    return F.mse_loss(x, x0), x.detach()


def warm_start_phases(step: int, regression_steps: int, fake_warmup: int, ttur: Callable[[int], list[str]],
                      student: str = "student", critic: str = "critic") -> list[str]:
    """The phases of iteration ``step`` under DMD2's warm-start schedule: ``regression_steps`` of regression (the
    student phase only), then ``fake_warmup`` critic-only iterations (the fake score fits the warm-started
    generator), then the two-time-scale schedule ``ttur`` counted from the end of the warm-ups."""
    if step < regression_steps:
        return [student]
    if step < regression_steps + fake_warmup:
        return [critic]
    return ttur(step - regression_steps - fake_warmup)
