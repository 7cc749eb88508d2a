"""FID with its protocol recorded beside the number (Heusel et al. 2017, arXiv:1706.08500).

``FID = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2})`` between Gaussian fits ``N(mu, C)`` of features (``C`` a
feature covariance; in this project ``sigma`` always means a noise level). The Fréchet distance itself is
clean-fid's; features come from :mod:`distill.features`. Every number is a :class:`FIDRecord` naming its feature
extractor (with a weights hash), sample count, reference statistics (source, size, SHA-256), NFE, sampler, grid,
guidance, seed, model and whether it is a proxy or a final FID (design.md §3 "Metric"). Per-class coverage of the
digits rides along in the record's ``extra``.

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
        n: number of reference samples.
        source: what the reference set is (e.g. ``"sklearn digits, all 1797"``).
        features: the extractor's :meth:`~distill.features.FeatureExtractor.describe` string.
    The ``sha256`` property hashes ``mu`` and ``cov``, so any change to the statistics changes it.
    """

    mu: np.ndarray
    cov: np.ndarray
    n: int
    source: str
    features: str

    def __post_init__(self) -> None:
        self.mu = _np64(self.mu)
        self.cov = _np64(self.cov)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.cov.shape != (d, d):
            raise ValueError(
                f"ReferenceStats needs mu [D] and cov [D, D], got {list(self.mu.shape)} and {list(self.cov.shape)}"
            )
        self.n = int(self.n)

    @property
    def sha256(self) -> str:
        return _stats_sha256(self.mu, self.cov)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def summary(self) -> dict[str, Any]:
        """What an :class:`FIDRecord` stores about its reference: source, n, features, sha256."""
        return {"source": self.source, "n": self.n, "features": self.features, "sha256": self.sha256}

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
                n=np.int64(self.n),
                source=np.str_(self.source),
                features=np.str_(self.features),
                sha256=np.str_(self.sha256),
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
            ref = cls(mu=z["mu"], cov=z[cov_key], n=int(z["n"]), source=str(z["source"]), features=str(z["features"]))
            stored = str(z["sha256"])
        if stored != ref.sha256:
            raise ValueError(f"{path}: stored sha256 {stored[:12]} does not match its statistics ({ref.sha256[:12]})")
        return ref


_DIGITS_REFERENCE_CACHE: dict[str, ReferenceStats] = {}
DIGITS_REFERENCE_FILE = ASSETS_DIR / "digits_reference_stats.npz"
DIGITS_REFERENCE_SOURCE = "sklearn load_digits, all 1797 images, x/8-1"


def compute_digits_reference_stats(extractor: FeatureExtractor) -> ReferenceStats:
    """Statistics of all 1,797 real digits under ``extractor``, computed now (well under a second on a CPU)."""
    images, _ = load_digits_tensor()
    return ReferenceStats.from_features(extractor(images), DIGITS_REFERENCE_SOURCE, extractor.describe())


def digits_reference_stats(extractor: FeatureExtractor | None = None, recompute: bool = False) -> ReferenceStats:
    """Statistics of all 1,797 real digits under ``extractor`` (default: the shipped digits classifier), cached.

    For the shipped classifier the statistics shipped beside it (``digits_reference_stats.npz``) are used, so the
    reference hash in every record is the same on every machine (on-the-fly features can differ in the last bits
    between CPUs); any other extractor, or ``recompute=True``, computes them on the fly. Cached per process, keyed
    by the extractor's description.
    """
    extractor = DigitsFeatures() if extractor is None else extractor
    key = extractor.describe()
    if recompute:
        return compute_digits_reference_stats(extractor)
    if key not in _DIGITS_REFERENCE_CACHE:
        ref = None
        if DIGITS_REFERENCE_FILE.is_file():
            shipped = ReferenceStats.load(DIGITS_REFERENCE_FILE)
            ref = shipped if shipped.features == key else None
        _DIGITS_REFERENCE_CACHE[key] = ref if ref is not None else compute_digits_reference_stats(extractor)
    return _DIGITS_REFERENCE_CACHE[key]


# ---------------------------------------------------------------------------------------------------------------
# FID with its protocol
# ---------------------------------------------------------------------------------------------------------------

_KINDS = ("proxy", "final")


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
        kind: ``"proxy"`` (few samples, during training) or ``"final"``.
        model: what produced the samples (run name, checkpoint path, ``"teacher"``...).
        step: training step of the model, if any.
        extra: anything else (class coverage, timings...).
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
    kind: str = "final"
    model: str = ""
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"FIDRecord kind must be one of {list(_KINDS)}, got {self.kind!r}")
        self.fid = float(self.fid)
        self.n_samples = int(self.n_samples)
        self.grid = _jsonable(self.grid)
        self.extra = _jsonable(dict(self.extra))
        self.reference = _jsonable(dict(self.reference))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        # allow_nan=False: a record with FID = nan/inf must not be written as if it were a number.
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FIDRecord:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown FIDRecord key(s) {unknown}; valid keys: {', '.join(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> FIDRecord:
        return cls.from_dict(json.loads(s))


_PROTOCOL_KEYS = ("nfe", "sampler", "grid", "guidance", "seed", "kind", "model", "step", "extra")


def compute_fid(
    samples: Tensor,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 500,
    **protocol: Any,
) -> FIDRecord:
    """FID of ``samples`` against ``reference`` under ``extractor``, returned as a full :class:`FIDRecord`.

    Args:
        samples: ``[N, C, H, W]`` images in ``[-1, 1]`` (or ``[N, D]`` for :class:`FlattenFeatures`), N >= 2.
        reference: statistics computed with the same extractor (checked by its description).
        extractor: the feature extractor.
        batch_size: images per feature-extractor call.
        **protocol: ``nfe, sampler, grid, guidance, seed, kind, model, step, extra``. ``kind`` defaults to
            ``"final"`` when ``N`` reaches ``min(reference.n, 50_000)`` and ``"proxy"`` otherwise.
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
    protocol.setdefault("kind", "final" if n >= min(reference.n, 50_000) else "proxy")
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
