"""Consistency Models — Song, Dhariwal, Chen & Sutskever 2023, arXiv:2303.01469 (consistency distillation, Alg. 2,
eq. 7); pseudo-Huber distance and 1/(sigma_{n+1} - sigma_n) weighting from "Improved Techniques for Training
Consistency Models" — Song & Dhariwal 2023, arXiv:2310.14189 (§3.3, §3.5). docs/methods.md §2.1.

One step, in the paper's ascending notation ``sigma_1 = sigma_min < ... < sigma_N = sigma_max``:

    x_{n+1} = x0 + sigma_{n+1} z                               (or a teacher-ODE sample, x0_source="teacher")
    x_hat_n = Solver_teacher(x_{n+1}, sigma_{n+1} -> sigma_n)   (one Heun or Euler step, no grad)
    L       = lambda(sigma_n, sigma_{n+1}) d(f_theta(x_{n+1}, sigma_{n+1}), f_target(x_hat_n, sigma_n))

Index convention in this file: the grid is stored **descending** (``self.sigmas[0] = sigma_max``, as every sampler
grid in the project), and ``n`` is drawn uniformly in ``{0, ..., N-2}``: the student sees the higher level
``sigmas[n]`` (the paper's ``sigma_{n+1}``) and the target the next lower one ``sigmas[n + 1]`` (the paper's
``sigma_n``). ``f`` is the student's denoised estimate ``student.denoise = J(., s, 0)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.ema import make_ema
from distill.core.registry import ConfigError
from distill.core.samplers import euler_step, heun_step
from distill.core.schedules import karras_sigmas

from . import register_loss
from .base import Batch, DataSpec, DistillLoss, StepContext
from .parts.functional import ict_huber_c, pseudo_huber

__all__ = ["ConsistencyDistillation", "squared_l2", "icm_weight", "karras_subgrid"]

SOLVERS: dict[str, Callable[..., Tensor]] = {"heun": heun_step, "euler": euler_step}
DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "icm")
TARGETS = ("sg", "ema")
X0_SOURCES = ("data", "teacher")

ConsistencyFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # f(x [B, ...], sigma [B], cond) -> [B, ...]


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared difference (CM's L2, averaged over dimensions so lr does not scale with size).

    Args: ``a, b: [B, ...]``. Returns ``[B]``.
    """
    return (a - b).pow(2).flatten(1).mean(1)


def icm_weight(sigma_hi: Tensor, sigma_lo: Tensor) -> Tensor:
    """iCT weighting ``lambda = 1 / (sigma_{n+1} - sigma_n)`` (arXiv:2310.14189 §3.5). Args/returns ``[B]``."""
    return 1.0 / (sigma_hi - sigma_lo)


def karras_subgrid(sigma_start: float, sigma_end: Tensor, steps: int, rho: float = 7.0) -> Tensor:
    """Per-sample Karras grids (arXiv:2206.00364 eq. 5) from a common ``sigma_start`` down to ``sigma_end``.

    Args:
        sigma_start: first level (e.g. ``sigma_max``).
        sigma_end: ``[B]`` last levels (> 0).
        steps: number of intervals ``K``.
    Returns:
        ``[K + 1, B]``; row 0 is ``sigma_start``, row ``K`` is ``sigma_end``.
    """
    ramp = torch.linspace(0, 1, steps + 1, dtype=sigma_end.dtype, device=sigma_end.device)[:, None]
    hi, lo = sigma_start ** (1 / rho), sigma_end[None] ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@register_loss("cd")
class ConsistencyDistillation(DistillLoss):
    """Consistency distillation with a frozen teacher (arXiv:2303.01469 Alg. 2).

    Args:
        num_levels: ``N``, levels of the Karras grid (``rho``) between ``sigma_min`` and ``sigma_max`` (18 CIFAR-10,
            40 ImageNet-64 in the paper).
        rho: Karras grid exponent.
        sigma_min, sigma_max: grid ends; ``None`` takes the teacher's (in :meth:`setup`).
        solver: the teacher's ODE step ``sigma_{n+1} -> sigma_n``: ``"heun"`` (2 NFE, the paper's) or ``"euler"``.
        distance: ``"l2"`` (per-sample mean squared error) or ``"pseudo_huber"``.
        huber_c: pseudo-Huber ``c``; ``None`` is iCT's ``0.00054 sqrt(dim)``.
        weighting: ``"uniform"`` (lambda = 1) or ``"icm"`` (``1/(sigma_{n+1} - sigma_n)``).
        target: ``"sg"`` (stop-gradient copy of the current student, mu = 0: the paper's CIFAR-10 CD and iCT) or
            ``"ema"`` (a separate EMA network with rate ``target_decay``, updated in :meth:`after_step`; the project's
            one EMA implementation, ``distill.core.ema``).
        target_decay: EMA rate mu of the ``"ema"`` target (0.95 for the paper's ImageNet/LSUN CD).
        x0_source: ``"data"``: ``x_{n+1} = x0 + sigma_{n+1} z`` from real data (the paper's, needs
            ``batch["x0"]``); ``"teacher"``: data-free, ``x_{n+1}`` is the teacher's ODE solution from
            ``sigma_max z`` down to ``sigma_{n+1}`` on a per-sample Karras grid of ``teacher_steps`` steps of
            ``solver`` (no grad; costs ``2 teacher_steps`` extra teacher NFE per step with Heun). It samples the
            teacher's own marginal at ``sigma_{n+1}`` (up to solver error), so the student learns the teacher's
            distribution rather than the data's.
        teacher_steps: steps of that teacher rollout (18 Heun steps is EDM's 35-NFE reference accuracy).
        guidance: classifier-free guidance weight of the teacher (conditional teachers; 1 = none).
    """

    phases = ("student",)
    student_kind = "consistency"

    def __init__(
        self,
        num_levels: int = 18,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        solver: str = "heun",
        distance: str = "l2",
        huber_c: float | None = None,
        weighting: str = "uniform",
        target: str = "sg",
        target_decay: float = 0.95,
        x0_source: str = "data",
        teacher_steps: int = 18,
        guidance: float = 1.0,
    ) -> None:
        super().__init__()
        for key, value, valid in (
            ("solver", solver, tuple(SOLVERS)),
            ("distance", distance, DISTANCES),
            ("weighting", weighting, WEIGHTINGS),
            ("target", target, TARGETS),
            ("x0_source", x0_source, X0_SOURCES),
        ):
            if value not in valid:
                raise ConfigError(f"cd: unknown {key} {value!r}; valid: {', '.join(valid)}")
        if int(num_levels) != num_levels or num_levels < 2:
            raise ConfigError(f"cd: num_levels must be an integer >= 2 (a step needs two levels), got {num_levels}")
        if not 0.0 <= target_decay < 1.0:
            raise ConfigError(f"cd: target_decay must lie in [0, 1), got {target_decay}")
        if int(teacher_steps) != teacher_steps or teacher_steps < 1:
            raise ConfigError(f"cd: teacher_steps must be an integer >= 1, got {teacher_steps}")
        if huber_c is not None and huber_c <= 0:
            raise ConfigError(f"cd: huber_c must be > 0 (or null for 0.00054 sqrt(dim)), got {huber_c}")
        if sigma_min is not None and sigma_max is not None and not 0 < sigma_min < sigma_max:
            raise ConfigError(f"cd: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.num_levels, self.rho = int(num_levels), float(rho)
        self.sigma_min_cfg, self.sigma_max_cfg = sigma_min, sigma_max
        self.solver, self.distance, self.huber_c, self.weighting = solver, distance, huber_c, weighting
        self.target, self.target_decay = target, float(target_decay)
        self.x0_source, self.teacher_steps, self.guidance = x0_source, int(teacher_steps), float(guidance)
        self.target_net: nn.Module | None = None
        # The grid is rebuilt by setup() from the config and the teacher, so it is not part of the state dict.
        self.register_buffer("sigmas", torch.empty(0, dtype=torch.float64), persistent=False)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"num_levels": 6, "solver": "heun", "target": "ema"}

    def data_specs(self) -> dict[str, DataSpec]:
        # x0_source: data trains on real data (the run's data set); teacher is data-free.
        return {"data": DataSpec("real" if self.x0_source == "data" else "noise")}

    # -- setup and target network ----------------------------------------------------------------------------
    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        lo = self.sigma_min_cfg if self.sigma_min_cfg is not None else teacher.sigma_min
        hi = self.sigma_max_cfg if self.sigma_max_cfg is not None else teacher.sigma_max
        if not 0 < lo < hi:
            raise ConfigError(f"cd: need 0 < sigma_min < sigma_max, got {lo}, {hi}")
        self.sigmas = karras_sigmas(self.num_levels, lo, hi, self.rho, append_zero=False).to(self.sigmas.device)
        if self.target == "ema":
            # theta^- starts as the initial student; never in an optimizer, never receives gradient; moved only by
            # after_step(): theta^- <- mu theta^- + (1 - mu) theta.
            self.target_net = make_ema(student, self.target_decay, copy_now=True)

    @torch.no_grad()
    def after_step(self, phase: str, student: nn.Module, ctx: StepContext) -> None:
        if self.target_net is not None:
            self.target_net.update_parameters(student)

    # -- pieces of one step ----------------------------------------------------------------------------------
    def levels(self, n: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(sigma_{n+1}, sigma_n)`` in the paper's notation = ``(sigmas[n], sigmas[n + 1])`` here; ``[B]`` each."""
        if self.sigmas.numel() == 0:
            raise RuntimeError("cd: call setup(student, teacher) before the loss")
        s = self.sigmas.to(like.device)
        return s[n].to(like.dtype), s[n + 1].to(like.dtype)

    def _teacher_fn(self, teacher: nn.Module) -> Callable[..., Tensor]:
        return lambda x, sigma, cond=None: teacher(x, sigma, cond, guidance=self.guidance)

    @torch.no_grad()
    def teacher_rollout(self, teacher: nn.Module, z: Tensor, sigma_end: Tensor, cond: Tensor | None = None) -> Tensor:
        """Data-free ``x_{n+1}``: the teacher ODE from ``sigma_max z`` to ``sigma_end: [B]`` (``z: [B, ...]``)."""
        grid = karras_subgrid(float(self.sigmas[0]), sigma_end, self.teacher_steps, self.rho)
        step, den = SOLVERS[self.solver], self._teacher_fn(teacher)
        x = grid[0, 0] * z
        for k in range(self.teacher_steps):
            x = step(den, x, grid[k], grid[k + 1], cond)
        return x

    def pair(
        self,
        f: ConsistencyFn,
        f_target: ConsistencyFn,
        teacher: nn.Module,
        x_hi: Tensor,
        n: Tensor,
        cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(f(x_{n+1}, sigma_{n+1}), sg f_target(x_hat_n, sigma_n))`` with one teacher step in between.

        Args:
            f: the trained consistency function (``student.denoise``), gradient flows through it.
            f_target: the target function (same student, or the EMA copy), evaluated under no_grad.
            teacher: the frozen teacher ``D(x, sigma, cond, guidance)``.
            x_hi: ``[B, ...]`` points at ``sigma_{n+1}``.
            n: ``[B]`` long indices into the descending grid, in ``{0, ..., N-2}``.
        Returns:
            ``(pred, target)``, each ``[B, ...]``.
        """
        s_hi, s_lo = self.levels(n, x_hi)
        with torch.no_grad():
            # Teacher ODE step sigma_{n+1} -> sigma_n (the same step functions the samplers use, docs/design.md §2.3).
            x_lo = SOLVERS[self.solver](self._teacher_fn(teacher), x_hi, s_hi, s_lo, cond)
            # Stop-gradient target (arXiv:2303.01469 eq. 7: theta^- receives no gradient).
            target = f_target(x_lo, s_lo, cond)
        return f(x_hi, s_hi, cond), target

    def residual(
        self,
        f: ConsistencyFn,
        f_target: ConsistencyFn,
        teacher: nn.Module,
        x0: Tensor,
        z: Tensor,
        n: Tensor,
        cond: Tensor | None = None,
    ) -> Tensor:
        """``f(x0 + sigma_{n+1} z, sigma_{n+1}) - f_target(x_hat_n, sigma_n)``, ``[B, ...]`` (forward()'s path;
        zero in expectation for the exact consistency map and an exact solver, docs/methods.md §4.3)."""
        s_hi, _ = self.levels(n, x0)
        pred, target = self.pair(f, f_target, teacher, x0 + append_dims(s_hi, x0.ndim) * z, n, cond)
        return pred - target

    def distance_fn(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-sample ``d(pred, target)``, ``[B]``."""
        if self.distance == "l2":
            return squared_l2(pred, target)
        c = self.huber_c if self.huber_c is not None else ict_huber_c(pred[0].numel())
        return pseudo_huber(pred, target, c)

    # -- one phase -------------------------------------------------------------------------------------------
    def forward(
        self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
    ) -> dict[str, Tensor]:
        if phase != "student":
            raise ValueError(f"cd has one phase, 'student'; got {phase!r}")
        cond = batch.labels
        if self.x0_source == "data" and batch.data is None:
            raise ValueError("cd with x0_source: data needs real data in batch.data")
        # Level index n ~ U{0, ..., N-2} (descending grid) and the noise z, per sample.
        n = batch.randint(self.num_levels - 1)
        z = batch.randn(*student.data_shape)
        s_hi, s_lo = self.levels(n, z)
        if self.x0_source == "data":
            x_hi = batch.data + append_dims(s_hi, z.ndim) * z
        else:
            x_hi = self.teacher_rollout(teacher, z, s_hi, cond)
        target_net = self.target_net.module if self.target_net is not None else student
        target_net.train(student.training)  # same mode (dropout) on both sides
        pred, target = self.pair(student.denoise, target_net.denoise, teacher, x_hi, n, cond)
        dist = self.distance_fn(pred, target)
        weight = icm_weight(s_hi, s_lo) if self.weighting == "icm" else torch.ones_like(dist)
        return {
            "loss": (weight * dist).mean(),
            "distance": dist.detach().mean(),
            "sigma_mean": s_hi.detach().mean(),
        }
