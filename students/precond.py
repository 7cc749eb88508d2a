"""Student parameterisations: how a raw backbone ``F`` (:mod:`students.backbones`) becomes ``D_theta``.

All are the affine EDM form (Karras et al. 2022, arXiv:2206.00364, eq. 7) with scalings from
:mod:`distill.core.precond` (shared with the teachers):

    D_theta(x, s[, t]) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)[, c_noise(t)])

* :class:`DenoiserPrecond` - a denoiser of one family (``edm``, ``vp``, ``flow``, ``trigflow``), the generator's and
  the flow map's ``D_theta`` (a flow map also feeds ``c_noise`` of its target level, CTM arXiv:2310.02279);
* :class:`ConsistencyPrecond` - the consistency boundary ``f(x, sigma_min) = x`` (Song et al. 2023,
  arXiv:2303.01469, App. C) around a base denoiser;
* TrigFlow (sCM, arXiv:2410.11081) is ``DenoiserPrecond("trigflow")``: a consistency function whose boundary
  ``f(x, 0) = x`` is built into its scalings.

The flow-map jump ``J(x, s, t) = (t/s) x + (1 - t/s) D_theta(x, s, t)`` is :class:`students.base.FlowMapStudent`.
A parameterisation is described by ``config()``: ``{"family", "prediction_type"[, "scheduler"]}`` (the VP table is
rebuilt from the scheduler config).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.precond import FAMILIES, cm_scalings, denoiser_scalings
from distill.core.registry import ConfigError
from teachers.diffusers_teacher import vp_log_sigmas

from .nets import RawFn

__all__ = ["DenoiserPrecond", "ConsistencyPrecond", "build_precond"]

Scalings = tuple[Tensor, Tensor, Tensor, Tensor]


class DenoiserPrecond(nn.Module):
    """``D = c_skip x + c_out F(c_in x, c_noise)`` of one family (:func:`distill.core.precond.denoiser_scalings`).

    Args:
        family: ``edm`` (default for fresh students), ``vp``, ``flow`` or ``trigflow``.
        sigma_data: data std (``edm``, ``trigflow``).
        prediction_type: what ``F`` predicts (``epsilon`` / ``v_prediction`` for ``edm``; also ``sample`` for ``vp``).
        scheduler: the VP scheduler config whose discrete table gives ``c_noise`` (``vp`` only).
    """

    def __init__(self, family: str = "edm", sigma_data: float = 0.5, prediction_type: str = "epsilon",
                 scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ConfigError(f"unknown student preconditioning family {family!r}; valid: {', '.join(FAMILIES)}")
        self.family, self.sigma_data, self.prediction_type = family, float(sigma_data), prediction_type
        self.scheduler = dict(scheduler) if scheduler is not None else None
        if family == "vp" and scheduler is None:
            raise ConfigError("a 'vp' student parameterisation needs its scheduler config (the timestep table)")
        # [M] ascending log-sigma table of a VP network (its c_noise); not part of the state dict
        self.register_buffer("log_sigmas", vp_log_sigmas(self.scheduler) if family == "vp" else None,
                             persistent=False)

    def scalings(self, sigma: Tensor) -> Scalings:
        """``(c_skip, c_out, c_in, c_noise)``, each ``[B]``, for ``sigma: [B]``."""
        return denoiser_scalings(sigma, self.family, self.sigma_data, self.prediction_type, self.log_sigmas)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """``c_noise(sigma)``, ``[B]`` (also the flow map's target-level input)."""
        return self.scalings(sigma)[3]

    def forward(self, raw: RawFn, x: Tensor, sigma: Tensor, sigma_to: Tensor | None = None) -> Tensor:
        """``c_skip x + c_out raw(c_in x, c_noise(sigma)[, c_noise(sigma_to)])``.

        Args:
            raw: the backbone's raw function (``Backbone.raw_fn(cond)``).
            x: ``[B, ...]``; sigma: ``[B]``; sigma_to: ``[B]`` target levels (flow maps) or ``None``.
        Returns:
            ``[B, ...]``.
        """
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        c_noise_to = None if sigma_to is None else self.c_noise(sigma_to)
        return c_skip * x + c_out * raw(c_in * x, c_noise.reshape(-1), c_noise_to)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"family": self.family, "prediction_type": self.prediction_type}
        if self.scheduler is not None:
            cfg["scheduler"] = dict(self.scheduler)
        return cfg


class ConsistencyPrecond(DenoiserPrecond):
    """Consistency function ``f(x, s)`` with ``f(x, eps) = x`` exactly (arXiv:2303.01469 App. C), around a base
    denoiser family.

    * EDM base: ``f = c_skip^CM x + c_out^CM F(c_in x, c_noise)`` with :func:`distill.core.precond.cm_scalings`
      (``c_out^CM`` sign-flipped for ``v_prediction``), EDM's ``c_in`` / ``c_noise`` - with ``c_noise = log(s)/4``
      and a UNet's timestep ``1000 c_noise`` this is exactly diffusers' ``CMStochasticIterativeScheduler`` step;
    * any other base ``D_b = a x + b F``: ``f = c x + (1 - c) D_b`` with ``c = c_skip^CM``, i.e.
      ``c_skip = c + (1 - c) a`` and ``c_out = (1 - c) b``; ``c = 1`` at ``s = eps`` so ``f = x`` there too.

    Args:
        eps: the boundary level (the student's ``sigma_min``); the rest as :class:`DenoiserPrecond`.
    """

    def __init__(self, eps: float, family: str = "edm", sigma_data: float = 0.5, prediction_type: str = "epsilon",
                 scheduler: dict[str, Any] | None = None) -> None:
        super().__init__(family, sigma_data, prediction_type, scheduler)
        if family == "trigflow":
            raise ConfigError("TrigFlow is a consistency parameterisation already (boundary at sigma = 0); use the "
                              "'trigflow' student")
        self.eps = float(eps)

    def scalings(self, sigma: Tensor) -> Scalings:
        c_skip_b, c_out_b, c_in, c_noise = super().scalings(sigma)
        c, c_out_cm = cm_scalings(sigma, self.sigma_data, self.eps)
        if self.family == "edm":
            return c, (-c_out_cm if self.prediction_type == "v_prediction" else c_out_cm), c_in, c_noise
        return c + (1 - c) * c_skip_b, (1 - c) * c_out_b, c_in, c_noise


def build_precond(kind: str, spec: dict[str, Any], sigma_data: float, sigma_min: float) -> DenoiserPrecond:
    """The parameterisation of a student of ``kind`` from its spec (``DenoiserPrecond.config()``)."""
    spec = dict(spec)
    unknown = sorted(set(spec) - {"family", "prediction_type", "scheduler"})
    if unknown:
        raise ConfigError(f"unknown student precond key(s) {unknown}; valid: family, prediction_type, scheduler")
    if kind == "consistency":
        return ConsistencyPrecond(sigma_min, sigma_data=sigma_data, **spec)
    if kind == "trigflow" and spec.get("family", "edm") != "trigflow":
        raise ConfigError(f"a 'trigflow' student needs precond family 'trigflow', got {spec.get('family')!r}")
    return DenoiserPrecond(sigma_data=sigma_data, **spec)
