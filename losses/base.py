"""The loss contract (docs/design.md §3.3; the one-page guide is ``docs/adding-a-loss.md``).

A loss is an ``nn.Module`` registered by name whose constructor is its config schema. The system
(``distill.iteration.run_iteration`` inside ``DistillModule``) asks it, each iteration ``k``:

* which **phases** run (:meth:`DistillLoss.phases_for_step`), and for each phase calls
  ``loss(phase, student, teacher, batch, ctx) -> {"loss": scalar, **logged terms}``;
* which **parameter groups** each phase trains (:meth:`DistillLoss.phase_groups`): the module builds one optimizer
  per phase from exactly these and clips, logs and NaN-checks exactly these, group by group;
* after which phases the student's evaluation EMA moves (:attr:`DistillLoss.ema_phases`);
* what **data** it needs (:meth:`DistillLoss.data_specs`: real data, exact teacher samples, noise only, cached
  teacher ODE pairs), delivered as a typed :class:`Batch`;
* how its student is **sampled** at k NFE (:meth:`DistillLoss.sampling`; config may override);
* about samples it had to exclude because a per-sample quantity was NaN/Inf (the reserved term
  :data:`NONFINITE_ROWS`; never silently absorbed);
* where its **rounds** start (:meth:`DistillLoss.round_of`): at a boundary the system resets what
  :attr:`DistillLoss.round_resets` names (EMA, optimizer state, LR warm-up) and calls :meth:`on_round_start`.

No phase name is special to the system: ``"student"`` and ``"critic"`` are conventions of the losses.

Randomness: per-sample draws go through the batch (:meth:`Batch.randn`, :meth:`Batch.randn_like`,
:meth:`Batch.rand`, :meth:`Batch.randint`). Each draw is a function of ``(seed, iteration, draw index, global sample
index)`` only, so a run on ``P`` processes at per-process batch ``B / P`` draws exactly what one process draws at
batch ``B``, and a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from distill.core.streams import stream_seed

if TYPE_CHECKING:  # a type only: the students layer sits below this one
    from students.sampling import SamplingPlan

__all__ = ["DistillLoss", "Batch", "StepContext", "DataSpec", "stream_seed", "ROUND_RESETS", "NONFINITE_ROWS"]

#: what a round boundary may reset
ROUND_RESETS = ("ema", "optimizer", "warmup")
#: the reserved term a loss returns when it excluded samples whose per-sample quantity was NaN/Inf (a count, a
#: scalar tensor): the system adds it to its ``nonfinite_rows`` counter, logs it, and under
#: ``trainer.nonfinite_rows: skip`` (the default) skips the phase's step as it does for a non-finite loss.
NONFINITE_ROWS = "nonfinite_rows"


@dataclass(frozen=True)
class StepContext:
    """Where training stands, for curricula (ECT's Δt halving, sCM's tangent warm-up, iCT's level doubling, rounds).

    Attributes:
        iteration: the 0-based training iteration ``k``.
        total: the run's number of iterations (``trainer.max_steps``).
        progress: ``k / total`` clipped to ``[0, 1]``.
        device, dtype: where and in which precision the student lives.
        round: the loss's round at ``k`` (:meth:`DistillLoss.round_of`).
    """

    iteration: int
    total: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    round: int = 0
    progress: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "progress", min(1.0, max(0.0, self.iteration / max(1, self.total))))


@dataclass(frozen=True)
class DataSpec:
    """Data a loss asks for; ``distill.data_sources`` provides it by ``source`` name.

    Attributes:
        source: ``"real"`` (the run's data set: ``data.name``, digits/mnist, or exact teacher samples for
            ``data.name: teacher``), ``"exact"`` (exact samples of an analytic teacher), ``"noise"`` (nothing but
            the batch size, and uniform labels for a class-conditional teacher) or ``"teacher_pairs"`` (noise ->
            teacher ODE endpoint, from the run's pair cache; options ``n``, ``nfe``, ``solver``, ``guidance``).
        batch_size: per-step batch size; ``None`` takes ``data.batch_size``.
        options: source-specific keyword arguments.
    """

    source: str
    batch_size: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


class Batch:
    """One iteration's data for one process.

    Attributes:
        size: samples in this process's batch (``B``).
        data: ``[B, ...]`` real data or exact samples (``None`` for data-free losses).
        labels: the condition passed to teacher and student: ``[B]`` class labels, a
            :class:`~distill.core.cond.Cond` (e.g. labels plus the per-sample guidance scale of ``data.guidance``), or
            ``None`` (unconditional).
        extras: further named tensors from extra data specs, keyed ``"<spec>.<field>"`` (e.g.
            ``"pairs.z"``, ``"pairs.x0"``, ``"pairs.labels"``).
    """

    def __init__(self, size: int, data: Tensor | None = None, labels: Tensor | None = None,
                 extras: dict[str, Tensor] | None = None, *, seed: int = 0, iteration: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if int(size) < 1:
            raise ValueError(f"a batch needs size >= 1, got {size}")
        self.size = int(size)
        self.data = data
        self.labels = labels
        self.extras = dict(extras or {})
        self.seed, self.iteration, self.rank, self.world_size = int(seed), int(iteration), int(rank), int(world_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self._draws = 0

    def __repr__(self) -> str:
        shape = None if self.data is None else list(self.data.shape)
        return (f"Batch(size={self.size}, data={shape}, labels={self.labels is not None}, "
                f"extras={sorted(self.extras)})")

    # -- per-sample randomness, invariant to the process count -------------------------------------------------
    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(stream_seed(self.seed, self.iteration, "draw", self._draws))
        self._draws += 1
        return g

    def _slice(self, full: Tensor) -> Tensor:
        return full[self.rank * self.size:(self.rank + 1) * self.size]

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal ``[B, *shape]``: this process's rows of one draw for the global batch."""
        n = self.size * self.world_size
        full = torch.randn((n, *shape), generator=self._generator(), device=self.device, dtype=dtype or self.dtype)
        return self._slice(full)

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal like ``x: [B, ...]`` (its leading dim must be the batch size)."""
        if x.shape[0] != self.size:
            raise ValueError(f"randn_like draws per sample: leading dim {x.shape[0]} is not the batch size "
                             f"{self.size}")
        return self.randn(*x.shape[1:], dtype=x.dtype).to(x.device)

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        """Uniform ``[0, 1)`` ``[B, *shape]``."""
        n = self.size * self.world_size
        return self._slice(torch.rand((n, *shape), generator=self._generator(), device=self.device,
                                      dtype=dtype or self.dtype))

    def randint(self, high: int, *shape: int, low: int = 0) -> Tensor:
        """Integers in ``[low, high)``, ``[B, *shape]`` (long)."""
        n = self.size * self.world_size
        return self._slice(torch.randint(low, high, (n, *shape), generator=self._generator(), device=self.device))

    def draw_seed(self) -> int:
        """One integer seed for this step (one draw; this process's first row), e.g. to fork the dropout RNG so two
        passes of a network see the same mask (:func:`losses.parts.jvp.same_randomness`). Processes of a DDP run get
        different seeds (as they get different rows)."""
        return int(self.randint(2**31, 1)[0, 0])


class DistillLoss(nn.Module):
    """Base class. Subclasses set :attr:`phases`, override :meth:`forward`, and :meth:`setup` if they own networks.

    Class attributes:
        phases: the phases in the order they run within an iteration, e.g. ``("critic", "student")``.
        ema_phases: phases after whose optimizer step the student's evaluation EMA moves.
        needs_data: shorthand for the default :meth:`data_specs` (real data vs noise only).
        student_kind: the student kind it trains (``students.STUDENTS`` name) when the config names none.
        round_resets: what a round boundary resets (a subset of :data:`ROUND_RESETS`).
    """

    phases: tuple[str, ...] = ("student",)
    ema_phases: tuple[str, ...] = ("student",)
    needs_data: bool = False
    student_kind: str = "generator"
    round_resets: tuple[str, ...] = ROUND_RESETS

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Constructor kwargs for a fast CPU smoke run (the shared contract test builds every loss with them)."""
        return {}

    # -- schedule ------------------------------------------------------------------------------------------------
    def update_every(self) -> dict[str, int]:
        """Phase -> run it on iterations where ``k % every == 0`` (DMD2: critic 1, student 5)."""
        return {p: 1 for p in self.phases}

    @property
    def uses_forward_ad(self) -> bool:
        """Whether a step differentiates a network in forward mode (``torch.func.jvp``: sCM, MeanFlow and AYF with
        ``jvp: autograd``). Attention kernels without forward-mode AD (xformers) and activation checkpointing cannot
        run under it; :mod:`distill.model_options` refuses those combinations."""
        return getattr(self, "jvp_method", None) == "autograd"

    def phases_for_step(self, step: int) -> list[str]:
        """The phases iteration ``step`` runs, in order (a pure function of ``step``: resume relies on it)."""
        every = self.update_every()
        return [p for p in self.phases if step % every[p] == 0]

    def round_of(self, step: int) -> int:
        """The round iteration ``step`` belongs to (progressive distillation, curriculum restarts); a pure,
        non-decreasing function of ``step``. One round by default."""
        return 0

    def on_round_start(self, round: int, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Called once when round ``round`` (>= 1) starts, after the system's resets."""

    # -- what the loss needs ------------------------------------------------------------------------------------
    def data_specs(self) -> dict[str, DataSpec]:
        """Named data needs. ``"data"`` fills :attr:`Batch.data`/:attr:`Batch.labels` and sets the batch size;
        any other name fills ``batch.extras["<name>.<field>"]``."""
        return {"data": DataSpec("real" if self.needs_data else "noise")}

    def sampling(self) -> SamplingPlan | None:
        """How the trained student is sampled at k NFE (``None``: the default plan; config may override)."""
        return None

    def setup(self, student: nn.Module, teacher: nn.Module, ctx: StepContext) -> None:
        """Build teacher- or student-dependent submodules. Runs once, on the run's device (``ctx.device``), before
        optimizers are created and before a checkpoint is restored; must be deterministic (a resumed run builds
        the same modules and then loads their state)."""

    def phase_groups(self, phase: str, student: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups trained in ``phase``: for a phase in :attr:`ema_phases` the student's (plus any
        loss submodule listed by :meth:`student_phase_modules`); otherwise the loss's own submodules, one group each.
        """
        if phase not in self.phases:
            raise ValueError(f"{type(self).__name__}: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")
        if phase in self.ema_phases:
            groups = {"student": [p for p in student.parameters() if p.requires_grad]}
            for name in self.student_phase_modules():
                groups[name] = [p for p in getattr(self, name).parameters() if p.requires_grad]
            return groups
        skip = set(self.student_phase_modules())
        groups = {}
        for name, child in self.named_children():
            params = [p for p in child.parameters() if p.requires_grad]
            if params and name not in skip:
                groups[name] = params
        return groups

    def student_phase_modules(self) -> tuple[str, ...]:
        """Names of loss submodules trained together with the student in its phases (sCM's adaptive weight)."""
        return ()

    def after_step(self, phase: str, student: nn.Module, ctx: StepContext) -> None:
        """Hook after the optimizer step of ``phase`` (e.g. an EMA target network update)."""

    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, ctx: StepContext
                ) -> dict[str, Tensor]:
        raise NotImplementedError
