"""Frozen teachers behind one denoiser contract ``D(x, sigma, cond=None, guidance=1.0) -> x0``.

Build one by name with :func:`build_teacher` (``{"name": "ring"}``, ``{"name": "diffusers", "path": ...}``,
``{"name": "mixture", "means": [[0, 0], [3, 0]], "stds": [0.1, 0.3], "weights": [0.8, 0.2]}``); an unknown name fails
with the list of valid names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distill.core.registry import Registry

from .analytic import GaussianMixtureTeacher, empirical, grid, mixture, ring
from .base import Denoiser, Teacher, TeacherInfo
from .diffusers_teacher import DiffusersTeacher, load_diffusers_teacher
from .folders import load_diffusers_folder
from .latent import DiTTeacher, TextLatentTeacher
from .shipped import digits_cond_teacher, digits_teacher, empirical_digits, load_shipped_teacher

TEACHERS: Registry = Registry("teacher")
TEACHERS.register("ring")(ring)
TEACHERS.register("grid")(grid)
TEACHERS.register("mixture")(mixture)
TEACHERS.register("diffusers")(load_diffusers_folder)  # dispatches: pixel UNet, SD/SDXL, DiT, SD3
TEACHERS.register("digits")(digits_teacher)
TEACHERS.register("digits_cond")(digits_cond_teacher)
TEACHERS.register("empirical_digits")(empirical_digits)


def build_teacher(cfg: Mapping[str, Any]) -> Teacher:
    """Build a teacher from a config mapping with a ``name`` key and the factory's keyword arguments."""
    cfg = dict(cfg)
    if "name" not in cfg:
        from distill.core.registry import ConfigError

        raise ConfigError(f"teacher config needs a 'name'; valid teachers: {', '.join(TEACHERS.names())}")
    name = cfg.pop("name")
    return TEACHERS.build(name, **cfg)


__all__ = [
    "Denoiser",
    "Teacher",
    "TeacherInfo",
    "GaussianMixtureTeacher",
    "DiffusersTeacher",
    "DiTTeacher",
    "TextLatentTeacher",
    "load_diffusers_folder",
    "TEACHERS",
    "build_teacher",
    "empirical",
    "grid",
    "mixture",
    "ring",
    "load_diffusers_teacher",
    "load_shipped_teacher",
]
