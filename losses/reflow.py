"""k-Rectified flow (reflow) and its distillation — Liu, Gong & Liu 2022, "Flow Straight and Fast", arXiv:2209.03003
(§2: the flow-matching objective ``min_v int E||(X1 - X0) - v(X_t, t)||^2 dt``, the reflow procedure (Alg. 1) and
its distillation, and the straightness measure ``S(Z)`` of the straightening analysis); InstaFlow, Liu et al. 2023,
arXiv:2309.06380 (teacher ODE pairs with guidance -> 2-RF -> one-step distillation). Algorithm card:
../shared/methods.md §2.10. Paper time runs noise (0) -> data (1); here ``tau`` runs data (0) -> noise (1), as the
project's flow family (``distill.core.conversions``), so the paper's ``x1 - x0`` is ``-(n - x1)`` below.

**Flow <-> VE.** The straight path between noise ``n`` and data ``x1`` in flow time ``tau`` (``tau = 1`` noise) is
``x_tau = (1 - tau) x1 + tau n``, velocity ``dx_tau/dtau = n - x1``. Dividing by ``1 - tau`` gives the project's VE
point ``x = x_tau / (1 - tau) = x1 + sigma n`` at ``sigma = tau / (1 - tau)`` (``tau = sigma / (1 + sigma)``,
``1 - tau = 1 / (1 + sigma)``). With ``D(x, sigma) = E[x1 | x]`` and ``E[n | x] = (x - D) / sigma``, the marginal
flow velocity is

    v(x_tau, tau) = E[n - x1 | x_tau] = (x - D)/sigma - D = (x - (1 + sigma) D)/sigma = (x_tau - D(x, sigma)) / tau

(``distill.core.conversions.x0_to_rf_velocity``); the VE probability-flow ODE ``dx/dsigma = (x - D)/sigma`` is
this flow ODE in other coordinates; one VE Euler/DDIM step ``J(x, s, t) = (t/s) x + (1 - t/s) D`` is exactly one
flow Euler step from ``tau(s)`` to ``tau(t)``. For a model ``D_theta`` on the straight path (``x = x1 + sigma n``):

    v_theta - (n - x1) = (x1 + sigma n - (1 + sigma) D_theta)/sigma - n + x1 = ((1 + sigma)/sigma) (x1 - D_theta),

so RF's loss ``E ||v_theta(x_tau, tau) - (n - x1)||^2`` is the denoiser regression
``E w(sigma) ||D_theta(x1 + sigma n, sigma) - x1||^2`` with ``w = ((1 + sigma)/sigma)^2 = 1/tau^2`` (norms here are
per-dimension means, as every loss of the project; ``tests/test_reflow.py`` checks the identity).

**Pairs and the noise end.** Samplers start at ``sigma_max z``, not at ``sigma = inf``: a pair ``(z, x1)`` is
``x1 = ODE(sigma_max z -> 0)``. The flow line through ``(tau_max, tau_max z)`` and ``(0, x1)`` has noise end
``n = z - x1 / sigma_max`` (VE: ``x(sigma) = sigma z + (1 - sigma/sigma_max) x1``, the jump line of ``J(sigma_max
z, sigma_max, .)``); ``n -> z`` as ``sigma_max -> inf``. Departure: ``tau ~ U[tau(sigma_min), tau(sigma_max)]``, the
student's noise range, not the paper's ``U[1e-3, 1 - 1e-3]``.

**Rounds** (``round_of``): rounds ``0..rounds-1`` are reflow rounds of ``round_iters`` iterations; round ``r`` trains
the ``(r + 2)``-RF on pairs of the ``(r + 1)``-RF (round 0: the teacher = 1-RF, from the run's teacher-pair cache;
round ``r >= 1``: a frozen copy of the student at the round's start, Heun ``pair_nfe`` from noise of a CPU generator
seeded by (run seed, round), generated in :meth:`on_round_start` and kept as loss **buffers**, so a checkpoint holds
them and a resume does not regenerate them). With ``distill_iters > 0`` a last round distils the last model into a
``distill_steps``-step generator: ``sigma`` on the k-grid (uniform in flow time from ``tau_max``; k = 1: ``sigma_max``)
and ``L = ||J(x(sigma), sigma, 0) - x1||^2`` (paper: LPIPS, t fixed at the noise end for k = 1; here L2). The
straightness ``S`` of each round's pair source (teacher, then each frozen model) is measured on its own ODE pairs from
fixed noise and logged as ``straightness``; each generation's cost is logged (``pair_seconds``,
``pair_network_evals``) and kept in :attr:`Reflow.pair_cost` (round 0's is the pair cache's ``meta.json``).
Departures: L2 rather than LPIPS; pairs of later rounds live in the checkpoint, not on disk (the loss contract gives
no run folder); a fresh student's round 0 learns the 2-RF from scratch instead of fine-tuning a trained 1-RF.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims, rf_to_ve, sigma_from_rf_t, x0_to_rf_velocity
from distill.core.pairs import teacher_ode_pairs
from distill.core.registry import ConfigError
from students.sampling import SamplingPlan

from . import register_loss
from .base import Batch, DataSpec, DistillLoss, StepContext
from .parts.regression import pairs_spec

__all__ = ["Reflow", "velocity_from_denoiser", "straightness", "flow_grid"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(x_tau [B, ...], tau [B]) -> [B, ...]


def velocity_from_denoiser(denoiser: Callable[..., Tensor], x_tau: Tensor, tau: Tensor, cond: Tensor | None = None
                           ) -> Tensor:
    """Flow velocity ``v = (x_tau - D(x_tau/(1 - tau), tau/(1 - tau)))/tau`` of a VE denoiser ``D(x, sigma[B], cond)``.
    Args: ``x_tau: [B, ...]`` flow coordinates, ``tau: [B]`` in ``(0, 1)``. Returns ``[B, ...]``."""
    return x0_to_rf_velocity(x_tau, tau, denoiser(rf_to_ve(x_tau, tau), sigma_from_rf_t(tau), cond))


def straightness(velocity_fn: VelocityFn, z: Tensor, x1: Tensor, n_t: int = 16, tau_min: float = 0.0,
                 tau_max: float = 1.0) -> Tensor:
    """The card's straightness ``S = mean_{tau, samples} ||(z - x1) - v(x_tau, tau)||^2`` (arXiv:2209.03003's
    ``S(Z)`` in this file's time direction), ``x_tau = (1 - tau) x1 + tau z``, on the ``n_t`` midpoints of
    ``[tau_min, tau_max]``; ``||.||^2`` sums over dimensions. 0 iff the flow moves every pair along its straight line
    at constant speed.
    Args: ``z, x1: [B, ...]`` (``z`` the noise end of the line). Returns a scalar."""
    total = z.new_zeros(())
    for i in range(n_t):
        tau = torch.full((z.shape[0],), tau_min + (i + 0.5) * (tau_max - tau_min) / n_t, dtype=z.dtype,
                         device=z.device)
        t = append_dims(tau, z.ndim)
        total = total + ((z - x1) - velocity_fn((1 - t) * x1 + t * z, tau)).pow(2).flatten(1).sum(1).mean()
    return total / n_t


def flow_grid(k: int, sigma_max: float) -> tuple[float, ...]:
    """``k`` levels uniform in flow time from ``tau_max = tau(sigma_max)`` (Euler with uniform steps, as RF samples):
    ``sigma_i = tau_i / (1 - tau_i)``, ``tau_i = tau_max (k - i)/k``; the first is ``sigma_max``."""
    tau_max = sigma_max / (1.0 + sigma_max)
    taus = [tau_max * (k - i) / k for i in range(k)]
    return (float(sigma_max), *(t / (1.0 - t) for t in taus[1:]))


def _int(owner: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < low:
        raise ConfigError(f"{owner}: {key} must be an integer >= {low}, got {value!r}")
    return int(value)


@register_loss("reflow")
class Reflow(DistillLoss):
    """Reflow rounds then optional k-step distillation (module docstring for the maths).

    Args:
        rounds: reflow rounds (0: distil the teacher's own flow directly); round 0 trains the 2-RF on teacher pairs.
        round_iters: iterations per reflow round.
        distill_iters: iterations of the final distillation round (0: none).
        distill_steps: steps k of the distilled student (its sampling grid is :func:`flow_grid`).
        pairs: pairs per round (the teacher-pair cache's ``n`` and each later round's buffer size).
        pair_nfe: network evaluations of each pair's Heun solve (odd, >= 3), teacher and frozen students alike.
        pair_batch: pairs generated per batch on the student's device.
        guidance: the teacher's classifier-free guidance for round 0's pairs (InstaFlow: 2-RF pairs with guidance).
        sigma_max: the teacher's ``sigma_max`` (the sampling plan is built before the teacher is seen).
        straightness_n, straightness_steps: fixed noise samples and tau midpoints of the logged straightness
            (``straightness_n = 0`` turns it off; it is then logged as -1).
    """

    phases = ("student",)
    student_kind = "generator"

    def __init__(self, rounds: int = 1, round_iters: int = 2000, distill_iters: int = 0, distill_steps: int = 1,
                 pairs: int = 10_000, pair_nfe: int = 35, pair_batch: int = 2048, guidance: float = 1.0,
                 sigma_max: float = 80.0, straightness_n: int = 256, straightness_steps: int = 16) -> None:
        super().__init__()
        self.rounds = _int("reflow", "rounds", rounds, 0)
        self.round_iters = _int("reflow", "round_iters", round_iters, 1)
        self.distill_iters = _int("reflow", "distill_iters", distill_iters, 0)
        if self.rounds == 0 and self.distill_iters == 0:
            raise ConfigError("reflow: nothing to train: set rounds >= 1 or distill_iters >= 1")
        self.distill_steps = _int("reflow", "distill_steps", distill_steps, 1)
        self.n_pairs = _int("reflow", "pairs", pairs, 1)
        self.pair_nfe = _int("reflow", "pair_nfe", pair_nfe, 3)
        if self.pair_nfe % 2 == 0:
            raise ConfigError(f"reflow: pair_nfe must be an odd integer >= 3 (Heun: 2N - 1), got {pair_nfe!r}")
        self.pair_batch = _int("reflow", "pair_batch", pair_batch, 1)
        self.straightness_n = _int("reflow", "straightness_n", straightness_n, 0)
        self.straightness_steps = _int("reflow", "straightness_steps", straightness_steps, 1)
        if not float(guidance) >= 0:
            raise ConfigError(f"reflow: guidance must be >= 0 (1 = none), got {guidance!r}")
        if not float(sigma_max) > 0:
            raise ConfigError(f"reflow: sigma_max must be > 0 (the teacher's), got {sigma_max!r}")
        self.guidance, self.sigma_max = float(guidance), float(sigma_max)
        self.num_rounds = self.rounds + (self.distill_iters > 0)
        self.generated_this_launch = 0  # pair sets this process generated (a resumed run restores them instead)
        self.pair_cost: dict[str, float] = {}  # the last generation: seconds and network evaluations

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"rounds": 2, "round_iters": 3, "distill_iters": 4, "pairs": 8, "pair_nfe": 3, "straightness_n": 4,
                "straightness_steps": 2}

    # -- schedule and data ------------------------------------------------------------------------------------
    def round_of(self, step: int) -> int:
        if step < self.rounds * self.round_iters:
            return step // self.round_iters
        return self.num_rounds - 1  # the distillation round, or the last reflow round continued

    def is_distill(self, r: int) -> bool:
        return self.distill_iters > 0 and r == self.rounds

    def data_specs(self) -> dict[str, DataSpec]:
        return {"data": DataSpec("noise"), "pairs": pairs_spec(self.n_pairs, self.pair_nfe, self.guidance)}

    def sampling(self) -> SamplingPlan:
        """Deterministic jumps (gamma 0) on :func:`flow_grid`: flow Euler with uniform steps, the distilled grid."""
        ks = sorted({*range(1, 17), self.distill_steps})
        return SamplingPlan(gamma=0.0, levels={k: flow_grid(k, self.sigma_max) for k in ks})

    # -- setup: buffers (checkpointed) and the teacher's straightness ----------------------------------------
    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        if getattr(teacher, "conditional", False) and not getattr(teacher, "num_classes", None):
            raise ConfigError("reflow keeps class labels with its pairs; text-conditional teachers are not supported "
                              "(use a data-free loss such as cd, dmd2, sid or sim)")
        if abs(teacher.sigma_max - self.sigma_max) > 1e-6 * self.sigma_max:
            raise ConfigError(f"reflow: sigma_max {self.sigma_max} must equal the teacher's ({teacher.sigma_max})")
        total = self.rounds * self.round_iters + self.distill_iters
        if ctx.total != total:
            warnings.warn(f"reflow: trainer.max_steps = {ctx.total} but the rounds take {total} iterations "
                          f"(rounds x round_iters + distill_iters)", stacklevel=2)
        self.sigma_min = float(student.sigma_min)
        dev, dt, shape = ctx.device, ctx.dtype, tuple(student.data_shape)
        m = self.n_pairs if self.num_rounds > 1 else 0  # only later rounds use the buffers
        self.conditional = bool(getattr(teacher, "num_classes", None))
        # System-seeded (fork of the run seed), so the same on every launch and every process.
        self.register_buffer("noise_seed", torch.randint(2**62, (), dtype=torch.long, device=dev))
        self.register_buffer("pair_z", torch.zeros((m, *shape), device=dev, dtype=dt))
        self.register_buffer("pair_x1", torch.zeros((m, *shape), device=dev, dtype=dt))
        self.register_buffer("pair_labels", torch.zeros((m if self.conditional else 0,), device=dev, dtype=torch.long))
        self.register_buffer("pair_round", torch.full((), -1, dtype=torch.long, device=dev))
        self.register_buffer("pair_generations", torch.zeros((), dtype=torch.long, device=dev))
        self.register_buffer("pair_seconds", torch.zeros(self.num_rounds, dtype=torch.float64, device=dev))
        self.register_buffer("pair_evals", torch.zeros(self.num_rounds, dtype=torch.float64, device=dev))
        self.register_buffer("straightness_log", torch.full((self.num_rounds,), -1.0, dtype=torch.float64,
                                                            device=dev))  # -1: not measured
        self.straightness_log[0] = self._straightness_of(
            lambda x, s, c: teacher(x, s, c, guidance=self.guidance), teacher, ctx)

    def _noise(self, r: int, n: int, shape: tuple[int, ...], teacher: nn.Module) -> tuple[Tensor, Tensor | None]:
        g = torch.Generator().manual_seed(int(self.noise_seed) + 7919 * (r + 1))
        z = torch.randn((n, *shape), generator=g)
        if not self.conditional:
            return z, None
        probs = teacher.class_probs
        lab = (torch.multinomial(probs.double().cpu(), n, replacement=True, generator=g) if probs is not None
               else torch.randint(teacher.num_classes, (n,), generator=g))
        return z, lab

    @torch.no_grad()
    def _solve(self, den: Callable[..., Tensor], z: Tensor, lab: Tensor | None, ctx: StepContext) -> Tensor:
        out = []
        for lo in range(0, z.shape[0], self.pair_batch):
            c = None if lab is None else lab[lo:lo + self.pair_batch].to(ctx.device)
            out.append(teacher_ode_pairs(den, z[lo:lo + self.pair_batch].to(ctx.device, ctx.dtype), self.sigma_min,
                                         self.sigma_max, c, self.pair_nfe, "heun"))
        return torch.cat(out)

    @torch.no_grad()
    def _straightness_of(self, den: Callable[..., Tensor], teacher: nn.Module, ctx: StepContext) -> float:
        """S of the flow of ``den`` on its own pairs from the fixed straightness noise (round index -1)."""
        if self.straightness_n == 0:
            return -1.0
        z, lab = self._noise(-1, self.straightness_n, tuple(teacher.data_shape), teacher)
        x1 = self._solve(den, z, lab, ctx).to(torch.float64)
        c = None if lab is None else lab.to(ctx.device)
        n = z.to(ctx.device, torch.float64) - x1 / self.sigma_max  # the line's noise end (module docstring)
        vel = lambda x, tau: velocity_from_denoiser(  # noqa: E731
            lambda a, s, cc: den(a.to(ctx.dtype), s.to(ctx.dtype), cc).to(torch.float64), x, tau, c)
        tau_max = self.sigma_max / (1 + self.sigma_max)
        return float(straightness(vel, n, x1, self.straightness_steps, 0.0, tau_max))

    # -- rounds ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_round_start(self, round: int, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Pairs of round ``round`` from a frozen copy of the student (= the previous round's model), once."""
        if int(self.pair_round) == round:
            return  # restored from a checkpoint: never regenerate
        frozen = copy.deepcopy(student).eval().requires_grad_(False)
        den = frozen.denoise
        self.straightness_log[round] = self._straightness_of(den, teacher, ctx)
        z, lab = self._noise(round, self.n_pairs, tuple(student.data_shape), teacher)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        t0 = time.perf_counter()
        x1 = self._solve(den, z, lab, ctx)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - t0
        self.pair_z.copy_(z.to(self.pair_z))
        self.pair_x1.copy_(x1.to(self.pair_x1))
        if lab is not None:
            self.pair_labels.copy_(lab.to(self.pair_labels.device))
        self.pair_round.fill_(round)
        self.pair_generations += 1
        self.pair_seconds[round] = seconds
        self.pair_evals[round] = float(self.n_pairs * self.pair_nfe)
        self.generated_this_launch += 1
        self.pair_cost = {"round": round, "seconds": seconds, "network_evals": self.n_pairs * self.pair_nfe}

    def round_pairs(self, r: int, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(z, x1, labels)`` of this batch: round 0 from the teacher-pair cache, later rounds from the buffers."""
        if r == 0:
            if "pairs.z" not in batch.extras:
                raise ValueError("reflow: round 0 needs teacher pairs in batch.extras ('pairs.z', 'pairs.x0')")
            ex = batch.extras
            return (ex["pairs.z"].to(ctx.device, ctx.dtype), ex["pairs.x0"].to(ctx.device, ctx.dtype),
                    ex.get("pairs.labels"))
        if int(self.pair_round) != r:
            raise RuntimeError(f"reflow: round {r} needs its pairs (made by on_round_start or restored from a "
                               f"checkpoint); the buffers hold round {int(self.pair_round)}'s")
        idx = batch.randint(self.n_pairs).to(self.pair_z.device)
        lab = self.pair_labels[idx] if self.conditional else None
        return self.pair_z[idx].to(ctx.dtype), self.pair_x1[idx].to(ctx.dtype), lab

    # -- one step --------------------------------------------------------------------------------------------
    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase != "student":
            raise ValueError(f"reflow has one phase, 'student'; got {phase!r}")
        r = min(ctx.round, self.num_rounds - 1)
        z, x1, cond = self.round_pairs(r, batch, ctx)
        if self.is_distill(r):
            grid = torch.tensor(flow_grid(self.distill_steps, self.sigma_max), device=ctx.device, dtype=ctx.dtype)
            sigma = grid[batch.randint(self.distill_steps).to(ctx.device)]
        else:
            lo, hi = self.sigma_min / (1 + self.sigma_min), self.sigma_max / (1 + self.sigma_max)
            tau = lo + (hi - lo) * batch.rand().to(ctx.device)
            sigma = sigma_from_rf_t(tau)
        s = append_dims(sigma, z.ndim)
        x = s * z + (1 - s / self.sigma_max) * x1  # = x1 + sigma n on the pair's straight line
        err = (student(x, sigma, torch.zeros_like(sigma), cond) - x1).pow(2).flatten(1).mean(1)
        out = {"round": torch.tensor(float(r)), "straightness": self.straightness_log[r].float(),
               "pair_seconds": self.pair_seconds[r].float(), "pair_network_evals": self.pair_evals[r].float()}
        if self.is_distill(r):
            out["loss"] = err.mean()
            out["distill_mse"] = out["loss"].detach()
        else:
            out["loss"] = (((1 + sigma) / sigma) ** 2 * err).mean()  # = mean ||v_theta - (n - x1)||^2 per dim
            out["denoiser_mse"] = err.detach().mean()
        return out
