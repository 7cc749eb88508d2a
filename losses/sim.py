"""SIM: Score Implicit Matching, one-step distillation through a general score divergence.

* "One-Step Diffusion Distillation through Score Implicit Matching", Luo, Huang, Geng, Kolter, Qi 2024,
  arXiv:2410.16794 (SIM).

SIM (§3.1) minimises ``int w(t) E_{x_t ~ pi_t} d(s_p(x_t) - s_q(x_t)) dt`` between the teacher's noised distribution
``p_t`` and the generator's ``q_t``, for a distance ``d``. Its score-divergence gradient theorem (Theorem 3.1, §3.2),
with ``pi_t = q_{sg[theta],t}``, gives the gradient as that of the tractable surrogate

    L_SIM = E_{z, n} [ -d'(y_t)^T (s_{q_sg}(x_t) - grad_{x_t} log q_t(x_t | x_0)) ],   y_t = s_{q_sg}(x_t) - s_p(x_t),

``x_0 = G(z)``, ``x_t = x_0 + sigma n``, in which the generator's intractable score is the online fake score (§3.2)
and the gradient reaches ``G`` through ``x_0`` and ``x_t``: into both networks (parameters frozen), into ``d'(y_t)``
and into the conditional score. In x0 units (docs/methods.md §0.3) ``s_q - grad log q(x_t|x_0) = (D_fake - x_0) /
sigma^2``; measuring the score difference in x0 units too, ``Delta = sigma^2 y_t = D_fake - D_real`` (``d`` applied
to ``Delta``, unit weight in these units: SIM's ``w(t)`` in score units is ``sigma^4`` for ``l2``), the per-sample
loss is ``l = -d'(Delta)^T (D_fake(x_t) - x_0)``, the gradient of ``E d(D_q(x_t) - D_p(x_t))`` at every ``sigma``:

* ``l2``: ``d = ||Delta||^2``, ``d' = 2 Delta``: SiD's fused loss at ``alpha = 1`` without its weight (SIM §3.3);
* ``pseudo_huber`` (SIM §3.3, the paper's choice): ``d = sqrt(||Delta||^2 + c^2) - c``,
  ``d' = Delta / sqrt(||Delta||^2 + c^2)``: a per-sample unit direction, robust to the score gap's scale.

Phases: ``critic`` fits the fake score by DSM on detached generator samples; ``student`` minimises ``mean_B l``
(1:1 alternation by default; Adam beta1 = 0 in the configs). The sample gradient ``dl/dx_0`` is formed row by row,
rows with a NaN/Inf are zeroed and reported as ``NONFINITE_ROWS``, and it is injected into the generator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.registry import ConfigError

from . import parts, register_loss
from .base import NONFINITE_ROWS, Batch, DistillLoss, StepContext
from .parts import regression as reg
from .parts.score_implicit import distance_grad, sim_rows, sum_dims

__all__ = ["SIM", "DISTANCES", "distance_grad", "sim_rows"]

DISTANCES = parts.SIM_DISTANCES


@register_loss("sim")
class SIM(reg.RegressionWarmStart, DistillLoss):
    """Score Implicit Matching, phases ``("critic", "student")``.

    Args:
        distance: ``"pseudo_huber"`` (SIM's choice) or ``"l2"``.
        huber_c: the pseudo-Huber ``c``, in x0 units of the whole sample's score gap ``||D_fake - D_real||``.
        guidance: the teacher's classifier-free guidance weight (needs a conditional teacher).
        critic_updates: fake-score updates per generator update (1: SIM's / SiD's alternation).
        sim_sigma, fake_sigma: noise densities of the generator loss and of the fake score's DSM
            (:class:`losses.parts.SigmaSampler`); ``t_min, t_max, num_levels``: the grid's index range (default:
            SiD's ``t ~ U[0, 800/1000]`` counted from ``sigma_min``, i.e. fraction ``[0.2, 1.0]`` from ``sigma_max``).
        p_mean, p_std: the log-normal density's parameters.
        fake_init, fake_hidden, fake_depth: :func:`losses.parts.build_fake_score` (``"residual"`` for exact teachers).
        fake_lora: a LoRA spec (``students.lora``) for a ``"teacher"`` fake: a LoRA critic on the shared, frozen
            teacher network (:func:`losses.parts.build_fake_score`); ``None``: a full trainable copy.
        regression_steps, regression_pairs, regression_nfe, regression_weight, fake_warmup: DMD2's warm start
            (:class:`losses.parts.regression.RegressionWarmStart`; not in SIM, off by default).
    """

    phases = ("critic", "student")
    ema_phases = ("student",)
    student_kind = "generator"

    def __init__(self, distance: str = "pseudo_huber", huber_c: float = 1e-3, guidance: float = 1.0,
                 critic_updates: int = 1, sim_sigma: str = "grid", fake_sigma: str = "grid", t_min: float = 0.2,
                 t_max: float = 1.0, num_levels: int = 1000, p_mean: float = -1.2, p_std: float = 1.2,
                 fake_init: str = "teacher", fake_hidden: int = 256, fake_depth: int = 4,
                 fake_lora: dict[str, Any] | None = None, regression_steps: int = 0,
                 regression_pairs: int = 10_000, regression_nfe: int = 35, regression_weight: float = 0.0,
                 fake_warmup: int = 0) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ConfigError(f"sim: unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if not huber_c > 0 or guidance < 0:
            raise ConfigError(f"sim: need huber_c > 0 and guidance >= 0, got {huber_c}, {guidance}")
        if int(critic_updates) != critic_updates or critic_updates < 1:
            raise ConfigError(f"sim: critic_updates must be an integer >= 1, got {critic_updates!r}")
        parts.check_sigma_config("sim", {"sim_sigma": sim_sigma, "fake_sigma": fake_sigma}, t_min, t_max, num_levels,
                                 p_std)
        self.fake_lora = parts.check_fake_config("sim", fake_init, fake_hidden, fake_depth, fake_lora)
        self.init_regression("sim", regression_steps, regression_pairs, regression_nfe, regression_weight, fake_warmup,
                             guidance)
        self.distance, self.huber_c, self.guidance = distance, float(huber_c), float(guidance)
        self.critic_updates, self.sim_sigma, self.fake_sigma = int(critic_updates), sim_sigma, fake_sigma
        self.sigma_kw = dict(num_levels=int(num_levels), t_min=float(t_min), t_max=float(t_max), p_mean=float(p_mean),
                             p_std=float(p_std))
        self.fake_init, self.fake_hidden, self.fake_depth = fake_init, int(fake_hidden), int(fake_depth)
        self.fake: nn.Module | None = None  # trained in the critic phase: the only parameter group of the loss

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"num_levels": 50}

    def update_every(self) -> dict[str, int]:
        return {"critic": 1, "student": self.critic_updates}

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Build the fake score on ``ctx.device`` and the two noise-level samplers."""
        if self.guidance != 1.0 and not getattr(teacher, "conditional", getattr(teacher, "num_classes", None)):
            raise ConfigError(f"sim: guidance={self.guidance} needs a conditional (class or text) teacher")
        self.fake = parts.build_fake_score(self.fake_init, teacher, ctx.device, ctx.dtype, hidden=self.fake_hidden,
                                           depth=self.fake_depth,
                                           lora=self.fake_lora, guidance=self.guidance, owner="sim")
        lo, hi = teacher.sigma_min, teacher.sigma_max
        self._sim_sigma = parts.SigmaSampler(self.sim_sigma, lo, hi, **self.sigma_kw)
        self._fake_sigma = parts.SigmaSampler(self.fake_sigma, lo, hi, **self.sigma_kw)

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if self.fake is None:
            raise RuntimeError("sim: call setup(student, teacher, ctx) before the first step")
        if phase not in self.phases:
            raise ValueError(f"sim: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")

        def generate() -> Tensor:  # one-step G(sigma_max z), z drawn through the batch
            return parts.generator_rollout(student, batch, ctx, [float(teacher.sigma_max)], teacher.data_shape,
                                           batch.labels)

        if phase == "critic":
            with torch.no_grad():  # the fake score learns the generator's current distribution (SIM §3.2)
                x = generate()
            sigma = self._fake_sigma(batch, x)
            dsm = parts.fake_dsm_loss(self.fake, x, sigma, batch.randn_like(x), batch.labels, teacher.sigma_data)
            return {"loss": dsm.mean(), "dsm": dsm.mean().detach()}
        warm = self.regression_step(student, batch, ctx, teacher.sigma_max)
        if warm is not None:
            return warm
        out = self._student(generate(), teacher, batch)
        out["loss"] = out["loss"] + self.regression_term(student, batch, ctx, teacher.sigma_max, out)
        return out

    def sample_grad(self, x0: Tensor, teacher: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """SIM's per-sample loss and its gradient with respect to the sample, ``(rows [B], g [B, ...], bad [B],
        gap [B])``, from ``x0: [B, ...]`` (detached): :func:`losses.parts.sim_sample_grad` at a level drawn from
        ``sim_sigma``; rows with a NaN/Inf are zeroed in all four and flagged."""
        sigma = self._sim_sigma(batch, x0)
        return parts.sim_sample_grad(x0, sigma, batch.randn_like(x0), teacher, self.fake, batch.labels,
                                     self.guidance, self.distance, self.huber_c)

    def _student(self, x: Tensor, teacher: nn.Module, batch: Batch) -> dict[str, Tensor]:
        rows, g, bad, gap = self.sample_grad(x, teacher, batch)
        # value: SIM's surrogate (bad rows zeroed); gradient w.r.t. the generator: g / B, i.e. that of mean_B l
        loss = rows.mean() + sum_dims((x - x.detach()) * g).mean()
        return {"loss": loss, "sim_loss": rows.mean(), "score_gap": gap.mean(),
                "sample_grad_norm": sum_dims(g**2).sqrt().mean(), "sample_mean": x.detach().mean(),
                "sample_std": x.detach().std(), NONFINITE_ROWS: bad.sum()}
