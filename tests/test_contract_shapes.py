"""Every loss shape the families need trains through ``distill train`` and resumes exactly, with nothing but the
contract (the dummy losses in ``tests/dummy_losses.py``; the worked example of ``docs/adding-a-loss.md``).

For each: ``N`` iterations straight == ``N/2`` + resume + ``N/2``, bit for bit, for every tensor of the checkpoint
(student, EMA, the loss's networks and buffers, optimizer states); then what the shape is about is checked on the
trained module (the critic's own optimizer, the pair cache, round resets, the auxiliary network's group, the JVP).
"""

from __future__ import annotations

from pathlib import Path

import dummy_losses  # noqa: F401  (registers the dummy losses)
import pytest
import torch
from _helpers import assert_resume_exact

from distill.config import load_config
from distill.train import build_module
from teachers import DiffusersTeacher
from teachers.nets import small_unet

STEPS = 12


def tiny_unet_teacher(folder: Path) -> Path:
    """A tiny EDM-family UNet teacher with an attention block, saved like a user's diffusers folder."""
    if not (folder / "unet").is_dir():
        torch.manual_seed(0)
        net = small_unet(8, 1, (8, 16), norm_num_groups=4)
        DiffusersTeacher(net, {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
                               "sigma_data": 0.5, "prediction_type": "epsilon"},
                         edm_timestep_scale=250.0).save_pretrained(folder)
    return folder


def cfg_for(loss: str, tmp: Path, name: str, steps: int, **over: str):
    ov = [f"loss.name={loss}", f"trainer.max_steps={steps}", "eval.every=0", "trainer.grid_every=0",
          "trainer.progress_bar=false", "trainer.ckpt_every=5", "trainer.log_every=3", f"out_dir={tmp / name}",
          "data.batch_size=32", f"data.pair_cache_dir={tmp / 'pairs'}", "optim.student.lr=1e-3",
          "optim.student.warmup=2"]
    if loss == "dummy_jvp":
        ov += ["teacher.name=diffusers", f"teacher.path={tiny_unet_teacher(tmp / 'teacher')}",
               "student.init=teacher", "data.batch_size=8"]
    else:
        ov += ["teacher.name=ring", "student.init=fresh", "student.hidden=16", "student.depth=1"]
    if loss == "dummy_critic":
        ov += ["data.name=teacher", "optim.critic.lr=1e-3"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, ov)


def train_and_resume(loss: str, tmp: Path) -> dict:
    a = assert_resume_exact(lambda name, steps: cfg_for(loss, tmp, name, steps), STEPS, tag=loss)
    assert int(a["state_dict"]["iteration"]) == STEPS
    return a


def trained_module(loss: str, tmp: Path, ckpt: dict):
    module = build_module(cfg_for(loss, tmp, "straight", STEPS))
    module.prepare()
    module.load_state_dict(ckpt["state_dict"])
    return module


def moved(module, ckpt_init: dict, prefix: str) -> bool:
    return any(not torch.equal(v, ckpt_init[k]) for k, v in module.state_dict().items() if k.startswith(prefix))


def test_two_network_critic_loss(tmp_path):
    ckpt = train_and_resume("dummy_critic", tmp_path)
    module = trained_module("dummy_critic", tmp_path, ckpt)
    opts, _ = module.configure_optimizers()
    assert len(opts) == 2 and len(ckpt["optimizer_states"]) == 2
    critic = {id(p) for p in module.loss.critic.parameters()}
    assert {id(p) for g in opts[0].param_groups for p in g["params"]} == critic  # the critic phase's own group
    assert not critic & {id(p) for g in opts[1].param_groups for p in g["params"]}
    # the student stepped on every 2nd iteration only: Adam's step counters say so
    steps = {int(st["step"]) for st in ckpt["optimizer_states"][1]["state"].values()}
    assert steps == {STEPS // 2}
    assert {int(st["step"]) for st in ckpt["optimizer_states"][0]["state"].values()} == {STEPS}


def test_loss_on_cached_teacher_pairs(tmp_path):
    ckpt = train_and_resume("dummy_pairs", tmp_path)
    shards = list((tmp_path / "pairs").glob("*/shard_*.safetensors"))
    assert len(shards) == 1 and (shards[0].parent / "meta.json").is_file()
    assert not any("pair" in k for k in ckpt["state_dict"])  # not stored in the checkpoint
    module = build_module(cfg_for("dummy_pairs", tmp_path, "again", STEPS))
    module.prepare()
    cache = module.providers["pairs"].cache
    assert cache.generated_shards == 0  # a run with the same teacher/solver/NFE/seed reuses the cache
    z, x0, _ = cache.tensors
    assert z.shape == (64, 2) and x0.shape == (64, 2)
    # the pairs really are the teacher's ODE endpoints of their noise
    from distill.core.pairs import teacher_ode_pairs

    want = teacher_ode_pairs(module.teacher, z, module.teacher.sigma_min, module.teacher.sigma_max, nfe=5)
    torch.testing.assert_close(x0, want.float())
    batch = module.make_batch(3)
    assert set(batch.extras) == {"pairs.z", "pairs.x0"} and batch.extras["pairs.z"].shape == (32, 2)


def test_round_based_loss_resets_at_boundaries(tmp_path):
    ckpt = train_and_resume("dummy_rounds", tmp_path)
    length = 4
    assert int(ckpt["state_dict"]["loss.rounds_started"]) == (STEPS - 1) // length
    # the EMA restarted at the last boundary (k = 8): it has averaged the 4 updates since
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == STEPS - length * ((STEPS - 1) // length)
    # the warm-up restarts at each round's first step: lr at k = 8 is lr * 1/2 again (warmup 2)
    module = build_module(cfg_for("dummy_rounds", tmp_path, "probe", 10))
    module.prepare()
    module.configure_optimizers()
    po = module._optims["student"]
    used, n_state = [], []
    po.optimizer.register_step_pre_hook(lambda opt, args, kw: used.append(opt.param_groups[0]["lr"]))
    for _ in range(10):
        module.iterate()
        n_state.append(int(next(iter(po.optimizer.state.values()))["step"]))
    assert used == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3] * 2 + [5e-4, 1e-3])  # warm-up 2 restarts at k = 4, 8
    assert n_state == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]  # optimizer state cleared at k = 4 and 8


def test_auxiliary_network_trained_in_the_student_phase(tmp_path):
    ckpt = train_and_resume("dummy_aux", tmp_path)
    module = build_module(cfg_for("dummy_aux", tmp_path, "probe", STEPS))
    module.prepare()
    init = {k: v.clone() for k, v in module.state_dict().items()}
    groups = module.loss.phase_groups("student", module.student)
    assert set(groups) == {"student", "weight"}
    module.configure_optimizers()
    logs = module.iterate()
    assert {"grad_norm/student", "grad_norm/weight"} <= set(logs) and float(logs["grad_norm/weight"]) > 0
    assert moved(module, init, "loss.weight.") and moved(module, init, "student.")
    assert any(k.startswith("loss.weight.") for k in ckpt["state_dict"])


def test_jvp_loss_through_the_raw_backbone(tmp_path):
    ckpt = train_and_resume("dummy_jvp", tmp_path)
    module = trained_module("dummy_jvp", tmp_path, ckpt)
    student = module.student
    # the raw entry point's JVP matches central finite differences through the attention UNet (math SDPA)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    c = torch.tensor([0.1, -0.3], dtype=torch.float64)
    v = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    student.double()
    raw = student.raw_fn(None)
    h = 1e-5
    with sdpa_kernel([SDPBackend.MATH]):
        # along x in float64: central differences are exact to O(h^2)
        _, tangent = torch.func.jvp(raw, (x, c), (v, torch.zeros_like(c)))
        fd = (raw(x + h * v, c) - raw(x - h * v, c)) / (2 * h)
        torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
        # along the noise input: the UNet sees timestep 1000 c_noise and diffusers embeds it in float32, so the
        # difference step is a compromise between curvature (period ~2pi in the timestep) and float32 rounding
        _, tangent = torch.func.jvp(raw, (x, c), (torch.zeros_like(v), torch.ones_like(c)))
        fd = (raw(x, c + h) - raw(x, c - h)) / (2 * h)
        assert float((tangent - fd).norm() / fd.norm()) < 1e-2
