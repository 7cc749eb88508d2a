"""Progressive distillation — Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
arXiv:2202.00512 (Alg. 2, §3; truncated-SNR weighting, §4). Card: ../shared/methods.md §2.11.

In the project's VE convention (``x_t = x0 + t eps``, ``alpha = 1``, denoisers predict ``x0``) a DDIM step from
level ``t`` to ``u`` around a denoised estimate ``D`` is ``x_u = D + (u/t) (x_t - D)``.

Grids. The **base grid** is ``start_steps = N0`` Karras levels (EDM arXiv:2206.00364 eq. 5) from ``sigma_max`` down to
``sigma_min`` followed by 0: ``base[0..N0]``, ``N0`` steps. Round ``r = 0, 1, ..., R-1`` (``R = log2(N0 /
final_steps)``) trains a student for ``N_r = N0 / 2^(r+1)`` steps on ``grid_r = base[::2^(r+1)]`` (``N_r + 1``
levels ending in 0) against that round's teacher on ``base[::2^r]`` (``2 N_r`` steps; round ``r + 1``'s teacher grid
is round ``r``'s student grid).

One step (Alg. 2): ``x0`` from data, ``i ~ U{0..N_r-1}``, ``t = grid_r[i]``, ``t'' = grid_r[i+1]`` and the midpoint
``t' = base[(2i+1) 2^r]``; ``x_t = x0 + t eps``; two teacher DDIM steps ``t -> t' -> t''`` (no grad); the target
``x~ = (x_t'' - (t''/t) x_t) / (1 - t''/t)`` is the ``x0`` with which ONE student DDIM step from ``x_t`` lands on
``x_t''`` (for ``t'' = 0`` it is ``x_t''`` itself); loss ``w(t) mean_dims (x~ - D_student(x_t, t))^2`` with
``w = max(SNR, 1) = max(1/t^2, 1)`` ("truncated SNR", the paper's x-space weighting) or ``w = 1``.

Flow-map students (``student: {name: flowmap}``; ``students/base.py``): the round teacher's steps are its jumps
``J(x, t, t')`` and the student's prediction is ``D_theta(x_t, t, t'')``, its x0 estimate *for the jump to t''*. For
a generator student (``D`` ignores the target level; the default) both are exactly the DDIM formulas above. The
difference matters for evaluation: a generator student's ``D(x, t)`` is overwritten every round, so after the last
round it is PD's ``final_steps``-step model only (its 2/4/8-step samples are NOT the earlier rounds' students),
while a flow map *can* keep each round's jump ``t -> t''`` apart and serve every round's grid from one network
(nothing makes it: later rounds never revisit the finer jumps, and on the ring with 300 iterations per round it
forgot them too).

Rounds: ``round_of(k) = min(k // round_iters, R - 1)``. The round's teacher is a frozen copy of the student taken when
the round starts (:meth:`on_round_start`, after the system reset EMA / optimizer state / LR warm-up); it is the
registered submodule ``round_teacher``, so it is saved in and restored from checkpoints (``loss.round_teacher.*``).
Round 0 uses the real teacher (the paper initialises the student from the teacher, making the two the same; with a
fresh student only the real teacher is meaningful).

Departures from the paper: x-prediction with the project's preconditioning (not v-prediction), a VE Karras grid (not
a cosine VP schedule), a constant round length, the mean over dimensions rather than the sum (a constant scale), and
the new teacher is the student's raw weights at the round boundary (not an EMA of them).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError
from distill.core.schedules import karras_sigmas
from students.sampling import SamplingPlan

from . import register_loss
from .base import Batch, DistillLoss, StepContext
from .parts.functional import mean_dims

__all__ = ["ProgressiveDistillation", "ddim_step", "pd_target", "pd_base_grid"]

WEIGHTINGS = ("snr_trunc", "none")
Jump = Callable[[Tensor, Tensor, Tensor], Tensor]  # x_u = step(x [B, ...], t [B], u [B]): a teacher step t -> u


def _power_of_two(n: Any) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def pd_base_grid(start_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``[N0 + 1]`` float64: ``N0`` Karras levels ``sigma_max .. sigma_min``, then 0 (the base teacher's grid)."""
    return karras_sigmas(start_steps, sigma_min, sigma_max, rho, append_zero=True)


def ddim_step(denoised: Tensor, x: Tensor, t: Tensor, u: Tensor) -> Tensor:
    """VE DDIM from level ``t`` to ``u`` (``[B]`` each): ``x_u = D + (u/t)(x_t - D)``; ``x, denoised: [B, ...]``."""
    r = append_dims(u / t, x.ndim)
    return denoised + r * (x - denoised)


def pd_target(x_t: Tensor, x_end: Tensor, t: Tensor, t_end: Tensor) -> Tensor:
    """The ``x0`` target ``x~ = (x_t'' - (t''/t) x_t) / (1 - t''/t)`` (Salimans & Ho eq. 8 with alpha = 1): one DDIM
    step ``t -> t''`` around ``x~`` from ``x_t`` gives exactly ``x_end``. ``x_t, x_end: [B, ...]``, ``t, t_end: [B]``
    with ``0 <= t_end < t`` (``t_end = 0`` returns ``x_end``)."""
    r = append_dims(t_end / t, x_t.ndim)
    return (x_end - r * x_t) / (1 - r)


@register_loss("pd")
class ProgressiveDistillation(DistillLoss):
    """Progressive distillation (arXiv:2202.00512 Alg. 2) with rounds of ``round_iters`` iterations.

    Args:
        start_steps: ``N0``, steps of the base teacher grid (a power of two; round 0's student takes ``N0/2``).
        final_steps: student steps of the last round (a power of two below ``start_steps``; 1 = one-step).
        round_iters: training iterations per round; a run needs ``trainer.max_steps = rounds * round_iters``.
        weighting: ``"snr_trunc"`` (``max(1/t^2, 1)``, the paper's) or ``"none"``.
        sigma_min, sigma_max, rho: the base Karras grid (known at construction, since :meth:`sampling` is asked
            before :meth:`setup`; must lie within the teacher's range).
        guidance: classifier-free guidance of the real teacher in round 0 (conditional teachers; 1 = none).
    """

    phases = ("student",)
    needs_data = True
    student_kind = "generator"

    def __init__(self, start_steps: int = 64, final_steps: int = 1, round_iters: int = 1000,
                 weighting: str = "snr_trunc", sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 guidance: float = 1.0) -> None:
        super().__init__()
        if not (_power_of_two(start_steps) and start_steps >= 2):
            raise ConfigError(f"pd: start_steps must be a power of two >= 2 (2, 4, 8, ...), got {start_steps!r}")
        if not (_power_of_two(final_steps) and final_steps < start_steps):
            raise ConfigError(f"pd: final_steps must be a power of two below start_steps={start_steps} "
                              f"(1, 2, ..., {start_steps // 2}), got {final_steps!r}")
        if not (isinstance(round_iters, int) and round_iters >= 1):
            raise ConfigError(f"pd: round_iters must be an integer >= 1, got {round_iters!r}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"pd: unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if not 0 < sigma_min < sigma_max or rho <= 0:
            raise ConfigError(f"pd: need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
        self.start_steps, self.final_steps, self.round_iters = start_steps, final_steps, round_iters
        self.weighting, self.guidance = weighting, float(guidance)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.num_rounds = int(round(math.log2(start_steps // final_steps)))
        # Derived from the config, so not part of the state dict; moves with the module to the run's device.
        self.register_buffer("base", pd_base_grid(start_steps, sigma_min, sigma_max, rho), persistent=False)
        self.round_teacher: nn.Module | None = None

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"start_steps": 4, "final_steps": 1, "round_iters": 2}

    # -- rounds and grids ----------------------------------------------------------------------------------------
    def steps_of(self, r: int) -> int:
        """``N_r = N0 / 2^(r+1)``: the student's steps in round ``r``."""
        return self.start_steps >> (r + 1)

    def student_grid(self, r: int) -> Tensor:
        """``grid_r = base[::2^(r+1)]``: ``[N_r + 1]`` float64 levels ending in 0."""
        return self.base[:: 2 ** (r + 1)]

    def round_of(self, step: int) -> int:
        return min(step // self.round_iters, self.num_rounds - 1)

    def sampling(self) -> SamplingPlan:
        """Deterministic DDIM (gamma 0) on each round's student grid: ``N_r`` NFE use ``grid_r`` without its 0."""
        levels = {self.steps_of(r): tuple(self.student_grid(r)[:-1].tolist()) for r in range(self.num_rounds)}
        return SamplingPlan(gamma=0.0, levels=levels)

    # -- setup and round starts ------------------------------------------------------------------------------------
    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Check the grid against the teacher and build ``round_teacher`` (a frozen copy of the student)."""
        lo, hi = float(teacher.sigma_min), float(teacher.sigma_max)
        if self.sigma_min < lo * (1 - 1e-9) or self.sigma_max > hi * (1 + 1e-9):
            raise ConfigError(f"pd: grid [{self.sigma_min}, {self.sigma_max}] leaves the teacher's range [{lo}, {hi}];"
                              f" set loss.sigma_min / loss.sigma_max within it")
        if self.guidance != 1.0 and not getattr(teacher, "conditional", getattr(teacher, "num_classes", None)):
            raise ConfigError(f"pd: guidance={self.guidance} needs a conditional (class or text) teacher "
                              "(use guidance=1.0)")
        self.round_teacher = copy.deepcopy(student).requires_grad_(False).eval()
        need = self.num_rounds * self.round_iters
        if ctx.total < need:
            warnings.warn(f"pd: trainer.max_steps={ctx.total} ends in round {self.round_of(ctx.total - 1)} "
                          f"({self.steps_of(self.round_of(ctx.total - 1))} steps); reaching final_steps="
                          f"{self.final_steps} needs {need} = {self.num_rounds} rounds x {self.round_iters}",
                          RuntimeWarning, stacklevel=2)

    @torch.no_grad()
    def on_round_start(self, round: int, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Teacher <- student (Alg. 2's ``eta <- theta``): copy the student's current weights into ``round_teacher``."""
        self.round_teacher.load_state_dict(student.state_dict())

    # -- one step ----------------------------------------------------------------------------------------------------
    def levels(self, r: int, i: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, t', t'')`` of student step ``i: [B]`` in round ``r``, each ``[B]`` in ``like``'s dtype."""
        stride = 2**r
        base = self.base.to(like.device)
        idx = 2 * stride * i.to(like.device)
        return tuple(base[j].to(like.dtype) for j in (idx, idx + stride, idx + 2 * stride))

    def round_step(self, r: int, teacher: nn.Module, cond: Tensor | None) -> Jump:
        """Round ``r``'s teacher step ``t -> u``: DDIM around the real teacher's ``D`` in round 0, else the frozen
        ``round_teacher``'s flow-map jump ``J(x, t, u)`` (DDIM around its ``D(x, t)`` for a generator)."""
        if r == 0:
            return lambda x, t, u: ddim_step(teacher(x, t, cond, guidance=self.guidance), x, t, u)
        self.round_teacher.eval()
        return lambda x, t, u: self.round_teacher(x, t, u, cond)

    @torch.no_grad()
    def target(self, step: Jump, x_t: Tensor, t: Tensor, t_mid: Tensor, t_end: Tensor) -> Tensor:
        """Two teacher steps ``t -> t' -> t''`` from ``x_t``, then :func:`pd_target`. ``[B, ...]``."""
        return pd_target(x_t, step(step(x_t, t, t_mid), t_mid, t_end), t, t_end)

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase != "student":
            raise ValueError(f"pd has one phase, 'student'; got {phase!r}")
        if batch.data is None:
            raise ValueError("pd needs real data in batch.data (needs_data; data.name: teacher / digits)")
        if self.round_teacher is None:
            raise RuntimeError("pd: call setup(student, teacher, ctx) before the loss")
        r = min(max(int(ctx.round), 0), self.num_rounds - 1)
        x0, cond = batch.data, batch.labels
        i = batch.randint(self.steps_of(r))
        eps = batch.randn(*student.data_shape).to(x0)
        t, t_mid, t_end = self.levels(r, i, x0)
        x_t = x0 + append_dims(t, x0.ndim) * eps
        x_tilde = self.target(self.round_step(r, teacher, cond), x_t, t, t_mid, t_end)
        dist = mean_dims((x_tilde - student.x0_estimate(x_t, t, t_end, cond)) ** 2)
        w = (1.0 / t**2).clamp_min(1.0) if self.weighting == "snr_trunc" else torch.ones_like(t)
        return {"loss": (w * dist).mean(), "distance": dist.detach().mean(), "sigma_mean": t.detach().mean(),
                "round": torch.tensor(float(r)), "student_steps": torch.tensor(float(self.steps_of(r)))}
