"""The contract every registered loss inherits (style.md §10), parametrised over ``LOSSES.names()`` so that each new
loss file is covered automatically: built from its own ``tiny_config()`` against a tiny EDM-family UNet teacher at 8x8
and the student kind it declares, each phase returns a finite scalar ``"loss"``, gives no gradient to the teacher,
and one SGD step on ``phase_parameters`` changes exactly those parameters."""

from __future__ import annotations

import math

import pytest
import torch

from distill.core.registry import ConfigError
from losses import LOSSES, DistillLoss
from students import STUDENTS, build_student
from teachers import DiffusersTeacher
from teachers.nets import small_unet

from _helpers import batch as make_batch
from _helpers import ctx

torch.set_num_threads(1)

EDM_SCHED = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "prediction_type": "epsilon"}
BATCH = 4


def tiny_teacher() -> DiffusersTeacher:
    torch.manual_seed(0)
    net = small_unet(block_out_channels=(8, 16), norm_num_groups=4)
    return DiffusersTeacher(net, EDM_SCHED, edm_timestep_scale=250.0)


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
def setup(request):
    name = request.param
    cls = LOSSES.get(name)
    torch.manual_seed(0)
    loss = LOSSES.build(name, **cls.tiny_config())
    assert isinstance(loss, DistillLoss)
    assert loss.student_kind in STUDENTS, f"{name}.student_kind {loss.student_kind!r} is not a student kind"
    teacher = tiny_teacher()
    student = build_student(loss.student_kind, teacher, init="teacher")
    loss.setup(student, teacher, ctx())
    batch = make_batch(torch.rand(BATCH, 1, 8, 8) * 2 - 1)
    return name, loss, student, teacher, batch


def test_every_phase_meets_the_contract(setup):
    name, loss, student, teacher, batch = setup
    assert loss.phases and len(set(loss.phases)) == len(loss.phases)
    for step, phase in enumerate(loss.phases):
        params = named_params(student=student, loss=loss, teacher=teacher)
        before = {k: p.detach().clone() for k, p in params.items()}
        trained = [p for ps in loss.phase_groups(phase, student).values() for p in ps]
        assert trained, f"{name}: phase {phase!r} trains no parameters"
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
        assert not stray, f"{name}/{phase}: parameters outside phase_parameters changed: {stray[:5]}"
        assert changed, f"{name}/{phase}: the SGD step changed nothing"
        loss.after_step(phase, student, ctx(step))

    # The teacher stays frozen through all of it.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_update_schedule(setup):
    name, loss, *_ = setup
    every = loss.update_every()
    assert set(every) == set(loss.phases), f"{name}: update_every must name every phase"
    assert all(isinstance(v, int) and v >= 1 for v in every.values())
    period = math.lcm(*every.values())
    for step in range(2 * period):
        expected = [p for p in loss.phases if step % every[p] == 0]
        assert loss.phases_for_step(step) == expected, (name, step)
    assert {p for s in range(period) for p in loss.phases_for_step(s)} == set(loss.phases)


@pytest.mark.parametrize("name", LOSSES.names())
def test_unknown_keys_fail_with_the_valid_ones(name):
    cls = LOSSES.get(name)
    with pytest.raises(ConfigError, match="not_a_key") as info:
        LOSSES.build(name, not_a_key=1)
    for key in cls.tiny_config():
        assert key in str(info.value), f"{name}: the error should list valid key {key!r}"
