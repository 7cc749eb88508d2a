"""The one student sampler: chains of flow-map jumps with CTM gamma-sampling (Kim et al. 2023, "Consistency
Trajectory Models", arXiv:2310.02279, Alg. / §4 "gamma-sampling").

From ``x`` at ``s`` to the next grid level ``t``:

    u = sqrt(1 - gamma^2) t,   x <- J(x, s, u),   x <- x + sqrt(t^2 - u^2) z,   z ~ N(0, I) fresh,

and the last step (``t = 0``) is a plain jump ``J(x, s, 0)``. ``gamma = 0`` is a deterministic chain of jumps (the
ODE trajectory for an exact flow map); ``gamma = 1`` jumps to 0 and re-noises to ``t``: multistep consistency sampling
(Song et al. 2023, arXiv:2303.01469, Alg. 1, methods.md §3) - with noise std ``t`` rather than CM's
``sqrt(t^2 - sigma_min^2)``, a relative difference of ``sigma_min^2 / 2t^2`` (1e-6 at t = 1). TCD's strategic
stochastic sampling (arXiv:2402.19159) is the same idea in VP coordinates. One network evaluation per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import FlowMapStudent

__all__ = ["sample_student"]


def sample_student(
    student: FlowMapStudent,
    noise: Tensor,
    sigmas: Tensor,
    gamma: float = 0.0,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample with ``len(sigmas) - 1`` student jumps (1 NFE each) and CTM gamma re-noising.

    Args:
        student: any :class:`FlowMapStudent` (called as ``J(x, s, t, cond)``).
        noise: ``[B, ...]`` standard normal; the chain starts at ``x = sigmas[0] * noise``.
        sigmas: ``[N + 1]`` strictly descending noise levels ending in 0.
        gamma: stochasticity in ``[0, 1]`` (0: deterministic jumps, 1: multistep consistency sampling).
        cond: conditioning passed to the student.
        generator: RNG for the re-noising draws (``None``: torch's global RNG).
    Returns:
        ``[B, ...]`` samples.
    """
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
    if len(sig) < 2 or sig[-1] != 0.0 or any(a <= b for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError(f"sigmas must be strictly descending with at least 2 entries and end in 0, got {sig}")
    scale = math.sqrt(1.0 - float(gamma) ** 2)
    x = sig[0] * noise
    for s, t in zip(sig[:-1], sig[1:]):
        if t == 0.0:
            # Final step: a plain jump to the data (no re-noising target).
            x = student(x, s, 0.0, cond)
            continue
        u = scale * t
        x = student(x, s, u, cond)
        if u < t:
            # Fresh noise brings the marginal from level u back up to t (variances add in VE coordinates).
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + math.sqrt(t * t - u * u) * z
    return x
