"""Offline data sets and image helpers (distill/core/data.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill.core.data import DATASETS, build_dataset, load_digits_tensor, load_mnist_tensor, save_grid, to_uint8_images
from distill.core.registry import ConfigError


def test_digits_shapes_range_and_levels():
    x, y = load_digits_tensor()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    # sklearn grey levels are the integers 0..16, so (x + 1) * 8 must be integral and cover all 17 levels.
    levels = (x + 1) * 8
    assert torch.equal(levels, levels.round())
    assert levels.unique().numel() == 17
    # Real digits are mostly background: the mean grey level of sklearn's digits is ~4.9/16.
    assert -0.45 < x.mean().item() < -0.35


def test_digits_class_balance():
    _, y = load_digits_tensor()
    counts = torch.bincount(y, minlength=10)
    assert counts.numel() == 10 and counts.sum() == 1797
    assert counts.min() >= 170 and counts.max() <= 190  # 174..183 per class


def test_cached_loader_returns_independent_copies():
    x1, _ = load_digits_tensor()
    x1.zero_()
    x2, _ = load_digits_tensor()
    assert x2.min() == -1.0 and x2.max() == 1.0


def test_mnist_shapes_range_and_balance():
    x, y = load_mnist_tensor()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 500))
    # Genuine MNIST statistics: ~19% of the pixels are ink.
    ink = (x > -1).float().mean().item()
    assert 0.15 < ink < 0.25


def test_registry_and_dataset():
    assert DATASETS.names() == ["digits", "mnist"]
    ds = build_dataset("digits")
    img, label = ds[5]
    assert img.shape == (1, 8, 8) and label.ndim == 0 and len(ds) == 1797
    with pytest.raises(ConfigError, match="valid datasets: digits, mnist"):
        build_dataset("cifar10")


def test_to_uint8_images():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5]).reshape(1, 1, 2, 3)
    u = to_uint8_images(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 3, 1)
    assert u.ravel().tolist() == [0, 128, 255, 255, 0, 191]  # (x + 1) * 127.5, rounded, clipped
    rgb = to_uint8_images(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*\[8, 8\]"):
        to_uint8_images(torch.zeros(8, 8))


def test_save_grid_upscales_with_nearest(tmp_path):
    x, _ = load_digits_tensor()
    path = save_grid(x[:16], tmp_path / "sub" / "grid.png", nrow=4, scale=4, padding=1)
    img = np.asarray(Image.open(path).convert("L"))
    # 4 x 4 tiles of 32 px with 1 px padding around each.
    assert img.shape == (4 * 33 + 1, 4 * 33 + 1)
    # First tile, top-left 4x4 block is one digit pixel repeated (nearest neighbour, no blur).
    tile = img[1:33, 1:33]
    expected = to_uint8_images(x[:1])[0, :, :, 0]
    assert np.abs(tile[::4, ::4].astype(int) - expected.astype(int)).max() <= 1
    assert (tile[:4, :4] == tile[0, 0]).all()
