"""The loss contract (design.md §3): a loss is an ``nn.Module`` registered by name whose constructor arguments are
the YAML schema. It declares its phases and how often each runs, owns its auxiliary trainable networks (fake score,
discriminator head, target network) as submodules, and computes one phase per call:

    terms = loss(phase, student, teacher, batch, step)   # terms["loss"] is back-propagated, the rest is logged

The Lightning module never imports a specific loss: it calls :meth:`DistillLoss.setup` once, builds one optimizer per
phase over :meth:`DistillLoss.phase_parameters`, runs :meth:`DistillLoss.phases_for_step` each iteration and calls
:meth:`DistillLoss.after_step` after each optimizer step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["DistillLoss", "Batch"]

# A batch is a plain dict: "x0" real data [B, ...] (or absent for data-free losses), "cond" labels [B] (or absent),
# "batch_size" (int). Losses draw their own noise from torch's global RNG (seeded and checkpointed by the trainer).
Batch = dict[str, Any]


class DistillLoss(nn.Module):
    """Base class. Subclasses set ``phases`` and override :meth:`forward` (and :meth:`setup` if they own networks)."""

    #: the phases in the order they run within an iteration, e.g. ("critic", "student")
    phases: tuple[str, ...] = ("student",)
    #: whether the loss needs real data in the batch (``batch["x0"]``)
    needs_data: bool = False
    #: the student kind it trains (``students.STUDENTS`` name: "generator", "consistency", "flowmap")
    student_kind: str = "generator"

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Constructor kwargs for a fast CPU smoke run (the shared contract test builds every loss with them)."""
        return {}

    def update_every(self) -> dict[str, int]:
        """Phase -> run it on iterations where ``step % every == 0`` (DMD2: critic 1, student 5)."""
        return {p: 1 for p in self.phases}

    def phases_for_step(self, step: int) -> list[str]:
        every = self.update_every()
        return [p for p in self.phases if step % every[p] == 0]

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        """Build teacher- or student-dependent submodules (called once, before optimizers are created)."""

    def phase_parameters(self, phase: str, student: nn.Module) -> list[nn.Parameter]:
        """Parameters trained in ``phase``: the student's for "student", the loss's own trainable ones otherwise."""
        if phase == "student":
            return [p for p in student.parameters() if p.requires_grad]
        return [p for p in self.parameters() if p.requires_grad]

    def after_step(self, phase: str, student: nn.Module, step: int) -> None:
        """Hook after the optimizer step of ``phase`` (e.g. an EMA target network update)."""

    def forward(
        self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, step: int
    ) -> dict[str, Tensor]:
        raise NotImplementedError
