"""Distillation losses, one file each, registered by name: ``build_loss("cd", N=18)``.

An unknown name or an unknown constructor key fails with the list of valid ones (distill.core.registry).
"""

from __future__ import annotations

from typing import Any

from distill.core.registry import Registry

from .base import Batch, DistillLoss

LOSSES: Registry = Registry("loss")


def register_loss(name: str):
    return LOSSES.register(name)


def build_loss(name: str, **kwargs: Any) -> DistillLoss:
    return LOSSES.build(name, **kwargs)


def _import_all() -> None:
    # Each top-level module registers its loss on import; import errors in a loss file are real errors. Subpackages
    # (``parts/``: pieces shared by several losses) register nothing and are imported by the losses that use them.
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(__path__):
        if m.name != "base" and not m.ispkg:
            importlib.import_module(f"{__name__}.{m.name}")


_import_all()

__all__ = ["LOSSES", "Batch", "DistillLoss", "build_loss", "register_loss"]
