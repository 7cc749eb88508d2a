"""Lightning's DDP strategy without the DDP wrapper: gradients are averaged phase by phase by
:func:`distill.iteration.all_reduce_grads`.

Multi-optimizer (GAN-style) losses train different parameters in different phases of one iteration, and some
iterations train only one of them (DMD2's critic-only iterations). ``DistributedDataParallel`` expects every
parameter it wraps to receive a gradient after each forward, so such modules fail with unused-parameter errors or
need ``find_unused_parameters=True`` and its graph walks. Averaging each phase's gradients explicitly after its
backward is the same data-parallel rule with none of those constraints; the initial weights are broadcast from rank
0 as DDP does.
"""

from __future__ import annotations

from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy

__all__ = ["GradSyncDDPStrategy"]


class GradSyncDDPStrategy(DDPStrategy):
    """``strategy: ddp`` in a run config: process group, launcher and samplers from Lightning; no DDP wrapper."""

    strategy_name = "ddp_grad_sync"

    def configure_ddp(self) -> None:
        assert self.model is not None
        _sync_module_states(self.model)
