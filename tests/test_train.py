"""End-to-end training through ``DistillModule`` on the exact ring: exact resume, safe checkpoints, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distill.config import load_config
from distill.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def ring_cfg(tmp: Path, steps: int, name: str = "r", **over: str):
    ov = [f"trainer.max_steps={steps}", "eval.every=0", "trainer.grid_every=0", "trainer.progress_bar=false",
          "trainer.ckpt_every=10", "data.batch_size=128", "student.hidden=32", "student.depth=2",
          "loss.num_levels=10", f"out_dir={tmp / name}", "trainer.log_every=5"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(ROOT / "configs" / "ring_cd.yaml", ov)


def student_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("student.", "ema."))}


def test_resume_is_exact(tmp_path):
    from distill.train import run_training

    run_training(ring_cfg(tmp_path, 20, "straight"), final_eval=False)
    run_training(ring_cfg(tmp_path, 10, "split"), final_eval=False)
    res = run_training(ring_cfg(tmp_path, 20, "split"), resume=True, final_eval=False)
    assert res["iterations"] == 20
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # A different seed really gives different weights (the comparison above can fail).
    run_training(ring_cfg(tmp_path, 20, "other", seed="1"), final_eval=False)
    c = student_weights(tmp_path / "other")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_errors_are_one_line(tmp_path):
    from distill.train import load_training_checkpoint, run_training

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_training_checkpoint(tmp_path / "nope.ckpt")
    run_training(ring_cfg(tmp_path, 10, "a"), final_eval=False)
    good = tmp_path / "a" / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated") as e:
        load_training_checkpoint(bad)
    assert "\n" not in str(e.value)
    # A checkpoint whose networks differ from the config (another width) is refused before training starts.
    with pytest.raises(ValueError, match="does not match this config's networks") as e:
        run_training(ring_cfg(tmp_path, 20, "a", **{"student.hidden": "48"}), resume=True, final_eval=False)
    assert "\n" not in str(e.value)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path):
    """Kill a process while it overwrites a checkpoint through Lightning's checkpoint IO (the path the trainer
    uses): the previous file must still load."""
    from distill.train import load_training_checkpoint, run_training

    run_training(ring_cfg(tmp_path, 10, "k"), final_eval=False)
    path = tmp_path / "k" / "checkpoints" / "last.ckpt"
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import torch, sys
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        ckpt = torch.load({str(path)!r}, weights_only=True)
        ckpt["padding"] = torch.randn(60_000_000)  # ~240 MB so the write takes a while
        print("ready", flush=True)
        while True:
            TorchCheckpointIO().save_checkpoint(ckpt, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = load_training_checkpoint(path)  # old or a complete new one, never a torn file
    assert ckpt["distill"]["iteration"] == 10
    assert path.read_bytes() == before or "padding" in ckpt


def test_export_round_trip_reproduces_training_samples(tmp_path):
    from distill.export import export_checkpoint, load_exported
    from distill.train import build_module, run_training

    cfg = ring_cfg(tmp_path, 15, "e")
    run_training(cfg, final_eval=False)
    module = build_module(cfg)
    ckpt = torch.load(tmp_path / "e" / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    out = export_checkpoint(tmp_path / "e", tmp_path / "export")
    student, sampling = load_exported(out)
    for nfe in (1, 2):
        sig = torch.tensor(sampling["sigmas"][str(nfe)], dtype=torch.float64)
        want = module.ema_samples(64, nfe=nfe, seed=3, gamma=sampling["gamma"], sigmas=sig)
        from students import sample_student

        g = torch.Generator().manual_seed(3)
        noise = torch.randn((64, *student.data_shape), generator=g)
        got = sample_student(student, noise, sig, gamma=sampling["gamma"], generator=g)
        assert torch.equal(got, want)
    assert (out / "README.md").read_text().startswith("# Distilled student")
    with pytest.raises(FileExistsError):
        export_checkpoint(tmp_path / "e", out)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_stepz'.*max_steps"):
        load_config(ROOT / "configs" / "ring_cd.yaml", ["trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    from distill.train import build_components

    with pytest.raises(ConfigError, match="unknown loss 'nope'; valid losses: .*cd.*dmd2"):
        build_components(load_config(None, ["teacher.name=ring", "loss.name=nope"]))
    with pytest.raises(ConfigError, match="unknown key.*'bogus'.*valid keys"):
        build_components(load_config(ROOT / "configs" / "ring_cd.yaml", ["loss.bogus=1"]))
    with pytest.raises(ConfigError, match="unknown teacher 'rng'; valid teachers: .*ring"):
        build_components(load_config(None, ["teacher.name=rng"]))


def test_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(tmp_path / "x.yaml")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "distill.cli", "sample", "teacher.name=nope"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "valid teachers" in r.stderr and r.stderr.strip().count("\n") == 0
