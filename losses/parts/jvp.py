"""Directional derivatives of a network function, for the continuous-time consistency and flow-map losses (sCM,
MeanFlow, Align Your Flow): ``jvp(fn, primals, tangents) -> (fn(*primals), d/dh fn(*(primals + h tangents))|_0)``.

Two methods, chosen by the loss's ``jvp`` option:

* ``"autograd"`` - one forward-mode pass, ``torch.func.jvp`` (sCM arXiv:2410.11081 §4 computes the tangent this
  way). Attention must use the math SDPA kernel for forward-mode AD on CPU (and with kernels that lack it), so the
  call runs under ``sdpa_kernel([SDPBackend.MATH])``. Forward-mode AD is not supported under FSDP or activation
  checkpointing.
* ``"finite_difference"`` - the central difference ``(fn(p + h t) - fn(p - h t)) / 2h`` with two ordinary forward
  passes (FastGen's ``use_jvp_finite_diff`` fallback for fused-attention kernels, FSDP and checkpointing). Its
  error is ``O(h^2)`` truncation plus ``O(eps_mach / h)`` rounding: with float32 networks and ``h = 1e-3`` about
  1e-4 relative. The value returned is a third pass at ``p`` itself (the primal of the autograd path).

Both run under whatever grad mode the caller set; the losses call them on no-grad copies under ``torch.no_grad()``.
Randomness inside ``fn`` (dropout) is the caller's business: fork the RNG so every pass sees the same mask
(:func:`same_randomness`).

The tangent's warm-up and normalisation of sCM (arXiv:2410.11081 §4.1-4.2), which Align Your Flow reuses, live here
too: :func:`tangent_warmup` and :func:`normalize_tangent` (FastGen's size-invariant norm, :func:`tangent_rms`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from distill.core.conversions import append_dims
from distill.core.registry import ConfigError

__all__ = ["JVP_METHODS", "check_jvp_method", "jvp", "same_randomness", "tangent_warmup", "tangent_rms",
           "normalize_tangent"]

JVP_METHODS = ("autograd", "finite_difference")


def check_jvp_method(method: str) -> str:
    if method not in JVP_METHODS:
        raise ConfigError(f"unknown jvp method {method!r}; valid: {', '.join(JVP_METHODS)}")
    return method


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor], method: str = "autograd",
        h: float = 1e-3) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), J_fn(primals) @ tangents)``.

    Args:
        fn: a function of tensors returning one tensor.
        primals, tangents: same-length sequences of same-shaped tensors.
        method: ``"autograd"`` (``torch.func.jvp``) or ``"finite_difference"`` (central difference with step ``h``).
    """
    check_jvp_method(method)
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents) or any(p.shape != t.shape for p, t in zip(primals, tangents)):
        raise ValueError("jvp: every primal needs a tangent of its shape; got primals "
                         f"{[list(p.shape) for p in primals]}, tangents {[list(t.shape) for t in tangents]}")
    if method == "autograd":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(fn, primals, tangents)
    plus = fn(*(p + h * t for p, t in zip(primals, tangents)))
    minus = fn(*(p - h * t for p, t in zip(primals, tangents)))
    return fn(*primals), (plus - minus) / (2 * h)


@contextlib.contextmanager
def same_randomness(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG (CPU and the current CUDA device) seeded to ``seed`` and restored
    afterwards, so two passes of a network with dropout (ECT's target and prediction, sCM's JVP and its gradient
    pass) draw identical masks."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def tangent_warmup(iteration: int, warmup: int, r_max: float = 1.0) -> float:
    """Tangent warm-up ``r = min(r_max, k / H)`` (sCM arXiv:2410.11081 §4.1 with ``r_max = 1``; Align Your Flow
    arXiv:2506.14603 caps it at 0.99); ``H = warmup <= 0`` means no warm-up (``r = r_max``)."""
    if warmup <= 0:
        return float(r_max)
    return float(min(r_max, max(0, iteration) / warmup))


def tangent_rms(g: Tensor) -> Tensor:
    """Per-sample size-invariant norm ``||g||_2 / sqrt(numel)`` (a root-mean-square): ``[B, ...] -> [B]``."""
    return g.flatten(1).norm(dim=1) / math.sqrt(g[0].numel())


def normalize_tangent(g: Tensor, c: float = 0.1) -> tuple[Tensor, Tensor]:
    """sCM's tangent normalisation ``(g / (||g|| + c), ||g||)`` with ``||.||`` = :func:`tangent_rms` (FastGen's
    departure from the paper's plain norm, which would make ``c`` negligible for images and dominant for 2-D data).
    The result's norm is below 1. Returns ``[B, ...]`` and ``[B]``."""
    norm = tangent_rms(g)
    return g / append_dims(norm + c, g.ndim), norm
