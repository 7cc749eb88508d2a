"""f-distill: distribution matching in an f-divergence, DMD's score difference weighted by a learned density ratio.

"One-step Diffusion Models with f-Divergence Distribution Matching", Xu, Nie & Vahdat 2025, arXiv:2502.15681.

The gradient of ``D_f(p_t || q_t)`` (teacher ``p``, generator ``q``, ``r = p_t / q_t``) w.r.t. a generated sample is
DMD's score difference times ``h(r) = r^2 f''(r)`` (the paper's main theorem); ``reverse_kl`` (``h = 1``) is
DMD. The divergences, their ``f, f''`` and ``h`` and the weight normalisation are tabled in
:mod:`losses.parts.divergences`. Phases:

* ``critic``: the fake score's DSM on detached generator samples (as DMD2), plus ``disc_weight`` times the logistic
  loss of a discriminator ``D`` (a :class:`losses.parts.GANHead` on the fake score's tapped features) between noised
  *real-side* samples and noised generator samples at the same ``dm_sigma`` level. Its optimal logit is
  ``log p_sigma / q_sigma`` (Goodfellow et al. 2014; the paper's GAN-based ratio estimator). The real side is the run's
  ``DataSpec("real")``: real data (the paper's choice, which takes the teacher to model the data) or, with
  ``data.name: teacher``, exact samples of an analytic teacher, so the ratio it estimates is the teacher's ``p / q``.
* ``student``: ``x = G(z)``, ``x_t = x + sigma n``; ``g = dmd_gradient(x, mu_real, mu_fake)`` (DMD eq. 7-8), each row
  scaled by ``h_hat`` from ``D(x_t)``: logit clamped to +-``logit_clamp``, ``r`` to ``[ratio_min, ratio_max]``,
  divided by its running mean in its noise-level bin (``ratio_bins`` Karras-index bins, decay ``ratio_ema``), then
  ``h`` normalised to batch mean 1 (:func:`losses.parts.divergences.fdistill_weights`); injected with
  :func:`losses.parts.gradient_injection_loss`. Optionally ``gan_weight`` times the non-saturating GAN loss through
  the frozen fake encoder and head on the same ``x_t`` (DMD2 eq. 6; the paper keeps it).

Schedule as DMD2: ``regression_steps`` of warm-start regression onto teacher ODE pairs (student only), ``fake_warmup``
critic-only iterations, then ``critic_updates`` critic updates per generator update (TTUR).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError

from . import parts, register_loss
from .base import NONFINITE_ROWS, Batch, DistillLoss, StepContext
from .parts import divergences as fdiv
from .parts import regression as reg

__all__ = ["FDistill", "RatioHead"]


class RatioHead(nn.Module):
    """The discriminator ``logit(x_t, sigma, cond) = head(features of fake.denoise(x_t, sigma, cond))``, an estimate of
    ``log p_sigma(x_t) / q_sigma(x_t)``. Owns only the head (the fake score is referenced, trained in its own group)."""

    def __init__(self, head: nn.Module, tap: parts.FeatureTap, fake: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.__dict__.update(tap=tap, fake=fake)

    def forward(self, x_t: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x_t: [B, ...]``, ``sigma: [B]`` -> logits ``[B]``."""
        return self.head(self.tap.grab(self.fake.denoise, x_t, sigma, cond))


@register_loss("fdistill")
class FDistill(reg.RegressionWarmStart, DistillLoss):
    """f-distill (phases ``("critic", "student")``). DMD2's arguments (``critic_updates``, ``guidance``, ``dm_sigma``,
    ``t_min``, ``t_max``, ``num_levels``, ``fake_sigma``, ``p_mean``, ``p_std``, ``fake_init``, ``fake_hidden``,
    ``fake_depth``, ``fake_lora``, ``dm_eps``, ``gan_weight``, ``regression_*``, ``fake_warmup``) mean what they mean
    there; plus:

    Args:
        divergence: one of :data:`losses.parts.divergences.DIVERGENCES` (paper's best: ``js``).
        disc_weight: weight of the discriminator's logistic loss in the critic update (DMD2's GAN classifier: 1e-2).
        logit_clamp, ratio_min, ratio_max: clamps of the logit and of ``r`` (paper / FastGen: 10, 0.1, 20).
        ratio_bins: noise-level bins of the ratio normalisation (FastGen: 10; 0 disables it).
        ratio_ema: decay of the bins' running means (FastGen: 0 on CIFAR-10, 0.5 on ImageNet-64).
    """

    phases = ("critic", "student")
    ema_phases = ("student",)
    student_kind = "generator"
    needs_data = True

    def __init__(self, divergence: str = "js", critic_updates: int = 5, guidance: float = 1.0, dm_sigma: str = "grid",
                 t_min: float = 0.02, t_max: float = 0.98, num_levels: int = 1000, fake_sigma: str = "lognormal",
                 p_mean: float = -1.2, p_std: float = 1.2, disc_weight: float = 1e-2, gan_weight: float = 0.0,
                 logit_clamp: float = 10.0, ratio_min: float = 0.1, ratio_max: float = 20.0, ratio_bins: int = 10,
                 ratio_ema: float = 0.0, fake_init: str = "teacher", fake_hidden: int = 256, fake_depth: int = 4,
                 fake_lora: dict[str, Any] | None = None,
                 dm_eps: float = 1e-5, regression_steps: int = 0, regression_pairs: int = 10_000,
                 regression_nfe: int = 35, regression_weight: float = 0.0, fake_warmup: int = 0) -> None:
        super().__init__()
        if divergence not in fdiv.DIVERGENCES:
            raise ConfigError(f"fdistill: unknown divergence {divergence!r}; valid: {', '.join(fdiv.DIVERGENCES)}")
        for key, val, lo in (("critic_updates", critic_updates, 1), ("ratio_bins", ratio_bins, 0)):
            if int(val) != val or val < lo:
                raise ConfigError(f"fdistill: {key} must be an integer >= {lo}, got {val!r}")
        parts.check_sigma_config("fdistill", {"dm_sigma": dm_sigma, "fake_sigma": fake_sigma}, t_min, t_max,
                                 num_levels, p_std)
        self.fake_lora = parts.check_fake_config("fdistill", fake_init, fake_hidden, fake_depth, fake_lora)
        self.init_regression("fdistill", regression_steps, regression_pairs, regression_nfe, regression_weight,
                             fake_warmup, guidance)
        if guidance < 0 or disc_weight <= 0 or gan_weight < 0:
            raise ConfigError(f"fdistill: need guidance >= 0, disc_weight > 0, gan_weight >= 0; got {guidance}, "
                              f"{disc_weight}, {gan_weight}")
        if not (logit_clamp > 0 and 0 < ratio_min < 1 < ratio_max and 0 <= ratio_ema < 1):
            raise ConfigError(f"fdistill: need logit_clamp > 0, 0 < ratio_min < 1 < ratio_max, 0 <= ratio_ema < 1; "
                              f"got {logit_clamp}, {ratio_min}, {ratio_max}, {ratio_ema}")
        self.divergence, self.critic_updates, self.guidance = divergence, int(critic_updates), float(guidance)
        self.dm_sigma, self.fake_sigma, self.t_min, self.t_max = dm_sigma, fake_sigma, float(t_min), float(t_max)
        self.num_levels, self.p_mean, self.p_std = int(num_levels), float(p_mean), float(p_std)
        self.disc_weight, self.gan_weight, self.dm_eps = float(disc_weight), float(gan_weight), float(dm_eps)
        self.logit_clamp, self.ratio_min, self.ratio_max = float(logit_clamp), float(ratio_min), float(ratio_max)
        self.ratio_ema = float(ratio_ema)
        self.fake_init, self.fake_hidden, self.fake_depth = fake_init, int(fake_hidden), int(fake_depth)
        self.fake: nn.Module | None = None  # both trained in the critic phase, one parameter group each
        self.disc: nn.Module | None = None
        # running per-bin means of r (checkpointed with the loss; none when ratio_bins = 0)
        self.register_buffer("ratio_means", torch.ones(int(ratio_bins), dtype=torch.float64) if ratio_bins else None)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Small and fast for the shared contract test: TTUR 2, a 50-level grid, the GAN term on (so the student
        phase has a gradient while the teacher-copy fake score still equals the teacher)."""
        return {"divergence": "js", "critic_updates": 2, "num_levels": 50, "gan_weight": 0.1}

    # -- schedule and needs ------------------------------------------------------------------------------------------
    def update_every(self) -> dict[str, int]:
        return {"critic": 1, "student": self.critic_updates}

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Build the fake score and the discriminator on ``ctx.device``, and the noise-level samplers."""
        if self.guidance != 1.0 and not getattr(teacher, "conditional", getattr(teacher, "num_classes", None)):
            raise ConfigError(f"fdistill: guidance={self.guidance} needs a conditional (class or text) teacher; this "
                              f"{type(teacher).__name__} is unconditional (use guidance=1.0)")
        self.fake = parts.build_fake_score(self.fake_init, teacher, ctx.device, ctx.dtype, hidden=self.fake_hidden,
                                           depth=self.fake_depth,
                                           lora=self.fake_lora, guidance=self.guidance, owner="fdistill")
        head, tap = parts.build_gan_head(self.fake, teacher.data_shape, getattr(teacher, "num_classes", None),
                                         ctx.device, ctx.dtype, "fdistill")
        self.disc = RatioHead(head, tap, self.fake)
        kw = dict(num_levels=self.num_levels, t_min=self.t_min, t_max=self.t_max, p_mean=self.p_mean, p_std=self.p_std)
        self._dm_sigma = parts.SigmaSampler(self.dm_sigma, teacher.sigma_min, teacher.sigma_max, **kw)
        self._fake_sigma = parts.SigmaSampler(self.fake_sigma, teacher.sigma_min, teacher.sigma_max, **kw)
        self._range = (float(teacher.sigma_min), float(teacher.sigma_max))

    # -- the phases --------------------------------------------------------------------------------------------------
    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if self.fake is None:
            raise RuntimeError("fdistill: call setup(student, teacher, ctx) before the first step")
        if phase == "critic":
            return self._critic(student, teacher, batch, ctx)
        if phase == "student":
            warm = self.regression_step(student, batch, ctx, teacher.sigma_max)
            return warm if warm is not None else self._student(student, teacher, batch, ctx)
        raise ValueError(f"fdistill: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")

    def _generate(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        return parts.generator_rollout(student, batch, ctx, [float(teacher.sigma_max)], teacher.data_shape,
                                       batch.labels)

    def _critic(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        if batch.data is None:
            raise ValueError("fdistill: the density-ratio discriminator needs real-side samples (batch.data)")
        with torch.no_grad():  # the fake score and the discriminator see the generator's *current* distribution
            x = self._generate(student, teacher, batch, ctx)
        cond, sd = batch.labels, float(teacher.sigma_data)
        dsm = parts.fake_dsm_loss(self.fake, x, self._fake_sigma(batch, x), batch.randn_like(x), cond, sd).mean()
        # ratio estimator: logistic loss, real side vs generator, both noised at the same dm_sigma level per row
        real = batch.data.to(device=ctx.device, dtype=ctx.dtype)
        sigma = self._dm_sigma(batch, x)
        s = append_dims(sigma, x.ndim)
        logit_f = self.disc(x + s * batch.randn_like(x), sigma, cond)
        logit_r = self.disc(real + s * batch.randn_like(real), sigma, cond)
        disc = parts.gan_critic_loss(logit_f, logit_r)
        return {"loss": dsm + self.disc_weight * disc, "dsm": dsm.detach(), "disc": disc.detach(),
                "d_real": torch.sigmoid(logit_r).mean().detach(), "d_fake": torch.sigmoid(logit_f).mean().detach()}

    def _student(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        x = self._generate(student, teacher, batch, ctx)
        xd, cond = x.detach(), batch.labels
        sigma = self._dm_sigma(batch, x)
        x_t = x + append_dims(sigma, x.ndim) * batch.randn_like(x)  # grad reaches x only through the GAN term
        with torch.no_grad():
            mu_real = teacher(x_t.detach(), sigma, cond, self.guidance).to(x.dtype)
            mu_fake = self.fake.denoise(x_t.detach(), sigma, cond).to(x.dtype)
        out, loss = {}, 0.0
        if self.gan_weight > 0:  # non-saturating GAN term through the frozen fake encoder and head (DMD2 eq. 6)
            with parts.no_param_grad(self.fake, self.disc):
                logit = self.disc(x_t, sigma, cond)
            gan_g = parts.gan_generator_loss(logit).mean()
            loss, out["gan_g"] = self.gan_weight * gan_g, gan_g.detach()
        else:
            with torch.no_grad():
                logit = self.disc(x_t.detach(), sigma, cond)
        g, bad_g = parts.dmd_gradient(xd, mu_real, mu_fake, self.dm_eps)  # (mu_fake - mu_real) / mean|x - mu_real|
        bins = fdiv.karras_bins(sigma, *self._range, self.ratio_means.numel()) if self.ratio_means is not None \
            else torch.zeros_like(sigma, dtype=torch.long)
        h, bad_h, log_r = fdiv.fdistill_weights(self.divergence, logit.detach(), bins, self.ratio_means,
                                                self.ratio_ema, self.logit_clamp, self.ratio_min, self.ratio_max)
        g = g * append_dims(h, g.ndim)  # h(r) (s_fake - s_real): the f-divergence gradient; bad rows have h = 0
        dm = parts.gradient_injection_loss(x, g)
        out.update(dm_loss=dm.detach(), dm_grad_norm=g.reshape(batch.size, -1).norm(dim=1).mean(),
                   h_min=h.min(), h_max=h.max(), log_ratio=log_r.mean(), sample_mean=xd.mean(), sample_std=xd.std())
        out[NONFINITE_ROWS] = (bad_g | bad_h).sum()
        out["loss"] = dm + loss + self.regression_term(student, batch, ctx, teacher.sigma_max, out)
        return out
