"""The shipped digits classifier (a small CNN on scikit-learn's 8x8 digits) and its loader.

It lives in the bottom layer because two upper layers use it: the digits FID features (:mod:`distill.features`) and
the ``kd`` loss's perceptual distance (``losses/kd.py``). Weights: ``distill/assets/digits_classifier.safetensors``
with its architecture and sha256 in the ``.json`` beside it (``scripts/train_classifier.py`` writes both).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

__all__ = ["DigitsClassifier", "load_digits_classifier", "file_sha256", "ASSETS_DIR", "DIGITS_CLASSIFIER_WEIGHTS",
           "DIGITS_CLASSIFIER_CONFIG"]

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DIGITS_CLASSIFIER_WEIGHTS = ASSETS_DIR / "digits_classifier.safetensors"
DIGITS_CLASSIFIER_CONFIG = ASSETS_DIR / "digits_classifier.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits: conv -> conv -> 2x2 max-pool -> linear to a ``hidden``-d ReLU layer -> logits.

    Args:
        channels: output channels of the two 3x3 convolutions (padding 1, so 8x8 stays 8x8 until the pool).
        hidden: width of the penultimate layer (the FID features).
        num_classes: number of logits.
        dropout: dropout on the penultimate features during training only.
        image_size: side of the square input (8 for scikit-learn's digits).

    Input ``x: [B, 1, image_size, image_size]`` in ``[-1, 1]``.
    """

    def __init__(
        self,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 64,
        num_classes: int = 10,
        dropout: float = 0.25,
        image_size: int = 8,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (image_size // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate ReLU activations ``[B, hidden]``."""
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = nn.functional.max_pool2d(h, 2)
        return torch.relu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc2(self.dropout(self.features(x)))


def load_digits_classifier(weights_path: str | os.PathLike[str] | None = None
                           ) -> tuple[DigitsClassifier, dict[str, Any], str]:
    """``(model, config, sha256)``: the classifier in eval mode with frozen weights, on the CPU. Missing files and a
    sha256 that does not match the ``.json`` fail with one line."""
    weights = Path(weights_path) if weights_path is not None else DIGITS_CLASSIFIER_WEIGHTS
    config_path = weights.with_suffix(".json")
    for p in (weights, config_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"digits classifier file {p} is missing; regenerate it with "
                f"`python scripts/train_classifier.py` (it writes {weights.name} and {config_path.name})"
            )
    config: dict[str, Any] = json.loads(config_path.read_text())
    arch = config["architecture"]
    model = DigitsClassifier(channels=tuple(arch["channels"]), hidden=arch["hidden"], num_classes=arch["num_classes"],
                             dropout=arch["dropout"], image_size=arch["image_size"])
    model.load_state_dict(load_file(str(weights)))
    model.eval().requires_grad_(False)
    sha = file_sha256(weights)
    expected = config.get("weights_sha256")
    if expected is not None and expected != sha:
        raise ValueError(
            f"digits classifier weights {weights} do not match the sha256 in {config_path.name} "
            f"({sha[:12]} != {expected[:12]}); retrain with scripts/train_classifier.py"
        )
    return model, config, sha
