"""A distribution-matching regulariser for trajectory losses: DMD2's reverse-KL gradient on the student's own few-step
samples, added to a flow-map / consistency objective.

Why. Trajectory objectives (AYF, sCM, MeanFlow) regress the student onto the teacher's PF-ODE; at 1-2 steps their
residual error shows as FID well above the teacher's. Both papers that scale them add a distribution-level term for
the last stretch: Align Your Flow fine-tunes its flow maps with an adversarial loss (arXiv:2506.14603 §3.5), rCM
regularises sCM with DMD's score-based reverse divergence (Zheng et al. 2025, "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency", arXiv:2510.08431). This part is the rCM form, usable by any loss
with a flow-map student: no discriminator, the teacher as the real score, a fake score trained on the generator's
samples (:mod:`.fake_score`), DMD2's two-time-scale schedule.

Per student iteration: draw a generator sample by backward simulation on ``dm_levels`` (:func:`.generator_rollout`,
with the loss's sampling gamma, so a flow map is trained on the very chain it samples with), noise it to a DMD level
``sigma``, and inject ``g = (mu_fake - mu_real) / mean|x - mu_real|`` (:func:`distribution_matching`, DMD eq. 7-8)
with weight ``dm_weight`` on top of the host loss. The critic phase fits the fake score to detached generator samples
(EDM-weighted x0 DSM). Schedule (:meth:`DistributionMatchingRegulariser.phases_for_step`): the host objective alone
for ``dm_start`` iterations, then ``fake_warmup`` critic-only iterations, then the critic every iteration and the
student every ``critic_updates`` (DMD2's TTUR), the student phase always carrying the host objective too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError

from ..base import NONFINITE_ROWS, Batch, StepContext
from .fake_score import build_fake_score, check_fake_config, check_single_guidance, fake_dsm_loss
from .functional import dmd_gradient, gradient_injection_loss
from .gan import build_gan_head, gan_critic_terms, gan_generator_loss, no_param_grad, noised_logits
from .rollout import check_levels, generator_rollout
from .score_implicit import SIM_DISTANCES, sim_sample_grad, sum_dims
from .sigmas import SigmaSampler, check_sigma_config

__all__ = ["DM_DIVERGENCES", "DM_INTERMEDIATE", "DistributionMatchingRegulariser", "distribution_matching",
           "score_implicit_matching"]

DM_DIVERGENCES = ("reverse_kl", "sim")
#: which noise levels an intermediate output of the backward simulation (a row graded after jump ``k < L - 1``) is
#: matched and fitted at: ``"full"`` the whole ``dm_t_min``/``dm_t_max`` range (DMD2's backward simulation),
#: ``"above_next"`` only levels ``>= dm_levels[k + 1]``, the ones that survive the chain's re-noising
DM_INTERMEDIATE = ("full", "above_next")


def distribution_matching(x: Tensor, sigma: Tensor, teacher: nn.Module, fake: nn.Module, batch: Batch,
                          guidance: float = 1.0, eps: float = 1e-5) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD's generator term on samples ``x: [B, ...]`` (with grad) noised to ``sigma: [B]`` by one batch draw:
    ``mu_real`` the (guided) teacher, ``mu_fake`` the fake score, the normalised gradient injected into ``x``.
    Returns ``(loss, terms)`` with the logged terms (``dm_loss``, ``dm_grad_norm``, sample moments and the
    non-finite row count)."""
    xd, cond = x.detach(), batch.labels
    x_t = xd + append_dims(sigma, x.ndim) * batch.randn_like(x)
    with torch.no_grad():
        mu_real = teacher(x_t, sigma, cond, guidance).to(x.dtype)
        mu_fake = fake.denoise(x_t, sigma, cond).to(x.dtype)
    g, bad = dmd_gradient(xd, mu_real, mu_fake, eps)
    dm = gradient_injection_loss(x, g)
    return dm, {"dm_loss": dm.detach(), "dm_grad_norm": g.reshape(batch.size, -1).norm(dim=1).mean(),
                "sample_mean": xd.mean(), "sample_std": xd.std(), NONFINITE_ROWS: bad.sum()}


def score_implicit_matching(x: Tensor, sigma: Tensor, teacher: nn.Module, fake: nn.Module, batch: Batch,
                            guidance: float = 1.0, distance: str = "pseudo_huber", c: float = 0.3
                            ) -> tuple[Tensor, dict[str, Tensor]]:
    """SIM's generator term (:func:`.sim_sample_grad`, arXiv:2410.16794) on samples ``x: [B, ...]`` (with grad)
    noised to ``sigma: [B]`` by one batch draw: the per-sample gradient ``dl/dx`` is injected into ``x`` with SIM's
    own scale (gradient of ``mean_B l``). Returns ``(loss, terms)`` like :func:`distribution_matching`."""
    rows, g, bad, gap = sim_sample_grad(x, sigma, batch.randn_like(x), teacher, fake, batch.labels, guidance,
                                        distance, c)
    loss = rows.mean() + sum_dims((x - x.detach()) * g).mean()
    xd = x.detach()
    return loss, {"dm_loss": rows.mean(), "dm_grad_norm": sum_dims(g**2).sqrt().mean(), "score_gap": gap.mean(),
                  "sample_mean": xd.mean(), "sample_std": xd.std(), NONFINITE_ROWS: bad.sum()}


class DistributionMatchingRegulariser:
    """Mixin for a flow-map loss (phases ``("student",)`` of its own): :meth:`init_dm` in ``__init__`` (which adds
    the ``"critic"`` phase when ``dm_weight > 0``), :meth:`setup_dm` in ``setup``, :meth:`dm_critic` for the critic
    phase and ``+ self.dm_term(...)`` in the student phase; the schedule is :meth:`phases_for_step`.

    Keys (the host loss's ``dm_*`` constructor arguments): ``dm_weight`` (0 = off), ``dm_levels`` (the generator's
    descending start levels, e.g. ``[80, 0.8]`` for a 2-step student; also its sampling levels at that NFE),
    ``dm_divergence`` (``"reverse_kl"``: DMD's normalised gradient, :func:`distribution_matching`; ``"sim"``: SIM's
    score-divergence gradient, :func:`score_implicit_matching`, with ``dm_distance`` / ``dm_huber_c``),
    ``dm_t_min`` / ``dm_t_max`` (the ``"grid"`` densities' index range, as fractions from the ``sigma_max`` end),
    ``dm_start`` (host-only iterations first), ``critic_updates`` (TTUR), ``fake_warmup``, ``dm_sigma`` /
    ``fake_sigma`` (:class:`.SigmaSampler` densities, DMD2's grid over ``[0.02, 0.98]`` of 1000 Karras levels or EDM's
    log-normal), ``fake_init`` (:func:`.build_fake_score`), ``dm_eps`` (the normaliser's floor), ``dm_gan_weight`` /
    ``dm_gan_critic_weight`` (DMD2's diffusion-GAN head on the fake score's features against the batch's real data,
    :mod:`.gan`: the generator's non-saturating term on the same samples, the classifier in the critic phase; 0 =
    off). With the GAN head the host loss's data must be the real data the student should match (``batch.data``).
    ``dm_intermediate`` (:data:`DM_INTERMEDIATE`): ``"above_next"`` matches (and fits the fake score to) an
    intermediate output of the chain only at the levels it is re-noised to or above: the chain re-noises jump ``k``'s
    output to ``dm_levels[k + 1]``, so its content below that level never reaches a sample, and matching it there
    pulls the intermediate jump towards detail the next jump redraws; the fake score then models the final outputs
    alone below ``dm_levels[1]``. Needs ``"grid"`` densities.
    """

    dm_weight: float = 0.0

    def init_dm(self, owner: str, *, weight: float, levels: Sequence[float] | None, start: int, critic_updates: int,
                fake_warmup: int, dm_sigma: str, fake_sigma: str, fake_init: str, eps: float,
                divergence: str = "reverse_kl", distance: str = "pseudo_huber", huber_c: float = 0.3,
                t_min: float = 0.02, t_max: float = 0.98, gan_weight: float = 0.0,
                gan_critic_weight: float = 1e-2, intermediate: str = "full") -> None:
        if not weight >= 0:
            raise ConfigError(f"{owner}: dm_weight must be >= 0 (0 = no distribution-matching term), got {weight}")
        for key, value in (("dm_start", start), ("fake_warmup", fake_warmup)):
            if int(value) != value or value < 0:
                raise ConfigError(f"{owner}: {key} must be an integer >= 0 (iterations), got {value!r}")
        if int(critic_updates) != critic_updates or critic_updates < 1:
            raise ConfigError(f"{owner}: critic_updates must be an integer >= 1, got {critic_updates!r}")
        for key, value, valid in (("dm_divergence", divergence, DM_DIVERGENCES),
                                  ("dm_distance", distance, SIM_DISTANCES),
                                  ("dm_intermediate", intermediate, DM_INTERMEDIATE)):
            if value not in valid:
                raise ConfigError(f"{owner}: unknown {key} {value!r}; valid: {', '.join(valid)}")
        if intermediate != "full" and "lognormal" in (dm_sigma, fake_sigma):
            raise ConfigError(f"{owner}: dm_intermediate={intermediate!r} bounds the levels per row on the grid; it "
                              f"needs dm_sigma and fake_sigma 'grid', got {dm_sigma!r} and {fake_sigma!r}")
        if not huber_c > 0:
            raise ConfigError(f"{owner}: dm_huber_c must be > 0, got {huber_c}")
        if not (gan_weight >= 0 and gan_critic_weight >= 0):
            raise ConfigError(f"{owner}: dm_gan_weight and dm_gan_critic_weight must be >= 0 (0 = no GAN head), got "
                              f"{gan_weight} and {gan_critic_weight}")
        if gan_weight > 0 and not weight > 0:
            raise ConfigError(f"{owner}: dm_gan_weight > 0 needs dm_weight > 0 (the GAN head sits on the "
                              "regulariser's fake score)")
        try:
            check_sigma_config(owner, {"dm_sigma": dm_sigma, "fake_sigma": fake_sigma}, t_min, t_max, 1000, 1.2)
        except ConfigError as e:
            raise ConfigError(str(e).replace("t_min", "dm_t_min").replace("t_max", "dm_t_max")) from None
        check_fake_config(owner, fake_init, 256, 4)
        if not eps > 0:
            raise ConfigError(f"{owner}: dm_eps must be > 0, got {eps}")
        if weight > 0 and levels is None:
            raise ConfigError(f"{owner}: dm_weight > 0 needs dm_levels, the generator's descending start levels "
                              "(e.g. [80.0, 0.8] for a 2-step student)")
        self._dm_owner = owner
        self.dm_weight, self.dm_levels = float(weight), check_levels(owner, levels)
        self.dm_start, self.critic_updates, self.fake_warmup = int(start), int(critic_updates), int(fake_warmup)
        self.dm_sigma, self.fake_sigma, self.fake_init, self.dm_eps = dm_sigma, fake_sigma, fake_init, float(eps)
        self.dm_divergence, self.dm_distance, self.dm_huber_c = divergence, distance, float(huber_c)
        self._dm_range = {"t_min": float(t_min), "t_max": float(t_max)}
        self.dm_gan_weight, self.dm_gan_critic_weight = float(gan_weight), float(gan_critic_weight)
        self.dm_intermediate = intermediate
        self.gan_head: nn.Module | None = None  # a critic-phase submodule (its own parameter group) when on
        if self.dm_weight > 0:
            self.phases = ("critic", "student")

    def update_every(self) -> dict[str, int]:
        return {"critic": 1, "student": self.critic_updates} if self.dm_weight > 0 else {"student": 1}

    def phases_for_step(self, step: int) -> list[str]:
        """The host objective alone before ``dm_start``; then ``fake_warmup`` critic-only iterations; then the critic
        every iteration and the student every ``critic_updates``."""
        if self.dm_weight <= 0 or step < self.dm_start:
            return ["student"]
        k = step - self.dm_start - self.fake_warmup
        if k < 0:
            return ["critic"]
        return ["critic", "student"] if k % self.critic_updates == 0 else ["critic"]

    def setup_dm(self, teacher: nn.Module, ctx: StepContext) -> None:
        """Build the fake score (a trainable teacher copy by default), the GAN head on its features when
        ``dm_gan_weight > 0``, and the noise-level samplers."""
        if self.dm_weight <= 0:
            return
        guidance = float(getattr(self, "guidance", 1.0))
        self.fake = build_fake_score(self.fake_init, teacher, ctx.device, ctx.dtype, guidance=guidance,
                                     owner=self._dm_owner)
        if self.dm_gan_weight > 0:
            self.gan_head, self._tap = build_gan_head(self.fake, teacher.data_shape,
                                                      getattr(teacher, "num_classes", None), ctx.device, ctx.dtype,
                                                      self._dm_owner)
        self._dm_sampler = SigmaSampler(self.dm_sigma, teacher.sigma_min, teacher.sigma_max, **self._dm_range)
        self._fake_sampler = SigmaSampler(self.fake_sigma, teacher.sigma_min, teacher.sigma_max, **self._dm_range)

    def dm_levels_plan(self) -> dict[int, tuple[float, ...]]:
        """``{len(dm_levels): dm_levels}`` for the sampling plan (empty when off)."""
        return {len(self.dm_levels): tuple(self.dm_levels)} if self.dm_weight > 0 else {}

    def _dm_generate(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                     ) -> tuple[Tensor, Tensor | None]:
        """Generator samples ``[B, ...]`` and the per-row level floors ``[B]`` (``None`` under ``"full"``):
        ``dm_levels[k + 1]`` for a row graded after intermediate jump ``k``, 0 for the final outputs."""
        gamma = float(getattr(self, "sampling_gamma", 1.0))
        x, k = generator_rollout(student, batch, ctx, self.dm_levels, teacher.data_shape, batch.labels, gamma,
                                 return_steps=True)
        if self.dm_intermediate == "full" or len(self.dm_levels) == 1:
            return x, None
        nxt = torch.tensor([*self.dm_levels[1:], 0.0], dtype=torch.float64, device=k.device)
        return x, nxt[k]

    def dm_critic(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                  ) -> dict[str, Tensor]:
        """The critic phase: EDM-weighted x0 DSM of the fake score on detached generator samples, plus
        ``dm_gan_critic_weight`` times the GAN classifier (noised real ``batch.data`` vs noised generated samples)."""
        check_single_guidance(batch.labels)
        with torch.no_grad():
            x, floor = self._dm_generate(student, teacher, batch, ctx)
        sigma = self._fake_sampler(batch, x, floor)
        dsm = fake_dsm_loss(self.fake, x, sigma, batch.randn_like(x), batch.labels, float(teacher.sigma_data)).mean()
        out = {"loss": dsm, "dsm": dsm.detach()}
        if self.dm_gan_weight > 0:
            gan_d, terms = gan_critic_terms(self._dm_owner, lambda x_, b_: self._gan_logits(x_, b_, floor), x, batch,
                                            ctx.device, ctx.dtype)
            out["loss"] = dsm + self.dm_gan_critic_weight * gan_d
            out.update(terms)
        return out

    def _gan_logits(self, x: Tensor, batch: Batch, floor: Tensor | None = None) -> Tensor:
        """GAN logits ``[B]`` of ``x`` re-noised at a ``dm_sigma`` level (DMD2 §4.3), ``>= floor`` per row if given."""
        return noised_logits(self.gan_head, self._tap, self.fake, x, self._dm_sampler(batch, x, floor), batch)

    def dm_term(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext,
                out: dict[str, Tensor]) -> Tensor | float:
        """``dm_weight`` times the generator term (DMD's or SIM's, ``dm_divergence``) on a backward-simulated sample,
        plus ``dm_gan_weight`` times the non-saturating GAN term on the same sample through the frozen fake encoder and
        head (0 before ``dm_start`` and when off); its logged terms go into ``out`` (the non-finite row counts add
        up)."""
        if self.dm_weight <= 0 or ctx.iteration < self.dm_start:
            return 0.0
        x, floor = self._dm_generate(student, teacher, batch, ctx)
        sigma, guidance = self._dm_sampler(batch, x, floor), float(getattr(self, "guidance", 1.0))
        if self.dm_divergence == "sim":
            loss, terms = score_implicit_matching(x, sigma, teacher, self.fake, batch, guidance, self.dm_distance,
                                                  self.dm_huber_c)
        else:
            loss, terms = distribution_matching(x, sigma, teacher, self.fake, batch, guidance, self.dm_eps)
        rows = terms.pop(NONFINITE_ROWS)
        out[NONFINITE_ROWS] = out[NONFINITE_ROWS] + rows.to(out[NONFINITE_ROWS]) if NONFINITE_ROWS in out else rows
        out.update(terms)
        loss = self.dm_weight * loss
        if self.dm_gan_weight > 0:
            with no_param_grad(self.fake, self.gan_head):
                gan_g = gan_generator_loss(self._gan_logits(x, batch, floor)).mean()
            out["gan_g"] = gan_g.detach()
            loss = loss + self.dm_gan_weight * gan_g
        return loss
