"""MeanFlow — Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling", arXiv:2505.13447:
average-velocity flow maps trained with the MeanFlow identity, here for distillation (``source: teacher``, ``v`` the
teacher's PF-ODE velocity) and from data (``source: data``, ``v`` the conditional velocity ``eps - x0``, the paper's
own setting).

Coordinates (paper §3, eq. 1). The paper works in rectified-flow (RF) time ``z_t = (1 - t) x0 + t eps``; the project
is VE, ``x = x0 + sigma eps``. At the edge of this loss (``distill.core.conversions``):

    z_t = x / (1 + sigma),   t = sigma / (1 + sigma)   (sigma = t / (1 - t), x = z_t / (1 - t)).

Average velocity of the student (paper eq. 3, ``u(z_t, r, t) = (z_t - z_r) / (t - r)``, with ``z_r`` from the flow
map ``J(x, s, t) = (t/s) x + (1 - t/s) D_theta(x, s, t)`` of :class:`students.base.FlowMapStudent`):
``z_r = J(x, sigma_t, sigma_r) / (1 + sigma_r)``. Writing ``D = D_theta(x, sigma_t, sigma_r)``,

    z_t - z_r = (sigma_t - sigma_r) / (sigma_t (1 + sigma_r)) * (x / (1 + sigma_t) - D),
    t - r     = (sigma_t - sigma_r) / ((1 + sigma_t)(1 + sigma_r)),

so the factor ``sigma_t - sigma_r`` cancels and

    u_theta(z_t, r, t) = (z_t - D_theta(z_t / (1 - t), sigma_t, sigma_r)) / t          (RF)
                       = (x - D) / sigma_t - D = eps_hat - x0_hat                       (VE)

with no 0/0 at ``r = t``: the RF analogue of the VE flow map's average velocity ``(x - D_theta) / s``. At ``r = t``
it is the RF velocity of the student's own denoiser ``D_theta(x, s, s)`` (the flow-matching limit, paper §3).

MeanFlow identity (paper eq. 6): ``u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)``, the total derivative along
``dz/dt = v``, ``dr/dt = 0``, ``dt/dt = 1`` (eq. 8), computed with ONE forward-mode JVP (:func:`losses.parts.jvp.jvp`,
option ``jvp``) of ``(z, r, t) -> u_theta`` through the conversions and the student, tangent ``(v, 0, 1)`` (paper
Alg. 1). The loss (eq. 9-10):

    u_tgt = sg(v - (t - r) du/dt),   Delta = u_theta - u_tgt,   L = E[ sg(w) ||Delta||^2 ],
    w = 1 / (||Delta||^2 + c)^p      (paper §4.3 "adaptive loss weighting"; p = 1, c = 1e-3 defaults; p = 0 is L2,
                                      p = 1/2 the pseudo-Huber loss),

``||.||^2`` the squared norm summed over the sample's dimensions (the paper's). ``v``:

* ``source: teacher`` (distillation): the teacher's PF-ODE velocity in RF coordinates. For ``z_t = (1 - t) x0 + t eps``
  the velocity is ``E[eps - x0 | z_t] = (z_t - x_hat0) / t`` with ``x_hat0 = D(z_t / (1 - t), t / (1 - t))`` (eps =
  (z_t - (1 - t) x0) / t, so eps - x0 = (z_t - x0) / t, averaged over the posterior of x0).
* ``source: data``: the conditional velocity ``v = eps - x0`` of the batch's data and noise (the paper's Alg. 1); its
  expectation given ``z_t`` is the teacher's velocity of the data distribution, and the target is linear in ``v``.

Distillation points: ``z_t`` from the batch's data plus noise in both modes (``needs_data``; on the analytic teachers
``data: {name: teacher}`` gives exact samples).

(r, t) sampling (paper §4.3, Table 1a-1b): two independent draws from ``lognorm(P_mean, P_std)`` (a logit-normal:
``sigmoid(P_mean + P_std n)``, ImageNet default (-0.4, 1.0)) or ``U(0, 1)``; ``t`` the larger, ``r`` the smaller; then
with probability ``1 - ratio`` set ``r = t`` (``ratio`` = the fraction of ``r != t``, 25% the paper's ImageNet
default). Departure: RF time ``t -> 1`` is ``sigma -> inf`` and ``t -> 0`` below the teacher's range, so both times
are clipped to ``[t(sigma_min), t(sigma_max)]`` of the teacher (``sigma_max = 80``: ``t <= 0.9877``) *before* the
JVP, so the derivative is that of the function actually evaluated (clipping inside the JVP'd function would zero
``du/dt`` there). Another: the JVP runs on the no-grad student and a second, ordinary pass gives ``u_theta`` with
gradient (the paper takes ``u`` from the JVP's primal output); both passes see the same dropout mask
(:func:`losses.parts.jvp.same_randomness`).

Sampling (paper §3 Alg. 2: ``z_r = z_t - (t - r) u(z_t, r, t)``, 1-NFE ``z_0 = z_1 - u(z_1, 0, 1)``): that update IS the
flow-map jump ``J(x, sigma_t, sigma_r)``, so the project's ``gamma = 0`` deterministic chain of jumps is MeanFlow's
sampler. 1 NFE: ``sigma_max -> 0``; ``k`` NFE: uniform in RF time, ``t_i = 1 - i/k`` (``sigma_i = (k - i)/i``), the
first level ``t = 1`` clipped to ``sigma_max`` (2 NFE: ``[sigma_max, 1, 0]``, the paper's two-step ``1 -> 0.5 -> 0``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims, rf_t_from_sigma, rf_to_ve, sigma_from_rf_t
from distill.core.registry import ConfigError
from students.sampling import SamplingPlan

from . import register_loss
from .base import Batch, DistillLoss, StepContext
from .parts.jvp import JVP_METHODS, jvp, same_randomness
from .parts.sigmas import check_wide, widen_noise

__all__ = ["MeanFlow", "average_velocity", "teacher_velocity", "adaptive_weight", "rf_uniform_levels"]

SOURCES = ("teacher", "data")
TIME_DISTS = ("logit_normal", "uniform", "log_uniform")
#: sampling levels are listed for k NFE up to this
MAX_PLAN_NFE = 16


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def average_velocity(student: nn.Module, z: Tensor, r: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
    """The student's average velocity over ``[r, t]`` in RF coordinates, ``u = (z_t - D_theta(z_t/(1-t), sigma_t,
    sigma_r)) / t`` (the closed form of ``(z_t - z_r)/(t - r)`` for its flow map ``J``; module docstring).

    Args:
        student: a flow map (its ``x0_estimate`` is ``D_theta(x, s, t)``).
        z: ``[B, ...]`` RF points ``z_t``; r, t: ``[B]`` RF times, ``0 <= r <= t < 1``, ``t > 0``.
    Returns:
        ``[B, ...]``.
    """
    x = rf_to_ve(z, t)
    d = student.x0_estimate(x, sigma_from_rf_t(t), sigma_from_rf_t(r), cond)
    return (z - d) / append_dims(t, z.ndim)


def teacher_velocity(teacher: nn.Module, z: Tensor, t: Tensor, cond: Tensor | None = None,
                     guidance: float = 1.0) -> Tensor:
    """The teacher's PF-ODE velocity in RF coordinates, ``v(z_t, t) = (z_t - D(z_t/(1-t), t/(1-t))) / t``
    (``= E[eps - x0 | z_t]``). Args: ``z: [B, ...]``, ``t: [B]`` in ``(0, 1)``. Returns ``[B, ...]``."""
    x0_hat = teacher(rf_to_ve(z, t), sigma_from_rf_t(t), cond, guidance=guidance)
    return (z - x0_hat) / append_dims(t, z.ndim)


def adaptive_weight(sq: Tensor, p: float, c: float) -> Tensor:
    """MeanFlow's adaptive loss weight ``w = 1 / (||Delta||^2 + c)^p`` (arXiv:2505.13447 §4.3), detached.

    Args: ``sq: [B]`` squared residual norms. Returns ``[B]``."""
    return (sq.detach() + c).pow(-p)


def rf_uniform_levels(nfe: int, sigma_max: float) -> tuple[float, ...]:
    """``nfe`` VE levels uniform in RF time: ``t_i = 1 - i/nfe`` for ``i = 0..nfe-1``, i.e. ``sigma_i = (nfe - i)/i``,
    the first (``t = 1``, ``sigma = inf``) clipped to ``sigma_max``. Needs ``nfe - 1 < sigma_max``."""
    if nfe < 1 or nfe - 1 >= sigma_max:
        raise ValueError(f"rf_uniform_levels: need 1 <= nfe < sigma_max + 1, got nfe={nfe}, sigma_max={sigma_max}")
    return (float(sigma_max), *((nfe - i) / i for i in range(1, nfe)))


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


@register_loss("meanflow")
class MeanFlow(DistillLoss):
    """MeanFlow (arXiv:2505.13447 Alg. 1) on a flow-map student, distilled from a teacher or trained from data.

    Args:
        source: ``"teacher"`` (``v`` = the teacher's PF-ODE velocity at ``z_t``: distillation) or ``"data"``
            (``v = eps - x0``, the conditional velocity: the paper's training from data). Both draw ``z_t`` from
            the batch's data and noise.
        ratio: fraction of samples with ``r != t`` (paper Table 1a: 25% best on ImageNet, 75% its CIFAR-10 setting);
            the rest have ``r = t`` (flow matching of the student's own velocity).
        time_dist: ``"logit_normal"`` (``sigmoid(p_mean + p_std n)``, paper Table 1d), ``"uniform"`` or
            ``"log_uniform"`` (uniform in ``logit(t) = log(sigma)`` over the teacher's ``[sigma_min, sigma_max]``:
            both ends of the noise range get mass; not in the paper).
        p_mean, p_std: the logit-normal's parameters (paper: (-0.4, 1.0) ImageNet; (-2.0, 2.0) CIFAR-10).
        p_boundary: share of the ``r != t`` samples whose ``r`` is set to the data end ``t(sigma_min)`` (the jump
            the 1-NFE sampler makes; the MeanFlow identity at ``r = 0`` is the continuous consistency condition);
            0 = the paper's sampler alone (not in the paper; AYF's option of the same name).
        norm_p: the adaptive weight's power ``p`` (1.0 the paper's ImageNet default; 0 is plain L2).
        norm_eps: its ``c`` (1e-3, the paper's).
        jvp: ``"autograd"`` (``torch.func.jvp``) or ``"finite_difference"`` (central difference, step ``jvp_h``;
            scaled down per sample near ``t = 0`` or ``1`` so ``t +- h`` stays in ``(0, 1)``).
        jvp_h: the finite-difference step in RF time (``z`` moves by ``h v``).
        guidance: classifier-free guidance weight of the teacher (``source: teacher``; 1 = none).
        wide_frac, wide_scale: the fraction of each batch whose ``eps`` is ``wide_scale`` times wider (off-marginal
            points, :mod:`losses.parts.sigmas`; ``source: teacher`` only: the identity with the teacher's ``v``
            holds at every point, the data mode's ``eps - x0`` averages to the velocity of the wider marginal); 0 =
            off, not in the paper.
        gap_warmup: a short-to-long curriculum over the first ``gap_warmup`` of training (a fraction of the run,
            the step context's ``progress``): the gap ``t - r`` is capped at ``max(gap_min, progress / gap_warmup)``
            of the RF range, ``r = max(r, t - cap)``; 0 = off (the paper's sampler). After Kim et al. 2025
            (arXiv:2511.19065: large-gap average velocities are learnt from established small-gap ones, so emphasis
            moves from short to long intervals), as a cap rather than their loss weighting. The cap binds
            ``p_boundary``'s jumps too: during the curriculum they reach only as far as the cap allows.
        gap_min: the cap's floor at the start of the curriculum (a fraction of the RF range).
    """

    phases = ("student",)
    needs_data = True
    student_kind = "flowmap"

    def __init__(
        self,
        source: str = "teacher",
        ratio: float = 0.25,
        time_dist: str = "logit_normal",
        p_mean: float = -0.4,
        p_std: float = 1.0,
        p_boundary: float = 0.0,
        norm_p: float = 1.0,
        norm_eps: float = 1e-3,
        jvp: str = "autograd",
        jvp_h: float = 1e-3,
        guidance: float = 1.0,
        wide_frac: float = 0.0,
        wide_scale: float = 2.0,
        gap_warmup: float = 0.0,
        gap_min: float = 0.05,
    ) -> None:
        super().__init__()
        check_wide("meanflow", wide_frac, wide_scale, None if source == "teacher" else
                   "needs source: teacher (the data pair's velocity eps - x0 is only valid on the noising marginal)")
        for key, value, valid in (("source", source, SOURCES), ("time_dist", time_dist, TIME_DISTS),
                                  ("jvp", jvp, JVP_METHODS)):
            if value not in valid:
                raise ConfigError(f"meanflow: unknown {key} {value!r}; valid: {', '.join(valid)}")
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"meanflow: ratio (the fraction of r != t) must lie in [0, 1], got {ratio}")
        if not p_std > 0:
            raise ConfigError(f"meanflow: p_std must be > 0, got {p_std}")
        if not 0.0 <= p_boundary <= 1.0:
            raise ConfigError(f"meanflow: p_boundary must lie in [0, 1], got {p_boundary}")
        if not 0.0 <= gap_warmup <= 1.0:
            raise ConfigError(f"meanflow: gap_warmup (a fraction of training) must lie in [0, 1], got {gap_warmup}")
        if not 0.0 < gap_min <= 1.0:
            raise ConfigError(f"meanflow: gap_min (a fraction of the RF time range) must lie in (0, 1], got {gap_min}")
        if not norm_p >= 0:
            raise ConfigError(f"meanflow: norm_p must be >= 0 (0 = plain L2), got {norm_p}")
        if not norm_eps > 0:
            raise ConfigError(f"meanflow: norm_eps must be > 0, got {norm_eps}")
        if not 0 < jvp_h < 0.1:
            raise ConfigError(f"meanflow: jvp_h must lie in (0, 0.1), got {jvp_h}")
        self.source, self.ratio, self.time_dist = source, float(ratio), time_dist
        self.p_mean, self.p_std, self.p_boundary = float(p_mean), float(p_std), float(p_boundary)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.jvp_method, self.jvp_h, self.guidance = jvp, float(jvp_h), float(guidance)
        self.wide_frac, self.wide_scale = float(wide_frac), float(wide_scale)
        self.gap_warmup, self.gap_min = float(gap_warmup), float(gap_min)
        # RF time range [t(sigma_min), t(sigma_max)]; set from the teacher in setup()
        self.t_lo, self.t_hi = float(rf_t_from_sigma(torch.tensor(0.002))), float(rf_t_from_sigma(torch.tensor(80.0)))
        self.sigma_max = 80.0

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"ratio": 0.5}

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        lo, hi = float(teacher.sigma_min), float(teacher.sigma_max)
        self.t_lo, self.t_hi = lo / (1 + lo), hi / (1 + hi)
        self.sigma_max = hi

    def sampling(self) -> SamplingPlan:
        """Deterministic flow-map jumps (``gamma = 0``, MeanFlow's Alg. 2), levels uniform in RF time."""
        levels = {k: rf_uniform_levels(k, self.sigma_max) for k in range(2, MAX_PLAN_NFE + 1) if k - 1 < self.sigma_max}
        return SamplingPlan(gamma=0.0, levels=levels)

    # -- pieces of one step ----------------------------------------------------------------------------------
    def gap_cap(self, progress: float) -> float | None:
        """The curriculum's cap on ``t - r`` in RF time at training ``progress`` (``None``: no cap)."""
        if self.gap_warmup <= 0 or progress >= self.gap_warmup:
            return None
        return max(self.gap_min, progress / self.gap_warmup) * (self.t_hi - self.t_lo)

    def sample_times(self, batch: Batch, like: Tensor, progress: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """``(r, t, r_ne_t)``, each ``[B]`` (the last a bool): paper §4.3's (r, t) sampler, clipped to the teacher's
        RF range (module docstring); with ``p_boundary`` that share of the ``r != t`` samples jumps to ``t_lo``; with
        ``gap_warmup`` the gap is capped by :meth:`gap_cap` at ``progress``."""
        n = batch.randn(2, dtype=like.dtype).to(like.device)
        if self.time_dist == "logit_normal":
            pair = torch.sigmoid(self.p_mean + self.p_std * n)
        elif self.time_dist == "log_uniform":  # uniform in log(sigma) = logit(t) over the teacher's range
            lo, hi = (math.log(t / (1 - t)) for t in (self.t_lo, self.t_hi))
            pair = torch.sigmoid(lo + (hi - lo) * batch.rand(2, dtype=like.dtype).to(like.device))
        else:
            pair = batch.rand(2, dtype=like.dtype).to(like.device)
        t, r = pair.max(1).values, pair.min(1).values
        neq = batch.rand(dtype=like.dtype).to(like.device) < self.ratio
        t = t.clamp(self.t_lo, self.t_hi)
        if self.p_boundary > 0:  # (drawn only when on: the stream of the paper's sampler stays as it was)
            r = torch.where(batch.rand(dtype=like.dtype).to(like.device) < self.p_boundary, self.t_lo, r)
        r = torch.where(neq, r.clamp(self.t_lo, self.t_hi), t).clamp(max=t)
        cap = self.gap_cap(progress)
        if cap is not None:
            r = torch.maximum(r, t - cap)
        return r, t, neq & (r < t)

    def velocity(self, teacher: nn.Module, z: Tensor, t: Tensor, x0: Tensor, eps: Tensor,
                 cond: Tensor | None = None) -> Tensor:
        """``v(z_t, t)``: the teacher's RF velocity (``source: teacher``) or ``eps - x0`` (``source: data``)."""
        if self.source == "data":
            return eps - x0
        with torch.no_grad():
            return teacher_velocity(teacher, z, t, cond, self.guidance).to(z.dtype)

    def target(self, student: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Tensor | None = None,
               seed: int | None = None) -> tuple[Tensor, Tensor]:
        """``(u_tgt, du/dt)``: ``du/dt`` the total derivative of ``u_theta(z, r, t)`` along ``(v, 0, 1)`` by one JVP
        (no grad) and ``u_tgt = sg(v - (t - r) du/dt)`` (paper eq. 8-10). ``seed`` forks dropout identically."""

        def fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
            if seed is None:
                return average_velocity(student, z_, r_, t_, cond)
            with same_randomness(seed):
                return average_velocity(student, z_, r_, t_, cond)

        one = torch.ones_like(t)
        if self.jvp_method == "finite_difference":
            # keep t +- h k inside (0, 1): per-sample tangent scale k <= 1, undone after (the JVP is linear in it)
            one = (torch.minimum(t, 1 - t) / (2 * self.jvp_h)).clamp(max=1.0)
        with torch.no_grad():
            _, dudt = jvp(fn, (z, r, t), (append_dims(one, v.ndim) * v, torch.zeros_like(r), one),
                          method=self.jvp_method, h=self.jvp_h)
            dudt = dudt / append_dims(one, dudt.ndim)
            u_tgt = v - append_dims(t - r, v.ndim) * dudt
        return u_tgt.detach(), dudt.detach()

    # -- one phase -------------------------------------------------------------------------------------------
    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase != "student":
            raise ValueError(f"meanflow has one phase, 'student'; got {phase!r}")
        x0, cond = batch.data, batch.labels
        if x0 is None:
            raise ValueError("meanflow needs data in batch.data (z_t = (1 - t) x0 + t eps, both sources)")
        eps = widen_noise(batch.randn_like(x0), self.wide_frac, self.wide_scale)
        r, t, neq = self.sample_times(batch, x0, ctx.progress)
        z = append_dims(1 - t, x0.ndim) * x0 + append_dims(t, x0.ndim) * eps
        seed = batch.draw_seed()
        v = self.velocity(teacher, z, t, x0, eps, cond)
        u_tgt, dudt = self.target(student, z, r, t, v, cond, seed)
        with same_randomness(seed):
            u = average_velocity(student, z, r, t, cond)
        sq = (u - u_tgt).pow(2).flatten(1).sum(1)
        w = adaptive_weight(sq, self.norm_p, self.norm_eps)
        return {
            "loss": (w * sq).mean(),
            "residual_sq": sq.detach().mean(),
            "dudt_abs": dudt.abs().mean(),
            "weight": w.mean(),
            "frac_r_ne_t": neq.to(x0.dtype).mean(),
            "t_minus_r": (t - r).detach().mean(),
        }
