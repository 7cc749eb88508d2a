"""The contract every registered loss inherits (docs/design.md §2.6), parametrised over ``LOSSES.names()`` so that each
new loss file is covered automatically (the dummy losses of ``tests/dummy_losses.py`` included).

Each loss is built from its own ``tiny_config()`` inside a ``DistillModule`` against a tiny EDM-family UNet teacher
at 8x8 (real data: the digits) and the student kind it declares; its batch comes from its own ``data_specs()``
through the real providers. Then: its declarations are well-formed (phases, schedule, EMA phases, disjoint parameter
groups, data specs, sampling plan); ``setup`` is deterministic; each phase returns a finite scalar ``"loss"`` and
scalar logged terms, gives no gradient to the teacher, and one SGD step on the phase's groups changes exactly those
parameters."""

from __future__ import annotations

import math

import dummy_losses  # noqa: F401  (registers the dummy losses, so they meet the contract too)
import pytest
import torch
from _helpers import ctx

from distill.core.registry import ConfigError
from distill.data_sources import DATA_SOURCES
from distill.module import DistillModule
from losses import LOSSES, DistillLoss
from losses.base import DataSpec
from students import STUDENTS, SamplingPlan, build_student
from teachers import DiffusersTeacher
from teachers.nets import small_unet

torch.set_num_threads(1)

EDM_SCHED = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "prediction_type": "epsilon"}
BATCH = 4
OPTIM = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "warmup": 0,
         "decay": "none", "final_lr_ratio": 0.0, "grad_clip": 1.0}


def tiny_teacher() -> DiffusersTeacher:
    torch.manual_seed(0)
    net = small_unet(block_out_channels=(8, 16), norm_num_groups=4)
    return DiffusersTeacher(net, EDM_SCHED, edm_timestep_scale=250.0)


def build(name: str, tmp_path) -> DistillModule:
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    loss = LOSSES.build(name, **LOSSES.get(name).tiny_config())
    teacher = tiny_teacher()
    student = build_student(loss.student_kind, teacher, init="teacher")
    optim = {p: OmegaConf.create(OPTIM) for p in loss.phases}
    module = DistillModule(teacher, student, loss, optim, data={"dataset": "digits", "batch_size": BATCH,
                                                                "out_dir": str(tmp_path)}, max_steps=10)
    module.prepare()
    return module


def named_params(**modules: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """All parameters of the given modules by a unique name (shared tensors listed once)."""
    out, seen = {}, set()
    for prefix, m in modules.items():
        for name, p in m.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{prefix}.{name}"] = p
    return out


@pytest.fixture(params=LOSSES.names())
def module(request, tmp_path):
    return build(request.param, tmp_path)


def test_declarations_are_well_formed(module):
    loss, name = module.loss, type(module.loss).__name__
    assert isinstance(loss, DistillLoss)
    assert loss.student_kind in STUDENTS, f"{name}.student_kind {loss.student_kind!r} is not a student kind"
    assert loss.phases and len(set(loss.phases)) == len(loss.phases)
    assert loss.ema_phases and set(loss.ema_phases) <= set(loss.phases), f"{name}: ema_phases must name phases"
    specs = loss.data_specs()
    assert "data" in specs and all(isinstance(s, DataSpec) and s.source in DATA_SOURCES for s in specs.values())
    plan = loss.sampling()
    assert plan is None or isinstance(plan, SamplingPlan)
    seen: set[int] = set()
    for phase in loss.phases:
        for group, params in loss.phase_groups(phase, module.student).items():
            ids = {id(p) for p in params}
            assert params and not ids & seen, f"{name}/{phase}: group {group!r} is empty or shared with another"
            seen |= ids
    assert not {id(p) for p in module.teacher.parameters()} & seen, f"{name}: a phase trains the teacher"


def test_setup_is_deterministic(module, tmp_path):
    again = build(type(module.loss).registry_name, tmp_path / "again")
    a, b = module.loss.state_dict(), again.loss.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "setup must build the same networks every time (resume)"


def test_every_phase_meets_the_contract(module):
    loss, student, teacher = module.loss, module.student, module.teacher
    name = type(loss).__name__
    batch = module.make_batch(0)
    assert batch.size == BATCH
    for step, phase in enumerate(loss.phases):
        params = named_params(student=student, loss=loss, teacher=teacher)
        before = {k: p.detach().clone() for k, p in params.items()}
        trained = [p for ps in loss.phase_groups(phase, student).values() for p in ps]
        trained_ids = {id(p) for p in trained}
        assert trained_ids <= {id(p) for p in params.values()}, f"{name}: {phase} trains parameters nobody owns"
        assert all(p.requires_grad for p in trained)

        for p in params.values():
            p.grad = None
        terms = loss(phase, student, teacher, batch, ctx(step))
        assert isinstance(terms, dict) and "loss" in terms, f"{name}/{phase} must return a dict with 'loss'"
        value = terms["loss"]
        assert value.ndim == 0 and torch.isfinite(value), f"{name}/{phase}: loss {value}"
        assert all(torch.as_tensor(v).numel() == 1 for v in terms.values()), f"{name}/{phase}: non-scalar log terms"
        value.backward()

        for k, p in named_params(teacher=teacher).items():
            assert p.grad is None, f"{name}/{phase}: teacher parameter {k} received a gradient"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), \
            f"{name}/{phase}: no gradient reaches the phase's parameters"

        torch.optim.SGD(trained, lr=1e-2).step()
        changed = {k for k, p in params.items() if not torch.equal(p.detach(), before[k])}
        stray = sorted(k for k in changed if id(params[k]) not in trained_ids)
        assert not stray, f"{name}/{phase}: parameters outside its groups changed: {stray[:5]}"
        assert changed, f"{name}/{phase}: the SGD step changed nothing"
        loss.after_step(phase, student, ctx(step))

    # The teacher stays frozen through all of it.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_update_schedule(module):
    loss = module.loss
    name = type(loss).__name__
    every = loss.update_every()
    assert set(every) == set(loss.phases), f"{name}: update_every must name every phase"
    assert all(isinstance(v, int) and v >= 1 for v in every.values())
    period = math.lcm(*every.values())
    rounds = [loss.round_of(k) for k in range(4 * period)]
    assert rounds == sorted(rounds), f"{name}: round_of must not decrease"
    if type(loss).phases_for_step is DistillLoss.phases_for_step:
        for step in range(2 * period):
            assert loss.phases_for_step(step) == [p for p in loss.phases if step % every[p] == 0], (name, step)


@pytest.mark.parametrize("name", LOSSES.names())
def test_unknown_keys_fail_with_the_valid_ones(name):
    cls = LOSSES.get(name)
    with pytest.raises(ConfigError, match="not_a_key") as info:
        LOSSES.build(name, not_a_key=1)
    for key in cls.tiny_config():
        assert key in str(info.value), f"{name}: the error should list valid key {key!r}"
