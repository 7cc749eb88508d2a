"""The one student sampler: chains of flow-map jumps with CTM gamma-sampling (Kim et al. 2023, "Consistency
Trajectory Models", arXiv:2310.02279, Alg. / §4 "gamma-sampling").

From ``x`` at ``s`` to the next grid level ``t``:

    u = sqrt(1 - gamma^2) t,   x <- J(x, s, u),   x <- x + sqrt(t^2 - u^2) z,   z ~ N(0, I) fresh,

and the last step (``t = 0``) is a plain jump ``J(x, s, 0)``. ``gamma = 0`` is a deterministic chain of jumps (the
ODE trajectory for an exact flow map); ``gamma = 1`` jumps to 0 and re-noises to ``t``: multistep consistency sampling
(Song et al. 2023, arXiv:2303.01469, Alg. 1, docs/methods.md §3.4) - with noise std ``t`` rather than CM's
``sqrt(t^2 - sigma_min^2)``, a relative difference of ``sigma_min^2 / 2t^2`` (1e-6 at t = 1). TCD's strategic
stochastic sampling (arXiv:2402.19159) is the same idea in VP coordinates. One network evaluation per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from distill.core.schedules import karras_sigmas
from distill.core.streams import randn_like

from .base import FlowMapStudent

__all__ = ["sample_student", "SamplingPlan"]


@dataclass(frozen=True)
class SamplingPlan:
    """How a student is sampled at k NFE: the one object evaluation, sample grids, final FID and export all use.

    At ``nfe`` steps the levels are ``levels[nfe]`` when given (``nfe`` values, the first normally ``sigma_max``),
    else ``sigma_max`` then ``nfe - 1`` Karras-spaced levels (rho 7) down to ``floor`` (2 steps: ``[sigma_max,
    floor]``); a final 0 is appended. Steps are CTM gamma-sampling (:func:`sample_student`): ``gamma = 0`` a
    deterministic chain of flow-map jumps, ``gamma = 1`` multistep consistency sampling.

    A loss may provide its plan (:meth:`losses.base.DistillLoss.sampling`, e.g. DMD2's training levels for a
    multi-step generator); the run config's ``sampling`` section overrides any field.
    """

    gamma: float = 1.0
    floor: float = 0.4
    levels: Mapping[int, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise ValueError(f"sampling gamma must lie in [0, 1], got {self.gamma}")
        if not float(self.floor) > 0:
            raise ValueError(f"sampling floor must be > 0, got {self.floor}")
        levels = {int(k): tuple(float(s) for s in v) for k, v in dict(self.levels).items()}
        for k, v in levels.items():
            if len(v) != k:
                raise ValueError(f"sampling levels for {k} NFE must list {k} noise levels, got {list(v)}")
        object.__setattr__(self, "levels", levels)

    def sigmas(self, nfe: int, sigma_max: float) -> Tensor:
        """``[nfe + 1]`` descending float64 levels ending in 0."""
        if int(nfe) < 1:
            raise ValueError(f"a student samples with nfe >= 1, got {nfe}")
        if nfe in self.levels:
            return torch.tensor([*self.levels[nfe], 0.0], dtype=torch.float64)
        if nfe == 1:
            return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
        return karras_sigmas(nfe, sigma_min=self.floor, sigma_max=sigma_max)

    def sample(self, student: FlowMapStudent, noise: Tensor, nfe: int, cond: Tensor | None = None, *,
               generator: torch.Generator | None = None) -> Tensor:
        """``nfe``-step samples from standard-normal ``noise: [B, ...]`` (re-noising draws from ``generator``)."""
        sig = self.sigmas(nfe, student.sigma_max).to(noise.device)
        return sample_student(student, noise, sig, self.gamma, cond, generator=generator)

    def override(self, gamma: float | None = None, floor: float | None = None,
                 levels: Mapping[Any, Any] | None = None) -> SamplingPlan:
        """A copy with every non-``None`` field replaced (explicit levels are merged per NFE)."""
        merged = dict(self.levels)
        merged.update({int(k): tuple(v) for k, v in dict(levels or {}).items()})
        return replace(self, gamma=self.gamma if gamma is None else float(gamma),
                       floor=self.floor if floor is None else float(floor), levels=merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (exports and checkpoints record it)."""
        return {"gamma": self.gamma, "floor": self.floor,
                "levels": {str(k): list(v) for k, v in sorted(self.levels.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingPlan:
        return cls(gamma=float(d.get("gamma", 1.0)), floor=float(d.get("floor", 0.4)),
                   levels={int(k): tuple(v) for k, v in dict(d.get("levels", {})).items()})


def sample_student(
    student: FlowMapStudent,
    noise: Tensor,
    sigmas: Tensor,
    gamma: float = 0.0,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    renoise: Tensor | None = None,
) -> Tensor:
    """Sample with ``len(sigmas) - 1`` student jumps (1 NFE each) and CTM gamma re-noising.

    Args:
        student: any :class:`FlowMapStudent` (called as ``J(x, s, t, cond)``).
        noise: ``[B, ...]`` standard normal; the chain starts at ``x = sigmas[0] * noise``.
        sigmas: ``[N + 1]`` strictly descending noise levels ending in 0.
        gamma: stochasticity in ``[0, 1]`` (0: deterministic jumps, 1: multistep consistency sampling).
        cond: conditioning passed to the student.
        generator: RNG for the re-noising draws (``None``: torch's global RNG).
        renoise: ``[N - 1, B, ...]`` standard-normal re-noising draws to use instead of ``generator`` (row ``i`` for
            the jump into ``sigmas[i + 1]``): what a sample gets then does not depend on how a set is batched.
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
    for i, (s, t) in enumerate(zip(sig[:-1], sig[1:])):
        if t == 0.0:
            # Final step: a plain jump to the data (no re-noising target).
            x = student(x, s, 0.0, cond)
            continue
        u = scale * t
        x = student(x, s, u, cond)
        if u < t:
            # Fresh noise brings the marginal from level u back up to t (variances add in VE coordinates).
            z = renoise[i].to(x) if renoise is not None else randn_like(x, generator)
            x = x + math.sqrt(t * t - u * u) * z
    return x
