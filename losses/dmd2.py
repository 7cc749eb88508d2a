"""DMD2: distribution matching distillation with a two-time-scale fake score and an optional GAN head.

* "One-step Diffusion with Distribution Matching Distillation", Yin et al. 2023, arXiv:2311.18828 (DMD).
* "Improved Distribution Matching Distillation for Fast Image Synthesis", Yin et al. 2024, arXiv:2405.14867 (DMD2).

A generator ``G`` (one-step, or few-step with backward simulation) is trained so that its noised sample
distribution matches the teacher's in reverse KL, averaged over noise levels: the sample gradient is
``(mu_fake - mu_real)`` over DMD's per-sample normaliser (DMD eq. 7-8; :func:`losses.parts.dmd_gradient`), with
``mu_real`` the frozen teacher and ``mu_fake`` a fake score trained on the generator's current samples. Phases:

* ``critic``: fit the fake score to detached generator samples (EDM-weighted x0 DSM), plus, with a GAN head, a
  classifier between noised real and noised generated samples on the fake score's bottleneck (DMD2 eq. 5);
* ``student``: push the generator's samples along ``-g`` (gradient injection), plus ``gan_weight`` times the
  non-saturating GAN loss (DMD2 eq. 6) and, optionally, DMD's regression onto teacher ODE pairs (DMD eq. 9).

DMD2's two-time-scale update rule (TTUR, §4.2) runs the critic ``critic_updates`` times per generator update, so the
fake score tracks the moving generator. Before it: ``regression_steps`` of regression warm start (student only) and
``fake_warmup`` critic-only steps. The reusable machinery lives in :mod:`losses.parts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.registry import ConfigError
from students import SamplingPlan

from . import parts, register_loss
from .base import Batch, DistillLoss, StepContext
from .parts import regression as reg

__all__ = ["DMD2"]


@register_loss("dmd2")
class DMD2(reg.RegressionWarmStart, DistillLoss):
    """Distribution matching distillation (DMD2 without/with its GAN head), phases ``("critic", "student")``.

    Args:
        critic_updates: fake-score (critic) updates per generator update, DMD2's TTUR (5).
        guidance: classifier-free guidance weight of the *teacher* (``mu_real``); needs a conditional teacher.
        dm_sigma: noise density of the distribution-matching and GAN terms: ``"grid"`` (uniform over the indices of
            a ``num_levels`` Karras grid restricted to ``[t_min, t_max]``, DMD2's ``t ~ U[0.02 T, 0.98 T]``) or
            ``"lognormal"`` (``log sigma ~ N(p_mean, p_std^2)``); see :class:`losses.parts.SigmaSampler`.
        t_min, t_max: the grid fraction range (0 = sigma_max end). num_levels: the grid's size.
        fake_sigma: noise density of the fake score's DSM, ``"lognormal"`` (EDM) or ``"grid"``.
        p_mean, p_std: log-normal parameters (EDM's -1.2, 1.2).
        gan_weight: weight of the generator's non-saturating GAN term (0 disables the GAN head entirely).
        gan_critic_weight: weight of the classifier loss in the critic update (DMD2: 1e-2).
        student_sigmas: ``None`` for a one-step generator fed ``sigma_max z``; a descending list of levels (e.g.
            ``[80, 2.0, 0.5]``) for a multi-step generator trained with backward simulation (DMD2 §4.5), also its
            sampling levels at ``len(student_sigmas)`` NFE.
        fake_init: ``"teacher"``, ``"fresh"`` or ``"residual"`` (:func:`losses.parts.build_fake_score`).
        fake_hidden, fake_depth: width and number of hidden layers of the fresh MLP (or residual correction).
        fake_lora: a LoRA spec (``students.lora``) for a ``"teacher"`` fake: a LoRA critic on the shared, frozen
            teacher network (:func:`losses.parts.build_fake_score`); ``None``: a full trainable copy.
        dm_eps: floor of the per-sample DMD normaliser.
        regression_steps: iterations of warm-start regression onto teacher ODE pairs ``(z, ODE(z))`` before
            distribution matching (DMD's regression loss, DMD2's SDXL warm start); only the student phase runs.
        regression_pairs: size of the pair cache (data spec ``"pairs"``; Heun of the teacher, with ``guidance``).
        regression_nfe: the Heun sampler's NFE for those pairs (odd; 35 = 18 Karras steps).
        regression_weight: weight of the same regression term during distribution matching (DMD's ``lambda_reg``).
        fake_warmup: critic-only iterations after the regression (the fake score fits the warm-started generator).
    """

    phases = ("critic", "student")
    ema_phases = ("student",)
    student_kind = "generator"

    def __init__(self, critic_updates: int = 5, guidance: float = 1.0, dm_sigma: str = "grid", t_min: float = 0.02,
                 t_max: float = 0.98, num_levels: int = 1000, fake_sigma: str = "lognormal", p_mean: float = -1.2,
                 p_std: float = 1.2, gan_weight: float = 0.0, gan_critic_weight: float = 1e-2,
                 student_sigmas: Sequence[float] | None = None, fake_init: str = "teacher", fake_hidden: int = 256,
                 fake_depth: int = 4, fake_lora: dict[str, Any] | None = None, dm_eps: float = 1e-5,
                 regression_steps: int = 0, regression_pairs: int = 10_000,
                 regression_nfe: int = 35, regression_weight: float = 0.0, fake_warmup: int = 0) -> None:
        super().__init__()
        if int(critic_updates) != critic_updates or critic_updates < 1:
            raise ConfigError(f"dmd2: critic_updates must be an integer >= 1, got {critic_updates!r}")
        densities = {"dm_sigma": dm_sigma, "fake_sigma": fake_sigma}
        parts.check_sigma_config("dmd2", densities, t_min, t_max, num_levels, p_std)
        if guidance < 0:
            raise ConfigError(f"dmd2: guidance must be >= 0 (1 = no guidance), got {guidance}")
        if gan_weight < 0 or gan_critic_weight < 0:
            raise ConfigError(f"dmd2: GAN weights must be >= 0, got gan_weight={gan_weight}, "
                              f"gan_critic_weight={gan_critic_weight}")
        self.fake_lora = parts.check_fake_config("dmd2", fake_init, fake_hidden, fake_depth, fake_lora)
        self.init_regression("dmd2", regression_steps, regression_pairs, regression_nfe, regression_weight,
                             fake_warmup, guidance)
        self.student_sigmas = parts.check_levels("dmd2", student_sigmas)
        self.critic_updates, self.guidance, self.dm_eps = int(critic_updates), float(guidance), float(dm_eps)
        self.dm_sigma, self.fake_sigma = dm_sigma, fake_sigma
        self.t_min, self.t_max, self.num_levels = float(t_min), float(t_max), int(num_levels)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.gan_weight, self.gan_critic_weight = float(gan_weight), float(gan_critic_weight)
        self.fake_init, self.fake_hidden, self.fake_depth = fake_init, int(fake_hidden), int(fake_depth)
        self.needs_data = self.gan_weight > 0  # real data is needed only by the GAN classifier
        self.fake: nn.Module | None = None  # trained in the critic phase (with gan_head): one parameter group each
        self.gan_head: nn.Module | None = None
        self._tap: parts.FeatureTap | None = None

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """A small, fast configuration for the shared loss contract test (CPU, 8x8 UNet teacher): the GAN head and a
        two-level student are on, so every code path (feature hook, backward simulation) is exercised."""
        return {"critic_updates": 2, "num_levels": 50, "gan_weight": 0.1, "student_sigmas": [80.0, 1.0]}

    # -- schedule and needs ----------------------------------------------------------------------------------------
    def update_every(self) -> dict[str, int]:
        return {"critic": 1, "student": self.critic_updates}

    def sampling(self) -> SamplingPlan | None:
        """A multi-step generator samples at its training levels with re-noising (gamma = 1, as in the rollout)."""
        if self.student_sigmas is None:
            return None
        return SamplingPlan(gamma=1.0, levels={len(self.student_sigmas): tuple(self.student_sigmas)})

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Build the fake score (and GAN head) on ``ctx.device``, and the noise-level samplers."""
        if self.guidance != 1.0 and not getattr(teacher, "conditional", getattr(teacher, "num_classes", None)):
            raise ConfigError(f"dmd2: guidance={self.guidance} needs a conditional (class or text) teacher; this "
                              f"{type(teacher).__name__} is unconditional (use guidance=1.0)")
        self.fake = parts.build_fake_score(self.fake_init, teacher, ctx.device, ctx.dtype, hidden=self.fake_hidden,
                                           depth=self.fake_depth,
                                           lora=self.fake_lora, guidance=self.guidance, owner="dmd2")
        if self.gan_weight > 0:
            k = getattr(teacher, "num_classes", None)
            self.gan_head, self._tap = parts.build_gan_head(self.fake, teacher.data_shape, k, ctx.device, ctx.dtype,
                                                            "dmd2")
        kw = dict(num_levels=self.num_levels, t_min=self.t_min, t_max=self.t_max, p_mean=self.p_mean,
                  p_std=self.p_std)
        self._dm_sigma = parts.SigmaSampler(self.dm_sigma, teacher.sigma_min, teacher.sigma_max, **kw)
        self._fake_sigma = parts.SigmaSampler(self.fake_sigma, teacher.sigma_min, teacher.sigma_max, **kw)

    # -- the phases ----------------------------------------------------------------------------------------------
    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if self.fake is None:
            raise RuntimeError("dmd2: call setup(student, teacher, ctx) before the first step")
        if phase == "critic":
            return self._critic(student, teacher, batch, ctx)
        if phase == "student":
            warm = self.regression_step(student, batch, ctx, teacher.sigma_max)
            return warm if warm is not None else self._student(student, teacher, batch, ctx)
        raise ValueError(f"dmd2: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")

    def _generate(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        levels = self.student_sigmas or [float(teacher.sigma_max)]
        return parts.generator_rollout(student, batch, ctx, levels, teacher.data_shape, batch.labels)

    def _logits(self, x: Tensor, batch: Batch) -> Tensor:
        """GAN logits ``[B]`` of ``x: [B, ...]`` re-noised at a ``dm_sigma`` level, on the fake score's features."""
        return parts.noised_logits(self.gan_head, self._tap, self.fake, x, self._dm_sigma(batch, x), batch)

    def _critic(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        with torch.no_grad():  # the fake score learns the generator's *current* distribution
            x = self._generate(student, teacher, batch, ctx)
        sigma = self._fake_sigma(batch, x)
        noise, sd = batch.randn_like(x), float(teacher.sigma_data)
        dsm = parts.fake_dsm_loss(self.fake, x, sigma, noise, batch.labels, sd).mean()
        out, loss = {"dsm": dsm.detach()}, dsm
        if self.gan_weight > 0:  # diffusion-GAN classifier on noised real vs noised generated samples (DMD2 §4.3)
            gan_d, terms = parts.gan_critic_terms("dmd2", self._logits, x, batch, ctx.device, ctx.dtype)
            loss = loss + self.gan_critic_weight * gan_d
            out.update(terms)
        out["loss"] = loss
        return out

    def _student(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        x = self._generate(student, teacher, batch, ctx)
        # Distribution matching at a random noise level (DMD eq. 7-8, DMD2 §3)
        loss, out = parts.distribution_matching(x, self._dm_sigma(batch, x), teacher, self.fake, batch, self.guidance,
                                                self.dm_eps)
        if self.gan_weight > 0:  # non-saturating GAN term through the frozen fake encoder and head (DMD2 eq. 6)
            with parts.no_param_grad(self.fake, self.gan_head):
                gan_g = parts.gan_generator_loss(self._logits(x, batch)).mean()
            loss = loss + self.gan_weight * gan_g
            out["gan_g"] = gan_g.detach()
        out["loss"] = loss + self.regression_term(student, batch, ctx, teacher.sigma_max, out)
        return out
