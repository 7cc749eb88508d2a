"""Regression of a one-step generator onto cached teacher ODE pairs: DMD's regression loss (arXiv:2311.18828 eq. 9,
with L2 instead of LPIPS so that it applies to any data) and DMD2's one-step warm start (arXiv:2405.14867 §4.4).

    L_reg = mean( (G(sigma_in z; sigma_in -> 0) - ODE(z))^2 ),

with ``(z, ODE(z))`` from the run's teacher-pair cache (data spec ``"pairs"``, source ``teacher_pairs``) and
``sigma_in`` the generator's input level (``sigma_max``, or SiD's ``sigma_init``: the map ``z -> ODE(z)`` is the same,
only the input's scale differs).

:class:`RegressionWarmStart` gives a two-phase (``"critic"``, ``"student"``) loss the whole schedule as config keys
(``regression_steps/_pairs/_nfe/_weight``, ``fake_warmup``): DMD2, f-distill, SiD and SIM all use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.registry import ConfigError
from students.sampling import sample_student

from ..base import Batch, DataSpec, StepContext

__all__ = ["RegressionWarmStart", "check_regression_config", "pairs_spec", "pair_regression", "warm_start_phases"]


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


def pair_regression(owner: str, student: nn.Module, batch: Batch, ctx: StepContext, sigma_in: float,
                    chain: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(L_reg, sg(G(sigma_in z)))`` on the batch's ``pairs.z, pairs.x0: [B, ...]`` (``pairs.labels: [B]``).

    ``chain``: the descending levels ``[sigma_0, ..., 0]`` of a multi-step student's deterministic sampler (TDM's K
    steps); its endpoint from ``sigma_0 z`` is regressed instead, with gradient through every jump (Luhman & Luhman's
    regression for a K-step student: a 1-step fit trains the generator at ``sigma_in`` alone)."""
    if "pairs.z" not in batch.extras:
        raise ValueError(f"{owner}: regression needs teacher pairs in batch.extras ('pairs.z', 'pairs.x0')")
    z = batch.extras["pairs.z"].to(device=ctx.device, dtype=ctx.dtype)
    x0 = batch.extras["pairs.x0"].to(device=ctx.device, dtype=ctx.dtype)
    if chain is not None:
        x = sample_student(student, z, chain.to(device=ctx.device, dtype=ctx.dtype), 0.0,
                           batch.extras.get("pairs.labels"))
        return F.mse_loss(x, x0), x.detach()
    s = torch.full((z.shape[0],), float(sigma_in), device=ctx.device, dtype=ctx.dtype)
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


class RegressionWarmStart:
    """Mixin for a :class:`~losses.base.DistillLoss` with phases ``("critic", "student")``: DMD2's warm-start
    schedule (:func:`warm_start_phases`), the ``"pairs"`` data spec, the regression step and DMD's regression term.

    The loss calls :meth:`init_regression` in ``__init__``, returns :meth:`regression_step` from its student phase when
    it is not ``None``, and adds :meth:`regression_term`; the ``"pairs"`` spec is added to its data specs here.
    """

    regression_steps: int = 0
    regression_weight: float = 0.0
    fake_warmup: int = 0

    def init_regression(self, owner: str, steps: int, pairs: int, nfe: int, weight: float, fake_warmup: int,
                        guidance: float = 1.0) -> None:
        check_regression_config(owner, steps, pairs, nfe, weight)
        if int(fake_warmup) != fake_warmup or fake_warmup < 0:
            raise ConfigError(f"{owner}: fake_warmup must be an integer >= 0, got {fake_warmup!r}")
        self._reg_owner, self._reg_guidance = owner, float(guidance)
        self.regression_steps, self.regression_pairs = int(steps), int(pairs)
        self.regression_nfe, self.regression_weight = int(nfe), float(weight)
        self.fake_warmup = int(fake_warmup)

    def phases_for_step(self, step: int) -> list[str]:
        """Regression warm start (student only), then fake-score warm-up (critic only), then the TTUR schedule."""
        return warm_start_phases(step, self.regression_steps, self.fake_warmup, super().phases_for_step)

    def data_specs(self) -> dict[str, DataSpec]:
        """The loss's own data specs, plus teacher ODE pairs ``"pairs"`` when the schedule regresses."""
        specs = super().data_specs()
        if self.regression_steps > 0 or self.regression_weight > 0:
            specs["pairs"] = pairs_spec(self.regression_pairs, self.regression_nfe, self._reg_guidance)
        return specs

    def regression_step(self, student: nn.Module, batch: Batch, ctx: StepContext, sigma_in: float,
                        chain: Tensor | None = None) -> dict[str, Tensor] | None:
        """The student phase's output during the warm start, ``None`` after it (``chain``: see
        :func:`pair_regression`)."""
        if ctx.iteration >= self.regression_steps:
            return None
        loss, x = pair_regression(self._reg_owner, student, batch, ctx, sigma_in, chain)
        return {"loss": loss, "regression": loss.detach(), "sample_mean": x.mean(), "sample_std": x.std()}

    def regression_term(self, student: nn.Module, batch: Batch, ctx: StepContext, sigma_in: float,
                        out: dict[str, Tensor], chain: Tensor | None = None) -> Tensor | float:
        """``regression_weight * L_reg`` during distribution matching (DMD's ``lambda_reg``; 0 when off), logged
        into ``out["regression"]``."""
        if self.regression_weight <= 0:
            return 0.0
        loss = pair_regression(self._reg_owner, student, batch, ctx, sigma_in, chain)[0]
        out["regression"] = loss.detach()
        return self.regression_weight * loss
