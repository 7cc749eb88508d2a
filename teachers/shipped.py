"""Teachers that ship with the project: trained UNets kept in ``teachers/shipped/<name>/`` and exact empirical ones.

* ``digits``: a 1.1 M-parameter diffusers ``UNet2DModel`` with EDM preconditioning trained on scikit-learn's 1,797
  8x8 digits by ``scripts/train_teacher.py`` (record in ``docs/teacher_digits.md``); loads offline in well under a
  second, so ``distill train`` works on a laptop CPU.
* ``digits_cond``: the same network and EDM recipe trained class-conditional (``num_class_embeds = 11``: the ten
  digits and a null class, label 10, trained in place of the label with probability 0.1), so classifier-free guidance
  ``D_w = D(x, null) + w (D(x, y) - D(x, null))`` is available for guidance distillation (``scripts/train_teacher.py
  --conditional``; record in ``docs/teacher_digits.md``).
* ``empirical_digits``: the exact denoiser of the empirical distribution of those same digits (a mixture of point
  masses): no training error, but it memorises — the closed-form reference, not a generative model.
"""

from __future__ import annotations

from pathlib import Path

from distill.core.registry import ConfigError

from .analytic import GaussianMixtureTeacher, empirical
from .diffusers_teacher import DiffusersTeacher, load_diffusers_teacher

__all__ = ["SHIPPED_ROOT", "SHIPPED_TEACHERS", "shipped_teacher_path", "load_shipped_teacher", "digits_teacher",
           "digits_cond_teacher", "empirical_digits"]

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"

# name -> the command that (re)creates its folder
SHIPPED_TEACHERS: dict[str, str] = {
    "digits": "python scripts/train_teacher.py --dataset digits --out teachers/shipped/digits",
    "mnist": "python scripts/train_teacher.py --dataset mnist --out teachers/shipped/mnist",
    "digits_cond": "python scripts/train_teacher.py --conditional --steps 5000 --seed 0 --threads 1 "
                   "--out teachers/shipped/digits_cond",
}


def shipped_teacher_path(name: str = "digits") -> Path:
    """The folder of the shipped teacher ``name`` (it may not exist yet; see :func:`load_shipped_teacher`)."""
    if name not in SHIPPED_TEACHERS:
        raise ConfigError(f"unknown shipped teacher {name!r}; valid names: {', '.join(sorted(SHIPPED_TEACHERS))}")
    return SHIPPED_ROOT / name


def load_shipped_teacher(name: str = "digits") -> DiffusersTeacher:
    """Load a shipped teacher from its local folder (nothing is downloaded)."""
    path = shipped_teacher_path(name)
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"shipped teacher folder {str(path)!r} is missing or incomplete; create it with "
                                f"`{SHIPPED_TEACHERS[name]}`")
    return load_diffusers_teacher(path)


def digits_teacher() -> DiffusersTeacher:
    """The shipped 8x8 digits teacher (EDM, sigma in [0.002, 80], sigma_data 0.5, data in [-1, 1])."""
    return load_shipped_teacher("digits")


def digits_cond_teacher() -> DiffusersTeacher:
    """The shipped class-conditional 8x8 digits teacher (as :func:`digits_teacher`, plus labels 0-9 and the null
    class 10 for classifier-free guidance)."""
    return load_shipped_teacher("digits_cond")


def empirical_digits(std: float = 0.0) -> GaussianMixtureTeacher:
    """Exact denoiser of the 1,797 real digits in [-1, 1] (optionally each smoothed by an isotropic ``std``)."""
    from distill.core.data import load_digits_tensor

    return empirical(load_digits_tensor()[0], std=std)
