"""Inception FID end to end without the real weights: a TorchScript stand-in with the entry points of clean-fid's
``inception-2015-12-05.pt`` (``layers.forward`` on normalised 299x299 input, and ``forward(x, return_features=True)``
on [0, 255] input), a reference folder of PNGs, ``distill eval``, and clean-fid's own feature code as the yardstick."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.cli import main
from distill.core.data import load_digits_tensor, to_uint8_images
from distill.features import INCEPTION_ENV_VAR, INCEPTION_FILENAME, InceptionFeatures
from distill.fid import folder_reference_stats, frechet_distance
from distill.scorers import FIDScorer

N_REF = 64


class _StandInLayers(torch.nn.Module):
    """``[B, 3, 299, 299]`` normalised to ``[-1, 1]`` -> ``[B, dim, 1, 1]`` (like the real pool3 output): an 8x8
    average pool (the digits' own pixels after upscaling), a fixed random projection and a tanh."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, dim, generator=g) / 8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return torch.tanh(pooled @ self.proj)[:, :, None, None]


class _StandInInception(torch.nn.Module):
    """clean-fid's file's call signature: ``forward(img [B, 3, H, W] in [0, 255], return_features=False)`` resizes
    to 299x299 inside and normalises; ``layers`` is the feature network on normalised 299x299 input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = _StandInLayers(dim)
        self.dim = dim
        self.register_buffer("head", torch.randn(dim, 1008, generator=torch.Generator().manual_seed(1)))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.layers.forward((x - 128) / 128).reshape(-1, self.dim)
        if return_features:
            return feats
        return feats @ self.head


def _save_stand_in(folder: Path, dim: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INCEPTION_FILENAME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(_StandInInception(dim)).save(str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A 32-d stand-in: FID's matrix square root at 2048-d would take ~20 s per number on a test CPU."""
    return _save_stand_in(tmp_path_factory.mktemp("inception32"), 32)


@pytest.fixture(scope="module")
def digits64() -> torch.Tensor:
    return load_digits_tensor()[0][:N_REF]


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory, digits64) -> Path:
    folder = tmp_path_factory.mktemp("refs") / "ref"
    folder.mkdir()
    for i, img in enumerate(to_uint8_images(digits64)):
        Image.fromarray(img[:, :, 0], mode="L").save(folder / f"{i:03d}.png")
    return folder


def _config(tmp_path: Path, weights: Path, reference: Path | str, n: int = N_REF) -> Path:
    cfg = tmp_path / "inception_eval.yaml"
    cfg.write_text(
        f"name: inception_eval\nout_dir: {tmp_path / 'run'}\nteacher: {{name: digits}}\n"
        f"eval:\n  features: inception\n  inception_path: {weights}\n  reference: {reference}\n"
        f"  n_samples: {n}\n  batch_size: {n}\n  seeds: [0]\n  samplers: [euler]\n  grids: [karras]\n"
        f"  teacher_nfe: [1]\n  reference_sampler: euler\n  reference_nfe: 2\n  diffusers_samplers: []\n"
    )
    return cfg


def test_distill_eval_computes_inception_fid_end_to_end(tmp_path, weights, ref_folder, capsys):
    out = tmp_path / "out"
    assert main(["eval", str(_config(tmp_path, weights, ref_folder)), "--out", str(out)]) == 0
    rows = json.loads((out / "teacher_solvers.json").read_text())
    label = f"Inception FID, final ({N_REF} samples vs {N_REF} images in ref/)"
    assert len(rows) == 2  # euler @ 1 NFE and the reference row (euler @ 2 NFE)
    for row in rows:
        rec = row["record"]
        assert rec["feature_extractor"].startswith("inception@") and rec["n_samples"] == N_REF
        assert rec["kind"] == "final" and rec["label"] == label
        assert rec["reference"]["n"] == N_REF and rec["reference"]["name"] == f"{N_REF} images in ref/"
        assert np.isfinite(row["score"]) and row["score"] > 0
    title = (out / "teacher_solvers.md").read_text().splitlines()[0]
    assert title.startswith("# digits: fid vs NFE") and title.endswith(label)
    assert label in capsys.readouterr().out


def test_reference_against_itself_is_zero_and_noise_is_far(tmp_path, weights, ref_folder, digits64):
    scorer = FIDScorer("inception", str(weights), str(ref_folder))
    same = scorer(digits64, seed=0, model="the reference images")
    assert abs(same["score"]) < 1e-6  # identical statistics: the Fréchet distance is 0 in closed form
    ref = scorer.reference
    assert frechet_distance(ref.mu, ref.cov, ref.mu, ref.cov) == pytest.approx(0.0, abs=1e-8)
    assert same["kind"] == "final"
    assert same["label"] == f"Inception FID, final ({N_REF} samples vs {N_REF} images in ref/)"
    # Fewer samples than the reference holds: the same protocol rule makes it a proxy.
    half = scorer(digits64[:32], seed=0)
    assert half["kind"] == "proxy" and half["label"] == f"Inception FID, proxy (32 samples vs {N_REF} images in ref/)"
    noise = torch.randn(N_REF, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    far = scorer(noise, seed=0, model="noise")["score"]
    assert far > 1.0 and far > 1e6 * abs(same["score"])
    # The same statistics as a clean-fid .npz (mu, sigma as make_custom_stats writes; no sample count): the same
    # number, labelled with the file, and a proxy, as an unknown reference size counts as 50,000.
    np.savez_compressed(tmp_path / "ref_stats.npz", mu=scorer.reference.mu, sigma=scorer.reference.cov)
    npz = FIDScorer("inception", str(weights), str(tmp_path / "ref_stats.npz"))
    rec = npz(noise, seed=0)
    assert rec["score"] == pytest.approx(far, rel=1e-9)
    assert rec["kind"] == "proxy" and rec["label"] == f"Inception FID, proxy ({N_REF} samples vs ref_stats.npz)"


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")  # inside clean-fid's InceptionV3W
def test_features_and_folder_statistics_match_clean_fids_own_code(tmp_path, ref_folder, digits64):
    """clean-fid's ``InceptionV3W`` (clean mode, its ``view(bs, 2048)`` needs a 2048-d stand-in) and its
    ``build_resizer("clean")`` / ``get_folder_features`` give the very features and statistics ours do."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    folder = _save_stand_in(tmp_path / "inception2048", 2048).parent
    ours = InceptionFeatures(folder)
    model = InceptionV3W(str(folder), download=False, resize_inside=False).eval()
    x = torch.cat([digits64[:6], torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    levels = ((x + 1) * 127.5).round().expand(-1, 3, -1, -1)  # the 8-bit image a PNG of x holds, as RGB
    resize = build_resizer("clean")
    batch = torch.stack([torch.from_numpy(resize(im.permute(1, 2, 0).numpy())).permute(2, 0, 1) for im in levels])
    with torch.no_grad():
        theirs = model(batch).double()
    feats = ours(x)
    assert feats.shape == (8, 2048) and ours.dim == 2048
    torch.testing.assert_close(feats, theirs, rtol=0, atol=1e-6)
    # The whole folder path against clean-fid's get_folder_features.
    their_feats = get_folder_features(str(ref_folder), model, num_workers=0, batch_size=32,
                                      device=torch.device("cpu"), mode="clean", verbose=False)
    ref = folder_reference_stats(ref_folder, ours)
    np.testing.assert_allclose(ref.mu, their_feats.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.cov, np.cov(their_feats, rowvar=False), rtol=0, atol=1e-6)
    # The stand-in's legacy entry point has the file's signature: [0, 255] in, return_features=True -> [B, 2048].
    assert model.base(levels, return_features=True).shape == (8, 2048)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_weights_and_missing_reference_fail_with_one_line(tmp_path, weights, ref_folder, capsys,
                                                                  monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    cfg = str(_config(tmp_path, weights, ref_folder))
    gone = tmp_path / "no_weights" / INCEPTION_FILENAME
    err = _one_line_error(capsys, ["eval", cfg, f"eval.inception_path={gone}"])
    assert str(gone) in err and "eval.inception_path" in err and INCEPTION_ENV_VAR in err
    err = _one_line_error(capsys, ["eval", cfg, "eval.inception_path=null"])
    assert "eval.inception_path" in err and INCEPTION_ENV_VAR in err and "nothing is downloaded" in err
    missing_ref = tmp_path / "no_such_reference"
    err = _one_line_error(capsys, ["eval", cfg, f"eval.reference={missing_ref}"])
    assert str(missing_ref) in err and "eval.reference" in err and ".npz" in err and "folder" in err
    err = _one_line_error(capsys, ["eval", cfg, "eval.reference=null"])
    assert "eval.reference" in err and "none were given" in err
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["eval", cfg, f"eval.reference={tmp_path / 'empty'}"])
    assert "empty" in err and "0 image" in err
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    err = _one_line_error(capsys, ["eval", cfg, f"eval.reference={tmp_path / 'bad.npz'}"])
    assert "bad.npz" in err and "'mu' and 'sigma'" in err
