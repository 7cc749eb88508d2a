"""Continuous-time consistency models in TrigFlow: sCT and sCD — Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv:2410.11081 (§2.2 TrigFlow, §3 consistency function, §4.1-4.2 tangent
warm-up / normalisation / adaptive weighting, Alg. 1 for sCT and Alg. 2 for sCD). docs/methods.md §2.3, checks §4.3.

TrigFlow notation (``sd`` = sigma_data, the teacher's):

    x_t = cos(t) x0 + sin(t) z,   z ~ N(0, sd^2 I),   t = arctan(sigma / sd)  (VE: x_VE = x_t / cos t, sigma = sd tan t)
    f_theta(x_t, t) = cos(t) x_t - sin(t) sd F_theta(x_t / sd, t)

The student is :class:`students.TrigFlowStudent`, whose VE denoiser ``D = cos^2 t x_VE - sd sin t F(cos t x_VE / sd,
t)`` is exactly this ``f`` after ``x_t = cos t x_VE``; the loss reaches ``F`` through ``student.raw_fn(cond)`` and
checks in :meth:`SCM.setup` that ``student.scalings`` are TrigFlow's (``c_in = cos t / sd``, ``c_noise = t``).

One step (one phase, ``"student"``):

1. ``x0`` real data, ``z = sd eps``, ``tau ~ N(P_mean, P_std^2)``, ``sigma = e^tau`` clipped to the teacher's
   ``[sigma_min, sigma_max]``, ``t = arctan(sigma / sd)``, ``x_t = cos t x0 + sin t z``.
2. Tangent of the PF-ODE trajectory through ``x_t``: ``dx_t/dt = cos t z - sin t x0`` (sCT, an unbiased one-sample
   estimate: it equals ``(cos t x_t - x0)/sin t`` and ``E[x0 | x_t]`` is the ideal denoiser) or, for sCD, the
   teacher's TrigFlow velocity from its VE denoiser ``x_hat0 = D(x_t / cos t, sd tan t)``:
   ``dx_t/dt = (cos t x_t - x_hat0) / sin t`` (from ``dx_VE/dsigma = (x_VE - D)/sigma`` and
   ``dsigma/dt = sd / cos^2 t``; the paper writes it ``sd F_pre(x_t/sd, t)``).
3. One forward-mode JVP (:func:`losses.parts.jvp`) of ``F_theta-`` (the same parameters, no grad) with the paper's
   rearranged tangents ``(cos t sin t dx_t/dt / sd, cos t sin t)`` -> ``F-`` and ``cos t sin t dF-/dt``.
4. ``g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt)`` = ``cos t df-/dt`` at ``r = 1``;
   ``r = min(1, k / H)`` is the tangent warm-up (``warmup_iters`` H).
5. Tangent normalisation ``g <- g / (||g|| + c)``, ``c = 0.1``. DEPARTURE (FastGen's, as docs/methods.md §2.3 says):
   ``||g||`` is the per-sample norm divided by ``sqrt(numel)`` (a root-mean-square), so the normalisation does not
   depend on the data size; the paper's plain norm would make ``c`` negligible for images and dominant for 2-D data.
6. ``L = e^{w_phi(t)} / D ||F_theta - F- - g||^2 - w_phi(t)`` with the adaptive weight network ``w_phi`` trained with
   the student (the paper's eq. for ``L_sCM(theta, phi)``, sign convention as printed there; EDM2's
   ``e^{-u} L + u`` is the same objective with ``u = -w``: at the optimum ``e^{w} = 1 / E||.||^2 D^-1``). The
   value is meaningless; its ``theta`` gradient is ``-2 e^{w}/D g dF_theta/dtheta``.
   Optional prior weight ``1 / (sd tan t) = 1/sigma`` on the squared term (``prior_weight: inv_sigma``, FastGen's;
   off by default, as in the paper's Alg. 1). With the adaptive weight at its optimum a prior weight only changes
   the weight's parameterisation, not the effective per-t balance.

Denoiser warm start (``denoiser_iters`` N, default 0; not in the paper): the paper initialises sCM from a pretrained
diffusion model. A fresh student (``init: fresh``, e.g. the ring's MLP) has none, so for its first N iterations the
loss trains it as one: ``L = ||F_theta(x_t / sd, t) - dx_t/dt / sd||^2 / D``, TrigFlow's diffusion objective (``F =
dx_t/dt / sd`` makes ``f = cos t x_t - sin t sd F`` the teacher's denoiser for sCD, the data-pair regression for sCT),
with no JVP; the tangent warm-up ``r = min(1, (k - N) / H)`` starts after them. A teacher-initialised student already
is that diffusion model: leave it at 0.

Off-marginal points (``wide_frac`` p, ``wide_scale`` s; sCD only, default off; not in the paper;
:func:`losses.parts.widen_noise`): a fraction p of each batch draws its noise with s times the std, ``x_t = cos t x0 +
sin t (s z)``. sCD's objective is the residual of the consistency condition ``df/dt = 0`` along the teacher's PF-ODE,
which holds at every point, so these points train the same map where the sampler can land but the marginal almost
never goes: the noise tails the 1-NFE sampler starts from (on the 2-D ring the map ran off beyond about four standard
deviations) and the off-data inputs of the later steps. sCT's tangent is the data pair's conditional velocity, whose
average is the velocity of the marginal the noise was drawn from, so there it would train the map of another process:
refused.

Dropout: the JVP pass and the gradient pass of ``F`` run under :func:`losses.parts.same_randomness` with one seed
drawn from the batch per step, so they see the same mask (the finite-difference fallback re-seeds each of its passes).
Sampling (:meth:`SCM.sampling`): multistep consistency sampling (gamma = 1) at the levels below.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.precond import trigflow_scalings
from distill.core.registry import ConfigError
from students.nets import sinusoidal_embedding
from students.sampling import SamplingPlan

from . import register_loss
from .base import Batch, DistillLoss, StepContext
from .parts.jvp import JVP_METHODS, jvp, normalize_tangent, same_randomness, tangent_rms, tangent_warmup
from .parts.sigmas import check_wide, widen_noise

__all__ = ["SCM", "AdaptiveWeight", "teacher_velocity", "sct_velocity", "tangent_g", "MODES", "PRIOR_WEIGHTS"]

MODES = ("sct", "scd")
PRIOR_WEIGHTS = ("none", "inv_sigma")
#: sCM's two-step sampler goes through TrigFlow time t_mid = 1.1 (arXiv:2410.11081 §5 / App.)
T_MID = 1.1
#: TrigFlow times of the 4- and 8-NFE intermediate levels (see SCM.sampling)
T_LEVELS = {4: (1.1, 0.75, 0.45), 8: (1.3, 1.1, 0.9, 0.75, 0.6, 0.45, 0.3)}


# ---------------------------------------------------------------------------------------------------------------
# Pure functions (the closed-form tests call these)
# ---------------------------------------------------------------------------------------------------------------


def sct_velocity(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """sCT's one-sample tangent ``dx_t/dt = cos t z - sin t x0`` (``x0, z: [B, ...]``, ``t: [B]``)."""
    cos, sin = append_dims(torch.cos(t), x0.ndim), append_dims(torch.sin(t), x0.ndim)
    return cos * z - sin * x0


def teacher_velocity(teacher: nn.Module, x_t: Tensor, t: Tensor, sigma_data: float, cond: Tensor | None = None,
                     guidance: float = 1.0) -> Tensor:
    """sCD's tangent: the teacher's TrigFlow PF-ODE velocity ``(cos t x_t - D(x_t / cos t, sd tan t)) / sin t``
    from its VE denoiser ``D`` (``x_t: [B, ...]`` in TrigFlow units, ``t: [B]`` in ``(0, pi/2)``)."""
    cos, sin = append_dims(torch.cos(t), x_t.ndim), append_dims(torch.sin(t), x_t.ndim)
    sigma = sigma_data * torch.tan(t)
    x0_hat = teacher(x_t / cos, sigma, cond, guidance=guidance).to(x_t.dtype)
    return (cos * x_t - x0_hat) / sin


def tangent_g(raw, x_t: Tensor, t: Tensor, dxdt: Tensor, sigma_data: float, r: float = 1.0,
              method: str = "autograd", h: float = 1e-3) -> tuple[Tensor, Tensor]:
    """``(F-, g)``: one JVP of the raw network ``raw(x_t / sd, t)`` along the trajectory and sCM's tangent
    ``g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt)`` (arXiv:2410.11081 §4.1; ``= cos t df-/dt``
    at ``r = 1``), before normalisation. Runs under the caller's grad mode (the loss calls it under no_grad).

    Args:
        raw: ``fn(x_in [B, ...], t [B]) -> F [B, ...]``.
        x_t: ``[B, ...]`` TrigFlow points; t: ``[B]``; dxdt: ``[B, ...]`` the trajectory tangent.
        r: tangent warm-up factor; method / h: :func:`losses.parts.jvp`.
    """
    cos, sin = torch.cos(t), torch.sin(t)
    cs = cos * sin
    # JVP rearrangement: tangents pre-multiplied by cos t sin t keep the output (cos t sin t dF/dt) O(1).
    f_minus, cs_dfdt = jvp(raw, (x_t / sigma_data, t), (append_dims(cs, x_t.ndim) * dxdt / sigma_data, cs),
                           method=method, h=h)
    c2 = append_dims(cos**2, x_t.ndim)
    g = -c2 * (sigma_data * f_minus - dxdt) - r * (append_dims(cs, x_t.ndim) * x_t + sigma_data * cs_dfdt)
    return f_minus, g


class AdaptiveWeight(nn.Module):
    """``w_phi(t)``: a tiny MLP on a sinusoidal (positional) embedding of the TrigFlow time ``t`` (arXiv:2410.11081
    §4.2 uses positional, not large-scale Fourier, time features). The output layer starts at zero (``w = 0``)."""

    def __init__(self, emb_dim: int = 32, hidden: int = 64, max_freq: float = 8.0) -> None:
        super().__init__()
        self.emb_dim, self.max_freq = int(emb_dim), float(max_freq)
        self.net = nn.Sequential(nn.Linear(self.emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: Tensor) -> Tensor:
        """``t: [B]`` -> ``w: [B]``."""
        p = self.net[0].weight
        return self.net(sinusoidal_embedding(t.to(p.dtype), self.emb_dim, self.max_freq)).squeeze(1)


@register_loss("scm")
class SCM(DistillLoss):
    """sCT / sCD in TrigFlow (arXiv:2410.11081 Alg. 1 / 2).

    Args:
        mode: ``"sct"`` (consistency training, tangent from the data pair) or ``"scd"`` (distillation, the teacher's
            velocity).
        p_mean, p_std: ``log sigma = tau ~ N(p_mean, p_std^2)``, ``t = arctan(e^tau / sd)`` (paper: -1.0 / 1.6
            ImageNet-64, -1.0 / 1.4 CIFAR-10).
        warmup_iters: ``H`` of the tangent warm-up ``r = min(1, k / H)`` (paper 10k).
        tangent_c: ``c`` of the tangent normalisation (paper 0.1); ``null`` disables it (not recommended).
        jvp: ``"autograd"`` (forward-mode, the paper's) or ``"finite_difference"`` (central difference, FastGen's
            fallback for kernels without forward AD).
        fd_step: the central difference's step (in units of the rearranged tangents).
        guidance: classifier-free guidance weight of the sCD teacher (1 = none).
        prior_weight: ``"none"`` (paper) or ``"inv_sigma"`` (``1 / (sd tan t)`` on the squared term, FastGen).
        denoiser_iters: the first N iterations train the student as TrigFlow diffusion model (warm start of a fresh
            student, see the module docstring); 0 = off.
        t_mid: TrigFlow time of the 2-NFE sampler's intermediate level (paper 1.1; a sampling choice, no effect
            on training).
        wide_frac, wide_scale: the fraction of each batch noised with ``wide_scale`` times the std (off-marginal
            points, sCD only; see the module docstring); 0 = off.
        weight_emb, weight_hidden: sizes of the adaptive weight network ``w_phi``.
    """

    phases = ("student",)
    student_kind = "trigflow"
    needs_data = True

    def __init__(self, mode: str = "scd", p_mean: float = -1.0, p_std: float = 1.4, warmup_iters: int = 1000,
                 tangent_c: float | None = 0.1, jvp: str = "autograd", fd_step: float = 1e-3, guidance: float = 1.0,
                 prior_weight: str = "none", weight_emb: int = 32, weight_hidden: int = 64,
                 denoiser_iters: int = 0, t_mid: float = T_MID, wide_frac: float = 0.0,
                 wide_scale: float = 2.0) -> None:
        super().__init__()
        for key, value, valid in (("mode", mode, MODES), ("jvp", jvp, JVP_METHODS),
                                  ("prior_weight", prior_weight, PRIOR_WEIGHTS)):
            if value not in valid:
                raise ConfigError(f"scm: unknown {key} {value!r}; valid: {', '.join(valid)}")
        if not p_std > 0:
            raise ConfigError(f"scm: p_std must be > 0, got {p_std}")
        if int(warmup_iters) != warmup_iters or warmup_iters < 0:
            raise ConfigError(f"scm: warmup_iters must be an integer >= 0, got {warmup_iters}")
        if tangent_c is not None and not tangent_c > 0:
            raise ConfigError(f"scm: tangent_c must be > 0 (or null for no normalisation), got {tangent_c}")
        if int(denoiser_iters) != denoiser_iters or denoiser_iters < 0:
            raise ConfigError(f"scm: denoiser_iters must be an integer >= 0, got {denoiser_iters}")
        if not 0 < t_mid < math.pi / 2:
            raise ConfigError(f"scm: t_mid must lie in (0, pi/2), got {t_mid}")
        check_wide("scm", wide_frac, wide_scale, None if mode == "scd" else
                   "needs mode: scd (sCT's data-pair tangent is only valid on the noising marginal)")
        if not fd_step > 0:
            raise ConfigError(f"scm: fd_step must be > 0, got {fd_step}")
        if int(weight_emb) != weight_emb or weight_emb < 2 or weight_emb % 2 or weight_hidden < 1:
            raise ConfigError(f"scm: weight_emb must be an even integer >= 2 and weight_hidden >= 1, got "
                              f"{weight_emb}, {weight_hidden}")
        self.mode, self.p_mean, self.p_std = mode, float(p_mean), float(p_std)
        self.warmup_iters, self.tangent_c = int(warmup_iters), None if tangent_c is None else float(tangent_c)
        self.jvp_method, self.fd_step, self.guidance = jvp, float(fd_step), float(guidance)
        self.prior_weight = prior_weight
        self.denoiser_iters, self.t_mid = int(denoiser_iters), float(t_mid)
        self.wide_frac, self.wide_scale = float(wide_frac), float(wide_scale)
        self.weight_emb, self.weight_hidden = int(weight_emb), int(weight_hidden)
        self.weight: AdaptiveWeight | None = None
        self._range: tuple[float, float, float] | None = None  # (sigma_min, sigma_max, sigma_data) after setup

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"mode": "scd", "warmup_iters": 2, "weight_hidden": 8, "weight_emb": 8}

    def student_phase_modules(self) -> tuple[str, ...]:
        return ("weight",)

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        sd = float(teacher.sigma_data)
        self._range = (float(teacher.sigma_min), float(teacher.sigma_max), sd)
        # The loss drives F through raw_fn(x_t / sd, t): the student must use TrigFlow's scalings with this sd.
        try:
            probe = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
            got = [torch.as_tensor(v, dtype=torch.float64).cpu() for v in student.scalings(probe)]
        except NotImplementedError:
            got = None
        want = trigflow_scalings(probe, sd)
        if got is None or any(not torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want)):
            raise ConfigError(f"scm needs a TrigFlow student (student: {{name: trigflow}}) with sigma_data {sd}; got "
                              f"a {getattr(student, 'kind', type(student).__name__)!r} student")
        self.weight = AdaptiveWeight(self.weight_emb, self.weight_hidden).to(ctx.device)

    def sampling(self) -> SamplingPlan | None:
        """gamma = 1 multistep consistency sampling (arXiv:2303.01469 Alg. 1, as sCM samples). 2 NFE goes through
        ``t_mid`` (sCM's 1.1 by default: ``sigma = sd tan 1.1``); 4 and 8 NFE through the TrigFlow times
        :data:`T_LEVELS` (4 NFE: 1.1 as sCM, then roughly equal steps of ~0.3 in t down to t = 0.45, sigma ~ 0.48 sd;
        8 NFE: equal steps of ~0.15-0.2 from 1.3 to 0.3). Not tuned: on a 4000-iteration ring student four such
        4-NFE grids and two 8-NFE grids scored within 0.005 sliced-W1 of each other, well below the student's own
        error."""
        if self._range is None:
            return None
        _, hi, sd = self._range
        levels = {1: (hi,), 2: (hi, sd * math.tan(self.t_mid))}
        for k, ts in T_LEVELS.items():
            levels[k] = (hi, *(sd * math.tan(t) for t in ts))
        return SamplingPlan(gamma=1.0, levels=levels)

    def warm_start(self, ctx: StepContext) -> bool:
        """Whether iteration ``ctx.iteration`` is one of the denoiser warm start's (``denoiser_iters``)."""
        return ctx.iteration < self.denoiser_iters

    # -- one step ----------------------------------------------------------------------------------------------
    def draw_time(self, batch: Batch, like: Tensor) -> Tensor:
        """``t = arctan(sigma / sd)``, ``sigma = e^tau`` clipped to the teacher's range; ``[B]``."""
        lo, hi, sd = self._range
        tau = self.p_mean + self.p_std * batch.randn(dtype=like.dtype).to(like.device)
        return torch.atan(tau.exp().clamp(lo, hi) / sd)

    def pieces(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """Everything one step computes (``forward`` and the tests use it): ``t``, ``x_t``, ``dxdt``, ``F_theta``
        (with grad), ``F_minus``, ``g_raw``, ``g`` (normalised), ``g_norm`` ([B]), ``r``; during the denoiser warm
        start the four tangent entries are ``None`` (no JVP runs)."""
        if self._range is None or self.weight is None:
            raise RuntimeError("scm: call setup(student, teacher, ctx) before the loss")
        if batch.data is None:
            raise ValueError("scm noises real data: it needs batch.data (data: {name: ...})")
        sd = self._range[2]
        x0, cond = batch.data, batch.labels
        z = widen_noise(sd * batch.randn_like(x0), self.wide_frac, self.wide_scale)
        t = self.draw_time(batch, x0)
        seed = batch.draw_seed()  # one dropout stream for both passes of F
        cos, sin = append_dims(torch.cos(t), x0.ndim), append_dims(torch.sin(t), x0.ndim)
        x_t = cos * x0 + sin * z
        r = tangent_warmup(ctx.iteration - self.denoiser_iters, self.warmup_iters)
        raw = student.raw_fn(cond)

        def f_raw(x_in: Tensor, t_in: Tensor) -> Tensor:
            with same_randomness(seed):
                return raw(x_in, t_in)

        with torch.no_grad():
            if self.mode == "sct":
                dxdt = sct_velocity(x0, z, t)
            else:
                dxdt = teacher_velocity(teacher, x_t, t, sd, cond, self.guidance)
            if self.warm_start(ctx):
                f_minus = g_raw = g = g_norm = None
            else:
                f_minus, g_raw = tangent_g(f_raw, x_t, t, dxdt, sd, r, self.jvp_method, self.fd_step)
                if self.tangent_c is not None:
                    g, g_norm = normalize_tangent(g_raw, self.tangent_c)
                else:
                    g, g_norm = g_raw, tangent_rms(g_raw)
        f_theta = f_raw(x_t / sd, t)
        return {"t": t, "x_t": x_t, "dxdt": dxdt, "F_theta": f_theta, "F_minus": f_minus, "g_raw": g_raw, "g": g,
                "g_norm": g_norm, "r": torch.tensor(r)}

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase != "student":
            raise ValueError(f"scm has one phase, 'student'; got {phase!r}")
        p = self.pieces(student, teacher, batch, ctx)
        t, f_theta = p["t"], p["F_theta"]
        if p["g"] is None:  # denoiser warm start: TrigFlow diffusion regression, no adaptive weight
            loss = (f_theta - p["dxdt"] / self._range[2]).pow(2).flatten(1).mean(1).mean()
            return {"loss": loss, "warmup_r": p["r"].detach(), "t_mean": t.detach().mean()}
        target = (p["F_minus"] + p["g"]).detach()
        dist = (f_theta - target).pow(2).flatten(1).mean(1)  # ||.||^2 / D
        if self.prior_weight == "inv_sigma":
            dist = dist / (self._range[2] * torch.tan(t))
        w = self.weight(t).to(dist.dtype)
        loss = torch.exp(w) * dist - w
        return {
            "loss": loss.mean(),
            "tangent_norm": p["g_norm"].detach().mean(),  # size-invariant ||g|| before normalisation
            "warmup_r": p["r"].detach(),
            "w_mean": w.detach().mean(),
            "t_mean": t.detach().mean(),
        }
