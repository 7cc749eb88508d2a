"""FID and feature extractors against closed forms, independent implementations and the digits calibration."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import distill.reference_stats as fid_module
from distill.core.data import load_digits_tensor
from distill.core.registry import ConfigError
from distill.features import (
    FEATURES,
    INCEPTION_ENV_VAR,
    INCEPTION_FILENAME,
    DigitsFeatures,
    FlattenFeatures,
    InceptionFeatures,
    build_features,
)
from distill.fid import (
    DIGITS_REFERENCE_FILE,
    FIDRecord,
    ReferenceStats,
    class_coverage,
    compute_fid,
    digits_reference_stats,
    digits_report,
    frechet_distance,
    gaussian_stats,
    load_reference,
    protocol_kind,
    protocol_label,
)


def _random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0.0 if rank else 0.1) * np.eye(d)


def _frechet_eig(mu1, s1, mu2, s2) -> float:
    """Independent Fréchet distance: Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), all symmetric PSD."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = np.linalg.eigvalsh(r @ s2 @ r)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(e, 0, None)).sum())


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------


def test_frechet_equal_covariance_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    cov = _random_spd(16, rng)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-7, abs=1e-8)
    assert frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0.0, abs=1e-8)


def test_frechet_one_dimensional_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9.0 + 1.5**2, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 5])
def test_frechet_matches_eigenvalue_form_without_warnings(rank):
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(12, rng, rank), _random_spd(12, rng, rank)  # rank 5: singular, like dead ReLU units
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = frechet_distance(torch.tensor(mu1), torch.tensor(s1), mu2, s2)  # tensors and arrays both accepted
    assert ours == pytest.approx(_frechet_eig(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)
    assert [str(w.message) for w in caught] == []



def test_frechet_fallback_for_scipy_without_disp_matches_clean_fid(monkeypatch):
    """SciPy releases that removed sqrtm's ``disp`` break clean-fid's ``frechet_distance`` (TypeError); ours falls
    back to the same formula with the current signature."""
    import cleanfid.fid
    from scipy import linalg

    from distill.fid import _frechet_distance_sqrtm

    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(12, rng), _random_spd(12, rng)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = frechet_distance(mu1, s1, mu2, s2)
    assert _frechet_distance_sqrtm(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    real_sqrtm = linalg.sqrtm

    def sqrtm_without_disp(a, **kw):
        if "disp" in kw:
            raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
        return real_sqrtm(a, **kw)

    monkeypatch.setattr(cleanfid.fid.linalg, "sqrtm", sqrtm_without_disp)
    monkeypatch.setattr(linalg, "sqrtm", sqrtm_without_disp)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)

def test_frechet_shape_error_is_one_line():
    with pytest.raises(ValueError, match="frechet_distance needs") as e:
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    assert "\n" not in str(e.value)


def test_compute_fid_closed_form_with_flatten_features():
    # Samples whitened to mean m and covariance exactly I against reference N(0, I): FID = ||m||^2.
    d, n = 3, 400
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    ext = FlattenFeatures()
    ref = ReferenceStats(mu=np.zeros(d), cov=np.eye(d), n=10_000, source="N(0, I)", features=ext.describe())
    rec = compute_fid(x + m, ref, ext, seed=0, model="whitened gaussian")
    assert rec.fid == pytest.approx(float((m**2).sum()), rel=1e-9)
    assert rec.kind == "proxy" and rec.n_samples == n  # 400 < min(10_000, 50_000)
    mu, cov = gaussian_stats(x + m)
    np.testing.assert_allclose(cov, np.eye(d), atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics and the FID record
# ---------------------------------------------------------------------------------------------------------------


def _ref(seed: int = 0) -> ReferenceStats:
    rng = np.random.default_rng(seed)
    return ReferenceStats.from_features(rng.standard_normal((50, 4)), source="test", features="flatten")


def test_reference_hash_changes_with_the_stats():
    a, b = _ref(0), _ref(0)
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    b.mu = b.mu + 1e-12
    assert b.sha256 != a.sha256
    c = _ref(0)
    c.cov[0, 1] += 1e-9
    assert c.sha256 != a.sha256


def test_reference_stats_save_load_round_trip(tmp_path):
    ref = _ref(1)
    path = ref.save(tmp_path / "ref.npz")
    back = ReferenceStats.load(path)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.cov, ref.cov)
    assert (back.n, back.source, back.features, back.sha256) == (50, "test", "flatten", ref.sha256)
    # A file whose statistics no longer match its stored hash is rejected.
    with np.load(path, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["mu"] = arrays["mu"] + 1.0
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="does not match"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_reference_stats_reads_files_that_store_the_covariance_as_sigma(tmp_path):
    # Files written before the covariance was renamed `cov` store it under `sigma`; the hash covers only the numbers.
    ref = _ref(2)
    with np.load(ref.save(tmp_path / "ref.npz"), allow_pickle=False) as z:
        arrays = dict(z)
    assert "cov" in arrays and "sigma" not in arrays
    arrays["sigma"] = arrays.pop("cov")
    np.savez(tmp_path / "legacy.npz", **arrays)
    back = ReferenceStats.load(tmp_path / "legacy.npz")
    np.testing.assert_array_equal(back.cov, ref.cov)
    assert back.sha256 == ref.sha256


PROTOCOL_FIELDS = {
    "fid", "feature_extractor", "n_samples", "reference", "nfe", "sampler", "grid", "guidance", "seed", "kind",
    "label", "model", "step", "extra",
}  # fmt: skip


def test_fid_record_has_every_protocol_field_and_round_trips():
    ext = FlattenFeatures()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ref = ReferenceStats.from_features(torch.randn(64, 4), source="test", features=ext.describe())
    rec = compute_fid(
        x, ref, ext, nfe=2, sampler="student", grid=torch.tensor([80.0, 0.8]), guidance=1.0, seed=3,
        model="run-1/ema", step=1500, extra={"gamma": 0.0},
    )  # fmt: skip
    d = json.loads(rec.to_json())
    assert set(d) == PROTOCOL_FIELDS
    assert d["reference"] == {"source": "test", "n": 64, "features": "flatten", "sha256": ref.sha256,
                              "name": "64 reference samples"}
    assert d["kind"] == "final" and d["label"] == "raw-coordinate FID, final (64 samples vs 64 reference samples)"
    assert d["grid"] == pytest.approx([80.0, 0.8]) and d["nfe"] == 2 and d["step"] == 1500
    assert FIDRecord.from_json(rec.to_json()) == rec
    assert FIDRecord.from_dict(rec.to_dict()) == rec
    with pytest.raises(ConfigError, match="valid keys"):
        FIDRecord.from_dict({**d, "nfes": 2})
    with pytest.raises(ConfigError, match="valid keys"):
        compute_fid(x, ref, ext, nfes=2)
    with pytest.raises(ConfigError, match="valid keys"):  # the kind is not a protocol input: it is derived
        compute_fid(x, ref, ext, kind="proxy")
    with pytest.raises(ValueError, match="makes it 'final'"):  # a stored kind that its protocol contradicts
        FIDRecord.from_dict({**d, "kind": "proxy"})
    with pytest.raises(ValueError):  # nan must not be written as a number
        FIDRecord.from_dict({**d, "fid": float("nan")}).to_json()


@pytest.mark.parametrize(
    "n, ref_n, kind",
    [(2000, 1797, "final"), (1797, 1797, "final"), (1796, 1797, "proxy"), (400, 10_000, "proxy"),
     (10_000, 10_000, "final"), (49_999, 1_281_167, "proxy"), (50_000, 1_281_167, "final"),
     (5_000, None, "proxy"), (50_000, None, "final")],
)  # fmt: skip
def test_protocol_kind_is_one_rule_of_the_sample_count_and_the_reference_size(n, ref_n, kind):
    assert protocol_kind(n, ref_n) == kind


def test_protocol_labels_name_the_measure_the_count_and_the_reference():
    assert protocol_label("digits-classifier FID", 2000, 1797, "1,797 real digits") == (
        "digits-classifier FID, final (2,000 samples vs 1,797 real digits)")
    assert protocol_label("Inception FID", 5000, None, "ref.npz") == "Inception FID, proxy (5,000 samples vs ref.npz)"
    assert protocol_label("sliced W1", 10_000, 10_000, "10,000 exact") == (
        "sliced W1, final (10,000 samples vs 10,000 exact)")


def test_the_same_protocol_gets_the_same_kind_for_fid_and_the_exact_scorer():
    from distill.scorers import RingScorer
    from teachers import build_teacher

    scorer = RingScorer(build_teacher({"name": "ring"}), n_reference=2000)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    rec = scorer(x, seed=0)
    assert rec["kind"] == protocol_kind(2000, 2000) == "final"
    assert rec["label"] == "sliced W1, final (2,000 samples vs 2,000 exact)"
    assert scorer(x[:1000], seed=0)["kind"] == "proxy"
    ref = ReferenceStats.from_features(torch.randn(2000, 2, dtype=torch.float64), source="t", features="flatten")
    assert compute_fid(x, ref, FlattenFeatures()).kind == "final"
    assert compute_fid(x[:1000], ref, FlattenFeatures()).kind == "proxy"


def test_compute_fid_rejects_reference_from_another_extractor():
    ref = ReferenceStats(mu=np.zeros(2), cov=np.eye(2), n=10, source="t", features="digits@000000000000")
    with pytest.raises(ValueError, match="recompute the reference"):
        compute_fid(torch.randn(8, 2), ref, FlattenFeatures())


def test_distill_evaluate_still_exports_the_scorers_and_the_table_helpers():
    """The scorers live in distill.scorers and the rows and tables in distill.eval_tables; distill.evaluate
    re-exports them (the same objects), so imports written before the split keep working."""
    import distill.eval_tables as tables
    import distill.evaluate as evaluate
    import distill.scorers as scorers

    for mod in (scorers, tables):
        for name in mod.__all__:
            assert getattr(evaluate, name) is getattr(mod, name) and name in evaluate.__all__


# ---------------------------------------------------------------------------------------------------------------
# Per-class coverage
# ---------------------------------------------------------------------------------------------------------------


def test_class_coverage():
    shares = class_coverage(torch.tensor([0, 0, 3, 9]))
    torch.testing.assert_close(shares, torch.tensor([0.5, 0, 0, 0.25, 0, 0, 0, 0, 0, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        class_coverage(torch.tensor([0, 10]))


# ---------------------------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------------------------


def test_feature_registry():
    assert FEATURES.names() == ["digits", "flatten", "inception"]
    assert isinstance(build_features("flatten"), FlattenFeatures)
    with pytest.raises(ConfigError, match="digits, flatten, inception"):
        build_features("clip")
    with pytest.raises(ConfigError, match="valid keys"):
        build_features("digits", weight_path="x")


def test_inception_missing_file_error_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    for kwargs in ({}, {"weights_path": tmp_path / "nope.pt"}, {"weights_path": tmp_path}):
        with pytest.raises(FileNotFoundError) as e:
            build_features("inception", **kwargs)
        msg = str(e.value)
        assert "\n" not in msg and INCEPTION_FILENAME in msg and INCEPTION_ENV_VAR in msg
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        InceptionFeatures()


class _FakeInceptionLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-channel mean over the 299x299 image, tiled to 2048 values
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


class _FakeInception(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_pipeline_scaling_with_a_stand_in_network(tmp_path, monkeypatch):
    # A TorchScript stand-in with the real file's `.layers` entry point checks the conversion path without
    # the real weights: [-1, 1] -> 8-bit levels -> 3 channels -> 299x299 clean resize -> (x - 128) / 128.
    path = tmp_path / INCEPTION_FILENAME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(_FakeInception()).save(str(path))
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path))  # a folder holding the file works too
    ext = InceptionFeatures()
    v = torch.tensor([-1.0, -0.3, 0.5, 1.0])
    feats = ext(v.reshape(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous())
    expected = (torch.round((v + 1) * 127.5) - 128) / 128  # a constant image stays constant under bicubic resize
    assert feats.shape == (4, 2048) and feats.dtype == torch.float64
    torch.testing.assert_close(feats, expected[:, None].double().expand(4, 2048), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="C in"):
        ext(torch.zeros(2, 2, 8, 8))


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_tensor()
    return images, labels


@pytest.fixture(scope="module")
def extractor():
    return DigitsFeatures()


def test_digits_classifier_accuracy_and_features(digits, extractor):
    images, labels = digits
    assert (extractor.predict(images) == labels).double().mean().item() > 0.98
    feats = extractor(images[:10])
    assert feats.shape == (10, 64) and feats.dtype == torch.float64 and bool((feats >= 0).all())
    assert extractor.describe().startswith("digits@")
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        extractor(torch.zeros(2, 1, 28, 28))
    bad = images[:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        extractor(bad)


def test_digits_reference_is_shipped_cached_and_reproducible(extractor):
    ref = digits_reference_stats(extractor)
    assert ref is digits_reference_stats(extractor)
    assert ref.n == 1797 and ref.dim == 64 and ref.features == extractor.describe()
    assert ReferenceStats.load(DIGITS_REFERENCE_FILE).sha256 == ref.sha256  # the shipped file is the one used
    with pytest.warns(UserWarning, match="recomputed on the fly"):
        fresh = digits_reference_stats(extractor, recompute=True)  # on-the-fly features reproduce the shipped stats
    assert "recomputed on the fly" in fresh.source and ref.source not in ("", fresh.source)
    np.testing.assert_allclose(fresh.mu, ref.mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fresh.cov, ref.cov, rtol=1e-5, atol=1e-4)
    assert frechet_distance(fresh.mu, fresh.cov, ref.mu, ref.cov) < 1e-3


def _fid(images: torch.Tensor, extractor: DigitsFeatures) -> float:
    return compute_fid(images, digits_reference_stats(extractor), extractor).fid


def test_digits_fid_calibration(digits, extractor):
    """docs/methods.md §4.5 "Digits": resampled real ~ floor; noise, blur and missing classes are far."""
    images, labels = digits
    g = torch.Generator().manual_seed(0)
    resampled = images[torch.randint(0, len(images), (2000,), generator=g)]
    floor = _fid(resampled, extractor)
    # The floor at 2,000 samples is ~1.0 +- 0.4 over sampling seeds (docs/bench/calibration.json); on this fixed draw
    # it must sit in [0.4, 1.6], below a set that is only nearly real (digits + mild noise, FID ~2: the quality of a
    # good 2-NFE student), so the band separates "at the floor" from "close to it".
    assert 0.4 < floor < 1.6, floor
    jittered = (resampled + 0.1 * torch.randn(resampled.shape, generator=g)).clamp(-1, 1)  # real digits + mild noise
    assert _fid(jittered, extractor) > 1.6
    noise = _fid(torch.randn(2000, 1, 8, 8, generator=g), extractor)
    assert noise > 100
    # 3x3 Gaussian blur (std 1 px), background value -1 outside the image
    k = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0]) ** 2) / 2)
    k = (k[:, None] * k[None]) / (k.sum() ** 2)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(resampled, (1, 1, 1, 1), value=-1.0), k[None, None])
    assert _fid(blurred, extractor) > 100
    low = images[labels < 5]
    rec = digits_report(low[torch.randint(0, len(low), (2000,), generator=g)], extractor, seed=0, model="digits 0-4")
    assert rec.fid > 50 and rec.kind == "final"
    shares = rec.extra["class_coverage"]
    assert sum(shares[5:]) < 0.01 and all(c > 0.15 for c in shares[:5])


def test_digits_report_on_real_digits(digits, extractor):
    images, labels = digits
    rec = digits_report(images[:500], extractor, nfe=None, sampler="real", seed=None, model="real digits")
    assert rec.kind == "proxy" and rec.feature_extractor == extractor.describe()
    true_share = torch.bincount(labels[:500], minlength=10).double() / 500
    np.testing.assert_allclose(rec.extra["class_coverage"], true_share.numpy(), atol=0.01)
    assert rec.reference["sha256"] == digits_reference_stats(extractor).sha256


def test_digits_reference_never_falls_back_silently(extractor, tmp_path, monkeypatch):
    key = extractor.describe()
    # Missing shipped file: one line naming the file, the classifier expected and how to rebuild it.
    monkeypatch.setattr(fid_module, "DIGITS_REFERENCE_FILE", tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError) as e:
        digits_reference_stats(extractor)
    msg = str(e.value)
    assert "\n" not in msg and "missing.npz" in msg and key in msg and "scripts/train_classifier.py" in msg
    # A file built for another classifier: the same, naming both hashes.
    other = ReferenceStats(mu=np.zeros(64), cov=np.eye(64), n=1797, source="old", features="digits@000000000000")
    monkeypatch.setattr(fid_module, "DIGITS_REFERENCE_FILE", other.save(tmp_path / "old.npz"))
    with pytest.raises(FileNotFoundError) as e:
        load_reference(None, extractor)  # what FIDScorer calls for digits features without eval.reference
    msg = str(e.value)
    assert "\n" not in msg and "old.npz" in msg and "digits@000000000000" in msg and key in msg
    assert "scripts/train_classifier.py" in msg
    # Asking for a recomputation works, warns, and says so in the statistics' source.
    with pytest.warns(UserWarning, match="old.npz"):
        fresh = digits_reference_stats(extractor, recompute=True)
    assert fresh.features == key and fresh.n == 1797
    assert "recomputed on the fly" in fresh.source and "digits@000000000000" in fresh.source
