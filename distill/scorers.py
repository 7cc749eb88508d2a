"""Scorers: the metric that turns a batch of generated samples into a number and its full record.

* Image teachers: FID on a feature extractor (the shipped digits classifier for 8x8 digits, Inception from a local
  file otherwise), every number a :class:`distill.fid.FIDRecord` carrying its protocol; for class-conditional digits
  samples also the per-class FID (:func:`distill.fid.per_class_fid`) in the record's ``extra``.
* Analytic (Gaussian-mixture) teachers: sliced Wasserstein-1 to a fixed exact sample set, per-mode mass and the
  off-mode fraction (docs/methods.md §4.4 "Ring", :mod:`distill.distances`), in a record of the same shape.

Generating the samples is :mod:`distill.evaluate`'s part; rendering rows of records is :mod:`distill.eval_tables`'.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distill.core.data import load_digits_tensor
from distill.distances import ring_report
from distill.features import build_features
from distill.fid import class_coverage, compute_fid, load_reference, per_class_fid, protocol_kind, protocol_label
from teachers.analytic import GaussianMixtureTeacher

__all__ = ["Scorer", "FIDScorer", "RingScorer", "build_scorer", "scorer_from_config"]


class Scorer:
    """Scores a batch of samples against the teacher's data; ``metric`` names the number (``fid`` or ``sw1``).

    Every record it returns carries ``kind`` (:func:`distill.fid.protocol_kind` of its sample count and reference
    size) and a one-line ``label`` naming the measure, the sample count and the reference set.
    """

    metric: str = "fid"

    def __call__(self, samples: Tensor, labels: Tensor | None = None, **protocol: Any) -> dict[str, Any]:
        """Score ``samples``; ``labels: [N]`` are the class labels they were generated for (``None``: unconditional),
        for per-class numbers where the scorer has them."""
        raise NotImplementedError


class FIDScorer(Scorer):
    """FID on ``features`` against the reference statistics ``reference`` (see :func:`distill.fid.load_reference`).

    Args:
        features: ``digits``, ``inception`` or ``flatten``.
        inception_path: the local ``inception-2015-12-05.pt`` (or its folder); else ``$DISTILL_INCEPTION_WEIGHTS``.
        reference: a clean-fid ``.npz`` (``mu``, ``sigma``), a :class:`~distill.fid.ReferenceStats` ``.npz`` or a
            folder of images; ``None`` means the shipped digits statistics (digits features only).
    """

    metric = "fid"

    def __init__(self, features: str = "digits", inception_path: str | None = None,
                 reference: str | None = None) -> None:
        kw = {"weights_path": inception_path} if features == "inception" else {}
        self.extractor = build_features(features, **kw)
        self.reference = load_reference(reference, self.extractor)
        self._class_reference: tuple[Tensor, Tensor] | None = None

    def class_reference(self) -> tuple[Tensor, Tensor] | None:
        """``(features [M, D], labels [M])`` of the real data per-class FID compares with: the 1,797 real digits
        under the digits classifier's features (computed once); ``None`` for other features (no labelled real set)."""
        if self._class_reference is None and getattr(self.extractor, "name", None) == "digits":
            images, labels = load_digits_tensor()
            self._class_reference = (self.extractor(images), labels)
        return self._class_reference

    def __call__(self, samples: Tensor, labels: Tensor | None = None, **protocol: Any) -> dict[str, Any]:
        """The FID record of ``samples`` (with class coverage for the digits classifier) plus, when ``labels: [N]``
        (the classes the samples were generated for) are given and the features are the digits classifier's,
        ``extra.per_class_fid`` / ``per_class_fid_mean`` / ``per_class_n`` (:func:`distill.fid.per_class_fid`)."""
        rec = compute_fid(samples, self.reference, self.extractor, **protocol)
        out = rec.to_dict()
        if hasattr(self.extractor, "predict"):
            predicted = self.extractor.predict(samples)
            shares = class_coverage(predicted, 10)
            out.setdefault("extra", {})["class_coverage"] = [round(float(c), 4) for c in shares]
        ref = self.class_reference() if labels is not None else None
        if ref is not None:
            if labels.shape != (samples.shape[0],):
                raise ValueError(f"labels must be [N] = [{samples.shape[0]}], got {list(labels.shape)}")
            pc = per_class_fid(self.extractor(samples), labels, ref[0], ref[1], int(ref[1].max()) + 1)
            out.setdefault("extra", {}).update(pc)
        out["score"] = float(rec.fid)
        return out


class RingScorer(Scorer):
    """Exact-teacher scorer for Gaussian mixtures (sliced W1 to a fixed exact set, mode mass, off-mode fraction).

    Its reference is a fixed set of ``n_reference`` exact samples, so a number is ``final`` from that many samples
    on (:func:`distill.fid.protocol_kind`), e.g. ``"sliced W1, final (10,000 samples vs 10,000 exact)"``.
    """

    metric = "sw1"

    def __init__(self, teacher: Any, n_reference: int = 10_000, reference_seed: int = 12345) -> None:
        g = torch.Generator().manual_seed(reference_seed)
        self.reference = teacher.sample(n_reference, generator=g)
        self.means = teacher.means.reshape(teacher.means.shape[0], -1).float()
        # the true mixture: per-mode mass is scored against the weights, "off" against each mode's own width
        self.weights = teacher.weights.detach().double().cpu()
        self.stds = teacher.stds.detach().double().cpu()
        self.reference_seed = reference_seed

    def __call__(self, samples: Tensor, labels: Tensor | None = None, **protocol: Any) -> dict[str, Any]:
        rep = ring_report(samples.reshape(samples.shape[0], -1).float(), self.means, self.reference,
                          weights=self.weights, stds=self.stds)
        rep = {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in rep.items()}
        n, n_ref = int(samples.shape[0]), int(self.reference.shape[0])
        name = f"{n_ref:,} exact"
        return {"score": float(rep["sw1"]), "metric": "sw1", "n_samples": n,
                "reference": {"source": "exact teacher samples", "n": n_ref, "seed": self.reference_seed,
                              "name": name},
                "kind": protocol_kind(n, n_ref), "label": protocol_label("sliced W1", n, n_ref, name),
                **rep, **protocol}


def build_scorer(teacher: Any, features: str = "auto", inception_path: str | None = None,
                 reference: str | None = None) -> Scorer:
    """Pick the metric for a teacher: exact ring metrics for mixtures, digits FID for 8x8 digits, else Inception.

    ``inception_path`` and ``reference`` are those of :class:`FIDScorer` (``eval.inception_path``,
    ``eval.reference``); the ring metrics ignore them.
    """
    if features == "auto":
        if isinstance(teacher, GaussianMixtureTeacher) and len(teacher.data_shape) == 1:
            return RingScorer(teacher)
        shape = tuple(getattr(teacher, "pixel_shape", teacher.data_shape))  # a latent teacher is scored on pixels
        features = "digits" if shape == (1, 8, 8) else "inception"
    if features in ("sw1", "ring"):
        return RingScorer(teacher)
    return FIDScorer(features, inception_path, reference)


def scorer_from_config(teacher: Any, ev: Any) -> Scorer:
    """:func:`build_scorer` from an ``eval`` config section (``features``, ``inception_path``, ``reference``)."""
    return build_scorer(teacher, ev.features, ev.inception_path, ev.reference)
