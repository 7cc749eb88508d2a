"""Independent random streams: one generator per (seed, purpose, ...) tuple.

Every random draw of the project comes from a stream named by what it is for: a training iteration's per-sample
draws (``seed, iteration, "draw", i``), a data batch (``seed, iteration, spec``), an evaluation's initial noise,
re-noising and labels (``seed, "eval", "noise" | "renoise" | "labels"``), the teacher-pair cache's shards (the
exact scorer's reference set is one fixed, documented seed). The tuple is hashed (sha256, 63 bits) into the seed of
a fresh Mersenne-Twister generator, so distinct tuples give unrelated streams: unlike ``Generator(seed)`` and
``Generator(seed + 1)`` for two purposes, no stream is another's continuation (the overlap that made "seed s
re-noising == seed s + 1 initial noise"). ``tests/test_streams.py`` checks that the evaluation streams of seeds
0-9 share no draws.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["stream_seed", "generator", "randn_like"]


def stream_seed(*parts: Any) -> int:
    """A deterministic 63-bit seed for a tuple of labels (Python's ``hash`` of a str is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded by :func:`stream_seed` of ``parts``."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(*parts))
    return g


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard-normal draws shaped like ``x``, on ``x``'s device and dtype, from ``generator`` (``None``: torch's
    global RNG). The draws are made on the generator's own device and moved, so a CPU stream gives the same numbers
    whether the model runs on the CPU or a GPU (torch refuses a CPU generator for a CUDA draw)."""
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
