"""Smoke tests of the benchmark scripts' own logic (tiny sizes; the figures themselves live in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_emas_scores_every_ema_and_a_zero_decay_ema_is_the_raw_student(tmp_path):
    mod = _load("sweep_emas")
    rows = mod.main([str(ROOT / "configs" / "ring_cd.yaml"), "student.hidden=32", "student.depth=2",
                     "loss.num_levels=6", "data.batch_size=64", "--steps", "6", "--every", "3", "--emas", "0.0", "0.9",
                     "--floors", "0.5", "--n", "500", "--json", str(tmp_path / "s.json")])
    assert [r["iteration"] for r in rows] == [3, 6]
    keys = {"ema0.0_nfe1", "ema0.0_nfe2_via0.5", "ema0.9_nfe1", "ema0.9_nfe2_via0.5"}
    assert keys <= set(rows[-1]) and all(math.isfinite(rows[-1][k]) for k in keys)
    assert rows[-1]["ema0.0_nfe1"] != rows[-1]["ema0.9_nfe1"]  # two different averages were scored
    assert (tmp_path / "s.json").is_file()
