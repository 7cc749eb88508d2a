"""The body of one training iteration, as a plain function: ``DistillModule`` and every script and benchmark call it.

For each phase the loss schedules at iteration ``k`` (in order): zero the phase's gradients, forward, backward,
(all-reduce across processes), per-group gradient norms, a NaN/Inf guard, clipping, optimizer step, LR schedule,
the loss's ``after_step`` hook and, for the loss's ``ema_phases``, the student's EMA.

No host-device synchronisation on iterations that do not log: the NaN/Inf verdict is a device tensor (``found_inf``,
as ``torch.amp.GradScaler`` keeps it) handed to optimizers that honour it (fused Adam/AdamW skip their update on the
device); only optimizers without that support read it on the host. Clipping uses the norm already computed
(``clip_grads_with_norm_``). Logged values stay tensors; the caller converts them at log steps.

A skipped phase leaves its parameters and optimizer moments untouched; its LR schedule, ``after_step`` and the EMA
still advance (an EMA update toward unchanged weights is a tiny pull that keeps the iteration free of host reads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.ema import reset_ema
from distill.core.registry import ConfigError
from losses.base import NONFINITE_ROWS, Batch, DistillLoss, StepContext

__all__ = ["PhaseOptim", "run_iteration", "build_phase_optim", "LRSchedule", "LR_DECAYS", "apply_round_start"]

LR_DECAYS = ("none", "cosine", "linear")
ROW_POLICIES = ("skip", "drop")  # a phase whose loss reports non-finite rows: skip its step, or keep the other rows
_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
_FUSED = ("adam", "adamw")  # optimizers with a fused kernel that honours ``found_inf``


class LRSchedule:
    """LR multiplier at optimizer step ``i``: linear warm-up over ``warmup`` steps counted from ``start`` (the
    round's first step; 0 without rounds), then constant or annealed over the whole run to ``final_ratio`` by a
    half cosine or a line. A callable object, so ``LambdaLR.state_dict`` saves ``start`` and resume stays exact."""

    def __init__(self, total: int, warmup: int = 0, decay: str = "none", final_ratio: float = 0.0) -> None:
        if decay not in LR_DECAYS:
            raise ConfigError(f"unknown lr decay {decay!r}; valid: {', '.join(LR_DECAYS)}")
        self.total, self.warmup, self.decay, self.final_ratio = int(total), int(warmup), decay, float(final_ratio)
        self.start = 0

    def __call__(self, i: int) -> float:
        j = i - self.start
        if self.warmup and j < self.warmup:
            return (j + 1) / self.warmup
        if self.decay == "none":
            return 1.0
        p = min(1.0, max(0.0, (i - self.warmup) / max(1, self.total - 1 - self.warmup)))
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if self.decay == "cosine" else 1.0 - p
        return self.final_ratio + (1.0 - self.final_ratio) * shape


@dataclass
class PhaseOptim:
    """One phase's optimizer, LR schedule, clipping threshold and named parameter groups."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    groups: dict[str, list[nn.Parameter]]
    grad_clip: float | None = None
    fused: bool = False
    params: list[nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for ps in self.groups.values() for p in ps]


def build_phase_optim(loss: DistillLoss, phase: str, student: nn.Module, cfg: Any, total_steps: int) -> PhaseOptim:
    """The optimizer of ``phase`` over exactly ``loss.phase_groups(phase, student)``.

    ``cfg``: ``name, lr, betas, eps, weight_decay, warmup, decay, final_lr_ratio, grad_clip``. The LR decay spans this
    phase's own number of steps in ``total_steps`` iterations (DMD2's generator steps once per 5 iterations).
    """
    groups = loss.phase_groups(phase, student)
    seen: set[int] = set()
    for name, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise ValueError(f"phase {phase!r}: a parameter appears in two groups (second: {name!r})")
            seen.add(id(p))
    params = [p for ps in groups.values() for p in ps]
    if not params:
        raise RuntimeError(f"phase {phase!r} of {type(loss).__name__} has no trainable parameters")
    name = str(cfg.name).lower()
    if name not in _OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.name!r}; valid optimizers: {', '.join(sorted(_OPTIMIZERS))}")
    kw: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    fused = name in _FUSED and all(p.is_floating_point() for p in params)
    if fused:
        kw["fused"] = True
    opt = _OPTIMIZERS[name](params, **kw)
    decay = str(cfg.decay)
    if decay not in LR_DECAYS:
        raise ConfigError(f"unknown optim.{phase}.decay {decay!r}; valid: {', '.join(LR_DECAYS)}")
    total = sum(phase in loss.phases_for_step(k) for k in range(total_steps)) if decay != "none" else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(total, int(cfg.warmup), decay,
                                                              float(cfg.final_lr_ratio)))
    return PhaseOptim(opt, sched, groups, None if cfg.grad_clip is None else float(cfg.grad_clip), fused)


def _group_norms(groups: Mapping[str, list[nn.Parameter]], like: Tensor) -> dict[str, Tensor]:
    norms = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        norms[name] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads \
            else torch.zeros((), device=like.device)
    return norms


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over processes (one flat all-reduce): the DDP data-parallel rule, phase by phase, so
    parameters a phase does not train are never waited for."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def apply_round_start(k: int, loss: DistillLoss, student: nn.Module, teacher: nn.Module, ctx: StepContext,
                      optims: Mapping[str, PhaseOptim], emas: Sequence[Any] = ()) -> bool:
    """At the first iteration of a new round: reset what ``loss.round_resets`` names, then the loss's hook."""
    if k == 0 or loss.round_of(k) == loss.round_of(k - 1):
        return False
    resets = set(loss.round_resets)
    if "ema" in resets:
        for ema in emas:
            reset_ema(ema)
    for po in optims.values():
        if "optimizer" in resets:
            po.optimizer.state.clear()
        if "warmup" in resets:
            sched = po.scheduler
            for group, base, fn in zip(po.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                fn.start = sched.last_epoch
                group["lr"] = base * fn(sched.last_epoch)  # this iteration's step already uses the restarted lr
            sched._last_lr = [g["lr"] for g in po.optimizer.param_groups]
    loss.on_round_start(loss.round_of(k), student, teacher, ctx)
    return True


def run_iteration(k: int, loss: DistillLoss, student: nn.Module, teacher: nn.Module, batch: Batch,
                  ctx: StepContext, optims: Mapping[str, PhaseOptim], emas: Sequence[Any] = (),
                  backward: Callable[[Tensor], None] | None = None, skipped: Tensor | None = None,
                  nonfinite: Tensor | None = None, row_policy: str = "skip") -> dict[str, Tensor | float]:
    """Run iteration ``k``'s phases. Returns logged values (device tensors; floats for learning rates).

    Args:
        k: iteration index (``ctx.iteration``).
        loss, student, teacher: the run's components.
        batch: this process's :class:`Batch`.
        ctx: the :class:`StepContext` of ``k``.
        optims: phase -> :class:`PhaseOptim`.
        emas: the student's ``AveragedModel`` s (the run's evaluation EMA, plus any a sweep tracks).
        backward: how to back-propagate (Lightning's ``manual_backward``; default ``Tensor.backward``).
        skipped: a long device counter incremented (on the device) for each skipped phase.
        nonfinite: a long device counter of the rows losses reported as non-finite (``NONFINITE_ROWS``).
        row_policy: ``"skip"`` a phase step whose loss reports non-finite rows, or ``"drop"`` only those rows.
    """
    if row_policy not in ROW_POLICIES:
        raise ConfigError(f"unknown trainer.nonfinite_rows {row_policy!r}; valid: {', '.join(ROW_POLICIES)}")
    backward = backward or Tensor.backward
    apply_round_start(k, loss, student, teacher, ctx, optims, emas)
    logs: dict[str, Tensor | float] = {}
    for phase in loss.phases_for_step(k):
        po = optims[phase]
        po.optimizer.zero_grad(set_to_none=True)
        terms = loss(phase, student, teacher, batch, ctx)
        value = terms["loss"]
        backward(value)
        all_reduce_grads(po.params)
        norms = _group_norms(po.groups, value)
        total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
        bad_rows = terms.get(NONFINITE_ROWS)
        found = ~torch.isfinite(total) | ~torch.isfinite(value.detach())
        if bad_rows is not None:
            if nonfinite is not None:
                nonfinite += bad_rows.detach().to(nonfinite.dtype)
            if row_policy == "skip":
                found = found | (bad_rows.detach() > 0)
        found_inf = found.float()
        if po.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(po.params, po.grad_clip, total, foreach=True)
        if po.fused:
            po.optimizer.found_inf, po.optimizer.grad_scale = found_inf, None
            po.optimizer.step()
        elif not bool(found_inf):  # host read: this optimizer cannot skip on the device
            po.optimizer.step()
        po.scheduler.step()
        loss.after_step(phase, student, ctx)
        if phase in loss.ema_phases:
            for ema in emas:
                ema.update_parameters(student)
        if skipped is not None:
            skipped += found_inf.to(skipped.dtype)
        for name, v in terms.items():
            logs[f"{phase}/{name}"] = v.detach().float().mean() if torch.is_tensor(v) else torch.tensor(float(v))
        for name, n in norms.items():
            logs[f"grad_norm/{name}"] = n
        logs[f"{phase}/skipped"] = found_inf
        logs[f"lr/{phase}"] = po.scheduler.get_last_lr()[0]
    return logs

