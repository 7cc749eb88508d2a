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
from distill.core.registry import ConfigError

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


@pytest.mark.parametrize("steps", [20, pytest.param(2000, marks=pytest.mark.slow)])
def test_resume_is_exact(tmp_path, steps):
    """``steps`` straight == ``steps/2`` + resume + ``steps/2`` (the issue's 2k-step form is the slow case)."""
    from distill.train import run_training

    every = str(max(10, steps // 4))
    run_training(ring_cfg(tmp_path, steps, "straight", **{"trainer.ckpt_every": every}), final_eval=False)
    run_training(ring_cfg(tmp_path, steps // 2, "split", **{"trainer.ckpt_every": every}), final_eval=False)
    res = run_training(ring_cfg(tmp_path, steps, "split", **{"trainer.ckpt_every": every}), resume=True,
                       final_eval=False)
    assert res["iterations"] == steps
    a, b = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # A different seed really gives different weights (the comparison above can fail).
    run_training(ring_cfg(tmp_path, steps, "other", seed="1", **{"trainer.ckpt_every": every}), final_eval=False)
    c = student_weights(tmp_path / "other")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def dmd2_ring_cfg(tmp: Path, steps: int, name: str):
    # A tiny version of configs/ring_dmd2.yaml that crosses every stage of its schedule within 24 iterations:
    # regression warm start (0-3), fake-score warm-up (4-5), then TTUR 2 (a generator update every other iteration).
    ov = [f"trainer.max_steps={steps}", "eval.every=0", "trainer.grid_every=0", "trainer.progress_bar=false",
          "trainer.ckpt_every=6", "data.batch_size=64", "student.hidden=32", "student.depth=2",
          "loss.fake_hidden=32", "loss.fake_depth=2", "loss.critic_updates=2", "loss.regression_steps=4",
          "loss.regression_pairs=128", "loss.regression_nfe=5", "loss.fake_warmup=2", f"out_dir={tmp / name}",
          "trainer.log_every=5"]
    return load_config(ROOT / "configs" / "ring_dmd2.yaml", ov)


def test_two_phase_resume_is_exact(tmp_path):
    """DMD2 keeps two optimizers, a fake score and regression pairs from the pair cache: 24 straight == 13 + resume
    + 11. The pairs are not in the checkpoint (rebuilt from the cache, which the resumed run reuses)."""
    from distill.train import run_training

    run_training(dmd2_ring_cfg(tmp_path, 24, "straight"), final_eval=False)
    run_training(dmd2_ring_cfg(tmp_path, 13, "split"), final_eval=False)  # stops between a critic and a G update
    run_training(dmd2_ring_cfg(tmp_path, 24, "split"), resume=True, final_eval=False)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("loss.fake.") for k in a["state_dict"])
    assert not any("ode" in k or "pair" in k for k in a["state_dict"])  # derived tensors stay out of checkpoints
    assert len(list((tmp_path / "split" / "teacher_pairs").glob("*/shard_*.safetensors"))) == 1
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{k} differs after resume"
    assert len(a["optimizer_states"]) == 2
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for i, st in oa["state"].items():
            for name, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][name])), (i, name)


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
    from distill.export import export_plan

    module = build_module(cfg)
    module.prepare()
    ckpt = torch.load(tmp_path / "e" / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    out = export_checkpoint(tmp_path / "e", tmp_path / "export")
    student, sampling = load_exported(out)
    plan = export_plan(sampling)
    for nfe in (1, 2):
        # the export carries the run's one sampling plan: same levels, same gamma, same samples
        torch.testing.assert_close(plan.sigmas(nfe, student.sigma_max), module.sampling.sigmas(nfe, 80.0))
        noise = torch.randn((64, *student.data_shape), generator=torch.Generator().manual_seed(3))
        want = module.sampling.sample(module.ema.module.eval(), noise, nfe, generator=torch.Generator().manual_seed(4))
        got = plan.sample(student, noise, nfe, generator=torch.Generator().manual_seed(4))
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


@pytest.mark.parametrize("config, data", [("ring_dmd2", "null"), ("ring_cd", "teacher")])
def test_every_loss_batch_has_the_configured_size(tmp_path, config, data):
    # Data-free losses (DMD2 on the ring) get their batch size from data.batch_size too; a missing DataSource once
    # silently trained them at batch size 1.
    from distill.train import build_module

    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [f"out_dir={tmp_path}", "data.batch_size=37",
                                                            "loss.regression_steps=0", "loss.regression_weight=0"]
                      if config == "ring_dmd2" else [f"out_dir={tmp_path}", "data.batch_size=37"])
    assert cfg.data.name == (None if data == "null" else data)
    module = build_module(cfg)
    module.prepare()
    batch = module.make_batch(0)
    assert batch.size == 37
    assert (batch.data is not None) == (data == "teacher")
    if data == "teacher":
        assert batch.data.shape == (37, 2)


def test_lr_schedule_warmup_and_decay():
    from distill.iteration import LRSchedule

    assert [LRSchedule(10, warmup=4)(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [LRSchedule(11, decay="cosine", final_ratio=0.1)(i) for i in range(11)]
    assert cos[0] == 1.0 and abs(cos[-1] - 0.1) < 1e-12 and abs(cos[5] - 0.55) < 1e-12
    assert all(a > b for a, b in zip(cos, cos[1:]))
    lin = [LRSchedule(6, warmup=1, decay="linear")(i) for i in range(6)]
    assert lin == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    # a round boundary restarts the warm-up from its first step (progressive distillation)
    sched = LRSchedule(10, warmup=2)
    sched.start = 6
    assert [sched(i) for i in range(6, 9)] == [0.5, 1.0, 1.0]


def test_lr_decay_counts_each_phase_own_steps(tmp_path):
    # DMD2's generator steps once per critic_updates iterations after the warm-ups: its cosine must still end at
    # final_lr_ratio on its own last step, not a fifth of the way through.
    from distill.train import build_module

    cfg = dmd2_ring_cfg(tmp_path, 24, "lr")
    for phase in ("student", "critic"):
        cfg.optim[phase].decay = "cosine"
        cfg.optim[phase].final_lr_ratio = 0.2
    module = build_module(cfg)
    opts, scheds = module.configure_optimizers()
    steps = {p: sum(p in module.loss.phases_for_step(k) for k in range(24)) for p in module.loss.phases}
    assert steps == {"critic": 2 + 18, "student": 4 + 9}
    for phase, opt, sched in zip(module.loss.phases, opts, scheds):
        lr0 = opt.param_groups[0]["lr"]
        for _ in range(steps[phase] - 1):
            opt.step()
            sched.step()
        assert abs(opt.param_groups[0]["lr"] - 0.2 * float(cfg.optim[phase].lr)) < 1e-12 * lr0
    with pytest.raises(ConfigError, match="unknown optim.student.decay 'cos'; valid: none, cosine, linear"):
        cfg.optim.student.decay = "cos"
        build_module(cfg).configure_optimizers()


def test_final_eval_reuses_the_callbacks_last_rows_exactly(tmp_path):
    # The FID callback's rows at the last iteration are reused by the final table; they must equal what the final
    # evaluation computes on its own (same noise, grid and protocol), and other seeds are computed fresh.
    from distill.train import final_evaluation, run_training

    cfg = ring_cfg(tmp_path, 12, "fe", **{"eval.every": "12", "eval.seeds": "[0,1]", "eval.n_samples": "500",
                                          "eval.batch_size": "500", "eval.nfe": "[1,2]"})
    res = run_training(cfg, final_eval=True)
    reused = {(r["model"], r["nfe"], r["seed"]): r["score"] for r in res["eval"]["rows"]}
    assert len(reused) == 6 and {k[2] for k in reused} == {0, 1}
    from distill.train import build_module

    module = build_module(cfg)
    module.prepare()
    ckpt = torch.load(tmp_path / "fe" / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    from distill.scorers import build_scorer as scorer_for

    fresh = final_evaluation(module, scorer_for(module.teacher, "auto"), cfg, tmp_path / "fresh", fid_cb=None)
    assert {(r["model"], r["nfe"], r["seed"]): r["score"] for r in fresh["rows"]} == reused


def test_sampling_plan_is_resolved_again_after_the_loss_setup(tmp_path):
    """A loss may build its sampling plan from what its setup saw (the teacher's levels): the module asks again after
    setup, and the config's ``sampling`` section still overrides it."""
    from distill.train import build_module
    from students import SamplingPlan

    module = build_module(ring_cfg(tmp_path, 5, **{"sampling.floor": 0.7, "sampling.gamma": "null"}))
    assert module.sampling.gamma != 0.25
    module.loss.sampling = lambda: SamplingPlan(gamma=0.25, floor=0.3)  # what a setup-dependent plan returns
    module.prepare()
    assert module.sampling.gamma == 0.25 and module.sampling.floor == 0.7
