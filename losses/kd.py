"""Knowledge distillation onto cached teacher ODE couplings.

* "Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed", Luhman & Luhman 2021,
  arXiv:2101.02388 (a one-step student regresses the deterministic DDIM teacher's map noise -> sample);
* DMD v1's regression term, Yin et al. 2023, arXiv:2311.18828 §3.3 eq. 9 (the same regression, with LPIPS, on
  pre-computed teacher ODE pairs; docs/methods.md §2.5, and §2.10 for reflow's k-step distillation on fixed pairs).

The run's teacher-pair cache (data spec ``"pairs"``, source ``teacher_pairs``: ``z ~ N(0, I)`` and ``ODE(z)``, the
teacher's Heun solve from ``sigma_max z`` to 0) gives fixed couplings; the student is trained by pure regression:

    k = 1:  L = mean_B d( J(sigma_in z, sigma_in, 0), ODE(z) )
    k > 1:  L = mean_B d( x_k, ODE(z) ),  x_0 = sigma_0 z,  x_{i+1} = J(x_i, sigma_i, sigma_{i+1}),  sigma_k = 0,

the chain being the student's deterministic ``k``-NFE sampler (CTM gamma-sampling at gamma = 0, i.e. DDIM jumps for a
generator student), unrolled *with* gradient through all ``k`` jumps. Its levels are those of :meth:`KD.sampling` at
``k`` NFE (``sigma_0 = input_sigma``, then Karras-spaced down to ``floor``, or explicit ``levels``), so evaluation
samples the student exactly as it was trained. ``d`` (per sample):

* ``l2``: mean over dimensions of the squared difference (DMD's eq. 9 with L2 instead of LPIPS, as
  :func:`losses.parts.regression.pair_regression`);
* ``pseudo_huber``: ``sqrt(||a - b||^2 + c^2) - c`` over the full vector (iCT, arXiv:2310.14189 §3.3), with iCT's
  ``c = 0.00054 sqrt(dim)`` when ``huber_c`` is null;
* ``features``: mean squared difference of the shipped digits classifier's 64-d penultimate ReLU features
  (``distill/features.py``), an LPIPS-like perceptual distance for 8x8 digits teachers only. Departures from LPIPS:
  one layer, no per-channel unit normalisation or learned weights, and no clamping of the inputs to ``[-1, 1]`` (it
  would cut the gradient). Note that the digits FID is computed in this same feature space.

Departures: Luhman & Luhman train a one-step student on DDIM pairs; ``k > 1`` follows reflow/InstaFlow's k-step
distillation on fixed pairs with back-propagation through the unrolled chain (there is no per-step target).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.registry import ConfigError
from distill.core.schedules import karras_sigmas
from students.sampling import SamplingPlan, sample_student

from . import register_loss
from .base import Batch, DataSpec, DistillLoss, StepContext
from .parts.functional import ict_huber_c, mean_dims, pseudo_huber
from .parts.regression import pairs_spec

__all__ = ["KD", "kd_distance", "digits_features", "DISTANCES"]

DISTANCES = ("l2", "pseudo_huber", "features")
DIGITS_SHAPE = (1, 8, 8)


def kd_distance(a: Tensor, b: Tensor, distance: str, c: float = 0.0, features: Callable[[Tensor], Tensor] | None = None
                ) -> Tensor:
    """Per-sample distance ``[B]`` between ``a, b: [B, ...]`` (``c``: pseudo-Huber's constant; ``features``: a
    network ``[B, ...] -> [B, F]`` for ``"features"``)."""
    if distance == "l2":
        return mean_dims((a - b) ** 2)
    if distance == "pseudo_huber":
        return pseudo_huber(a, b, c)
    if distance == "features":
        return mean_dims((features(a) - features(b)) ** 2)
    raise ValueError(f"kd: unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")


def digits_features(device: torch.device, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """The shipped digits classifier's penultimate features as a frozen, differentiable map ``[B,1,8,8] -> [B,64]``."""
    from distill.core.digits_classifier import load_digits_classifier

    return load_digits_classifier()[0].to(device, dtype).features


@register_loss("kd")
class KD(DistillLoss):
    """Regression of the student's ``k``-step deterministic chain onto cached teacher ODE pairs, one phase.

    Args:
        steps: student steps ``k`` (NFE of the trained sampler), an integer >= 1.
        distance: ``"l2"``, ``"pseudo_huber"`` or ``"features"`` (digits teachers only).
        huber_c: pseudo-Huber's ``c`` (null: iCT's ``0.00054 sqrt(dim)``).
        pairs: number of cached teacher pairs.
        pair_nfe: teacher Heun NFE per pair (odd: Heun's ``2N - 1``; 35 is EDM's reference solve).
        guidance: the teacher's guidance weight for the pairs (1: none).
        input_sigma: the chain's first level ``sigma_0`` (null: the student's ``sigma_max``; the pairs always start
            the teacher at its ``sigma_max``: only the scale of the student's input differs).
        floor: the last nonzero level of the Karras-spaced chain for ``k > 1`` (the sampler plan's ``floor``).
        levels: explicit ``k`` strictly descending levels instead (the first one is ``sigma_0``).
    """

    phases = ("student",)
    ema_phases = ("student",)
    student_kind = "generator"

    def __init__(self, steps: int = 1, distance: str = "l2", huber_c: float | None = None, pairs: int = 10_000,
                 pair_nfe: int = 35, guidance: float = 1.0, input_sigma: float | None = None, floor: float = 0.4,
                 levels: Sequence[float] | None = None) -> None:
        super().__init__()
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ConfigError(f"kd: steps must be an integer >= 1 (student NFE), got {steps!r}")
        if distance not in DISTANCES:
            raise ConfigError(f"kd: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        if huber_c is not None and not huber_c > 0:
            raise ConfigError(f"kd: huber_c must be > 0 (or null for iCT's 0.00054 sqrt(dim)), got {huber_c}")
        if int(pairs) != pairs or pairs < 1:
            raise ConfigError(f"kd: pairs must be an integer >= 1, got {pairs!r}")
        if int(pair_nfe) != pair_nfe or pair_nfe < 3 or pair_nfe % 2 == 0:
            raise ConfigError(f"kd: pair_nfe must be an odd integer >= 3 (Heun: 2N - 1), got {pair_nfe!r}")
        if input_sigma is not None and not input_sigma > 0:
            raise ConfigError(f"kd: input_sigma must be > 0 (or null for the student's sigma_max), got {input_sigma}")
        if not floor > 0:
            raise ConfigError(f"kd: floor must be > 0, got {floor}")
        if levels is not None:
            lv = [float(s) for s in levels]
            if len(lv) != steps or any(s <= 0 for s in lv) or any(a <= b for a, b in zip(lv, lv[1:])):
                raise ConfigError(f"kd: levels must list steps={steps} strictly descending positive noise levels "
                                  f"(e.g. [80, 0.4] for 2 steps), got {list(levels)}")
            if input_sigma is not None and lv[0] != float(input_sigma):
                raise ConfigError(f"kd: levels[0] = {lv[0]} is the input level; it contradicts input_sigma = "
                                  f"{input_sigma} (set one of them)")
        self.steps, self.distance, self.pairs, self.pair_nfe = int(steps), distance, int(pairs), int(pair_nfe)
        self.huber_c = None if huber_c is None else float(huber_c)
        self.guidance, self.floor = float(guidance), float(floor)
        self.input_sigma = None if input_sigma is None else float(input_sigma)
        self.levels = None if levels is None else tuple(float(s) for s in levels)
        self._sigmas: Tensor | None = None
        self._c = 0.0
        self.__dict__["_features"] = None  # frozen classifier: not a submodule (no checkpoint state, no optimizer)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Two unrolled steps on the features distance (the contract test's teacher is 8x8), few cheap pairs."""
        return {"steps": 2, "distance": "features", "pairs": 16, "pair_nfe": 3}

    def data_specs(self) -> dict[str, DataSpec]:
        """Noise (labels only, for a class-conditional teacher) sets the batch; ``"pairs"`` are the couplings."""
        return {"data": DataSpec("noise"), "pairs": pairs_spec(self.pairs, self.pair_nfe, self.guidance)}

    def sampling(self) -> SamplingPlan:
        """The training chain as the sampling plan: gamma 0 and, at ``steps`` NFE, the training levels."""
        if self.levels is not None:
            return SamplingPlan(gamma=0.0, floor=self.floor, levels={self.steps: self.levels})
        if self.input_sigma is None:  # the default plan from the student's sigma_max is the training chain
            return SamplingPlan(gamma=0.0, floor=self.floor)
        if self.steps == 1:
            return SamplingPlan(gamma=0.0, floor=self.floor, levels={1: (self.input_sigma,)})
        grid = karras_sigmas(self.steps, sigma_min=self.floor, sigma_max=self.input_sigma)[:-1].tolist()
        return SamplingPlan(gamma=0.0, floor=self.floor, levels={self.steps: tuple(grid)})

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Fix the chain's levels from :meth:`sampling`, the pseudo-Huber constant and the feature network."""
        first = self.levels[0] if self.levels else (self.input_sigma or float(student.sigma_max))
        if self.steps > 1 and self.levels is None and not self.floor < first:
            raise ConfigError(f"kd: floor ({self.floor}) must lie below the input level ({first}) for steps > 1")
        self._sigmas = self.sampling().sigmas(self.steps, float(student.sigma_max))
        dim = math.prod(teacher.data_shape)
        self._c = self.huber_c if self.huber_c is not None else ict_huber_c(dim)
        if self.distance == "features":
            if tuple(teacher.data_shape) != DIGITS_SHAPE:
                raise ConfigError(f"kd: distance 'features' uses the digits classifier and needs an 8x8 digits "
                                  f"teacher (data shape {list(DIGITS_SHAPE)}), got {list(teacher.data_shape)}; "
                                  f"use l2 or pseudo_huber")
            self.__dict__["_features"] = digits_features(ctx.device, ctx.dtype)

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase != "student":
            raise ValueError(f"kd: unknown phase {phase!r}; valid phases: student")
        if self._sigmas is None:
            raise RuntimeError("kd: call setup(student, teacher, ctx) before the first step")
        if "pairs.z" not in batch.extras:
            raise ValueError("kd: needs teacher pairs in batch.extras ('pairs.z', 'pairs.x0')")
        z = batch.extras["pairs.z"].to(device=ctx.device, dtype=ctx.dtype)
        x0 = batch.extras["pairs.x0"].to(device=ctx.device, dtype=ctx.dtype)
        x = sample_student(student, z, self._sigmas, 0.0, batch.extras.get("pairs.labels"))  # graded, all k jumps
        loss = kd_distance(x, x0, self.distance, self._c, self._features).mean()
        xd = x.detach()
        return {"loss": loss, "kd": loss.detach(), "mse": mean_dims((xd - x0) ** 2).mean(),
                "sample_mean": xd.mean(), "sample_std": xd.std()}
