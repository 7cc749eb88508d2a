"""TDM: Trajectory Distribution Matching for a few-step generator.

* "Learning Few-Step Diffusion Models by Trajectory Distribution Matching", Luo et al. 2025, arXiv:2503.06674
  (TDM; §3 and Algorithm 1; /work/shared/methods.md §2.9, the authors' ``train_tdm_demo.py``).

A K-step student is sampled by deterministic DDIM jumps ``J(x, s, t) = (t/s) x + (1 - t/s) D_theta(x, s)`` on the
levels ``s_0 = sigma_max > s_1 > ... > s_{K-1} = floor > s_K = 0`` (Karras-spaced, rho 7). TDM matches, for every
segment ``k``, the distribution of the student's segment end ``x_{s_{k+1}}`` to the teacher's marginal at that level,
by distribution matching on forward-diffused copies of it. Per iteration, in the project's VE convention (the paper's
VP ``alpha_t, sigma_t`` become ``alpha = 1``, ``sigma = sigma``):

1. roll the student out from ``sigma_max z`` without grad, storing every state ``x_{s_0..s_K}``;
2. draw a segment ``k`` per sample, re-run the student on ``x_{s_k}`` (with grad in the student phase):
   ``x0_hat = D_theta(x_{s_k}, s_k)``, ``eps_hat = (x_{s_k} - x0_hat) / s_k``, and jump to the segment end
   ``s = s_{k+1}`` (``random_mid``: a random level of the segment): ``x_s = x0_hat + s eps_hat`` (TDM eq. 9);
3. diffuse forward with the exact VE transition ``x_tau = x_s + sqrt(tau^2 - s^2) xi`` (TDM eq. 10);
4. student: push ``x0_hat`` toward ``sg(x0_hat - (D_fake(x_tau) - D_teacher(x_tau)) / n)``, ``n = mean_dims|x0_hat -
   D_teacher(x_tau)|`` (the DMD normaliser of the card, §2.0.4), by L2 or pseudo-Huber (TDM eq. 12-13);
5. critic: the fake score's x0 regression of ``sg(x0_hat)`` from ``x_tau``, weighted by ``min(SNR, snr_gamma)``
   (VE: ``SNR = 1/tau^2``) and by the importance weight ``omega = exp(-mean(xi_mix^2)/2) / exp(-mean(xi^2)/2)`` with
   ``xi_mix = (x_tau - x0_hat)/tau`` the effective noise of ``x_tau`` around ``x0_hat`` (TDM §3.3): it reweights the
   regression from the actual construction (``x_s`` carries the student's own ``eps_hat``) toward ``x0_hat + tau N``.

Noise levels. The code draws ``tau`` uniformly over DDPM timesteps in ``[max(20, s), t_k - 10]`` (``--use_separate``:
each segment owns its interval, so one fake score serves all segments without fitting a mixture of their marginals)
or ``[max(20, s), T - 10]``. Here a timestep index maps to a position on the Karras curve: ``tau`` is uniform in
``tau^(1/7)`` over ``[max(s, tau_min), s_k]`` (``separate``) or ``[max(s, tau_min), sigma_max]``; the lower margin 20
becomes ``tau_min`` (default the teacher's ``sigma_min``; it is what keeps the final segment, which ends at 0, off
``tau = 0``), and the upper margin 10 is dropped (``tau = s_k`` is a valid VE level). ``random_mid`` draws ``s``
uniformly in ``s^(1/7)`` over ``[s_{k+1}, s_k]``. Departures: the importance weight is not normalised to batch mean 1
(neither is the authors'); the normaliser divides the *gradient* (DMD2 style) where the authors divide the loss by it
(the same L2 gradient direction; under pseudo-Huber the residual is the normalised one here); a generator student
whose ``D`` ignores the target level (the card's eps-prediction student); ``guidance`` is the teacher's CFG weight.
The optional regression warm start (:class:`losses.parts.regression.RegressionWarmStart`, DMD2's; not in TDM)
regresses the endpoint of the student's K-step deterministic chain (all K levels, gradient through every jump) onto
cached teacher ODE pairs, and ``regression_weight`` keeps that term afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError
from distill.core.schedules import karras_sigmas
from students import SamplingPlan

from . import parts, register_loss
from .base import NONFINITE_ROWS, Batch, DistillLoss, StepContext
from .parts import regression as reg

__all__ = ["TDM", "tdm_levels", "rollout_states", "segment_jump", "draw_levels", "importance_weight",
           "tdm_generator_loss", "DISTANCES"]

DISTANCES = ("l2", "huber")
RHO = 7.0


def tdm_levels(steps: int, sigma_max: float, floor: float) -> list[float]:
    """The ``K + 1`` descending levels ``[sigma_max, Karras-spaced ..., floor, 0]`` (``[sigma_max, 0]`` for K = 1)."""
    if steps == 1:
        return [float(sigma_max), 0.0]
    return karras_sigmas(steps, sigma_min=floor, sigma_max=sigma_max, rho=RHO).tolist()


def rollout_states(student: nn.Module, x: Tensor, levels: Tensor, cond: Tensor | None = None) -> Tensor:
    """``[K + 1, B, ...]`` states of the deterministic K-jump chain from ``x`` at ``levels[0]`` (``levels: [K + 1]``
    ending in 0); the caller decides about grad (TDM step 1 runs it under ``no_grad``)."""
    states = [x]
    for j in range(levels.shape[0] - 1):
        x = student(x, levels[j].expand(x.shape[0]), levels[j + 1].expand(x.shape[0]), cond)
        states.append(x)
    return torch.stack(states)


def segment_jump(student: nn.Module, states: Tensor, levels: Tensor, k: Tensor, s: Tensor,
                 cond: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """TDM step 2: ``(x0_hat, eps_hat, x_s)`` for segment ``k: [B]`` from the stored ``states: [K + 1, B, ...]`` and
    the jump target ``s: [B]``; ``x0_hat`` carries the student's gradient iff grad is enabled (``eps_hat`` and ``x_s``
    are built from it too: the caller detaches what it must)."""
    x_k = states[k, torch.arange(k.shape[0], device=k.device)]
    s_k = levels[k]
    x0_hat = student(x_k, s_k, torch.zeros_like(s_k), cond)
    eps_hat = (x_k - x0_hat) / append_dims(s_k, x_k.ndim)
    return x0_hat, eps_hat, x0_hat + append_dims(s, x_k.ndim) * eps_hat


def _ramp(u: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Uniform ``u`` mapped to ``[lo, hi]`` uniformly in ``sigma^(1/rho)`` (a Karras-curve position)."""
    a, b = lo.clamp_min(0) ** (1 / RHO), hi ** (1 / RHO)
    return (a + u * (b - a)) ** RHO


def draw_levels(batch: Batch, levels: Tensor, k: Tensor, *, random_mid: bool, separate: bool, tau_min: float
                ) -> tuple[Tensor, Tensor]:
    """``(s, tau)``, each ``[B]``: the jump target of segment ``k`` (its end ``levels[k + 1]``, or with ``random_mid``
    a random level in ``[levels[k + 1], levels[k]]``) and the diffusion level ``tau`` in ``[max(s, tau_min), hi]``
    with ``hi = levels[k]`` (``separate``: non-overlapping intervals across segments) or ``levels[0]``. Always two
    batch draws, so the draw count does not depend on the options."""
    lv = levels.to(torch.float64)
    u_mid, u_tau = (batch.rand(dtype=torch.float64).to(lv.device) for _ in range(2))
    k = k.to(lv.device)
    start, end = lv[k], lv[k + 1]
    s = _ramp(u_mid, end, start) if random_mid else end
    hi = start if separate else lv[0].expand_as(start)
    tau = _ramp(u_tau, torch.maximum(s, torch.full_like(s, tau_min)), hi)
    return s.to(levels), tau.to(levels)


def importance_weight(x_tau: Tensor, x0_hat: Tensor, xi: Tensor, tau: Tensor) -> Tensor:
    """TDM's ``omega = exp(-mean(xi_mix^2)/2) / exp(-mean(xi^2)/2)``, ``xi_mix = (x_tau - x0_hat)/tau`` (means over the
    data dims), ``[B]``. Exactly 1 when ``x_tau = x0_hat + tau xi``."""
    xi_mix = (x_tau - x0_hat) / append_dims(tau, x_tau.ndim)
    return torch.exp(0.5 * (parts.mean_dims(xi**2) - parts.mean_dims(xi_mix**2)))


def tdm_generator_loss(x0_hat: Tensor, d_teacher: Tensor, d_fake: Tensor, distance: str = "l2",
                       huber_c: float = 1e-3, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample generator loss ``[B]`` against ``target = sg(x0_hat - g)``, ``g = (d_fake - d_teacher) / n``,
    ``n = mean_dims|x0_hat - d_teacher|`` (:func:`losses.parts.dmd_gradient`): ``0.5 mean_dims((x0_hat - target)^2)``
    (``"l2"``, gradient ``g / d``) or ``mean_dims(sqrt((x0_hat - target)^2 + c^2) - c)`` (``"huber"``).
    Returns ``(rows, g, bad)``; NaN/Inf rows of ``g`` are zeroed and flagged in ``bad``."""
    g, bad = parts.dmd_gradient(x0_hat.detach(), d_teacher, d_fake, eps)
    diff = x0_hat - (x0_hat.detach() - g)
    rows = 0.5 * parts.mean_dims(diff**2) if distance == "l2" else parts.mean_dims((diff**2 + huber_c**2).sqrt()
                                                                                   - huber_c)
    return rows, g, bad


@register_loss("tdm")
class TDM(reg.RegressionWarmStart, DistillLoss):
    """Trajectory Distribution Matching, phases ``("critic", "student")``, one update each per iteration.

    Args:
        steps: K, the student's number of deterministic jumps (TDM demo: 4); also its sampling NFE.
        sigma_max: the chain's start level (the teacher's ``sigma_max``, 80 for every shipped teacher; a constructor
            key because the sampling plan is built before :meth:`setup` sees the teacher).
        floor: the last non-zero level ``s_{K-1}``.
        random_mid: jump to a random level inside the segment instead of its end (``--use_randmid``).
        separate: each segment's ``tau`` in its own interval ``[s_{k+1}, s_k]`` (``--use_separate``; else up to
            ``sigma_max``).
        tau_min: lowest ``tau`` (``None``: the teacher's ``sigma_min``).
        distance: ``"l2"`` or ``"huber"`` (pseudo-Huber with ``huber_c``; the code's 1e-3).
        snr_gamma: the fake loss's ``min(SNR, snr_gamma)`` clamp (5).
        guidance: the teacher's CFG weight in the generator target (1 = none; needs a conditional teacher).
        fake_init, fake_hidden, fake_depth: :func:`losses.parts.build_fake_score`.
        norm_eps: floor of the per-sample normaliser.
        regression_steps, regression_pairs, regression_nfe, regression_weight, fake_warmup: DMD2's warm start
            (:class:`losses.parts.regression.RegressionWarmStart`; not in TDM, off by default).
    """

    phases = ("critic", "student")
    ema_phases = ("student",)
    student_kind = "generator"

    def __init__(self, steps: int = 4, sigma_max: float = 80.0, floor: float = 0.4, random_mid: bool = False,
                 separate: bool = True, tau_min: float | None = None, distance: str = "l2", huber_c: float = 1e-3,
                 snr_gamma: float = 5.0, guidance: float = 1.0, fake_init: str = "teacher", fake_hidden: int = 256,
                 fake_depth: int = 4, norm_eps: float = 1e-5, regression_steps: int = 0,
                 regression_pairs: int = 10_000, regression_nfe: int = 35, regression_weight: float = 0.0,
                 fake_warmup: int = 0) -> None:
        super().__init__()
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ConfigError(f"tdm: steps must be an integer >= 1, got {steps!r}")
        if not 0 < floor < sigma_max:
            raise ConfigError(f"tdm: need 0 < floor < sigma_max, got floor={floor}, sigma_max={sigma_max}")
        if distance not in DISTANCES:
            raise ConfigError(f"tdm: unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if not (huber_c > 0 and snr_gamma > 0 and norm_eps > 0 and guidance >= 0):
            raise ConfigError(f"tdm: need huber_c, snr_gamma, norm_eps > 0 and guidance >= 0, got {huber_c}, "
                              f"{snr_gamma}, {norm_eps}, {guidance}")
        if tau_min is not None and not 0 < tau_min < floor:
            raise ConfigError(f"tdm: tau_min must lie in (0, floor={floor}) or be null, got {tau_min}")
        parts.check_fake_config("tdm", fake_init, fake_hidden, fake_depth)
        self.init_regression("tdm", regression_steps, regression_pairs, regression_nfe, regression_weight,
                             fake_warmup, guidance)
        self.steps, self.sigma_max, self.floor = int(steps), float(sigma_max), float(floor)
        self.random_mid, self.separate, self.tau_min = bool(random_mid), bool(separate), tau_min
        self.distance, self.huber_c, self.snr_gamma = distance, float(huber_c), float(snr_gamma)
        self.guidance, self.norm_eps = float(guidance), float(norm_eps)
        self.fake_init, self.fake_hidden, self.fake_depth = fake_init, int(fake_hidden), int(fake_depth)
        self.levels = tdm_levels(self.steps, self.sigma_max, self.floor)
        self.fake: nn.Module | None = None  # the critic: one parameter group

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"steps": 2, "random_mid": True}

    def sampling(self) -> SamplingPlan:
        """Deterministic jumps (gamma 0) on the training levels at K NFE; other NFEs: Karras down to ``floor``."""
        return SamplingPlan(gamma=0.0, floor=self.floor, levels={self.steps: tuple(self.levels[:-1])})

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        if self.sigma_max > teacher.sigma_max * (1 + 1e-6):
            raise ConfigError(f"tdm: sigma_max={self.sigma_max} exceeds the teacher's {teacher.sigma_max}")
        if self.guidance != 1.0 and not getattr(teacher, "conditional", getattr(teacher, "num_classes", None)):
            raise ConfigError(f"tdm: guidance={self.guidance} needs a conditional (class or text) teacher "
                              "(use guidance=1.0)")
        self._tau_min = float(teacher.sigma_min if self.tau_min is None else self.tau_min)
        if not self._tau_min < self.floor:
            raise ConfigError(f"tdm: tau_min={self._tau_min} must be below floor={self.floor}")
        self.fake = parts.build_fake_score(self.fake_init, teacher, ctx.device, ctx.dtype, hidden=self.fake_hidden,
                                           depth=self.fake_depth, guidance=self.guidance, owner="tdm")

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if self.fake is None:
            raise RuntimeError("tdm: call setup(student, teacher, ctx) before the first step")
        if phase == "critic":
            return self._critic(student, teacher, batch, ctx)
        if phase == "student":
            warm = self.regression_step(student, batch, ctx, self.sigma_max, self._chain(ctx))
            return warm if warm is not None else self._student(student, teacher, batch, ctx)
        raise ValueError(f"tdm: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")

    def _chain(self, ctx: StepContext) -> Tensor:
        """The K-step sampler's levels ``[s_0, ..., s_{K-1}, 0]``: the warm start regresses this chain's endpoint
        onto the teacher pairs (all K levels trained), not DMD2's 1-step map."""
        return torch.tensor(self.levels, device=ctx.device, dtype=ctx.dtype)

    def construct(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext, grad: bool
                  ) -> dict[str, Tensor]:
        """Steps 1-3 for one batch: ``x0_hat`` (with the student's grad iff ``grad``), the detached ``x_tau``, and
        ``tau, s, k, xi``. Draws, in order: ``z``, ``k``, the two level draws, ``xi``."""
        lv = torch.tensor(self.levels, device=ctx.device, dtype=ctx.dtype)
        x = lv[0] * batch.randn(*teacher.data_shape, dtype=ctx.dtype).to(ctx.device)
        with torch.no_grad():
            states = rollout_states(student, x, lv, batch.labels)
        k = batch.randint(self.steps).to(ctx.device)
        s, tau = draw_levels(batch, lv, k, random_mid=self.random_mid, separate=self.separate, tau_min=self._tau_min)
        xi = batch.randn_like(x)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x0_hat, _, x_s = segment_jump(student, states, lv, k, s, batch.labels)
        x_tau = x_s.detach() + append_dims((tau**2 - s**2).clamp_min(0).sqrt(), x.ndim) * xi
        return {"x0_hat": x0_hat, "x_tau": x_tau, "tau": tau, "s": s, "k": k, "xi": xi}

    def _critic(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        parts.check_single_guidance(batch.labels)  # the fake score has no guidance input
        c = self.construct(student, teacher, batch, ctx, grad=False)
        x0, tau = c["x0_hat"].detach(), c["tau"]
        omega = importance_weight(c["x_tau"], x0, c["xi"], tau)
        w = (1.0 / tau**2).clamp_max(self.snr_gamma)
        mse = parts.mean_dims((self.fake.denoise(c["x_tau"], tau, batch.labels) - x0) ** 2)
        loss = (w * omega * mse).mean()
        return {"loss": loss, "fake_mse": mse.detach().mean(), "is_weight": omega.mean(),
                "is_weight_max": omega.max()}

    def _student(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        c = self.construct(student, teacher, batch, ctx, grad=True)
        x0_hat, x_tau, tau = c["x0_hat"], c["x_tau"], c["tau"]
        with torch.no_grad():
            d_teacher = teacher(x_tau, tau, batch.labels, self.guidance).to(x0_hat.dtype)
            d_fake = self.fake.denoise(x_tau, tau, batch.labels).to(x0_hat.dtype)
        rows, g, bad = tdm_generator_loss(x0_hat, d_teacher, d_fake, self.distance, self.huber_c, self.norm_eps)
        out = {"tdm_loss": rows.detach().mean(), "tdm_grad_norm": g.reshape(batch.size, -1).norm(dim=1).mean(),
               "sample_mean": x0_hat.detach().mean(), "sample_std": x0_hat.detach().std(), NONFINITE_ROWS: bad.sum()}
        out["loss"] = rows.mean() + self.regression_term(student, batch, ctx, self.sigma_max, out, self._chain(ctx))
        return out
