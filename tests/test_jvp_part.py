"""losses.parts.jvp: forward-mode JVP and its finite-difference fallback against a float64 central difference."""

import pytest
import torch
from torch import nn

from distill.core.registry import ConfigError
from losses.parts import jvp, same_randomness


def _net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2)).to(dtype)


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_jvp_matches_float64_central_difference(method):
    net64 = _net(torch.float64)
    net32 = _net(torch.float32)
    x, s = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64)
    v, ds = torch.randn_like(x), torch.ones_like(s)

    def f64(x_, s_):
        return net64(torch.cat([x_, s_], 1))

    ref = (f64(x + 1e-6 * v, s + 1e-6 * ds) - f64(x - 1e-6 * v, s - 1e-6 * ds)) / 2e-6
    out, tan = jvp(f64, (x, s), (v, ds), method=method, h=1e-6)
    assert torch.allclose(out, f64(x, s)) and (tan - ref).norm() < 1e-6 * ref.norm()
    # float32 network: the fallback's default step h = 1e-3 leaves a rounding error of order eps32 / h ~ 1e-4
    # relative (1.5e-4 on an AMD EPYC), the autograd JVP far closer
    out32, tan32 = jvp(lambda a, b: net32(torch.cat([a, b], 1)), (x.float(), s.float()), (v.float(), ds.float()),
                       method=method)
    assert (tan32.double() - ref).norm() < (5e-4 if method == "finite_difference" else 1e-5) * ref.norm()


def test_jvp_rejects_bad_input():
    with pytest.raises(ConfigError, match="valid: autograd, finite_difference"):
        jvp(lambda a: a, (torch.ones(1),), (torch.ones(1),), method="forward")
    with pytest.raises(ValueError, match="tangent of its shape"):
        jvp(lambda a: a, (torch.ones(2),), (torch.ones(3),))


def test_same_randomness_gives_identical_dropout_masks_and_restores_the_rng():
    drop = nn.Dropout(0.5)
    x = torch.ones(1000)
    torch.manual_seed(1)
    with same_randomness(7):
        a = drop(x)
    with same_randomness(7):
        b = drop(x)
    after = torch.rand(1)
    with same_randomness(8):
        c = drop(x)
    torch.manual_seed(1)
    assert torch.equal(a, b) and not torch.equal(a, c) and 0.4 < (a == 0).float().mean() < 0.6
    assert torch.equal(torch.rand(1), after)  # the global stream continued as if the blocks never ran
