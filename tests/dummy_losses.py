"""Dummy losses, one of each shape the loss families need, written only against the contract in ``losses/base.py``.

They prove the contract: each trains through ``distill train`` (``tests/test_contract_shapes.py``) and resumes
exactly, and none needed an edit of ``DistillModule``. They are deliberately small, not good methods.

* ``dummy_critic`` - a two-network (GAN-style) loss: a critic the loss owns, trained in its own phase on real vs
  generated samples (least-squares GAN, Mao et al. 2017, arXiv:1611.04076), a student phase every 2nd iteration.
  (DMD2, SiD, SIM, f-distill.)
* ``dummy_pairs`` - regression on cached teacher ODE pairs (Luhman & Luhman 2021, arXiv:2101.02388). (Reflow,
  DMD's regression term, TDM's trajectory pairs.)
* ``dummy_rounds`` - rounds with resets: every ``round_length`` iterations the EMA, the optimizer state and the LR
  warm-up restart and the loss's own hook runs; the step is progressive distillation's (one student jump onto two
  teacher steps, Salimans & Ho 2022, arXiv:2202.00512). (Progressive distillation, iCT/ECT curriculum restarts.)
* ``dummy_aux`` - an auxiliary network trained *in the student phase*: a learned per-sigma log-variance weight
  ``u(sigma)`` as in EDM2's uncertainty weighting (Karras et al. 2024, arXiv:2312.02696 §5) and sCM's adaptive
  weight: ``L = exp(-u) d + u``.
* ``dummy_jvp`` - a loss that needs a forward-mode JVP of the student's raw backbone along the teacher's PF-ODE
  (``torch.func.jvp`` with the math SDPA kernel on CPU), the computation continuous-time consistency (sCM,
  arXiv:2410.11081) and MeanFlow are built on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.conversions import append_dims
from losses import LOSSES, register_loss
from losses.base import Batch, DataSpec, DistillLoss, StepContext


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


def _generate(student: nn.Module, batch: Batch) -> Tensor:
    """One-step generator samples ``G(sigma_max z)``, ``[B, ...]``."""
    z = batch.randn(*student.data_shape)
    s = torch.full((batch.size,), student.sigma_max, device=z.device, dtype=z.dtype)
    return student(s[0] * z, s, torch.zeros_like(s), batch.labels)


def _sigma(batch: Batch, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """EDM log-normal noise levels ``[B]`` (arXiv:2206.00364 Table 1)."""
    return (p_mean + p_std * batch.randn()).exp()


def _register(name: str):
    # Idempotent: pytest may import this file twice (as a module and through a test).
    def deco(cls):
        return cls if name in LOSSES else register_loss(name)(cls)

    return deco


@_register("dummy_critic")
class DummyCritic(DistillLoss):
    phases = ("critic", "student")
    needs_data = True

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = int(hidden)
        self.critic: nn.Module | None = None

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"hidden": 16}

    def update_every(self) -> dict[str, int]:
        return {"critic": 1, "student": 2}

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        dim = int(torch.tensor(student.data_shape).prod())
        self.critic = nn.Sequential(nn.Flatten(), nn.Linear(dim, self.hidden), nn.SiLU(), nn.Linear(self.hidden, 1))
        self.critic.to(ctx.device)

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        if phase == "critic":
            with torch.no_grad():
                fake = _generate(student, batch)
            d_real, d_fake = self.critic(batch.data).squeeze(1), self.critic(fake).squeeze(1)
            loss = ((d_real - 1) ** 2).mean() + (d_fake**2).mean()
            return {"loss": loss, "d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}
        # The critic is a constant here: only the student's group is stepped, and the critic's grads are not used.
        d = self.critic(_generate(student, batch)).squeeze(1)
        return {"loss": ((d - 1) ** 2).mean()}


@_register("dummy_pairs")
class DummyPairs(DistillLoss):
    def __init__(self, n: int = 64, nfe: int = 5) -> None:
        super().__init__()
        self.n, self.nfe = int(n), int(nfe)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"n": 16, "nfe": 3}

    def data_specs(self) -> dict[str, DataSpec]:
        return {"data": DataSpec("noise"), "pairs": DataSpec("teacher_pairs", options={"n": self.n, "nfe": self.nfe})}

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        z, x0 = batch.extras["pairs.z"], batch.extras["pairs.x0"]
        s = torch.full((batch.size,), student.sigma_max, device=z.device, dtype=z.dtype)
        x = student(s[0] * z, s, torch.zeros_like(s), batch.extras.get("pairs.labels"))
        return {"loss": _mse(x, x0).mean()}


@_register("dummy_rounds")
class DummyRounds(DistillLoss):
    def __init__(self, round_length: int = 4) -> None:
        super().__init__()
        self.round_length = int(round_length)
        # Persistent: a resumed run must know how many rounds the first part started.
        self.register_buffer("rounds_started", torch.zeros((), dtype=torch.long))

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"round_length": 2}

    def round_of(self, step: int) -> int:
        return step // self.round_length

    def on_round_start(self, round: int, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        self.rounds_started += 1

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        # Progressive distillation's shape (Salimans & Ho 2022, arXiv:2202.00512): one student jump from sigma to
        # sigma/4 regresses onto two Euler steps of the teacher, sigma -> sigma/2 -> sigma/4.
        sigma = _sigma(batch)
        x = batch.randn(*student.data_shape) * append_dims(sigma + 1.0, len(student.data_shape) + 1)
        with torch.no_grad():
            target = x
            for a, b in ((sigma, sigma / 2), (sigma / 2, sigma / 4)):
                d = (target - teacher(target, a, batch.labels)) / append_dims(a, x.ndim)
                target = target + append_dims(b - a, x.ndim) * d
        jump = student(x, sigma, sigma / 4, batch.labels)
        return {"loss": _mse(jump, target).mean() / (sigma**2).mean(), "round": torch.tensor(float(ctx.round))}


@_register("dummy_aux")
class DummyAux(DistillLoss):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.weight = nn.Sequential(nn.Linear(1, int(hidden)), nn.SiLU(), nn.Linear(int(hidden), 1))

    def student_phase_modules(self) -> tuple[str, ...]:
        return ("weight",)

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        sigma = _sigma(batch)
        x = batch.randn(*student.data_shape) * append_dims(sigma + 1.0, len(student.data_shape) + 1)
        with torch.no_grad():
            target = teacher(x, sigma, batch.labels)
        d = _mse(student.denoise(x, sigma, batch.labels), target)
        u = self.weight(sigma.log()[:, None] / 4).squeeze(1)
        return {"loss": (torch.exp(-u) * d + u).mean(), "u_mean": u.mean().detach()}


@_register("dummy_jvp")
class DummyJVP(DistillLoss):
    student_kind = "consistency"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.w = float(weight)

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        sigma = _sigma(batch)
        x = batch.randn(*student.data_shape) * append_dims(sigma + 1.0, len(student.data_shape) + 1)
        with torch.no_grad():  # the PF-ODE direction dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3)
            dxds = (x - teacher(x, sigma, batch.labels)) / append_dims(sigma, x.ndim)
        raw = student.raw_fn(batch.labels)

        def f(x_: Tensor, s_: Tensor) -> Tensor:
            _, _, c_in, c_noise = student.scalings(s_)
            return raw(append_dims(c_in, x_.ndim) * x_, c_noise)

        # Forward-mode AD through the raw backbone; attention needs the math SDPA kernel for forward AD on CPU.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            out, tangent = torch.func.jvp(f, (x, sigma), (dxds, torch.ones_like(sigma)))
        # Pull F along its own total derivative (sCM's tangent-as-target form: the tangent is a constant).
        target = (out - self.w * sigma.reshape(-1, *[1] * (x.ndim - 1)) * tangent).detach()
        return {"loss": _mse(out, target).mean(), "tangent_norm": tangent.flatten(1).norm(dim=1).mean().detach()}
