"""FID with its protocol recorded beside the number (Heusel et al. 2017, arXiv:1706.08500).

``FID = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2})`` between Gaussian fits ``N(mu, C)`` of features (``C`` a
feature covariance; in this project ``sigma`` always means a noise level). The Fréchet distance itself is
clean-fid's; features come from :mod:`distill.features`. Every number is a :class:`FIDRecord` naming its feature
extractor (with a weights hash), sample count, reference statistics (source, size, SHA-256), NFE, sampler, grid,
guidance, seed, model, and a ``kind`` and one-line ``label`` that follow from that protocol alone
(:func:`protocol_kind`, :func:`protocol_label`; docs/design.md §3.6). Per-class coverage of the digits rides along
in the record's ``extra``.

Reference statistics come from the shipped digits file (an error, not a silent recomputation, when it is missing
or was built for another classifier), a ``.npz`` (clean-fid's ``mu``/``sigma`` or a :class:`ReferenceStats` file)
or a folder of images read as clean-fid reads them (:func:`load_reference`). Nothing is downloaded.

Low-dimensional distances for analytic teachers live in :mod:`distill.distances`.

Arrays are ``[N, D]`` (features); images are ``[N, C, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from scipy.linalg import LinAlgWarning
from torch import Tensor

from distill.core.data import load_digits_tensor
from distill.core.registry import ConfigError
from distill.features import ASSETS_DIR, DigitsFeatures, FeatureExtractor

__all__ = [
    "frechet_distance",
    "gaussian_stats",
    "ReferenceStats",
    "digits_reference_stats",
    "compute_digits_reference_stats",
    "DIGITS_REFERENCE_FILE",
    "folder_reference_stats",
    "load_reference",
    "protocol_kind",
    "protocol_label",
    "feature_metric_name",
    "FINAL_SAMPLES_CAP",
    "FIDRecord",
    "compute_fid",
    "class_coverage",
    "digits_report",
]

ArrayLike = Tensor | np.ndarray

# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (clean-fid's implementation).

    Args:
        mu1, mu2: ``[D]`` means.
        cov1, cov2: ``[D, D]`` covariances.
    """
    m1, m2 = _np64(mu1), _np64(mu2)
    c1, c2 = _np64(cov1), _np64(cov2)
    d = m1.shape[0] if m1.ndim == 1 else -1
    if m1.ndim != 1 or m2.shape != m1.shape or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs mu1, mu2: [D] and cov1, cov2: [D, D] with one D; got mu1 {list(m1.shape)}, "
            f"cov1 {list(c1.shape)}, mu2 {list(m2.shape)}, cov2 {list(c2.shape)}"
        )
    if d == 1:
        # SciPy's sqrtm returns no error estimate for 1x1 input, which clean-fid's unpacking trips on. Append an
        # identical N(0, 1) coordinate to both: the distance is additive over independent blocks, so it adds 0.
        m1, m2 = np.append(m1, 0.0), np.append(m2, 0.0)
        c1, c2 = np.diag([c1[0, 0], 1.0]), np.diag([c2[0, 0], 1.0])
    with warnings.catch_warnings():
        # clean-fid calls scipy.linalg.sqrtm(..., disp=False); SciPy 1.17 deprecates `disp` (env-notes §5).
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        # Covariances of ReLU features are often rank-deficient (units that never fire, N < D); the square root
        # of a singular PSD product is still well defined and sqrtm gets it right (tested against the eigenvalue
        # form), so SciPy's "Matrix is singular" warning is noise here.
        warnings.filterwarnings("ignore", message=".*singular.*", category=LinAlgWarning)
        return float(cleanfid_fid.frechet_distance(m1, c1, m2, c2))


def gaussian_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``feats: [N, D]``, N >= 2."""
    f = _np64(feats)
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
        self.mu = _np64(self.mu)
        self.cov = _np64(self.cov)
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


# ---------------------------------------------------------------------------------------------------------------
# FID with its protocol
# ---------------------------------------------------------------------------------------------------------------

FINAL_SAMPLES_CAP = 50_000

# Human names of the FID feature extractors, by the name in their describe() string.
_FEATURE_METRIC_NAMES = {
    "digits": "digits-classifier FID",
    "inception": "Inception FID",
    "flatten": "raw-coordinate FID",
}


def protocol_kind(n_samples: int, reference_n: int | None) -> str:
    """``"final"`` when ``n_samples`` reaches ``min(reference_n, 50_000)``, else ``"proxy"``.

    The one labelling rule of the project, for FID and the exact-teacher scorer alike: a number is final when it used
    as many samples as the reference set holds, or 50,000 (the convention of published FIDs), whichever is smaller.
    An unknown reference size (a clean-fid ``.npz`` stores none) counts as 50,000.
    """
    cap = FINAL_SAMPLES_CAP if reference_n is None else min(int(reference_n), FINAL_SAMPLES_CAP)
    return "final" if int(n_samples) >= cap else "proxy"


def protocol_label(metric: str, n_samples: int, reference_n: int | None, reference_name: str) -> str:
    """One line naming the metric, the kind, the sample count and the reference set, e.g.
    ``"digits-classifier FID, final (2,000 samples vs 1,797 real digits)"``."""
    return f"{metric}, {protocol_kind(n_samples, reference_n)} ({int(n_samples):,} samples vs {reference_name})"


def feature_metric_name(feature_extractor: str) -> str:
    """``"digits@4900de862027"`` -> ``"digits-classifier FID"``; ``"inception@..."`` -> ``"Inception FID"``."""
    name = feature_extractor.split("@", 1)[0]
    return _FEATURE_METRIC_NAMES.get(name, f"{name} FID")


def _reference_name(reference: dict[str, Any]) -> str:
    n = reference.get("n")
    return reference.get("name") or (f"{n:,} reference samples" if n is not None else str(reference.get("source")))


def _jsonable(v: Any) -> Any:
    """Tensors/arrays/numpy scalars -> plain Python, so a record always serialises."""
    if isinstance(v, Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@dataclass
class FIDRecord:
    """One FID number and everything needed to reproduce or compare it.

    Attributes:
        fid: the Fréchet distance.
        feature_extractor: the extractor's ``describe()`` string, e.g. ``"digits@4900de862027"``.
        n_samples: number of generated samples.
        reference: ``{"source", "n", "features", "sha256"}`` of the reference statistics.
        nfe: network evaluations per sample (measured, not computed), or ``None`` for real data.
        sampler: sampler name (e.g. ``"heun"``, ``"student"``).
        grid: the noise grid (a name or the list of sigmas).
        guidance: classifier-free guidance weight (``None`` if unconditional).
        seed: seed of the sampling noise.
        model: what produced the samples (run name, checkpoint path, ``"teacher"``...).
        step: training step of the model, if any.
        extra: anything else (class coverage, timings...).
        kind: derived, not given: :func:`protocol_kind` of ``n_samples`` and the reference's ``n``.
        label: derived: the one-line :func:`protocol_label`, e.g.
            ``"Inception FID, proxy (5,000 samples vs ref.npz)"``.
    """

    fid: float
    feature_extractor: str
    n_samples: int
    reference: dict[str, Any]
    nfe: int | None = None
    sampler: str | None = None
    grid: str | list[float] | None = None
    guidance: float | None = None
    seed: int | None = None
    model: str = ""
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = field(init=False)
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.fid = float(self.fid)
        self.n_samples = int(self.n_samples)
        self.grid = _jsonable(self.grid)
        self.extra = _jsonable(dict(self.extra))
        self.reference = _jsonable(dict(self.reference))
        ref_n = self.reference.get("n")
        self.kind = protocol_kind(self.n_samples, ref_n)
        self.label = protocol_label(feature_metric_name(self.feature_extractor), self.n_samples, ref_n,
                                    _reference_name(self.reference))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        # allow_nan=False: a record with FID = nan/inf must not be written as if it were a number.
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FIDRecord:
        """Rebuild a record; ``kind`` and ``label`` are derived again, and a stored ``kind`` must agree."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown FIDRecord key(s) {unknown}; valid keys: {', '.join(names)}")
        derived = {f.name for f in fields(cls) if not f.init}
        rec = cls(**{k: v for k, v in d.items() if k not in derived})
        if "kind" in d and d["kind"] != rec.kind:
            raise ValueError(f"FIDRecord says kind {d['kind']!r} but its protocol ({rec.n_samples} samples vs a "
                             f"reference of {rec.reference.get('n')}) makes it {rec.kind!r}")
        return rec

    @classmethod
    def from_json(cls, s: str) -> FIDRecord:
        return cls.from_dict(json.loads(s))


_PROTOCOL_KEYS = ("nfe", "sampler", "grid", "guidance", "seed", "model", "step", "extra")


def compute_fid(
    samples: Tensor,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    *,
    batch_size: int | None = None,
    **protocol: Any,
) -> FIDRecord:
    """FID of ``samples`` against ``reference`` under ``extractor``, returned as a full :class:`FIDRecord`.

    Args:
        samples: ``[N, C, H, W]`` images in ``[-1, 1]`` (or ``[N, D]`` for :class:`FlattenFeatures`), N >= 2.
        reference: statistics computed with the same extractor (checked by its description).
        extractor: the feature extractor.
        batch_size: images per feature-extractor call (default: the extractor's ``batch_size``).
        **protocol: ``nfe, sampler, grid, guidance, seed, model, step, extra``. The record's ``kind`` is not one of
            them: it follows from ``N`` and ``reference.n`` (:func:`protocol_kind`).
    """
    unknown = sorted(set(protocol) - set(_PROTOCOL_KEYS))
    if unknown:
        raise ConfigError(f"unknown FID protocol key(s) {unknown}; valid keys: {', '.join(_PROTOCOL_KEYS)}")
    desc = extractor.describe()
    if reference.features != desc:
        raise ValueError(
            f"reference statistics were computed with features {reference.features!r} but the extractor is "
            f"{desc!r}; recompute the reference with this extractor"
        )
    n = int(samples.shape[0])
    if n < 2:
        raise ValueError(f"compute_fid needs at least 2 samples, got {n}")
    feats = extractor(samples, batch_size=batch_size)
    if feats.shape[1] != reference.dim:
        raise ValueError(f"features have dim {feats.shape[1]} but the reference has dim {reference.dim}")
    mu, cov = gaussian_stats(feats)
    fid = frechet_distance(mu, cov, reference.mu, reference.cov)
    return FIDRecord(fid=fid, feature_extractor=desc, n_samples=n, reference=reference.summary(), **protocol)


# ---------------------------------------------------------------------------------------------------------------
# Per-class coverage and the digits report
# ---------------------------------------------------------------------------------------------------------------


def class_coverage(labels: ArrayLike, num_classes: int = 10) -> Tensor:
    """Share of each class among ``labels: [N]`` (ints in ``[0, num_classes)``). Returns ``[num_classes]``."""
    y = torch.as_tensor(labels).detach().cpu()
    if y.ndim != 1 or y.numel() == 0 or y.is_floating_point():
        raise ValueError(f"labels must be a non-empty integer tensor [N], got dtype {y.dtype} shape {list(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return torch.bincount(y.long(), minlength=num_classes).to(torch.float64) / y.numel()


def digits_report(
    samples: Tensor,
    extractor: DigitsFeatures | None = None,
    reference: ReferenceStats | None = None,
    **protocol: Any,
) -> FIDRecord:
    """Digits FID (shipped-classifier features vs all real digits) with per-class coverage in ``extra``.

    Args:
        samples: ``[N, 1, 8, 8]`` in ``[-1, 1]``.
        extractor: defaults to :class:`~distill.features.DigitsFeatures`; reference defaults to
            :func:`digits_reference_stats` of that extractor.
        **protocol: as in :func:`compute_fid`.
    """
    extractor = DigitsFeatures() if extractor is None else extractor
    reference = digits_reference_stats(extractor) if reference is None else reference
    record = compute_fid(samples, reference, extractor, **protocol)
    shares = class_coverage(extractor.predict(samples), extractor.num_classes)
    record.extra.update(
        class_coverage=[round(float(c), 6) for c in shares],
        min_class_share=float(shares.min()),
        max_class_share=float(shares.max()),
    )
    return record
