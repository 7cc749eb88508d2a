"""Small builders for the loss contract's typed arguments (``losses.base.StepContext`` and ``Batch``) in tests."""

from __future__ import annotations

import torch

from losses.base import Batch, StepContext


def ctx(k: int = 0, total: int = 100, device: str = "cpu", dtype: torch.dtype = torch.float32) -> StepContext:
    return StepContext(k, total, torch.device(device), dtype)


def batch(data: torch.Tensor | None = None, labels: torch.Tensor | None = None, size: int | None = None,
          k: int = 0, seed: int = 0, extras: dict | None = None, dtype: torch.dtype | None = None) -> Batch:
    """A one-process batch; its size and dtype follow ``data`` when given."""
    size = size if size is not None else int(data.shape[0])
    dtype = dtype or (data.dtype if data is not None else torch.float32)
    return Batch(size, data, labels, extras, seed=seed, iteration=k, dtype=dtype)


def fit(step, params, steps: int, lr: float) -> None:
    """Adam with a cosine-annealed lr for ``steps`` steps on ``step(i) -> scalar loss`` (the closed-form convergence
    tests of the distribution-matching losses)."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for i in range(steps):
        opt.zero_grad()
        step(i).backward()
        opt.step()
        sched.step()
