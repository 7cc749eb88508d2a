"""Align Your Flow - continuous-time flow-map distillation: Sabour, Fidler & Kreis 2025, "Align Your Flow: Scaling
Continuous-Time Flow Map Distillation", arXiv:2506.14603 (§3.2 AYF-EMD / AYF-LMD, Theorem 3.2, §3.4 tangent
normalisation and regularised tangent warm-up, Algorithm 1). docs/methods.md §2.13.

Coordinates. The student is the project's VE flow map (``students.base``)

    J(x, a, b) = (b/a) x + (1 - b/a) D_theta(x, a, b) = x + (b - a) F_theta(x, a, b),   F_theta = (x - D_theta) / a,

from level ``a`` down to ``b <= a``: exactly the paper's Euler form ``f(x_t, t, s) = x_t + (s - t) F_theta`` with
VE sigma as the time variable and ``F_theta`` an (average) VE velocity. The teacher's PF-ODE is
``dx/dsigma = v(x, sigma) = (x - D(x, sigma)) / sigma``. Every derivative below is taken in VE sigma (the teacher's
own ODE, no conversion inside the JVP). The paper works in rectified-flow (RF) time ``t = sigma / (1 + sigma)``
(``x_t = (1 - t) x0 + t eps``); RF time enters at the edges only, where it decides something (``units: rf``):

* the (t, s) density is the paper's, drawn in RF time and mapped to sigma (``distill.core.conversions``);
* the RF tangent of a flow map is a per-sample positive multiple of the VE one (``f_RF(x_t, t, s) =
  (1 - s) J(x_t / (1 - t), a, b)``), so after per-sample normalisation the directions agree; the RF factors are kept
  where they do not cancel: the relative size of the warmed-up term (``k`` below), the size the normaliser's ``c``
  compares against, and the weight ``w(a, b)`` that makes the J-space surrogate equal to Algorithm 1's unweighted
  surrogate on the RF network output ``F_RF`` (``dF_RF/dtheta = (1 + a) dF_VE/dtheta``).

``units: ve`` drops those factors (VE-velocity units throughout).

Eulerian (AYF-EMD, Theorem 3.2). The flow map is constant along the teacher trajectory in its start point:
``dJ(x_a, a, b)/da`` along ``(dx/da = v, da = 1, db = 0)`` vanishes for the exact map. The gradient
``E[w sign(a - b) J_theta^T dJ^-/da]`` (``J^-`` = stop-gradient student) is implemented as the gradient-injection
surrogate ``w * 0.5 ||J_theta - sg(J_theta - g)||^2`` with ``g`` the normalised, warmed-up tangent. Sign: the target
of the discrete EMD loss is the map from the next point towards ``b``, ``J(x_{a - h}, a - h, b) = J - h dJ/da``, so
the descent step moves ``J_theta`` along ``-dJ/da``: ``g = +dJ/da`` (``a > b`` here). Split (paper §3.4)

    dJ/da = A + B,   A = v(x_a, a) - F^-(x_a, a, b)   (flow-matching residual),   B = (b - a) dF^-/da,

and the warm-up weights ``B`` by ``r``. In RF units (``units: rf``) the warmed tangent is, up to a per-sample factor,
``(1 + a) [(1 - r) A + r k dJ/da]`` with ``k = (1 + a) / (1 + b)`` (the RF split differs from the VE split by this
ratio); with ``r = 1`` it is a multiple of ``dJ/da`` and vanishes at the exact map. At ``b = 0`` the objective is
continuous-time consistency distillation (sCM), as ``b -> a`` flow matching on ``F``.

Lagrangian (AYF-LMD, §3.2; distillation only). The end point follows the teacher ODE: ``dJ(x, a, b)/db`` (tangent
``(0, 0, 1)``) equals ``v(J, b)``. Gradient ``E[w sign(b - a) J_theta^T (dJ^-/db - v(J^-, b))]`` with
``sign(b - a) = -1``, so the injected ``g = -(dJ/db - v(J, b))``: the discrete target is one teacher Euler step
back from the map to a slightly higher end level, ``J(x, a, b + h) - h v = J + h (dJ/db - v)``. Split
``dJ/db - v(J, b) = A + B`` with ``A = F^- - v(J^-, b)``, ``B = (b - a) dF^-/db`` (warm-up on ``B``: our reading;
the paper states its warm-up for EMD); in RF units the whole tangent carries the factor ``(1 + b)``, so the split
is the VE one. ``v(J, b)`` needs ``b > 0``: the Lagrangian draws ``b >= sigma_min`` (the teacher's), where
``J(., ., sigma_min)`` is the data map up to ``sigma_min``'s noise (the flow-map student embeds every
``b <= sigma_min`` alike anyway).

One JVP per step (:func:`losses.parts.jvp.jvp`, ``jvp: autograd | finite_difference``) of the no-grad student's
denoiser ``D^-(x, a, b)`` (``student.x0_estimate``), under ``torch.no_grad`` with the same parameters and the same
dropout mask as the gradient pass (:func:`same_randomness`); ``J``, ``F``, ``dJ/da`` / ``dJ/db`` follow from ``D``
and ``dD`` in closed form. Teacher cost: one denoiser call per step (at ``(x_a, a)`` or ``(J^-, b)``).

Tangent normalisation (sCM arXiv:2410.11081 §4, AYF §3.4): ``g <- g / (||g|| + c)`` per sample with the size-invariant
norm ``||g|| = ||g||_2 / sqrt(numel)`` (FastGen's), ``c = 0.1``. Warm-up ``r = min(r_max, k / H)``; the paper keeps
``r_max = 0.99`` (a small permanent share of the flow-matching regulariser, §3.4), ``r_max = 1`` is the plain sCM
ramp.

(a, b) density (Algorithm 1 line 4, as reproduced by a third-party implementation; the official text's numbers could
not be read here, so ``p_mean`` / ``p_std`` are unverified defaults): the RF gap ``t - s = t_hi * sigmoid(tau)``,
``tau ~ N(p_mean, p_std^2)``, ``s ~ U[0, t_hi - (t - s)]``, ``t = s + (t - s)``, ``t_hi = t(sigma_max)``; then
``a = sigma(t)``, ``b = sigma(s)``. Exact ``b = 0`` (consistency pairs) has probability 0 in that density (pairs with
a large gap have ``b`` near 0); ``p_boundary`` (default 0) draws ``b = 0`` (Lagrangian: ``sigma_min``) for that share
of samples on top. Weight: ``units: rf`` ``w = (1 + a) / (a - b)``, ``units: ve`` ``w = 1 / (a - b)`` (each equals
Algorithm 1's unweighted surrogate on its ``F``), ``weighting: uniform`` ``w = 1`` in J units (the card's form).

Sampling (``sampling()``): ``gamma = 0`` by default, a deterministic chain of flow-map jumps at any NFE; levels
``rf_uniform`` (the paper's: uniform in RF time from ``sigma_max`` to 0, explicit for 1..16 NFE, Karras with
``sampling_floor`` beyond) or ``karras`` (the project default grid); ``sampling_gamma > 0`` is CTM gamma-sampling, the
paper's stochastic sampler.

Distribution-matching regulariser (``dm_weight > 0``, :mod:`losses.parts.dm_regulariser`): the paper fine-tunes its
few-step flow maps with an adversarial loss (§3.5); here the stand-in is rCM's score-based one, DMD's reverse-KL
gradient on the student's own ``len(dm_levels)``-step samples (backward simulation with ``sampling_gamma``), with a
fake score trained in a ``"critic"`` phase under DMD2's two-time-scale schedule, added to the AYF loss in the student
phase. ``student.from_export`` starts it from an AYF run's export (a fine-tune, as in the paper).

Departures: no autoguidance (the project's teachers have no weak checkpoint; ``guidance`` is ordinary CFG), the
adversarial fine-tune replaced by the score-based regulariser above, no learned adaptive weight; VE-sigma JVP
instead of RF-time JVP (equal up to the per-sample factors above).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims, sigma_from_rf_t
from distill.core.registry import ConfigError
from students.sampling import SamplingPlan

from . import register_loss
from .base import NONFINITE_ROWS, Batch, DistillLoss, StepContext
from .parts.dm_regulariser import DistributionMatchingRegulariser
from .parts.jvp import check_jvp_method, jvp, normalize_tangent, same_randomness, tangent_rms, tangent_warmup
from .parts.sigmas import check_wide, widen_noise

__all__ = ["AlignYourFlow", "eulerian_tangent", "lagrangian_tangent",
           "rf_uniform_levels", "OBJECTIVES", "UNITS", "WEIGHTINGS", "LEVEL_GRIDS"]

OBJECTIVES = ("eulerian", "lagrangian")
UNITS = ("rf", "ve")
WEIGHTINGS = ("paper", "uniform")
LEVEL_GRIDS = ("rf_uniform", "karras")
#: NFE counts for which ``rf_uniform`` levels are listed explicitly in the sampling plan
RF_UNIFORM_MAX_NFE = 16
#: smallest RF-time gap t - s (keeps a - b > 0 in float32)
MIN_RF_GAP = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def eulerian_tangent(x: Tensor, d: Tensor, dd: Tensor, v: Tensor, a: Tensor, b: Tensor, r: float,
                     units: str = "rf") -> Tensor:
    """The warmed-up AYF-EMD tangent in J units, before normalisation (``+`` = the direction ``J_theta`` descends
    against).

    Args:
        x: ``[B, ...]`` the start points ``x_a``.
        d, dd: ``[B, ...]`` ``D^-(x, a, b)`` and its total derivative along ``(v, 1, 0)``.
        v: ``[B, ...]`` the teacher velocity ``(x - D_teacher(x, a)) / a``.
        a, b: ``[B]`` levels, ``a > b >= 0``.
        r: warm-up factor in ``[0, 1]``.
        units: ``"rf"`` (the paper's split and scale) or ``"ve"``.
    Returns:
        ``[B, ...]``: ``rf``: ``(1 + a) [(1 - r) A + r k dJ/da]``, ``k = (1 + a)/(1 + b)``; ``ve``: ``A + r B``; with
        ``A = v - F``, ``dJ/da = (b/a) A + (1 - b/a) dD`` (so ``B = dJ/da - A``).
    """
    ratio = append_dims(b / a, x.ndim)
    f = (x - d) / append_dims(a, x.ndim)
    resid = v - f
    djda = ratio * resid + (1 - ratio) * dd
    if units == "ve":
        return resid + r * (djda - resid)
    k = append_dims((1 + a) / (1 + b), x.ndim)
    return append_dims(1 + a, x.ndim) * ((1 - r) * resid + r * k * djda)


def lagrangian_tangent(x: Tensor, d: Tensor, dd_b: Tensor, v_end: Tensor, a: Tensor, b: Tensor, r: float,
                       units: str = "rf") -> Tensor:
    """The warmed-up AYF-LMD tangent ``(dJ/db - v(J, b))`` split as ``A + r B``, before normalisation (``J_theta``
    descends along ``+`` this, i.e. the injected ``g`` is its negative).

    Args:
        x: ``[B, ...]`` start points; d: ``D^-(x, a, b)``; dd_b: ``dD^-/db`` (tangent ``(0, 0, 1)``);
        v_end: ``[B, ...]`` the teacher velocity at the end point, ``v(J^-, b)``; a, b: ``[B]`` with ``a > b > 0``.
    Returns:
        ``[B, ...]``: ``(F - v_end) + r (1 - b/a) dD/db`` (times ``1 + b`` in ``rf`` units).
    """
    ratio = append_dims(b / a, x.ndim)
    f = (x - d) / append_dims(a, x.ndim)
    out = (f - v_end) + r * (1 - ratio) * dd_b
    return out if units == "ve" else append_dims(1 + b, x.ndim) * out


def rf_uniform_levels(nfe: int, sigma_max: float) -> tuple[float, ...]:
    """``nfe`` start levels uniform in RF time from ``t(sigma_max)`` down (the final 0 is the plan's):
    ``t_i = t_hi (1 - i / nfe)``, ``sigma_i = t_i / (1 - t_i)``; the first is ``sigma_max`` exactly."""
    t_hi = sigma_max / (1 + sigma_max)
    out = [sigma_max]
    for i in range(1, nfe):
        t = t_hi * (1 - i / nfe)
        out.append(t / (1 - t))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


@register_loss("ayf")
class AlignYourFlow(DistributionMatchingRegulariser, DistillLoss):
    """AYF flow-map distillation (arXiv:2506.14603 Algorithm 1 and its Lagrangian variant), see the module docstring.

    Args:
        objective: ``"eulerian"`` (AYF-EMD, the paper's main objective) or ``"lagrangian"`` (AYF-LMD).
        p_mean, p_std: the logit-normal RF-gap density, ``t - s = t_hi sigmoid(tau)``, ``tau ~ N(p_mean, p_std^2)``.
        p_boundary: share of samples whose end level is set to ``b = 0`` (Lagrangian: ``sigma_min``); 0 = the paper's
            density alone.
        warmup: ``H``, tangent warm-up iterations (``r = min(r_max, k/H)``); 0 = none.
        warmup_max: ``r_max`` (0.99 in the paper, 1 for the plain sCM ramp).
        norm_c: the normaliser's ``c`` (0.1, sCM / AYF).
        units: ``"rf"`` (the paper's time variable at the edges) or ``"ve"``.
        weighting: ``"paper"`` (``w = (1 + a)/(a - b)`` for rf, ``1/(a - b)`` for ve: Algorithm 1's unweighted loss
            on ``F``) or ``"uniform"`` (``w = 1`` in J units).
        jvp: ``"autograd"`` (forward-mode, ``torch.func.jvp``) or ``"finite_difference"``; jvp_h: its step.
        guidance: teacher classifier-free guidance weight (1 = none).
        sampling_gamma: CTM gamma of the sampling plan (0 = deterministic chain of flow-map jumps).
        sampling_levels: ``"rf_uniform"`` or ``"karras"``; sampling_floor: the Karras floor.
        wide_frac, wide_scale: the fraction of each batch whose noise is ``wide_scale`` times wider (off-marginal
            points, :mod:`losses.parts.sigmas`: both objectives are identities along the teacher's PF-ODE, valid at
            every point); 0 = off, not in the paper.
        dm_weight, dm_levels, dm_start, critic_updates, fake_warmup, dm_sigma, fake_sigma, fake_init, dm_eps,
        dm_divergence, dm_distance, dm_huber_c, dm_t_min, dm_t_max, dm_gan_weight, dm_gan_critic_weight,
        dm_intermediate: the
            distribution-matching regulariser
            (:mod:`losses.parts.dm_regulariser`; rCM's score-based stand-in for the paper's adversarial fine-tuning):
            ``dm_weight`` times DMD's reverse-KL gradient (``dm_divergence="reverse_kl"``) or SIM's score-divergence
            gradient (``"sim"``) on the student's own ``len(dm_levels)``-step samples (drawn with
            ``sampling_gamma``), a fake score trained in a ``"critic"`` phase, optionally DMD2's GAN head on it
            against ``batch.data`` (``dm_gan_weight``: the paper's adversarial fine-tuning in DMD2's form), the
            chain's intermediate outputs matched at all levels or only at those they are re-noised to
            (``dm_intermediate``);
            ``dm_weight = 0`` (the default) is the plain AYF objective with one phase.
    """

    phases = ("student",)
    student_kind = "flowmap"
    needs_data = True

    def __init__(
        self,
        objective: str = "eulerian",
        p_mean: float = -0.8,
        p_std: float = 1.6,
        p_boundary: float = 0.0,
        warmup: int = 1000,
        warmup_max: float = 0.99,
        norm_c: float = 0.1,
        units: str = "rf",
        weighting: str = "paper",
        jvp: str = "autograd",
        jvp_h: float = 1e-3,
        guidance: float = 1.0,
        sampling_gamma: float = 0.0,
        sampling_levels: str = "rf_uniform",
        sampling_floor: float = 0.4,
        wide_frac: float = 0.0,
        wide_scale: float = 2.0,
        dm_weight: float = 0.0,
        dm_levels: list[float] | None = None,
        dm_start: int = 0,
        critic_updates: int = 5,
        fake_warmup: int = 0,
        dm_sigma: str = "grid",
        fake_sigma: str = "lognormal",
        fake_init: str = "teacher",
        dm_eps: float = 1e-5,
        dm_divergence: str = "reverse_kl",
        dm_distance: str = "pseudo_huber",
        dm_huber_c: float = 0.3,
        dm_t_min: float = 0.02,
        dm_t_max: float = 0.98,
        dm_gan_weight: float = 0.0,
        dm_gan_critic_weight: float = 1e-2,
        dm_intermediate: str = "full",
    ) -> None:
        super().__init__()
        check_wide("ayf", wide_frac, wide_scale)
        for key, value, valid in (("objective", objective, OBJECTIVES), ("units", units, UNITS),
                                  ("weighting", weighting, WEIGHTINGS), ("sampling_levels", sampling_levels,
                                                                         LEVEL_GRIDS)):
            if value not in valid:
                raise ConfigError(f"ayf: unknown {key} {value!r}; valid: {', '.join(valid)}")
        try:
            check_jvp_method(jvp)
        except ConfigError as e:
            raise ConfigError(f"ayf: {e}") from None
        if not p_std > 0:
            raise ConfigError(f"ayf: p_std must be > 0, got {p_std}")
        if not 0.0 <= p_boundary <= 1.0:
            raise ConfigError(f"ayf: p_boundary must lie in [0, 1], got {p_boundary}")
        if int(warmup) != warmup or warmup < 0:
            raise ConfigError(f"ayf: warmup must be an integer >= 0 (iterations), got {warmup}")
        if not 0.0 < warmup_max <= 1.0:
            raise ConfigError(f"ayf: warmup_max must lie in (0, 1], got {warmup_max}")
        if not norm_c > 0:
            raise ConfigError(f"ayf: norm_c must be > 0, got {norm_c}")
        if not jvp_h > 0:
            raise ConfigError(f"ayf: jvp_h must be > 0, got {jvp_h}")
        if not 0.0 <= sampling_gamma <= 1.0:
            raise ConfigError(f"ayf: sampling_gamma must lie in [0, 1], got {sampling_gamma}")
        if not sampling_floor > 0:
            raise ConfigError(f"ayf: sampling_floor must be > 0, got {sampling_floor}")
        self.objective, self.units, self.weighting = objective, units, weighting
        self.p_mean, self.p_std, self.p_boundary = float(p_mean), float(p_std), float(p_boundary)
        self.warmup, self.warmup_max, self.norm_c = int(warmup), float(warmup_max), float(norm_c)
        self.jvp_method, self.jvp_h, self.guidance = jvp, float(jvp_h), float(guidance)
        self.sampling_gamma, self.sampling_levels = float(sampling_gamma), sampling_levels
        self.sampling_floor = float(sampling_floor)
        self.wide_frac, self.wide_scale = float(wide_frac), float(wide_scale)
        self.sigma_min: float | None = None
        self.sigma_max: float | None = None
        self.init_dm("ayf", weight=dm_weight, levels=dm_levels, start=dm_start, critic_updates=critic_updates,
                     fake_warmup=fake_warmup, dm_sigma=dm_sigma, fake_sigma=fake_sigma, fake_init=fake_init,
                     eps=dm_eps, divergence=dm_divergence, distance=dm_distance, huber_c=dm_huber_c, t_min=dm_t_min,
                     t_max=dm_t_max, gan_weight=dm_gan_weight, gan_critic_weight=dm_gan_critic_weight,
                     intermediate=dm_intermediate)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """The regulariser is on (2-step generator, 1 host-only iteration), so the contract covers the critic phase."""
        return {"warmup": 2, "dm_weight": 0.5, "dm_levels": [80.0, 1.0], "dm_start": 1, "critic_updates": 2}

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        self.sigma_min, self.sigma_max = float(teacher.sigma_min), float(teacher.sigma_max)
        self.setup_dm(teacher, ctx)

    def sampling(self) -> SamplingPlan:
        levels = {}
        if self.sampling_levels == "rf_uniform" and self.sigma_max is not None:
            levels = {n: rf_uniform_levels(n, self.sigma_max) for n in range(1, RF_UNIFORM_MAX_NFE + 1)}
        levels.update(self.dm_levels_plan())  # the regulariser's generator samples at its own levels
        return SamplingPlan(gamma=self.sampling_gamma, floor=self.sampling_floor, levels=levels)

    # -- pieces of one step ----------------------------------------------------------------------------------
    def _ranges(self, teacher: nn.Module) -> tuple[float, float]:
        lo = self.sigma_min if self.sigma_min is not None else float(teacher.sigma_min)
        hi = self.sigma_max if self.sigma_max is not None else float(teacher.sigma_max)
        return lo, hi

    def draw_levels(self, batch: Batch, teacher: nn.Module) -> tuple[Tensor, Tensor]:
        """``(a, b)``, each ``[B]``, from the paper's RF-time density (module docstring), drawn through the batch."""
        lo, hi = self._ranges(teacher)
        t_hi = hi / (1 + hi)
        tau = self.p_mean + self.p_std * batch.randn(dtype=torch.float64)
        gap = (t_hi * torch.sigmoid(tau)).clamp(MIN_RF_GAP, t_hi)
        s = batch.rand(dtype=torch.float64) * (t_hi - gap)
        t = s + gap
        a = sigma_from_rf_t(t).clamp(lo, hi)
        b = sigma_from_rf_t(s)
        if self.p_boundary > 0:
            b = torch.where(batch.rand(dtype=torch.float64) < self.p_boundary, torch.zeros_like(b), b)
        if self.objective == "lagrangian":
            b = b.clamp_min(lo)  # v(J, b) needs b > 0
        # keep a > b (a was clamped to sigma_min from below; the gap in sigma is at least that of the RF gap)
        b = torch.minimum(b, a * (1 - MIN_RF_GAP))
        return a.to(batch.dtype), b.to(batch.dtype)

    def teacher_velocity(self, teacher: nn.Module, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        """The PF-ODE velocity ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM eq. 3), ``[B, ...]``."""
        with torch.no_grad():
            return (x - teacher(x, sigma, cond, guidance=self.guidance)) / append_dims(sigma, x.ndim)

    def tangent(self, student: nn.Module, teacher: nn.Module, x: Tensor, a: Tensor, b: Tensor, r: float,
                cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The raw (unnormalised) warmed-up tangent and the J-space sign convention applied: returns
        ``(g_raw, g)`` where ``g = +-g_raw / (||g_raw|| + c)`` is what the surrogate injects into ``J_theta``
        (Eulerian ``+``, Lagrangian ``-``). ``x: [B, ...]`` start points at ``a``; ``a, b: [B]``."""
        with torch.no_grad():
            if self.objective == "eulerian":
                v = self.teacher_velocity(teacher, x, a, cond)

                def den(x_: Tensor, a_: Tensor) -> Tensor:
                    return student.x0_estimate(x_, a_, b, cond)

                d, dd = jvp(den, (x, a), (v, torch.ones_like(a)), method=self.jvp_method, h=self.jvp_h)
                raw = eulerian_tangent(x, d, dd, v, a, b, r, self.units)
                sign = 1.0
            else:
                def den_b(b_: Tensor) -> Tensor:
                    return student.x0_estimate(x, a, b_, cond)

                d, dd = jvp(den_b, (b,), (torch.ones_like(b),), method=self.jvp_method, h=self.jvp_h)
                ratio = append_dims(b / a, x.ndim)
                end = ratio * x + (1 - ratio) * d
                v_end = self.teacher_velocity(teacher, end, b, cond)
                raw = lagrangian_tangent(x, d, dd, v_end, a, b, r, self.units)
                sign = -1.0
            g, _ = normalize_tangent(raw, self.norm_c)
        return raw, sign * g

    def weight(self, a: Tensor, b: Tensor) -> Tensor:
        """``w(a, b)``, ``[B]`` (module docstring)."""
        if self.weighting == "uniform":
            return torch.ones_like(a)
        w = 1.0 / (a - b)
        return w * (1 + a) if self.units == "rf" else w

    # -- one phase -------------------------------------------------------------------------------------------
    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase == "critic" and "critic" in self.phases:
            return self.dm_critic(student, teacher, batch, ctx)
        if phase != "student":
            raise ValueError(f"ayf: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")
        if batch.data is None:
            raise ValueError("ayf needs data in batch.data (data: {name: teacher} or a real data set)")
        cond = batch.labels
        x0 = batch.data
        a, b = self.draw_levels(batch, teacher)
        eps = widen_noise(batch.randn_like(x0), self.wide_frac, self.wide_scale)
        x = x0 + append_dims(a, x0.ndim) * eps
        seed = batch.draw_seed()  # one dropout stream for the JVP and the gradient pass
        r = tangent_warmup(ctx.iteration, self.warmup, self.warmup_max)
        with same_randomness(seed):
            raw, g = self.tangent(student, teacher, x, a, b, r, cond)
        with same_randomness(seed):
            j = student(x, a, b, cond)
        w = self.weight(a, b)
        bad = ~torch.isfinite(g).flatten(1).all(1) | ~torch.isfinite(w)
        g = torch.where(append_dims(bad, g.ndim), torch.zeros_like(g), g)
        w = torch.where(bad, torch.zeros_like(w), w)
        per_sample = 0.5 * (j - (j - g).detach()).pow(2).flatten(1).mean(1)
        loss = (w.detach() * per_sample).mean()
        norm = tangent_rms(raw)
        out = {
            "loss": loss,
            "ayf_loss": loss.detach(),
            "tangent_norm": norm[~bad].mean().detach() if (~bad).any() else norm.new_zeros(()),
            "warmup_r": a.new_tensor(r),
            "gap_mean": (a - b).mean().detach(),
            "weight_mean": w.mean().detach(),
            NONFINITE_ROWS: bad.sum().to(torch.float32),
        }
        out["loss"] = loss + self.dm_term(student, teacher, batch, ctx, out)
        return out


