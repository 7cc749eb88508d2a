"""SiD: Score identity Distillation, with SiDA's optional adversarial term.

* "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for One-Step
  Generation", Zhou et al. 2024, arXiv:2404.04057 (SiD).
* "Adversarial Score identity Distillation: Rapidly Surpassing the Teacher in One Step", Zhou et al. 2024,
  arXiv:2410.14919 (SiDA).

A one-step generator ``x_g = G(sigma_init z)`` is trained to minimise the model-based explicit score-matching (Fisher)
divergence between the teacher's noised distribution and its own, ``E w(t)/sigma^4 ||f_phi(x_t) - f_psi*(x_t)||^2``
(SiD §4), with ``f_phi`` the frozen teacher denoiser, ``f_psi`` a fake denoiser of the generator's current
distribution and ``x_t = x_g + sigma n`` (VE, docs/methods.md §0.1). SiD's score identities (§3) turn it into the
fused generator loss of §4 (Algorithm 1 and the authors' code: ``<D, f_phi - x_g> - alpha ||D||^2``), per sample,
with ``D = f_phi(x_t) - f_psi(x_t)``:

    l = w * [ (1 - alpha) ||D||^2 + <D, f_psi(x_t) - x_g> ],    w = 1 / sg(mean_dims |x_g - f_phi(x_t)|)

(SiD's weighting absorbs the ``1/sigma^4`` of the score-to-x0 conversion into a per-sample stop-gradient normaliser;
the paper sums over dims, this file averages: a constant factor, as is SiD's x100 fp16 loss scaling). Gradients flow
into ``G`` through ``x_g`` and through ``x_t`` into both networks, whose parameters stay frozen (first-order VJPs
only). Phases:

* ``critic``: the fake score's EDM-weighted DSM on detached generator samples (SiD Algorithm 1; EDM log-normal sigma),
  plus, with ``gan_weight > 0``, SiDA's classifier on the fake score's features (noised real vs generated samples);
* ``student``: ``mean_B l`` plus ``gan_weight`` times the non-saturating GAN loss through the frozen fake encoder.

1:1 alternation (fake score, then generator) as in SiD; Adam beta1 = 0 is set in the configs. Rows with a NaN/Inf
per-sample quantity are zeroed and reported as ``NONFINITE_ROWS`` (SiD filters them; here they are counted).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError
from students import SamplingPlan

from . import parts, register_loss
from .base import NONFINITE_ROWS, Batch, DistillLoss, StepContext
from .parts import regression as reg
from .parts.input_grad import fake_denoise_with_input_grad

__all__ = ["SiD", "sid_weight", "sid_generator_loss"]


def sid_weight(x: Tensor, f_real: Tensor, eps: float = 1e-5) -> Tensor:
    """SiD's per-sample weight (§4) over ``sigma^4``: ``1 / max(mean_dims|x - f_real|, eps)``, stop-gradient.
    ``x, f_real: [B, ...]`` -> ``[B]``."""
    return 1.0 / parts.mean_dims((x - f_real).detach().abs()).clamp_min(eps)


def sid_generator_loss(x: Tensor, f_real: Tensor, f_fake: Tensor, alpha: float, eps: float = 1e-5
                       ) -> tuple[Tensor, Tensor]:
    """SiD's fused generator loss per sample (§4, Algorithm 1): ``w * mean_dims[(1 - alpha) D^2 + D (f_fake - x)]`` with
    ``D = f_real - f_fake`` and ``w`` from :func:`sid_weight` (equivalently ``D ((f_real - x) - alpha D)``, the form of
    SiD's code).

    Args: ``x: [B, ...]`` generator samples; ``f_real, f_fake: [B, ...]`` teacher and fake denoisers at ``x_t``
        (all three carry the gradients the caller wants). ``alpha``: SiD's alpha (1.2 in the paper).
    Returns: ``(loss [B], bad [B] bool)``: rows where an input is NaN/Inf are zeroed before the
        arithmetic (so they get exactly zero gradient here), rows whose loss overflows are zeroed after it; both are
        flagged for the caller's ``NONFINITE_ROWS``.
    """
    finite = [torch.isfinite(t.detach()).flatten(1).all(dim=1) for t in (x, f_real, f_fake)]
    bad = ~(finite[0] & finite[1] & finite[2])
    x, f_real, f_fake = (torch.where(append_dims(bad, t.ndim), torch.zeros_like(t), t) for t in (x, f_real, f_fake))
    w = sid_weight(x, f_real, eps)
    d = f_real - f_fake
    rows = w * parts.mean_dims((1.0 - alpha) * d**2 + d * (f_fake - x))
    bad = bad | ~torch.isfinite(rows.detach())  # finite inputs can still overflow
    return torch.where(bad, torch.zeros_like(rows), rows), bad


@register_loss("sid")
class SiD(reg.RegressionWarmStart, DistillLoss):
    """Score identity Distillation (SiD, optionally SiDA), phases ``("critic", "student")``.

    Args:
        alpha: the fused loss's ``alpha`` (SiD: 1.2 on CIFAR-10 / ImageNet-64 / FFHQ, 1.0 on AFHQ).
        init_sigma: the generator's input level, ``x_g = G(init_sigma z, init_sigma)`` (SiD: 2.5); also its 1-NFE
            sampling level. ``None`` uses the teacher's ``sigma_max``.
        critic_updates: fake-score updates per generator update (SiD: 1).
        sid_sigma, t_min, t_max, num_levels: the generator loss's noise density. SiD draws ``t ~ U[0, 800/1000]`` on a
            1000-level Karras grid counted from ``sigma_min``: ``"grid"`` with the fraction ``[0.2, 1.0]`` from the
            ``sigma_max`` end (:class:`losses.parts.SigmaSampler`).
        fake_sigma, p_mean, p_std: the fake score's DSM density (SiD: EDM log-normal -1.2, 1.2).
        fake_init, fake_hidden, fake_depth: :func:`losses.parts.build_fake_score` (SiD: ``"teacher"``; ``"residual"``
            for analytic teachers).
        fake_lora: a LoRA spec (``students.lora``) for a ``"teacher"`` fake: a LoRA critic on the shared, frozen
            teacher network (:func:`losses.parts.build_fake_score`); ``None``: a full trainable copy.
        norm_eps: floor of the per-sample weight's denominator (SiD's code: 1e-5).
        gan_weight: SiDA's generator adversarial weight (0: SiD, no GAN head, data-free).
        gan_critic_weight: weight of the GAN classifier loss in the critic update.
        regression_steps, regression_pairs, regression_nfe, regression_weight, fake_warmup: DMD2's warm start
            (:class:`losses.parts.regression.RegressionWarmStart`; not in SiD, off by default): the generator
            ``G(init_sigma z)`` first regresses onto teacher ODE pairs ``(z, ODE(z))``, then the fake score fits it.
    """

    phases = ("critic", "student")
    ema_phases = ("student",)
    student_kind = "generator"

    def __init__(self, alpha: float = 1.2, init_sigma: float | None = 2.5, critic_updates: int = 1,
                 sid_sigma: str = "grid", t_min: float = 0.2, t_max: float = 1.0, num_levels: int = 1000,
                 fake_sigma: str = "lognormal", p_mean: float = -1.2, p_std: float = 1.2, fake_init: str = "teacher",
                 fake_hidden: int = 256, fake_depth: int = 4,
                 fake_lora: dict[str, Any] | None = None, norm_eps: float = 1e-5, gan_weight: float = 0.0,
                 gan_critic_weight: float = 1e-2, regression_steps: int = 0, regression_pairs: int = 10_000,
                 regression_nfe: int = 35, regression_weight: float = 0.0, fake_warmup: int = 0) -> None:
        super().__init__()
        if int(critic_updates) != critic_updates or critic_updates < 1:
            raise ConfigError(f"sid: critic_updates must be an integer >= 1, got {critic_updates!r}")
        if init_sigma is not None and not init_sigma > 0:
            raise ConfigError(f"sid: init_sigma must be > 0 (or null for sigma_max), got {init_sigma}")
        if gan_weight < 0 or gan_critic_weight < 0 or norm_eps <= 0:
            raise ConfigError(f"sid: need gan_weight, gan_critic_weight >= 0 and norm_eps > 0, got {gan_weight}, "
                              f"{gan_critic_weight}, {norm_eps}")
        parts.check_sigma_config("sid", {"sid_sigma": sid_sigma, "fake_sigma": fake_sigma}, t_min, t_max, num_levels,
                                 p_std)
        self.fake_lora = parts.check_fake_config("sid", fake_init, fake_hidden, fake_depth, fake_lora)
        self.init_regression("sid", regression_steps, regression_pairs, regression_nfe, regression_weight, fake_warmup)
        self.alpha, self.critic_updates, self.norm_eps = float(alpha), int(critic_updates), float(norm_eps)
        self.init_sigma = None if init_sigma is None else float(init_sigma)
        self.sid_sigma, self.fake_sigma = sid_sigma, fake_sigma
        self.sigma_kw = dict(num_levels=int(num_levels), t_min=float(t_min), t_max=float(t_max), p_mean=float(p_mean),
                             p_std=float(p_std))
        self.fake_init, self.fake_hidden, self.fake_depth = fake_init, int(fake_hidden), int(fake_depth)
        self.gan_weight, self.gan_critic_weight = float(gan_weight), float(gan_critic_weight)
        self.needs_data = self.gan_weight > 0  # SiDA's classifier needs real data; SiD is data-free
        self.fake: nn.Module | None = None  # trained in the critic phase (with gan_head): one parameter group each
        self.gan_head: nn.Module | None = None
        self._tap: parts.FeatureTap | None = None

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Small and fast, with SiDA's GAN head on, so the feature tap path runs in the contract test too."""
        return {"num_levels": 50, "gan_weight": 0.1}

    def update_every(self) -> dict[str, int]:
        return {"critic": 1, "student": self.critic_updates}

    def sampling(self) -> SamplingPlan | None:
        """One NFE starts at the training input level ``init_sigma`` (other NFEs: the default plan)."""
        return None if self.init_sigma is None else SamplingPlan(levels={1: (self.init_sigma,)})

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Build the fake score (and GAN head) on ``ctx.device``, and the two noise-level samplers."""
        self.fake = parts.build_fake_score(self.fake_init, teacher, ctx.device, ctx.dtype, hidden=self.fake_hidden,
                                           depth=self.fake_depth, lora=self.fake_lora, owner="sid")
        if self.gan_weight > 0:
            k = getattr(teacher, "num_classes", None)
            self.gan_head, self._tap = parts.build_gan_head(self.fake, teacher.data_shape, k, ctx.device, ctx.dtype,
                                                            "sid")
        lo, hi = teacher.sigma_min, teacher.sigma_max
        self._sid_sigma = parts.SigmaSampler(self.sid_sigma, lo, hi, **self.sigma_kw)
        self._fake_sigma = parts.SigmaSampler(self.fake_sigma, lo, hi, **self.sigma_kw)
        self._levels = [self.init_sigma or float(hi)]

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if self.fake is None:
            raise RuntimeError("sid: call setup(student, teacher, ctx) before the first step")
        if phase == "critic":
            return self._critic(student, teacher, batch, ctx)
        if phase == "student":
            warm = self.regression_step(student, batch, ctx, self._levels[0])
            return warm if warm is not None else self._student(student, teacher, batch, ctx)
        raise ValueError(f"sid: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")

    def _generate(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        return parts.generator_rollout(student, batch, ctx, self._levels, teacher.data_shape, batch.labels)

    def _logits(self, x: Tensor, batch: Batch) -> Tensor:
        """SiDA's logits ``[B]`` of ``x: [B, ...]`` re-noised at a ``sid_sigma`` level, on the fake score's features."""
        return parts.noised_logits(self.gan_head, self._tap, self.fake, x, self._sid_sigma(batch, x), batch)

    def _critic(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        with torch.no_grad():  # the fake score learns the generator's *current* distribution
            x = self._generate(student, teacher, batch, ctx)
        sigma = self._fake_sigma(batch, x)
        dsm = parts.fake_dsm_loss(self.fake, x, sigma, batch.randn_like(x), batch.labels, teacher.sigma_data).mean()
        out, loss = {"dsm": dsm.detach()}, dsm
        if self.gan_weight > 0:  # SiDA: classify noised real vs generated samples on the fake score's encoder
            gan_d, terms = parts.gan_critic_terms("sid", self._logits, x, batch, ctx.device, ctx.dtype)
            loss = loss + self.gan_critic_weight * gan_d
            out.update(terms)
        out["loss"] = loss
        return out

    def _student(self, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        x, cond = self._generate(student, teacher, batch, ctx), batch.labels
        sigma = self._sid_sigma(batch, x)
        x_t = x + append_dims(sigma, x.ndim) * batch.randn_like(x)  # differentiable in x (SiD Algorithm 1)
        with parts.no_param_grad(self.fake):  # gradients reach x_t through both networks, never their parameters
            f_real = teacher(x_t, sigma, cond).to(x.dtype)
            f_fake = fake_denoise_with_input_grad(self.fake, x_t, sigma, cond, base=f_real).to(x.dtype)
        rows, bad = sid_generator_loss(x, f_real, f_fake, self.alpha, self.norm_eps)
        loss = rows.mean()
        gap = parts.mean_dims((f_real - f_fake).detach() ** 2)
        out = {"sid_loss": loss.detach(), "score_gap": torch.where(bad, 0.0, gap).mean(),
               "sample_mean": x.detach().mean(), "sample_std": x.detach().std(), NONFINITE_ROWS: bad.sum()}
        if self.gan_weight > 0:  # SiDA: non-saturating GAN term through the frozen fake encoder and head
            with parts.no_param_grad(self.fake, self.gan_head):
                gan_g = parts.gan_generator_loss(self._logits(x, batch)).mean()
            loss = loss + self.gan_weight * gan_g
            out["gan_g"] = gan_g.detach()
        out["loss"] = loss + self.regression_term(student, batch, ctx, self._levels[0], out)
        return out
