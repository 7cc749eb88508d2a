"""Generator rollouts: one-step ``G(z) = J(sigma_max z, sigma_max, 0)`` and DMD2's backward simulation for
few-step generators (arXiv:2405.14867 §4.5), with every random draw made through the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError

from ..base import Batch, StepContext

__all__ = ["check_levels", "generator_rollout"]


def check_levels(owner: str, levels: Sequence[float] | None) -> list[float] | None:
    """Validate ``student_sigmas`` (a non-empty strictly descending list of positive levels, or ``None``)."""
    if levels is None:
        return None
    out = [float(s) for s in levels]
    if not out or any(s <= 0 for s in out) or any(a <= b for a, b in zip(out, out[1:])):
        raise ConfigError(f"{owner}: student_sigmas must be a non-empty strictly descending list of positive "
                          f"noise levels (e.g. [80, 2.0, 0.5]), got {list(levels)}")
    return out


def generator_rollout(student: nn.Module, batch: Batch, ctx: StepContext, levels: Sequence[float],
                      data_shape: Sequence[int], cond: Tensor | None = None, gamma: float = 1.0,
                      return_steps: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Generator samples ``[B, *data_shape]``, differentiable through the last jump iff grad is enabled.

    One level ``[sigma_0]`` (a one-step generator, normally ``sigma_0 = sigma_max``): ``x = J(sigma_0 z, sigma_0, 0)``
    with ``z = batch.randn(*data_shape)``. Several levels ``sigma_0 > ... > sigma_{L-1}`` (DMD2 §4.5, backward
    simulation): each row draws a level ``k`` in ``{0, ..., L-1}``; the *current* student runs ``k`` jumps from
    ``sigma_0 z`` without grad, re-noising after jump ``j`` to ``sigma_{j+1}`` with fresh noise
    (``x = J(x, sigma_j, 0) + sigma_{j+1} n_j``, as at sampling time, so training inputs match inference inputs);
    the last jump ``k -> 0`` is graded. Draws: ``z``, ``k``, then one ``n_j`` per ``j < L - 1`` (always ``L - 1`` of
    them, so that a process's draw count does not depend on its rows). ``gamma`` is the sampler's CTM gamma
    (:func:`students.sampling.sample_student`): the no-grad jumps go to ``u = sqrt(1 - gamma^2) sigma_{j+1}`` and
    re-noise by ``sqrt(sigma_{j+1}^2 - u^2) n_j``; ``gamma = 1`` (the default) is the re-noising chain above,
    ``gamma = 0`` a deterministic chain of flow-map jumps ``J(x, sigma_j, sigma_{j+1})`` (whose ``n_j`` are drawn and
    unused), so a flow-map student is trained on the chain it samples with.

    Args:
        student: ``J(x, sigma_from, sigma_to, cond)``.
        batch: supplies the size and the draws.
        ctx: the run's device and dtype.
        levels: ``[L]`` strictly descending noise levels.
        data_shape: one sample's shape.
        cond: ``[B]`` labels or ``None``.
        gamma: the sampler's CTM gamma (above).
        return_steps: also return ``k: [B]`` (long), the index of each row's graded jump's start level (so row ``i``
            is an intermediate output of the chain iff ``k_i < L - 1``; all zeros for one level).
    """
    if not 0.0 <= float(gamma) <= 1.0:
        raise ConfigError(f"generator rollout: gamma must lie in [0, 1], got {gamma}")
    n, dev, dt = batch.size, ctx.device, ctx.dtype
    sig = torch.tensor([float(s) for s in levels], device=dev, dtype=dt)
    zero = torch.zeros(n, device=dev, dtype=dt)
    x = sig[0] * batch.randn(*data_shape, dtype=dt).to(dev)
    if len(levels) == 1:
        out = student(x, sig[0].expand(n), zero, cond)
        return (out, torch.zeros(n, dtype=torch.long, device=dev)) if return_steps else out
    scale = math.sqrt(1.0 - float(gamma) ** 2)
    k = batch.randint(len(levels)).to(dev)
    with torch.no_grad():
        for j in range(len(levels) - 1):
            noise = batch.randn(*data_shape, dtype=dt).to(dev)
            if bool((k > j).any()):
                # CTM gamma step: jump to u <= t, then fresh noise back up to t (gamma 1: u = 0, the full sqrt(t^2) = t)
                t = float(sig[j + 1])
                u = scale * t
                renoised = student(x, sig[j].expand(n), torch.full_like(zero, u), cond)
                if u < t:
                    renoised = renoised + math.sqrt(t * t - u * u) * noise
                x = torch.where(append_dims(k > j, x.ndim), renoised, x)
    out = student(x, sig[k], zero, cond)
    return (out, k) if return_steps else out
