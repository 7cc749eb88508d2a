"""Data as specs (``distill/data_sources.py``): global batches sliced per process, the teacher-pair cache (exact
endpoints, sharded, resumable, reused, corrupt shards named), one-line errors; and the iteration's NaN/Inf guard."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from distill.core.pairs import teacher_ode_pairs
from distill.core.registry import ConfigError
from distill.data_sources import TeacherPairCache, build_providers
from distill.module import DistillModule
from losses.base import Batch, DataSpec, DistillLoss
from students import build_student
from teachers import ring

RUN = {"seed": 3, "dataset": "teacher", "conditional": False}


def test_real_and_noise_providers_draw_global_batches():
    teacher = ring(conditional=True)
    prov = build_providers({"data": DataSpec("real"), "labels": DataSpec("noise")}, teacher, RUN)
    a, b = prov["data"].draw(5, 64), prov["data"].draw(5, 64)
    assert torch.equal(a["data"], b["data"]) and a["data"].shape == (64, 2)  # a function of (seed, k) only
    assert not torch.equal(a["data"], prov["data"].draw(6, 64)["data"])
    lab = prov["labels"].draw(0, 16)["labels"]
    assert lab.shape == (16,) and int(lab.max()) < 8  # uniform labels of a class-conditional teacher


def test_batch_draws_do_not_depend_on_the_process_count():
    one = Batch(8, seed=1, iteration=4)
    halves = [Batch(4, seed=1, iteration=4, rank=r, world_size=2) for r in (0, 1)]
    full = one.randn(3), one.randint(10), one.rand()
    parts = [(h.randn(3), h.randint(10), h.rand()) for h in halves]
    for i in range(3):
        assert torch.equal(full[i], torch.cat([p[i] for p in parts]))
    assert not torch.equal(Batch(8, seed=1, iteration=5).randn(3), full[0])
    with pytest.raises(ValueError, match="leading dim 3 is not the batch size 8"):
        one.randn_like(torch.zeros(3, 2))


def test_teacher_pair_cache_is_exact_sharded_resumable_and_reused(tmp_path):
    teacher = ring()
    cache = TeacherPairCache(teacher, tmp_path, seed=0, n=10, nfe=5, shard_size=4)
    cache.load()
    z, x0, lab = cache.tensors
    assert z.shape == (10, 2) and lab is None and cache.generated_shards == 3
    want = teacher_ode_pairs(teacher, z, teacher.sigma_min, teacher.sigma_max, nfe=5)
    torch.testing.assert_close(x0, want.float())
    shards = sorted(cache.folder.glob("shard_*.safetensors"))
    assert len(shards) == 3 and not list(cache.folder.glob("*.tmp"))
    # the generation cost is recorded: 10 pairs x 5 network evaluations, on this launch
    assert cache.cost["pairs"] == 10 and cache.cost["network_evals"] == 50 and cache.cost["seconds"] > 0
    assert cache.cost["generated_this_launch"] == 10
    # an interrupted generation resumes from the missing shard and gives the same pairs
    shards[1].unlink()
    again = TeacherPairCache(teacher, tmp_path, seed=0, n=10, nfe=5, shard_size=4)
    again.load()
    assert again.generated_shards == 1 and torch.equal(again.tensors[1], x0)
    assert again.cost["generated_this_launch"] == 4 and again.cost["pairs"] == 14  # the cumulative cost grows
    # the same teacher/solver/NFE/seed reuses it; another NFE gets its own folder
    third = TeacherPairCache(teacher, tmp_path, seed=0, n=10, nfe=5, shard_size=4)
    third.load()
    assert third.generated_shards == 0
    assert third.cost["generated_this_launch"] == 0 and third.cost["network_evals"] == 70  # read from meta.json
    assert TeacherPairCache(teacher, tmp_path, seed=0, n=10, nfe=7, shard_size=4).folder != cache.folder
    # a corrupt shard is named in one line
    shards[0].write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"shard_00000\.safetensors' is corrupt.*delete it") as info:
        TeacherPairCache(teacher, tmp_path, seed=0, n=10, nfe=5, shard_size=4).load()
    assert "\n" not in str(info.value)


def test_data_spec_errors_are_one_line():
    teacher = ring()
    with pytest.raises(ConfigError, match="unknown data source 'pairs'; valid data sources: exact, noise, real"):
        build_providers({"data": DataSpec("pairs")}, teacher, RUN)
    with pytest.raises(ConfigError, match="needs real data .*set data.name"):
        build_providers({"data": DataSpec("real")}, teacher, {"seed": 0, "dataset": None})
    with pytest.raises(ConfigError, match="unknown key.*'nfes'.*valid keys.*nfe"):
        build_providers({"data": DataSpec("noise"), "p": DataSpec("teacher_pairs", options={"nfes": 3})}, teacher,
                        RUN)
    with pytest.raises(ConfigError, match="must name a 'data' entry"):
        build_providers({"x": DataSpec("noise")}, teacher, RUN)


class NaNAt(DistillLoss):
    """Denoiser regression whose loss is NaN at iteration 2 (or its gradient, with ``where="grad"``)."""

    def __init__(self, where: str = "loss") -> None:
        super().__init__()
        self.where = where

    def forward(self, phase, student, teacher, batch, ctx):
        sigma = torch.full((batch.size,), 1.0)
        x = batch.randn(2)
        out = (student.denoise(x, sigma) - teacher(x, sigma)).pow(2).mean()
        if ctx.iteration == 2:
            w = student.net.mlp[0].weight
            # "grad": a finite loss whose gradient is NaN (d sqrt(u)/du is infinite at u = 0)
            out = out * float("nan") if self.where == "loss" else out + (w - w.detach()).pow(2).sum().sqrt()
        return {"loss": out}


@pytest.mark.parametrize("optimizer, where", [("adam", "loss"), ("adam", "grad"), ("radam", "loss")])
def test_a_nan_step_is_skipped_counted_and_reported(optimizer, where):
    teacher = ring()
    torch.manual_seed(0)
    student = build_student("generator", teacher, init="fresh", hidden=8, depth=1)
    optim = {"student": OmegaConf.create({"name": optimizer, "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8,
                                          "weight_decay": 0.0, "warmup": 0, "decay": "none", "final_lr_ratio": 0.0,
                                          "grad_clip": 1.0})}
    module = DistillModule(teacher, student, NaNAt(where), optim, data={"batch_size": 16}, max_steps=5)
    module.prepare()
    module.configure_optimizers()
    snapshots, skipped = [], []
    for k in range(4):
        logs = module.iterate()
        if k == 2:
            assert torch.isfinite(logs["student/loss"]) == (where == "grad")
        snapshots.append({k: v.clone() for k, v in student.state_dict().items()})
        skipped.append(float(logs["student/skipped"]))
    assert skipped == [0.0, 0.0, 1.0, 0.0] and int(module.skipped_steps) == 1
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1])  # the bad step did nothing
    assert any(not torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2])  # training goes on
    assert all(torch.isfinite(v).all() for v in student.state_dict().values())
    with pytest.warns(RuntimeWarning, match="1 phase step\\(s\\) skipped"):
        module._log(3, logs)


class BadRows(DistillLoss):
    """Reports 3 non-finite rows at iteration 1 (as DMD2 does when its DM gradient has NaN rows)."""

    def forward(self, phase, student, teacher, batch, ctx):
        from losses.base import NONFINITE_ROWS

        sigma = torch.full((batch.size,), 1.0)
        x = batch.randn(2)
        out = (student.denoise(x, sigma) - teacher(x, sigma)).pow(2).mean()
        return {"loss": out, NONFINITE_ROWS: torch.tensor(3 if ctx.iteration == 1 else 0)}


@pytest.mark.parametrize("policy", ["skip", "drop"])
def test_nonfinite_rows_are_counted_and_follow_the_guard_policy(policy):
    teacher = ring()
    torch.manual_seed(0)
    student = build_student("generator", teacher, init="fresh", hidden=8, depth=1)
    optim = {"student": OmegaConf.create({"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8,
                                          "weight_decay": 0.0, "warmup": 0, "decay": "none", "final_lr_ratio": 0.0,
                                          "grad_clip": 1.0})}
    module = DistillModule(teacher, student, BadRows(), optim, data={"batch_size": 16}, max_steps=3,
                           nonfinite_rows=policy)
    module.prepare()
    module.configure_optimizers()
    module.iterate()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    logs = module.iterate()
    unchanged = all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert int(module.nonfinite_rows) == 3 and float(logs["student/nonfinite_rows"]) == 3
    assert unchanged == (policy == "skip") and int(module.skipped_steps) == (policy == "skip")
    with pytest.warns(RuntimeWarning, match="3 sample row\\(s\\) were not finite"):
        module._log(1, logs)
