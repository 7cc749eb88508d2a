"""EMA policies: one implementation, a subclass of ``torch.optim.swa_utils.AveragedModel``, for the student's
evaluation EMA and for losses' target networks (CD's theta^-).

* ``{"kind": "exp", "decay": mu}``: ``theta_ema <- mu theta_ema + (1 - mu) theta``.
* ``{"kind": "power", "gamma": g}`` (or ``"sigma_rel"``): EDM2's power-function EMA (Karras et al. 2024, "Analyzing
  and Improving the Training Dynamics of Diffusion Models", arXiv:2312.02696, §3.1 eq. 3 / Alg. 2): after ``t``
  updates the decay is ``beta_t = (1 - 1/t)^(g + 1)``, so update ``t`` carries weight ``proportional to ~t^g`` and
  the averaging window grows with training instead of being fixed (``sigma_rel`` 0.05 is ``g`` = 16.97, 0.10 is 6.94).

Both are one lerp ``theta_ema <- theta_ema + w_t (theta - theta_ema)`` whose weight ``w_t`` is a device tensor
computed from the update counter, with ``w_0 = 1`` (the first update copies). Unlike the stock
``AveragedModel.update_parameters`` (which branches on ``n_averaged == 0`` in Python), this never reads the counter
on the host, so an EMA update does not synchronise the GPU. The state dict (``module.*``, ``n_averaged``) is
``AveragedModel``'s. :func:`reset_ema` restarts the average from the current weights at the next update.

Frozen parameters are not averaged: a network that names them in ``frozen_state_keys`` (a LoRA student's base
weights, ``students.lora``) shares those very ``Parameter`` objects with its EMA copy, so the EMA holds and moves
only the trainable (adapter) tensors and costs no second copy of the base.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from distill.core.registry import ConfigError

__all__ = ["EMA", "EMA_KINDS", "make_ema", "sigma_rel_to_gamma", "reset_ema", "ema_policy"]

EMA_KINDS = ("exp", "power")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 (arXiv:2312.02696) eq. 4 inverted: the power-EMA exponent whose averaging profile has relative std
    ``sigma_rel``. ``sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3))``, i.e. with ``t = sigma_rel^-2`` the largest real
    root of ``g^3 + 7 g^2 + (16 - t) g + (12 - t) = 0`` (0.05 -> 16.97, 0.10 -> 6.94)."""
    t = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_policy(spec: float | Mapping[str, Any]) -> dict[str, Any]:
    """Normalise an EMA spec: a float is an exponential decay; a mapping names ``kind`` and its parameter."""
    if isinstance(spec, (int, float)):
        spec = {"kind": "exp", "decay": float(spec)}
    spec = {k: v for k, v in dict(spec).items() if v is not None}
    kind = spec.get("kind", "exp")
    if kind not in EMA_KINDS:
        raise ConfigError(f"unknown EMA kind {kind!r}; valid kinds: {', '.join(EMA_KINDS)}")
    if kind == "exp":
        decay = float(spec.get("decay", 0.999))
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must lie in [0, 1), got {decay}")
        return {"kind": "exp", "decay": decay}
    gamma = sigma_rel_to_gamma(spec["sigma_rel"]) if "sigma_rel" in spec else float(spec.get("gamma", 6.94))
    if gamma <= 0:
        raise ConfigError(f"power EMA gamma must be > 0, got {gamma}")
    return {"kind": "power", "gamma": gamma}


class EMA(AveragedModel):
    """An ``AveragedModel`` whose update weight ``w_t`` (``t`` = updates so far) follows ``policy``
    (:func:`ema_policy`); parameters and floating buffers are averaged, other buffers copied."""

    def __init__(self, module: nn.Module, policy: Mapping[str, Any]) -> None:
        frozen = frozenset(getattr(module, "frozen_state_keys", ()))
        if not frozen:
            super().__init__(module, use_buffers=True)
        else:  # copy all but the frozen parameters, which the copy shares with ``module`` (deepcopy's memo)
            super().__init__(nn.Identity(), use_buffers=True)
            memo = {id(p): p for name, p in module.named_parameters() if name in frozen}
            self.module = copy.deepcopy(module, memo)
        self.policy = dict(policy)
        self.requires_grad_(False)  # (the shared parameters are frozen already)

    def weight(self, n_averaged: Tensor) -> Tensor:
        """``w_t`` as a float32 device tensor: 1 at ``t = 0``; then ``1 - mu`` (exp) or
        ``1 - (1 - 1/(t + 1))^(g + 1)`` (power)."""
        t = n_averaged.to(torch.float32)
        if self.policy["kind"] == "power":
            return 1.0 - (1.0 - 1.0 / (t + 1.0)) ** (self.policy["gamma"] + 1.0)
        return torch.where(t == 0, 1.0, 1.0 - self.policy["decay"])

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA of a network with {len(mine)} tensors updated from one with {len(theirs)}")
        pairs = [(a, b) for a, b in zip(mine, theirs) if a is not b]  # shared (frozen) tensors need no update
        floats = [(a, b.detach()) for a, b in pairs if a.is_floating_point()]
        for a, b in pairs:
            if not a.is_floating_point():
                a.copy_(b)
        if floats:
            w = self.weight(self.n_averaged.to(floats[0][0].device))
            by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
            for a, b in floats:
                ea, eb = by_dtype.setdefault(a.dtype, ([], []))
                ea.append(a)
                eb.append(b.to(a.device))
            for dtype, (ea, eb) in by_dtype.items():
                torch._foreach_lerp_(ea, eb, w.to(dtype))
        self.n_averaged += 1


def make_ema(module: nn.Module, spec: float | Mapping[str, Any] = 0.999, copy_now: bool = False) -> EMA:
    """An :class:`EMA` of ``module`` under the policy ``spec``.

    ``copy_now=True`` performs the first (copying) update immediately, so the average starts at ``module``'s current
    weights rather than at its first post-step weights (CD's target network starts as the initial student).
    """
    ema = EMA(module, ema_policy(spec))
    if copy_now:
        ema.update_parameters(module)
    return ema


def reset_ema(ema: AveragedModel) -> None:
    """Restart the average: the next ``update_parameters`` copies the network."""
    ema.n_averaged.zero_()

