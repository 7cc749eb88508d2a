"""FID with its protocol recorded beside the number (Heusel et al. 2017, arXiv:1706.08500).

``FID = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2})`` between Gaussian fits ``N(mu, C)`` of features (``C`` a
feature covariance; in this project ``sigma`` always means a noise level). The Fréchet distance itself is
clean-fid's; features come from :mod:`distill.features`. Every number is a :class:`FIDRecord` naming its feature
extractor (with a weights hash), sample count, reference statistics (source, size, SHA-256), NFE, sampler, grid,
guidance, seed, model, and a ``kind`` and one-line ``label`` that follow from that protocol alone
(:func:`protocol_kind`, :func:`protocol_label`; docs/design.md §3.6). Per-class coverage of the digits rides along
in the record's ``extra``, and so does the per-class FID of class-conditional samples (:func:`per_class_fid`).

Reference statistics come from the shipped digits file (an error, not a silent recomputation, when it is missing
or was built for another classifier), a ``.npz`` (clean-fid's ``mu``/``sigma`` or a :class:`ReferenceStats` file)
or a folder of images read as clean-fid reads them (:func:`load_reference`). Nothing is downloaded.

Low-dimensional distances for analytic teachers live in :mod:`distill.distances`.

Arrays are ``[N, D]`` (features); images are ``[N, C, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from scipy.linalg import LinAlgWarning
from torch import Tensor

from distill.core.registry import ConfigError
from distill.features import DigitsFeatures, FeatureExtractor
from distill.reference_stats import (
    DIGITS_REFERENCE_FILE,
    ReferenceStats,
    as_float64,
    compute_digits_reference_stats,
    digits_reference_stats,
    folder_reference_stats,
    gaussian_stats,
    load_reference,
)

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
    "per_class_fid",
    "digits_report",
]

ArrayLike = Tensor | np.ndarray

# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (clean-fid's implementation).

    Args:
        mu1, mu2: ``[D]`` means.
        cov1, cov2: ``[D, D]`` covariances.
    """
    m1, m2 = as_float64(mu1), as_float64(mu2)
    c1, c2 = as_float64(cov1), as_float64(cov2)
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
        try:
            return float(cleanfid_fid.frechet_distance(m1, c1, m2, c2))
        except TypeError as err:  # a SciPy that removed sqrtm's `disp` (clean-fid 0.1.35 still passes it)
            if "disp" not in str(err):
                raise
            return _frechet_distance_sqrtm(m1, c1, m2, c2)


def _frechet_distance_sqrtm(m1: np.ndarray, c1: np.ndarray, m2: np.ndarray, c2: np.ndarray,
                            eps: float = 1e-6) -> float:
    """clean-fid's ``frechet_distance`` formula with SciPy's current ``sqrtm`` signature (no ``disp``): the same
    eps-on-the-diagonal retry for a non-finite root and the same check that any imaginary part is round-off."""
    from scipy import linalg

    covmean = linalg.sqrtm(c1.dot(c2))
    if not np.isfinite(covmean).all():
        offset = np.eye(c1.shape[0]) * eps
        covmean = linalg.sqrtm((c1 + offset).dot(c2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    diff = m1 - m2
    return float(diff.dot(diff) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


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


def per_class_fid(feats: ArrayLike, labels: ArrayLike, ref_feats: ArrayLike, ref_labels: ArrayLike,
                  num_classes: int) -> dict[str, Any]:
    """Per-class FID: for each class ``c``, the Fréchet distance between the features of the samples *generated for*
    class ``c`` (their conditioning label, not a classifier's guess: a "3" that looks like an "8" counts against
    class 3) and those of the real data of class ``c``.

    With ~200 samples per class in 64 dimensions each number carries a larger finite-sample bias than the overall
    FID (compare numbers at equal sample counts only).

    Args:
        feats: ``[N, D]`` features of the generated samples; labels: ``[N]`` their conditioning labels.
        ref_feats: ``[M, D]`` features of the real data; ref_labels: ``[M]`` its labels.
        num_classes: classes ``0 .. num_classes - 1``.
    Returns:
        ``{"per_class_fid": [num_classes] (None where a side has fewer than 2 samples), "per_class_fid_mean"
        (over the classes that have a number; None if none), "per_class_n": [num_classes] sample counts}``.
    """
    f, r = as_float64(feats), as_float64(ref_feats)
    y, ry = torch.as_tensor(labels).cpu().long().numpy(), torch.as_tensor(ref_labels).cpu().long().numpy()
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1] or y.shape != (f.shape[0],) or ry.shape != (r.shape[0],):
        raise ValueError(f"per_class_fid needs feats [N, D], labels [N], ref_feats [M, D], ref_labels [M]; got "
                         f"{list(f.shape)}, {list(y.shape)}, {list(r.shape)}, {list(ry.shape)}")
    scores: list[float | None] = []
    for c in range(int(num_classes)):
        a, b = f[y == c], r[ry == c]
        if a.shape[0] < 2 or b.shape[0] < 2:
            scores.append(None)
            continue
        scores.append(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)))
    have = [s for s in scores if s is not None]
    return {"per_class_fid": scores, "per_class_fid_mean": float(np.mean(have)) if have else None,
            "per_class_n": [int((y == c).sum()) for c in range(int(num_classes))]}


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
