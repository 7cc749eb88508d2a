"""The student contract: every student is a flow map ``J(x, sigma_from, sigma_to, cond) -> x at sigma_to``.

All students share one parameterisation (the DDIM/Euler jump around an x0 estimate, as in CTM arXiv:2310.02279 and
Align Your Flow arXiv:2506.14603):

    J(x, s, t) = (t / s) x + (1 - t / s) D_theta(x, s, t),

so ``J(x, s, s) = x`` for every network, ``J(x, s, 0) = D_theta(x, s, 0)`` is the denoised estimate, and a
deterministic multi-step sampler is a chain of jumps. Subclasses implement :meth:`FlowMapStudent.x0_estimate` (the
``D_theta``) and differ only in what it may depend on:

* one-step / few-step **generator** (DMD2, SiD, SIM, f-distill, kd, reflow, PD, TDM): ``D_theta(x, s)`` ignores ``t``;
* **consistency** function (CD, iCT, ECT, sCM): ``D_theta(x, s) = f_theta(x, s)`` with the boundary condition
  ``f_theta(x, sigma_min) = x`` built in by ``c_skip/c_out``;
* general **flow map** (CTM, TCD, AYF): ``D_theta(x, s, t)`` depends on both noise levels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims, as_sigma

__all__ = ["FlowMapStudent"]


class FlowMapStudent(nn.Module):
    """Base class of students. ``config()`` must return the JSON-serialisable constructor config that
    ``students.build_student_from_config`` turns back into an identical (untrained) module."""

    kind: str = "flowmap"

    def __init__(
        self, data_shape: tuple[int, ...], sigma_min: float, sigma_max: float, sigma_data: float
    ) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    def x0_estimate(self, x: Tensor, sigma_from: Tensor, sigma_to: Tensor, cond: Tensor | None = None) -> Tensor:
        """``D_theta(x, s, t)``: the network's clean-data estimate. Args: ``x: [B, ...]``, sigmas ``[B]``."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float, cond: Tensor | None = None
    ) -> Tensor:
        """``J(x, s, t) = (t/s) x + (1 - t/s) D_theta(x, s, t)``."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{type(self).__name__} expects inputs [B, {', '.join(map(str, self.data_shape))}], got {list(x.shape)}"
            )
        s = as_sigma(sigma_from, x)
        t = as_sigma(sigma_to, x)
        x0 = self.x0_estimate(x, s, t, cond)
        ratio = append_dims(t / s, x.ndim)
        return ratio * x + (1 - ratio) * x0

    def denoise(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """The student as a denoiser, ``J(x, sigma, 0)`` (so samplers and FID code can treat it like a teacher)."""
        return self(x, sigma, torch.zeros_like(as_sigma(sigma, x)), cond)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)``, each ``[B]``, of the preconditioning ``D_theta = c_skip x + c_out
        raw(c_in x, c_noise, ...)`` (network students; :mod:`students.precond`)."""
        raise NotImplementedError(f"{type(self).__name__} has no preconditioned network")

    def raw(self, x_in: Tensor, c_noise: Tensor, c_noise_to: Tensor | None = None,
            cond: Tensor | None = None) -> Tensor:
        """The raw backbone ``F(x_in, c_noise[, c_noise_to], cond) -> [B, *data_shape]`` (no preconditioning)."""
        raise NotImplementedError(f"{type(self).__name__} has no raw network")

    def raw_fn(self, cond: Tensor | None = None) -> Callable[..., Tensor]:
        """``fn(x_in, c_noise, c_noise_to=None)`` = :meth:`raw` with ``cond`` closed over: the ``torch.func.jvp``
        entry point."""
        raise NotImplementedError(f"{type(self).__name__} has no raw network")

    def config(self) -> dict[str, Any]:
        raise NotImplementedError
