"""Memory estimate before launch (``distill train --dry-run``): what a run will hold at its peak, by part.

The estimate is the sum of

* **weights**: every parameter and buffer of the teacher, the student, the student's EMA and the loss's own
  networks (fake score, discriminator heads, adaptive weights), counted once per storage;
* **optimizer state**: the state tensors the run's optimizers actually hold after one iteration (Adam: two moments
  per trainable parameter);
* **runtime overhead** (CPU): what a training iteration adds to the process's resident memory besides tensors
  (kernel and thread-pool buffers, autograd bookkeeping, allocator slack), measured on the first probe;
* **step memory**: every tensor created during training iterations - activations saved for backward, gradients
  (all phases' gradients: ``set_to_none`` frees a phase's gradients only when that phase runs again), the teacher's
  and critics' no-grad evaluations, backward's temporaries - tracked live, per storage, by a
  ``TorchDispatchMode`` that sees every operator's outputs (forward and backward) and releases them when their last
  tensor dies. It is measured, not modelled: the probe runs real iterations of this very config at two small batch
  sizes (after one warm-up iteration that creates the optimizer state) and extrapolates the peak linearly to the
  configured batch, ``S(B) = a + b B``; the part of ``a`` that is gradients is shown separately.

What it leaves out: the framework's own footprint (the CUDA context, the Python process and its libraries), the
allocator slack that grows with the batch, and anything not linear in the batch. ``scripts/bench_memory.py``
compares the estimate with the measured peak and reports the gap. A dry run builds everything a run builds (a loss
that generates teacher pairs in ``prepare`` generates them) and costs a few small iterations.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorProbe", "estimate_memory", "extrapolate_peak", "format_estimate", "measure_peak", "storage_bytes"]


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def storage_bytes(tensors: Iterable[Tensor], exclude: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        key = _storage_key(t)
        if exclude is not None and key in exclude:
            continue
        seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _module_tensors(m: nn.Module) -> list[Tensor]:
    return [*m.parameters(), *m.buffers()]


def _optimizer_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> list[Tensor]:
    return [v for opt in optimizers for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


class LiveTensorProbe(TorchDispatchMode):
    """Peak bytes of the storages created while the mode is active and still alive.

    Every operator output (forward, backward, optimizer) registers its storage once, with a weak reference to the
    C++ storage (``StorageWeakRef``: it expires exactly when the last tensor using the storage is freed, whether a
    Python object, the autograd graph or a ``.grad`` slot held it). Expired storages are swept before each operator
    registers its outputs. Storages in ``exclude`` (weights and optimizer state: what existed before) are never
    counted, so in-place updates of them are free. ``peak`` is the largest live total seen, ``timeline`` the live
    total after each operator."""

    def __init__(self, exclude: set[tuple[str, int]]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live: dict[tuple[str, int], tuple[Any, int]] = {}  # storage -> (weak reference, bytes)
        self.current = 0
        self.peak = 0
        self.timeline: list[int] = []  # live bytes after each operator

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            key = _storage_key(t)
            storage = t.untyped_storage()
            if key in self.exclude or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self.timeline.append(self.current)
        return out


def _cycle(module: Any) -> int:
    """Iterations until every phase of the loss has run once (DMD2: the critic steps between generator steps)."""
    seen: set[str] = set()
    k = 0
    while seen != set(module.loss.phases) and k < 100:
        seen |= set(module.loss.phases_for_step(k))
        k += 1
    return max(1, k)


def _probe(cfg: Any, batch_size: int) -> tuple[Any, list[int], int]:
    """Build ``cfg`` at ``batch_size``, run one warm-up cycle, then probe the next cycle. Returns ``(module, live
    bytes after each operator, runtime overhead)``: the overhead is the process's resident-memory growth over the
    two cycles that is not tensors (the optimizer state and the probed tensor peak are subtracted): kernel and
    thread-pool buffers, autograd bookkeeping, allocator slack at this batch (CPU; 0 elsewhere or where
    ``/proc`` is missing)."""
    import resource

    from distill.train import build_module

    cfg = copy.deepcopy(cfg)
    cfg.data.batch_size = int(batch_size)
    module = build_module(cfg)
    module.prepare()
    optimizers = module.configure_optimizers()[0]
    cycle = _cycle(module)
    rss0 = _rss_bytes()
    for _ in range(cycle):  # creates the optimizer state (and any lazy buffers) outside the probe
        module.iterate()
    existing = [*_module_tensors(module), *_module_tensors(module.loss), *_optimizer_tensors(optimizers)]
    with LiveTensorProbe({_storage_key(t) for t in existing}) as probe:
        for _ in range(cycle):
            module.iterate()
    overhead = 0
    if rss0 and next(module.student.parameters()).device.type == "cpu":
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        overhead = max(0, grown - storage_bytes(_optimizer_tensors(optimizers)) - max(probe.timeline, default=0))
    return module, probe.timeline, overhead


def extrapolate_peak(t1: list[int], t2: list[int], b1: int, b2: int, batch: int) -> tuple[float, float, float]:
    """Peak of the live-bytes timeline at ``batch`` from two probes' timelines: operator by operator,
    ``L_B[i] = L_1[i] + (L_2[i] - L_1[i]) (B - b_1) / (b_2 - b_1)`` (exact when every tensor's size is affine in the
    batch), then the maximum over operators. The two runs execute the same operators; if their counts differ (a
    data-dependent branch), the peaks themselves are extrapolated. Returns ``(peak, per_sample, fixed)`` where
    ``per_sample`` and ``fixed`` describe the line through the operator that attains the peak."""
    if len(t1) != len(t2) or not t1:
        p1, p2 = max(t1, default=0), max(t2, default=0)
        slope = (p2 - p1) / (b2 - b1)
        return p1 + slope * (batch - b1), slope, p1 - slope * b1
    best, best_i = -1.0, 0
    for i, (a, b) in enumerate(zip(t1, t2)):
        v = a + (b - a) * (batch - b1) / (b2 - b1)
        if v > best:
            best, best_i = v, i
    slope = (t2[best_i] - t1[best_i]) / (b2 - b1)
    return best, slope, t1[best_i] - slope * b1


def estimate_memory(cfg: Any, probe_batches: tuple[int, int] = (2, 4)) -> dict[str, Any]:
    """The memory estimate of a resolved run config (module docstring). Returns a JSON-able dict (bytes):
    ``weights`` (by network), ``optimizer``, ``gradients`` (part of the step memory), ``step`` (``total``,
    ``per_sample``, ``fixed``, the probe peaks), ``total``, ``batch_size`` and ``trainable_parameters``."""
    b1, b2 = (int(b) for b in probe_batches)
    module, t1, overhead = _probe(cfg, b1)  # first: the overhead reads this process's peak resident memory
    t2 = _probe(cfg, b2)[1]
    weights: dict[str, int] = {}
    counted: set[tuple[str, int]] = set()
    for name, net in (("teacher", module.teacher), ("student", module.student), ("ema", module.ema),
                      ("loss", module.loss)):
        tensors = _module_tensors(net)
        weights[name] = storage_bytes(tensors, exclude=counted)
        counted |= {_storage_key(t) for t in tensors}
    host = {}
    if str(cfg.model.teacher_offload) == "cpu":  # accelerate's cpu_offload keeps the teacher in host memory
        host["teacher"] = weights.pop("teacher")
    optimizers = [po.optimizer for po in module._optims.values()]
    trainable = {_storage_key(p): p for po in module._optims.values() for p in po.params}
    batch = int(cfg.data.batch_size)
    peak, per_sample, fixed = extrapolate_peak(t1, t2, b1, b2, batch)
    step = int(round(max(0.0, peak)))
    optimizer = storage_bytes(_optimizer_tensors(optimizers))
    return {
        "batch_size": batch,
        "weights": weights,
        "host": host,
        "trainable_parameters": int(sum(p.numel() for p in trainable.values())),
        "optimizer": int(optimizer),
        "gradients": int(sum(p.numel() * p.element_size() for p in trainable.values())),
        "step": {"total": step, "per_sample": per_sample, "fixed": fixed,
                 "probes": {str(b1): max(t1, default=0), str(b2): max(t2, default=0)}, "operators": [len(t1), len(t2)]},
        "runtime_overhead": int(overhead),
        "total": int(sum(weights.values()) + optimizer + step + overhead),
    }


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def format_estimate(est: dict[str, Any]) -> str:
    """A few human lines of :func:`estimate_memory`'s result."""
    w, step = est["weights"], est["step"]
    return "\n".join([
        f"memory estimate at batch {est['batch_size']} (peak of a training iteration, without the process's and "
        f"libraries' own footprint):",
        "  weights      " + ", ".join(f"{k} {_mb(v)}" for k, v in w.items()) + f"  (sum {_mb(sum(w.values()))})",
        f"  optimizer    {_mb(est['optimizer'])}  ({est['trainable_parameters']:,} trainable parameters)",
        f"  step         {_mb(step['total'])}  = {_mb(step['per_sample'])} per sample + {_mb(step['fixed'])} fixed "
        f"(of which gradients {_mb(est['gradients'])}); probed at batch {', '.join(step['probes'])}",
        f"  runtime      {_mb(est['runtime_overhead'])}  (non-tensor growth of a training iteration, measured at "
        f"batch {next(iter(step['probes']))}; CPU only)",
        f"  total        {_mb(est['total'])}",
    ])


def _rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        import os

        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def measure_peak(cfg: Any, iterations: int = 3) -> dict[str, int]:
    """The measured counterpart of :func:`estimate_memory` on CPU. Builds the run (every import, the networks, the
    data), reads the resident memory, trains ``iterations`` iterations at the configured batch and reads the
    process's peak resident memory (``ru_maxrss``). ``measured`` = the weights (counted as the estimate counts
    them) + the growth from that point to the peak (gradients, optimizer state, activations, transient buffers,
    allocator slack): the quantity the estimate predicts, without the interpreter's and libraries' footprint. Run it
    in a fresh process (``scripts/bench_memory.py`` does): the peak is the process's. On CUDA,
    ``torch.cuda.max_memory_allocated`` is reported as well (``device_peak``)."""
    import resource

    from distill.train import build_module

    module = build_module(cfg)
    module.prepare()
    module.configure_optimizers()
    nets = [module.teacher, module.student, module.ema, module.loss]
    weights = storage_bytes([t for n in nets for t in _module_tensors(n)])
    base = _rss_bytes()
    for _ in range(int(iterations)):
        module.iterate()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"weights": weights, "rss_after_build": base, "peak_rss": peak, "growth": peak - base,
           "measured": weights + max(0, peak - base), "iterations": int(iterations)}
    if torch.cuda.is_available() and next(module.student.parameters()).is_cuda:
        out["device_peak"] = int(torch.cuda.max_memory_allocated())
    return out
