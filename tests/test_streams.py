"""Independent random streams (``distill.core.streams``): the evaluation streams of sampling seeds 0-9 share no
draws, so "± sd over seeds" comes from independent sample sets. The old scheme (initial noise from ``Generator(s)``,
re-noising from ``Generator(s + 1)``) fails this test: seed s's re-noising was seed s+1's initial noise."""

from __future__ import annotations

import itertools

import pytest
import torch

from distill.core.streams import generator, randn_like, stream_seed
from distill.evaluate import EVAL_STREAMS, eval_generator, generate_student
from losses.base import Batch
from students import SamplingPlan, build_student
from teachers import ring

N = 4096


def draws(g: torch.Generator) -> set[float]:
    return set(torch.randn(N, generator=g, dtype=torch.float64).tolist())


def test_evaluation_streams_of_seeds_0_to_9_share_no_draws():
    sets = {(s, p): draws(eval_generator(s, p)) for s in range(10) for p in EVAL_STREAMS}
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], f"streams {a} and {b} overlap"
    # the test can fail: the old derivation overlaps
    old = {(s, "noise"): draws(torch.Generator().manual_seed(s)) for s in range(3)}
    old |= {(s, "renoise"): draws(torch.Generator().manual_seed(s + 1)) for s in range(3)}
    assert old[(0, "renoise")] & old[(1, "noise")]


def test_training_draws_and_other_streams_are_independent_too():
    b = [Batch(64, seed=s, iteration=k) for s in range(3) for k in range(3)]
    sets = [set(x.randn(dtype=torch.float64).tolist()) for x in b]
    sets += [draws(eval_generator(s, "noise")) for s in range(3)]
    for x, y in itertools.combinations(sets, 2):
        assert not x & y
    assert stream_seed(0, "a") != stream_seed(0, "b") and stream_seed(1, 2) == stream_seed(1, 2)
    assert torch.equal(torch.rand(3, generator=generator(5, "x")), torch.rand(3, generator=generator(5, "x")))


def test_generate_student_uses_the_seed_streams():
    """A two-step multistep-consistency student draws its initial noise and its re-noising from the seed's streams."""
    teacher = ring()
    torch.manual_seed(0)
    student = build_student("consistency", teacher, init="fresh", hidden=8, depth=1)
    plan = SamplingPlan(gamma=1.0, floor=0.5)
    x, nfe, sig = generate_student(student, 2, 64, 3, plan, batch_size=64)
    noise = torch.randn((64, 2), generator=eval_generator(3, "noise"))
    from students import sample_student

    with torch.no_grad():
        want = sample_student(student.eval(), noise, sig, 1.0, generator=eval_generator(3, "renoise"))
    assert nfe == 2 and torch.equal(x, want.float())
    with pytest.raises(ValueError, match="valid: noise, labels, renoise"):
        eval_generator(0, "data")


def test_student_samples_do_not_depend_on_the_evaluation_batch_size():
    """Re-noising draws are fixed per sample up front: 4-step samples are the same at batch 64 and batch 16."""
    teacher = ring()
    torch.manual_seed(0)
    student = build_student("consistency", teacher, init="fresh", hidden=8, depth=1)
    plan = SamplingPlan(gamma=0.9, floor=0.3)
    a = generate_student(student, 4, 64, 1, plan, batch_size=64)[0]
    b = generate_student(student, 4, 64, 1, plan, batch_size=16)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, generate_student(student, 4, 64, 2, plan, batch_size=16)[0])  # another seed


def test_randn_like_draws_from_the_generator_device_independently():
    x = torch.zeros(3, 4, dtype=torch.float64)
    z = randn_like(x, generator(0, "t"))
    assert z.shape == x.shape and z.dtype == torch.float64 and z.device == x.device
    assert torch.equal(z, torch.randn(3, 4, generator=generator(0, "t"), dtype=torch.float64))
    assert not torch.equal(z, randn_like(x, generator(1, "t")))
