"""Reference statistics for FID: the Gaussian fit ``N(mu, C)`` of a reference set's features, with its source, size
and a SHA-256, from the shipped digits file (an error, never a silent recomputation, when it is missing or built for
another classifier), a ``.npz`` (clean-fid's ``mu``/``sigma`` or a :class:`ReferenceStats` file) or a folder of
images read as clean-fid reads them (:func:`load_reference`). Nothing is downloaded. Used by :mod:`distill.fid`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.core.data import load_digits_tensor
from distill.features import ASSETS_DIR, DigitsFeatures, FeatureExtractor

__all__ = ["ReferenceStats", "gaussian_stats", "digits_reference_stats", "compute_digits_reference_stats",
           "DIGITS_REFERENCE_FILE", "folder_reference_stats", "load_reference", "as_float64"]

ArrayLike = Tensor | np.ndarray


def as_float64(x: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of a tensor or array."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``feats: [N, D]``, N >= 2."""
    f = as_float64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs features [N, D] with N >= 2, got shape {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------------------


def _stats_sha256(mu: np.ndarray, cov: np.ndarray) -> str:
    """SHA-256 of the little-endian float64 bytes of ``mu`` then ``cov`` (shape is implied by ``len(mu)``)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(mu, dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(cov, dtype="<f8").tobytes())
    return h.hexdigest()


# The covariance's key in reference files written before it was renamed from ``sigma`` to ``cov``.
_LEGACY_COV_KEY = "sigma"


@dataclass
class ReferenceStats:
    """Gaussian statistics of a reference set's features, with where they came from.

    Attributes:
        mu: ``[D]`` feature mean (float64).
        cov: ``[D, D]`` feature covariance (float64).
        n: number of reference samples (``None`` when unknown, e.g. a clean-fid ``.npz`` holds only mu and sigma).
        source: what the reference set is (e.g. ``"sklearn digits, all 1797"``).
        features: the extractor's :meth:`~distill.features.FeatureExtractor.describe` string.
        name: a short name for one-line labels (e.g. ``"1,797 real digits"``, ``"ref.npz"``); see
            :attr:`display_name`.
    The ``sha256`` property hashes ``mu`` and ``cov``, so any change to the statistics changes it.
    """

    mu: np.ndarray
    cov: np.ndarray
    n: int | None
    source: str
    features: str
    name: str = ""

    def __post_init__(self) -> None:
        self.mu = as_float64(self.mu)
        self.cov = as_float64(self.cov)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.cov.shape != (d, d):
            raise ValueError(
                f"ReferenceStats needs mu [D] and cov [D, D], got {list(self.mu.shape)} and {list(self.cov.shape)}"
            )
        self.n = None if self.n is None else int(self.n)

    @property
    def sha256(self) -> str:
        return _stats_sha256(self.mu, self.cov)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def display_name(self) -> str:
        """``name``, else ``"<n> reference samples"``, else the source."""
        return self.name or (f"{self.n:,} reference samples" if self.n is not None else self.source)

    def summary(self) -> dict[str, Any]:
        """What an :class:`FIDRecord` stores about its reference: source, n, features, sha256 and a short name."""
        return {"source": self.source, "n": self.n, "features": self.features, "sha256": self.sha256,
                "name": self.display_name}

    @classmethod
    def from_features(cls, feats: ArrayLike, source: str, features: str) -> ReferenceStats:
        """Statistics of ``feats: [N, D]``."""
        mu, cov = gaussian_stats(feats)
        return cls(mu=mu, cov=cov, n=int(feats.shape[0]), source=source, features=features)

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` at exactly ``path`` (strings as unicode arrays, so no pickling is needed to read it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(
                f,
                mu=self.mu,
                cov=self.cov,
                n=np.int64(-1 if self.n is None else self.n),
                source=np.str_(self.source),
                features=np.str_(self.features),
                sha256=np.str_(self.sha256),
                name=np.str_(self.name),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Read a file written by :meth:`save`; the stored hash must match the stored statistics.

        Files written before the covariance was renamed store it as ``sigma``; they are read too (the hash covers
        only the numbers, so it is unchanged by the key's name).
        """
        with np.load(path, allow_pickle=False) as z:
            cov_key = _LEGACY_COV_KEY if "cov" not in z.files and _LEGACY_COV_KEY in z.files else "cov"
            missing = sorted({"mu", cov_key, "n", "source", "features", "sha256"} - set(z.files))
            if missing:
                raise ValueError(f"{path} is not a ReferenceStats file: missing arrays {missing}")
            n = int(z["n"])
            name = str(z["name"]) if "name" in z.files else ""
            ref = cls(mu=z["mu"], cov=z[cov_key], n=None if n < 0 else n, source=str(z["source"]),
                      features=str(z["features"]), name=name)
            stored = str(z["sha256"])
        if stored != ref.sha256:
            raise ValueError(f"{path}: stored sha256 {stored[:12]} does not match its statistics ({ref.sha256[:12]})")
        return ref


_DIGITS_REFERENCE_CACHE: dict[tuple[str, str], ReferenceStats] = {}
DIGITS_REFERENCE_FILE = ASSETS_DIR / "digits_reference_stats.npz"
DIGITS_REFERENCE_SOURCE = "sklearn load_digits, all 1797 images, x/8-1"
_REBUILD_HINT = "rebuild it with `python scripts/train_classifier.py --reference-only` (for the shipped classifier)"


def compute_digits_reference_stats(extractor: FeatureExtractor) -> ReferenceStats:
    """Statistics of all 1,797 real digits under ``extractor``, computed now (well under a second on a CPU)."""
    images, _ = load_digits_tensor()
    ref = ReferenceStats.from_features(extractor(images), DIGITS_REFERENCE_SOURCE, extractor.describe())
    ref.name = f"{ref.n:,} real digits"
    return ref


def _shipped_digits_problem(path: Path, key: str) -> str | None:
    """Why the shipped statistics at ``path`` cannot serve the classifier ``key`` (one line), or ``None``."""
    if not path.is_file():
        return f"digits reference statistics {path} are missing (expected statistics for classifier {key})"
    shipped = ReferenceStats.load(path)
    if shipped.features != key:
        return (f"digits reference statistics {path} were built for classifier {shipped.features}, but the classifier "
                f"in use is {key}")
    return None


def digits_reference_stats(extractor: FeatureExtractor | None = None, recompute: bool = False) -> ReferenceStats:
    """Statistics of all 1,797 real digits under ``extractor`` (default: the shipped digits classifier), cached.

    The statistics shipped beside the classifier (``digits_reference_stats.npz``) are used, so the reference hash in
    every record is the same on every machine (on-the-fly features can differ in the last bits between CPUs). A
    missing file, or one built for another classifier (another weights hash), is an error with one line naming the
    file, the expected classifier and how to rebuild it -- never a silent recomputation. ``recompute=True`` asks for
    the statistics to be computed now instead: that is warned about (:class:`UserWarning`) and written into the
    returned statistics' ``source``. The shipped statistics are cached per process, keyed by file and extractor.
    """
    extractor = DigitsFeatures() if extractor is None else extractor
    key = extractor.describe()
    path = Path(DIGITS_REFERENCE_FILE)
    if recompute:
        problem = _shipped_digits_problem(path, key)
        why = problem if problem is not None else f"{path.name} would have served"
        ref = compute_digits_reference_stats(extractor)
        ref.source = f"{DIGITS_REFERENCE_SOURCE}; recomputed on the fly with {key} at the caller's request ({why})"
        warnings.warn(f"digits reference statistics recomputed on the fly with {key}, not read from {path} ({why})",
                      UserWarning, stacklevel=2)
        return ref
    cache_key = (str(path), key)
    if cache_key not in _DIGITS_REFERENCE_CACHE:
        problem = _shipped_digits_problem(path, key)
        if problem is not None:
            raise FileNotFoundError(f"{problem}; {_REBUILD_HINT}, or ask for recompute=True")
        ref = ReferenceStats.load(path)
        ref.name = ref.name or f"{ref.n:,} real digits"
        _DIGITS_REFERENCE_CACHE[cache_key] = ref
    return _DIGITS_REFERENCE_CACHE[cache_key]


# clean-fid's image extensions (cleanfid.utils.EXTENSIONS) less its .npy arrays.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def _image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursively), sorted, as clean-fid's ``get_folder_features`` lists them."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def _load_images(files: list[Path], channels: int) -> list[Tensor]:
    """``[1, C, H, W]`` float32 tensors in ``[-1, 1]`` on exact 8-bit levels, read as clean-fid reads a folder."""
    from PIL import Image  # Pillow comes with torchvision and clean-fid; only folder references need it

    out = []
    for f in files:
        with Image.open(f) as img:
            arr = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        out.append(torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0)
    return out


def folder_reference_stats(
    folder: str | Path, extractor: FeatureExtractor, batch_size: int | None = None
) -> ReferenceStats:
    """Statistics of every image in ``folder`` (recursively) under ``extractor``, computed now.

    Images are read as clean-fid reads a folder (PIL, converted to RGB; to greyscale for the 1-channel digits
    classifier) and mapped onto ``[-1, 1]`` exactly, so their 8-bit levels reach the extractor's own resize as in
    clean-fid's folder path. Streams ``batch_size`` files at a time (images of one size are stacked).
    """
    folder = Path(folder)
    files = _image_files(folder)
    if len(files) < 2:
        raise ValueError(f"reference folder {folder} holds {len(files)} image(s) with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)}; FID needs at least 2")
    channels = 1 if extractor.name == "digits" else 3
    chunk = int(batch_size or extractor.batch_size)
    feats = []
    for start in range(0, len(files), chunk):
        by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for img in _load_images(files[start : start + chunk], channels):
            by_shape.setdefault(tuple(img.shape), []).append(img)
        feats.extend(extractor(torch.cat(group), batch_size=chunk) for group in by_shape.values())
    ref = ReferenceStats.from_features(torch.cat(feats), f"image folder {folder} ({len(files)} files)",
                                       extractor.describe())
    ref.name = f"{len(files):,} images in {folder.name}/"
    return ref


def _npz_reference(path: Path, extractor: FeatureExtractor) -> ReferenceStats:
    """A :class:`ReferenceStats` file, or clean-fid statistics (``mu``, ``sigma`` as ``make_custom_stats`` writes)."""
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
        if "sha256" in names:
            ref = None
        elif {"mu", "sigma"} <= names:
            # clean-fid's own key for the covariance is `sigma`: reading it under that name is correct here. Its files
            # record neither the extractor nor the sample count, so the features are taken to be the extractor's.
            desc = extractor.describe()
            ref = ReferenceStats(mu=z["mu"], cov=z["sigma"], n=int(z["n"]) if "n" in names else None, name=path.name,
                                 source=f"clean-fid statistics {path} (features taken to be {desc})", features=desc)
        else:
            raise ValueError(f"reference {path} is not a clean-fid statistics file: it needs arrays 'mu' and 'sigma', "
                             f"found {sorted(names)}")
    if ref is None:
        ref = ReferenceStats.load(path)
        ref.name = ref.name or path.name
    return ref


def load_reference(
    spec: str | Path | None, extractor: FeatureExtractor, *, where: str = "eval.reference",
    batch_size: int | None = None,
) -> ReferenceStats:
    """The reference statistics named by ``spec`` for ``extractor``; nothing is downloaded.

    Args:
        spec: ``None`` (the shipped digits statistics; only for the digits classifier), a ``.npz`` (clean-fid's
            ``mu``/``sigma``, or a :class:`ReferenceStats` file) or a folder of images (features computed now with
            ``extractor``, see :func:`folder_reference_stats`).
        extractor: the feature extractor the statistics must belong to.
        where: what to call ``spec`` in errors (the config key).
        batch_size: images per extractor call for a folder.

    A missing or unusable reference raises one line naming the path tried and how to provide one.
    """
    how = (f"set {where} to a clean-fid-compatible .npz (arrays mu, sigma) or to a folder of reference images "
           f"(nothing is downloaded)")
    if spec is None or str(spec) == "":
        if extractor.name == "digits":
            return digits_reference_stats(extractor)
        raise FileNotFoundError(f"{extractor.name} FID needs reference statistics and none were given: {how}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_reference_stats(path, extractor, batch_size)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ValueError(f"reference {path} (from {where}) is neither a .npz file nor a folder: {how}")
        return _npz_reference(path, extractor)
    raise FileNotFoundError(f"reference not found at {path} (from {where}): {how}")


