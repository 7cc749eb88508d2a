"""Consistency training / tuning from data, no teacher network in the loss: iCT and ECT. docs/methods.md §2.2.

* **iCT** — "Improved Techniques for Training Consistency Models", Song & Dhariwal 2023, arXiv:2310.14189.
* **ECT** — "Consistency Models Made Easy" (Easy Consistency Tuning), Geng et al. 2024, arXiv:2406.14548.

Both compare the student's consistency function ``f = student.denoise = J(., s, 0)`` (boundary ``f(x, sigma_min) = x``
built in by the consistency student's ``c_skip / c_out``) at two noise levels of the *same* forward-noising path

    x_hi = x0 + s_hi z,   x_lo = x0 + s_lo z        (the same z at both levels),
    L    = w(s_hi, s_lo) d( f_theta(x_hi, s_hi), sg f_theta(x_lo, s_lo) ),
    d(a, b) = sqrt(|a - b|^2 + c^2) - c             (pseudo-Huber on the full squared norm; c = 0: the L2 norm),
    w = 1 / (s_hi - s_lo).

The target is the *current* weights under ``torch.no_grad()`` (iCT §3.2: mu = 0, no EMA target; ECT likewise). Why
the same z works without a teacher: for an ``f`` that is affine in ``x`` the expected target given ``x_hi`` is
``f(E[x_lo | x_hi], s_lo)`` and ``E[x0 + s_lo z | x_hi] = x_hi - (s_hi - s_lo)(x_hi - D*(x_hi, s_hi)) / s_hi`` is
exactly one Euler step of the PF-ODE with the true denoiser (CM arXiv:2303.01469 Thm. 2: CT = CD with the exact
score up to ``O(Delta s)``). ``tests/test_ct.py`` checks that the loss's gradient vanishes at the exact Gaussian
consistency map for this reason. Both passes run under :func:`losses.parts.jvp.same_randomness` with one seed drawn
per step from the batch, so a network with dropout sees the same mask in both (ECT's "shared dropout mask"; done for
iCT too).

**iCT** (``mode: ict``; arXiv:2310.14189 §3.3-3.5, Alg. in App.):

* levels: the Karras rho-grid (EDM arXiv:2206.00364 eq. 5) of ``N(k)`` levels on ``[sigma_min, sigma_max]``, in the
  paper's ascending notation ``sigma_1 = sigma_min < ... < sigma_N = sigma_max``;
* curriculum (§3.4, eq. 8): ``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2 floor(s1 / s0) + 1))``,
  ``K`` = ``ctx.total``, ``k`` = ``ctx.iteration``; s0 = 10, s1 = 1280 (10 -> 1280 doubles 7 times: 8 stages);
* index (§3.5, eq. 9): ``p(i) ∝ erf((log sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((log sigma_i - P_mean) /
  (sqrt2 P_std))``, ``i`` in ``{1 .. N-1}``, P_mean -1.1, P_std 2.0: the log-normal mass of each interval;
* ``s_hi = sigma_{i+1}``, ``s_lo = sigma_i``; ``c = 0.00054 sqrt(dim)`` (§3.3; ``huber_c: auto``), weight
  ``lambda = 1 / (sigma_{i+1} - sigma_i)`` (§3.5).
* Not done here: iCT's larger dropout and smaller Fourier scale (architecture; this project's MLP has no dropout).

**ECT** (``mode: ect``; arXiv:2406.14548 §3, the mapping function and loss of the official release):

* ``t ~ LogNormal(P_mean, P_std)`` (-1.1, 2.0), clipped to ``[sigma_min, sigma_max]`` (ECT does not clip; the
  consistency student is defined on that range only);
* ``r = t (1 - q^-(stage + 1) (1 + kk sigmoid(-b t)))``, ``q = 2, kk = 8, b = 1`` (:func:`ect_r`), then ``r >= 0`` and
  ``r <= max_ratio t`` (0.999, FastGen's cap; ECT's own code does not cap);
  ``stage = floor(k / stage_iters)``, ``stage_iters = ceil(total / stages)`` (8 stages by default) or explicit. The
  paper writes ``Delta t = t / q^a n(t)`` with ``n(t) = 1 + kk sigmoid(-b t)`` and ``a`` a tick counter; the official
  code uses the exponent ``stage + 1``, which we follow: at stage 0 ``r = 0`` for ``t <= ln 7 = 1.95`` (the loss is
  pure denoising there) and ``r -> t/2`` at large ``t``. ECT counts stages in training ticks (``--double``), we in
  iterations;
* target: ``D(x0 + r eps, r)`` under no_grad with the same weights; where ``r < sigma_min`` (below the student's
  boundary, where ``f`` is not defined) the target is the clean ``x0`` (ECT: where ``r = 0``), so the loss there is
  denoising;
* loss: ``(sqrt(|D_t - D_r|^2 + c^2) - c) / (t - r)``, ``c = 0`` by default (ECT's "adaptive weighting p = 1/2" through
  the pseudo-Huber form; the plain L2 norm at c = 0). ECT's later EDM2/ImageNet release replaces ``1/(t - r)`` by
  ``(t^2 + sigma_d^2)/(t sigma_d)^2``; not done here.

Departures common to both: the norm at ``c = 0`` is ``sqrt(max(|a - b|^2, tiny))`` so its gradient is 0, not NaN, at a
zero residual. No directional derivative is taken, so the loss has no ``jvp`` option.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError
from distill.core.schedules import karras_sigmas
from students.sampling import SamplingPlan

from . import register_loss
from .base import Batch, DistillLoss, StepContext
from .parts.functional import ict_huber_c, pseudo_huber
from .parts.jvp import same_randomness

__all__ = ["ConsistencyTraining", "ect_r", "ect_stage", "ict_num_levels", "ict_sigmas", "ict_index_probs", "MODES"]

MODES = ("ict", "ect")


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def ict_num_levels(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation curriculum (arXiv:2310.14189 eq. 8): ``N(k) = min(s0 2^floor(k/K'), s1) + 1`` with
    ``K' = floor(K / (log2 floor(s1/s0) + 1))`` (at least 1), ``K = total``."""
    k_prime = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return int(min(s0 * 2 ** (int(k) // k_prime), s1) + 1)


def ict_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The Karras grid of ``n`` levels, **ascending**, float64, with its ends exactly ``sigma_min`` and ``sigma_max``
    (``(sigma_min^(1/rho))^rho`` rounds below ``sigma_min``: iCT's lowest target must sit on the student's boundary)."""
    grid = karras_sigmas(n, sigma_min, sigma_max, rho, append_zero=False).flip(0)
    grid[0], grid[-1] = sigma_min, sigma_max
    return grid


def ict_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's index distribution (arXiv:2310.14189 eq. 9) over the ``n - 1`` intervals of an ascending grid:
    ``p(i) ∝ erf((log sigma_{i+1} - P_mean)/(sqrt2 P_std)) - erf((log sigma_i - P_mean)/(sqrt2 P_std))``, i.e. the mass
    of ``log sigma ~ N(P_mean, P_std^2)`` on ``[log sigma_i, log sigma_{i+1}]``, normalised. Returns ``[n - 1]``."""
    e = torch.erf((sigmas.to(torch.float64).log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = e[1:] - e[:-1]
    return mass / mass.sum()


def ect_stage(k: int, total: int, stages: int | None = 8, stage_iters: int | None = None) -> int:
    """ECT's stage at iteration ``k``: ``floor(k / stage_iters)``, ``stage_iters`` explicit or
    ``ceil(total / stages)``."""
    every = int(stage_iters) if stage_iters is not None else max(1, math.ceil(total / int(stages)))
    return int(k) // every


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0, max_ratio: float = 0.999) -> Tensor:
    """ECT's mapping ``t -> r`` (arXiv:2406.14548 §3, official code's exponent ``stage + 1``):
    ``r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))``, clamped to ``[0, max_ratio t]``. Args/returns ``[B]``."""
    decay = float(q) ** -(int(stage) + 1)
    r = t * (1.0 - decay * (1.0 + k * torch.sigmoid(-b * t)))
    return torch.minimum(r.clamp_min(0.0), max_ratio * t)


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


@register_loss("ct")
class ConsistencyTraining(DistillLoss):
    """iCT / ECT consistency training from real data (no teacher call in the loss; see the module docstring).

    Args:
        mode: ``"ict"`` (discrete Karras grid with iCT's curriculum) or ``"ect"`` (continuous ``t``, ECT's ``r(t)``).
        sigma_min, sigma_max: the range; ``None`` takes the teacher's (the student's boundary is ``sigma_min``).
        p_mean, p_std: the log-normal of the noise level (iCT's index weights / ECT's ``t``).
        huber_c: pseudo-Huber ``c``: a number ``>= 0`` or ``"auto"`` (``0.00054 sqrt(dim)``); ``None`` is the mode's
            default (ict: auto, ect: 0).
        rho, s0, s1: iCT's grid exponent and curriculum ends.
        q, kk, b: ECT's mapping function (``kk`` is the paper's ``k``).
        stages: ECT stages over the run (``stage_iters = ceil(total / stages)``), unless ``stage_iters`` is given.
        max_ratio: the cap ``r <= max_ratio t`` (ECT).
    """

    phases = ("student",)
    student_kind = "consistency"
    needs_data = True

    def __init__(
        self,
        mode: str = "ect",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        huber_c: float | str | None = None,
        rho: float = 7.0,
        s0: int = 10,
        s1: int = 1280,
        q: float = 2.0,
        kk: float = 8.0,
        b: float = 1.0,
        stages: int = 8,
        stage_iters: int | None = None,
        max_ratio: float = 0.999,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"ct: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if huber_c is not None and huber_c != "auto" and (isinstance(huber_c, str) or float(huber_c) < 0):
            raise ConfigError(f"ct: huber_c must be a number >= 0, 'auto' (0.00054 sqrt(dim)) or null, got {huber_c!r}")
        if sigma_min is not None and sigma_max is not None and not 0 < sigma_min < sigma_max:
            raise ConfigError(f"ct: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not p_std > 0:
            raise ConfigError(f"ct: p_std must be > 0, got {p_std}")
        if int(s0) != s0 or int(s1) != s1 or not 1 <= s0 <= s1:
            raise ConfigError(f"ct: need integers 1 <= s0 <= s1, got s0={s0}, s1={s1}")
        if not q > 1:
            raise ConfigError(f"ct: q must be > 1 (r -> t as stages grow), got {q}")
        if kk < 0 or b < 0:
            raise ConfigError(f"ct: kk and b must be >= 0, got kk={kk}, b={b}")
        if int(stages) != stages or stages < 1:
            raise ConfigError(f"ct: stages must be an integer >= 1, got {stages}")
        if stage_iters is not None and (int(stage_iters) != stage_iters or stage_iters < 1):
            raise ConfigError(f"ct: stage_iters must be an integer >= 1 or null, got {stage_iters}")
        if not 0 < max_ratio < 1:
            raise ConfigError(f"ct: max_ratio must lie in (0, 1), got {max_ratio}")
        self.mode = mode
        self.sigma_min_cfg, self.sigma_max_cfg = sigma_min, sigma_max
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.huber_c_cfg = ("auto" if mode == "ict" else 0.0) if huber_c is None else huber_c
        self.rho, self.s0, self.s1 = float(rho), int(s0), int(s1)
        self.q, self.kk, self.b = float(q), float(kk), float(b)
        self.stages = int(stages)
        self.stage_iters = None if stage_iters is None else int(stage_iters)
        self.max_ratio = float(max_ratio)
        self.sigma_min: float | None = None
        self.sigma_max: float | None = None

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"mode": "ect", "stage_iters": 2}

    def sampling(self) -> SamplingPlan:
        # Multistep consistency sampling (CM arXiv:2303.01469 Alg. 1): jump to 0, re-noise to the next level.
        return SamplingPlan(gamma=1.0)

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        lo = self.sigma_min_cfg if self.sigma_min_cfg is not None else teacher.sigma_min
        hi = self.sigma_max_cfg if self.sigma_max_cfg is not None else teacher.sigma_max
        if not 0 < lo < hi:
            raise ConfigError(f"ct: need 0 < sigma_min < sigma_max, got {lo}, {hi}")
        boundary = getattr(student, "sigma_min", None)
        if boundary is not None and lo < boundary * (1 - 1e-9):
            raise ConfigError(f"ct: sigma_min {lo} lies below the student's boundary {boundary}; "
                              "use sigma_min >= the student's sigma_min (or null)")
        self.sigma_min, self.sigma_max = float(lo), float(hi)

    # -- pieces of one step ----------------------------------------------------------------------------------
    def huber_c(self, dim: int) -> float:
        return ict_huber_c(dim) if self.huber_c_cfg == "auto" else float(self.huber_c_cfg)

    def _check_setup(self) -> None:
        if self.sigma_min is None:
            raise RuntimeError("ct: call setup(student, teacher, ctx) before the loss")

    def num_levels(self, ctx: StepContext) -> int:
        """iCT's ``N(k)`` at this step."""
        return ict_num_levels(ctx.iteration, ctx.total, self.s0, self.s1)

    def stage(self, ctx: StepContext) -> int:
        """ECT's stage at this step."""
        return ect_stage(ctx.iteration, ctx.total, self.stages, self.stage_iters)

    def levels(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``(s_hi, s_lo)``, each ``[B]`` float64, from one batch draw: iCT ``(sigma_{i+1}, sigma_i)`` with ``i`` from
        eq. 9's distribution (inverse CDF of a uniform); ECT ``(t, r(t))`` (``r`` may be ``< sigma_min``)."""
        self._check_setup()
        if self.mode == "ict":
            grid = ict_sigmas(self.num_levels(ctx), self.sigma_min, self.sigma_max, self.rho).to(batch.device)
            cdf = ict_index_probs(grid, self.p_mean, self.p_std).cumsum(0)
            u = batch.rand(dtype=torch.float64)
            i = torch.searchsorted(cdf, u, right=True).clamp(max=len(grid) - 2)
            return grid[i + 1], grid[i]
        n = batch.randn(dtype=torch.float64)
        t = (self.p_mean + self.p_std * n).exp().clamp(self.sigma_min, self.sigma_max)
        return t, ect_r(t, self.stage(ctx), self.q, self.kk, self.b, self.max_ratio)

    def pair(self, student: nn.Module, x0: Tensor, z: Tensor, s_hi: Tensor, s_lo: Tensor, seed: int,
             cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(f_theta(x0 + s_hi z, s_hi), sg f_theta(x0 + s_lo z, s_lo))``; where ``s_lo < sigma_min`` the target is
        ``x0``. Both passes draw dropout from one RNG state (``seed``). Args: ``x0, z: [B, ...]``, levels ``[B]``."""
        lo_ok = s_lo >= self.sigma_min
        s_hi_, s_lo_ = s_hi.to(x0.dtype), s_lo.clamp_min(self.sigma_min).to(x0.dtype)
        with same_randomness(seed):
            pred = student.denoise(x0 + append_dims(s_hi_, x0.ndim) * z, s_hi_, cond)
        if bool(lo_ok.any()):
            with torch.no_grad(), same_randomness(seed):
                f_lo = student.denoise(x0 + append_dims(s_lo_, x0.ndim) * z, s_lo_, cond)
            target = torch.where(append_dims(lo_ok.to(x0.device), x0.ndim), f_lo, x0)
        else:
            target = x0
        return pred, target.detach()

    # -- one phase -------------------------------------------------------------------------------------------
    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase != "student":
            raise ValueError(f"ct has one phase, 'student'; got {phase!r}")
        if batch.data is None:
            raise ValueError("ct trains from real data: it needs batch.data (data spec 'real')")
        x0 = batch.data
        s_hi, s_lo = self.levels(batch, ctx)
        z = batch.randn_like(x0)
        seed = batch.draw_seed()  # one dropout stream per step, shared by both passes
        pred, target = self.pair(student, x0, z, s_hi, s_lo, seed, batch.labels)
        dist = pseudo_huber(pred, target, self.huber_c(x0[0].numel()))
        weight = (1.0 / (s_hi - s_lo)).to(dist.dtype)
        out = {"loss": (weight * dist).mean(), "distance": dist.detach().mean(), "weight": weight.mean()}
        if self.mode == "ict":
            out["num_levels"] = torch.tensor(float(self.num_levels(ctx)))
        else:
            out["stage"] = torch.tensor(float(self.stage(ctx)))
            out["dt_ratio"] = ((s_hi - s_lo) / s_hi).mean().to(dist.dtype)
            out["denoise_frac"] = (s_lo < self.sigma_min).to(dist.dtype).mean()
        return out
