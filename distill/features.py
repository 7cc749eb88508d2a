"""Feature extractors for FID: a shipped digits classifier, clean-fid's Inception from a local file, raw pixels.

Every extractor maps images ``[B, C, H, W]`` in ``[-1, 1]`` (or low-dimensional points ``[B, D]`` for
:class:`FlattenFeatures`) to features ``[B, D]`` in float64, and names itself with :meth:`FeatureExtractor.describe`
(``"<name>@<version>"``, the version being a hash of its weights) so that an FID is only ever compared against
reference statistics computed with the very same network (docs/design.md §3.6).

* ``digits`` -- :class:`DigitsFeatures`: the 64-d penultimate ReLU layer of a small CNN trained on scikit-learn's
  8x8 digits by ``scripts/train_classifier.py``; weights ship in ``distill/assets`` as safetensors + JSON.
* ``inception`` -- :class:`InceptionFeatures`: clean-fid's torchscript Inception (``inception-2015-12-05.pt``), only
  from a local path; images are quantised to 8-bit levels, made 3-channel and resized to 299x299 with clean-fid's
  "clean" resizer (PIL bicubic on float images), then fed to the network exactly as clean-fid's ``InceptionV3W``
  does in "clean" mode.
* ``flatten`` -- :class:`FlattenFeatures`: the raw coordinates, for 2-D data and tests.

Nothing here downloads anything, and nothing is unpickled: weights are safetensors (or TorchScript for Inception).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid.resize import build_resizer
from torch import Tensor

from distill.core.digits_classifier import (  # noqa: F401  (re-exported)
    ASSETS_DIR,
    DIGITS_CLASSIFIER_CONFIG,
    DIGITS_CLASSIFIER_WEIGHTS,
    DigitsClassifier,
    file_sha256,
    load_digits_classifier,
)
from distill.core.registry import Registry

__all__ = [
    "FeatureExtractor",
    "DigitsClassifier",
    "DigitsFeatures",
    "InceptionFeatures",
    "FlattenFeatures",
    "FEATURES",
    "build_features",
    "ASSETS_DIR",
    "DIGITS_CLASSIFIER_WEIGHTS",
    "DIGITS_CLASSIFIER_CONFIG",
    "INCEPTION_FILENAME",
    "INCEPTION_ENV_VAR",
    "file_sha256",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_ENV_VAR = "DISTILL_INCEPTION_WEIGHTS"

FEATURES: Registry[Any] = Registry("feature extractor")


def _check_images(images: Tensor, where: str, channels: tuple[int, ...] | None = None) -> None:
    """One-line errors for the image convention ``[B, C, H, W]`` float, finite."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{where}: images must be a torch.Tensor [B, C, H, W] in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{where}: images must have shape [B, C, H, W], got {list(images.shape)}")
    if channels is not None and images.shape[1] not in channels:
        raise ValueError(f"{where}: images must have C in {list(channels)} channels, got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{where}: images must be a float tensor in [-1, 1], got dtype {images.dtype}")
    bad = (~torch.isfinite(images)).sum().item()
    if bad:
        # A diverged student must fail loudly here rather than report FID = nan next to a protocol record.
        raise ValueError(f"{where}: images contain {bad} non-finite values (NaN/Inf); FID needs finite samples")


class FeatureExtractor:
    """Base class: ``extractor(images) -> [B, dim]`` float64 features, computed in batches without gradients.

    Subclasses set ``name`` and ``dim`` and implement :meth:`_features` on one batch; ``version`` identifies the
    weights (e.g. a hash prefix) and :meth:`describe` is the string every FID record and reference carries;
    ``batch_size`` is the default number of images per network call.
    """

    name: str = ""
    dim: int = 0
    version: str = ""
    batch_size: int = 500

    def _features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _validate(self, images: Tensor) -> None:
        _check_images(images, type(self).__name__)

    def describe(self) -> str:
        """``"<name>@<version>"`` (or just the name when the extractor has no weights)."""
        return f"{self.name}@{self.version}" if self.version else self.name

    def __call__(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """Features of ``images: [B, C, H, W]`` in ``[-1, 1]``. Returns ``[B, dim]`` float64 on the CPU."""
        self._validate(images)
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                out.append(self._features(images[start : start + batch_size]).detach().to("cpu", torch.float64))
        if not out:
            return torch.zeros((0, self.dim), dtype=torch.float64)
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r}, dim={self.dim})"


# ---------------------------------------------------------------------------------------------------------------
# The shipped digits classifier
# ---------------------------------------------------------------------------------------------------------------


@FEATURES.register("digits")
class DigitsFeatures(FeatureExtractor):
    """64-d penultimate features of the shipped digits classifier (safetensors weights, JSON architecture).

    Args:
        weights_path: a ``.safetensors`` file; defaults to ``distill/assets/digits_classifier.safetensors``, with its
            architecture read from the ``.json`` beside it.
        device: where the classifier runs.
    """

    name = "digits"

    def __init__(self, weights_path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> None:
        self.model, self.config, sha = load_digits_classifier(weights_path)
        arch = self.config["architecture"]
        self.device = torch.device(device)
        self.model.to(self.device)
        self.image_size = int(arch["image_size"])
        self.dim = int(arch["hidden"])
        self.num_classes = int(arch["num_classes"])
        self.version = sha[:12]

    def _validate(self, images: Tensor) -> None:
        _check_images(images, "DigitsFeatures", channels=(1,))
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"DigitsFeatures: images must have shape [B, 1, {self.image_size}, {self.image_size}], "
                f"got {list(images.shape)}"
            )

    def _prepare(self, images: Tensor) -> Tensor:
        # Clamp as a saved image would be: real digits live in [-1, 1], so out-of-range pixels a sampler
        # overshoots to must not move features into a region the reference never visits.
        return images.to(self.device, torch.float32).clamp(-1.0, 1.0)

    def _features(self, images: Tensor) -> Tensor:
        return self.model.features(self._prepare(images))

    def logits(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Class logits ``[B, num_classes]`` (float32, CPU)."""
        self._validate(images)
        with torch.no_grad():
            parts = [
                self.model(self._prepare(images[s : s + batch_size])).cpu()
                for s in range(0, images.shape[0], batch_size)
            ]
        return torch.cat(parts) if parts else torch.zeros((0, self.num_classes))

    def predict(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """Predicted digit labels ``[B]`` (int64), for per-class coverage."""
        return self.logits(images, batch_size).argmax(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# clean-fid's Inception, from a local file only
# ---------------------------------------------------------------------------------------------------------------


_INCEPTION_HOW = (
    f"provide clean-fid's '{INCEPTION_FILENAME}' (the file clean-fid itself downloads) through eval.inception_path, "
    f"InceptionFeatures(weights_path=...) or {INCEPTION_ENV_VAR}=/path/to/{INCEPTION_FILENAME} (nothing is downloaded)"
)


def _resolve_inception_path(weights_path: str | os.PathLike[str] | None) -> Path:
    """The local Inception file from the argument, else ``$DISTILL_INCEPTION_WEIGHTS``; a directory may hold it."""
    source = "weights_path / eval.inception_path"
    if weights_path is None or str(weights_path) == "":
        weights_path = os.environ.get(INCEPTION_ENV_VAR) or None
        source = f"${INCEPTION_ENV_VAR}"
    if weights_path is None:
        raise FileNotFoundError(f"Inception weights not given: {_INCEPTION_HOW}")
    path = Path(weights_path).expanduser()
    if path.is_dir():
        path = path / INCEPTION_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path} (from {source}): {_INCEPTION_HOW}")
    return path


def _to_uint8_levels(images: Tensor, quantize: bool) -> np.ndarray:
    """``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, H, W, 3]`` float32 in ``[0, 255]`` (grey replicated to RGB).

    With ``quantize`` the values are rounded to the 256 levels a saved PNG would hold, which is what clean-fid's
    folder pipeline (and every published reference statistic) measures.
    """
    x = (images.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5
    if quantize:
        x = x.round()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


@FEATURES.register("inception")
class InceptionFeatures(FeatureExtractor):
    """2048-d pool features of clean-fid's torchscript Inception-v3, in clean-fid's "clean" mode.

    Per image, as clean-fid's ``get_model_features``/folder path in "clean" mode: ``[-1, 1]`` -> ``[0, 255]``
    (rounded to 8-bit levels unless ``quantize=False``), grey replicated to 3 channels, each channel resized to
    299x299 by ``cleanfid.resize.build_resizer("clean")`` (PIL bicubic on float32, clipped to ``[0, 255]``); the batch
    ``[B, 3, 299, 299]`` then goes through ``InceptionV3W.forward`` with ``resize_inside=False``:
    ``base.layers.forward((x - 128) / 128).view(B, -1)``. (The file's own ``forward(x, return_features=True)`` is
    clean-fid's "legacy_tensorflow" path, which resizes inside the network; "clean" mode does not call it.) The
    feature width is read from the network's output: 2048 for clean-fid's file; a stand-in network of another
    width (tests) is measured the same way.

    Args:
        weights_path: the local ``inception-2015-12-05.pt`` (or a folder holding it); if ``None``, the path in
            ``$DISTILL_INCEPTION_WEIGHTS``. A missing file raises :class:`FileNotFoundError`; nothing is downloaded.
        device: where Inception runs.
        quantize: round images to 8-bit levels before resizing (as saved PNGs would be).
    """

    name = "inception"
    dim = 2048
    batch_size = 50  # 50 x 3 x 299 x 299 float32 inputs and their activations stay well under a few GB

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        quantize: bool = True,
    ) -> None:
        path = _resolve_inception_path(weights_path)
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # clean-fid's file is TorchScript, so torch.jit.load is the only way to read it; torch 2.14 marks
            # the API deprecated (FutureWarning) but it still loads the archive without unpickling Python objects.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        self.resize = build_resizer("clean")  # PIL bicubic to 299x299 on float32, no quantisation after
        self.quantize = quantize
        self.version = file_sha256(path)[:12]
        self.path = path
        self._width: int | None = None

    def _validate(self, images: Tensor) -> None:
        _check_images(images, "InceptionFeatures", channels=(1, 3))

    def _features(self, images: Tensor) -> Tensor:
        hwc = _to_uint8_levels(images, self.quantize)
        resized = np.stack([self.resize(img) for img in hwc])  # [B, 299, 299, 3] in [0, 255]
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        # clean-fid "clean" mode (InceptionV3W, resize_inside=False): the network's own normalisation on input that
        # is already 299x299, then its pool features.
        feats = self.model.layers.forward((x - 128) / 128).reshape(x.shape[0], -1)
        if self._width is None:
            self._width = self.dim = int(feats.shape[1])
        elif feats.shape[1] != self._width:
            raise ValueError(f"InceptionFeatures: {self.path} gave {feats.shape[1]} features, earlier {self._width}")
        return feats


# ---------------------------------------------------------------------------------------------------------------
# Raw coordinates
# ---------------------------------------------------------------------------------------------------------------


@FEATURES.register("flatten")
class FlattenFeatures(FeatureExtractor):
    """The raw values, flattened: ``[B, ...] -> [B, prod(...)]``. ``dim`` is fixed by the first call if not given.

    Args:
        dim: expected feature dimension (optional; checked when given).
    """

    name = "flatten"

    def __init__(self, dim: int | None = None) -> None:
        self.dim = int(dim) if dim is not None else 0

    def _validate(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim < 2:
            got = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"FlattenFeatures: input must be a tensor [B, ...] with at least 2 dims, got {got}")
        bad = (~torch.isfinite(images)).sum().item()
        if bad:
            raise ValueError(f"FlattenFeatures: input contains {bad} non-finite values (NaN/Inf)")
        d = int(np.prod(images.shape[1:]))
        if self.dim and d != self.dim:
            raise ValueError(f"FlattenFeatures: expected {self.dim} values per sample, got shape {list(images.shape)}")
        self.dim = d

    def _features(self, images: Tensor) -> Tensor:
        return images.reshape(images.shape[0], -1)


def build_features(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build a registered feature extractor by name (``digits``, ``inception``, ``flatten``)."""
    return FEATURES.build(name, **kwargs)
