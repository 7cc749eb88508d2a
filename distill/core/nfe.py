"""Counting network function evaluations (NFE) by wrapping the network, never by arithmetic.

``with count_nfe(teacher) as c: sample(...)`` replaces ``teacher.denoise`` (or any named method) by a counting
wrapper for the duration of the block, so Heun's ``2N - 1`` and classifier-free guidance's doubling are *measured*.
``c.nfe`` is the number of forward passes per sample (each call processes the whole batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["NFECounter", "count_nfe"]


@dataclass
class NFECounter:
    calls: int = 0  # network forward passes (each over the whole batch)
    rows: int = 0  # total rows processed (calls x batch when the batch is fixed)

    @property
    def nfe(self) -> int:
        return self.calls


@contextmanager
def count_nfe(obj: Any, method: str | None = None) -> Iterator[NFECounter]:
    """Count calls of ``obj.<method>`` (default: ``denoise`` if ``obj`` has one, else ``forward``)."""
    if method is None:
        method = "denoise" if hasattr(obj, "denoise") else "forward"
    counter = NFECounter()
    had_instance_attr = method in vars(obj)
    original = getattr(obj, method)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        if args and hasattr(args[0], "shape"):
            counter.rows += int(args[0].shape[0])
        return original(*args, **kwargs)

    object.__setattr__(obj, method, counted)
    try:
        yield counter
    finally:
        if had_instance_attr:
            object.__setattr__(obj, method, original)
        else:
            object.__delattr__(obj, method)
