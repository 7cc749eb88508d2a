"""The conditioning contract (distill.core.cond): Cond helpers, guidance carried by the batch, CFG per sample."""

import pytest
import torch

from distill.core.cond import Cond, as_cond, cond_cat, cond_index, cond_size, split_guidance
from teachers.analytic import ring


def test_cond_index_cat_roundtrip():
    c = Cond(labels=torch.arange(6), embeds=torch.randn(6, 3, 4), added={"time_ids": torch.randn(6, 2)})
    a, b = cond_index(c, slice(0, 2)), cond_index(c, slice(2, 6))
    back = cond_cat([a, b])
    assert cond_size(back) == 6 and torch.equal(back.embeds, c.embeds) and torch.equal(back.added["time_ids"],
                                                                                      c.added["time_ids"])
    assert torch.equal(cond_cat([torch.arange(2), torch.arange(3)]), torch.tensor([0, 1, 0, 1, 2]))
    assert as_cond(torch.arange(3)).labels.tolist() == [0, 1, 2]


def test_cond_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="batch size"):
        Cond(labels=torch.arange(3), embeds=torch.randn(4, 2, 2))


def test_split_guidance_rejects_two_scales():
    c = Cond(labels=torch.arange(2), guidance=torch.full((2,), 3.0))
    rest, w = split_guidance(c)
    assert rest.guidance is None and torch.equal(w, torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="guidance given twice"):
        split_guidance(c, 2.0)


def test_teacher_applies_per_sample_guidance_from_cond():
    """CFG with a per-sample scale in cond equals the float-scale CFG row by row (exact mixture teacher)."""
    t = ring(conditional=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64) * 2
    sigma = torch.full((4,), 0.7, dtype=torch.float64)
    labels = torch.tensor([0, 3, 5, 7])
    w = torch.tensor([1.0, 2.0, 3.5, 0.0], dtype=torch.float64)
    got = t(x, sigma, Cond(labels=labels, guidance=w))
    for i in range(4):
        want = t(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1], float(w[i]))
        torch.testing.assert_close(got[i:i + 1], want)
