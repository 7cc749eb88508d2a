"""EMA policies: one implementation, on ``torch.optim.swa_utils.AveragedModel``, for the student's evaluation EMA and
for losses' target networks (CD's theta^-).

* ``{"kind": "exp", "decay": mu}``: ``theta_ema <- mu theta_ema + (1 - mu) theta`` (torch's
  ``get_ema_multi_avg_fn``).
* ``{"kind": "power", "gamma": g}``: EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the
  Training Dynamics of Diffusion Models", arXiv:2312.02696, §3.1 eq. 3): after ``t`` updates the decay is
  ``beta_t = (1 - 1/t)^(g + 1)``, so the average weights the training history by ``t^g`` and its length grows with
  training instead of being fixed (``sigma_rel`` 0.05-0.10 in the paper is ``g`` ~ 16.97-6.94).

The first update copies the network (``n_averaged == 0``); :func:`reset_ema` restarts the average from the current
weights at the next update (progressive-distillation rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distill.core.registry import ConfigError

__all__ = ["EMA_KINDS", "make_ema", "power_ema_multi_avg_fn", "sigma_rel_to_gamma", "reset_ema", "ema_policy"]

EMA_KINDS = ("exp", "power")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 (arXiv:2312.02696) eq. 4 inverted: the power-EMA exponent whose averaging profile has relative std
    ``sigma_rel``. ``sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3))``, i.e. with ``t = sigma_rel^-2`` the largest real
    root of ``g^3 + 7 g^2 + (16 - t) g + (12 - t) = 0`` (0.05 -> 16.97, 0.10 -> 6.94)."""
    t = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_multi_avg_fn(gamma: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """``multi_avg_fn`` for ``AveragedModel``: ``ema <- beta_t ema + (1 - beta_t) theta`` with
    ``beta_t = (1 - 1/t)^(gamma + 1)`` and ``t = num_averaged + 1`` (the first update copies)."""

    @torch.no_grad()
    def fn(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # beta stays a device tensor: no host synchronisation per update
        t = num_averaged.to(torch.float32) + 1.0
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        torch._foreach_mul_(ema, beta)
        torch._foreach_add_(ema, torch._foreach_mul(current, 1.0 - beta))

    return fn


def ema_policy(spec: float | Mapping[str, Any]) -> dict[str, Any]:
    """Normalise an EMA spec: a float is an exponential decay; a mapping names ``kind`` and its parameter."""
    if isinstance(spec, (int, float)):
        spec = {"kind": "exp", "decay": float(spec)}
    spec = dict(spec)
    kind = spec.get("kind", "exp")
    if kind not in EMA_KINDS:
        raise ConfigError(f"unknown EMA kind {kind!r}; valid kinds: {', '.join(EMA_KINDS)}")
    if kind == "exp":
        decay = float(spec.get("decay", 0.999))
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must lie in [0, 1), got {decay}")
        return {"kind": "exp", "decay": decay}
    if spec.get("sigma_rel") is not None:
        gamma = sigma_rel_to_gamma(float(spec["sigma_rel"]))
    else:
        gamma = float(spec.get("gamma", 6.94))
    if gamma <= 0:
        raise ConfigError(f"power EMA gamma must be > 0, got {gamma}")
    return {"kind": "power", "gamma": gamma}


def make_ema(module: nn.Module, spec: float | Mapping[str, Any] = 0.999, copy_now: bool = False) -> AveragedModel:
    """An ``AveragedModel`` of ``module`` (parameters and buffers averaged) under the policy ``spec``.

    ``copy_now=True`` performs the first (copying) update immediately, so the average starts at ``module``'s current
    weights rather than at its first post-step weights (CD's target network starts as the initial student).
    """
    policy = ema_policy(spec)
    fn = get_ema_multi_avg_fn(policy["decay"]) if policy["kind"] == "exp" else power_ema_multi_avg_fn(
        policy["gamma"])
    ema = AveragedModel(module, multi_avg_fn=fn, use_buffers=True)
    ema.requires_grad_(False)
    if copy_now:
        ema.update_parameters(module)
    return ema


def reset_ema(ema: AveragedModel) -> None:
    """Restart the average: the next ``update_parameters`` copies the network."""
    ema.n_averaged.zero_()
