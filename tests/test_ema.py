"""EMA policies (``distill.core.ema``): exponential and EDM2's power-function EMA against their closed forms, the
first update copying, reset, and no host read of the update counter."""

from __future__ import annotations

import pytest
import torch

from distill.core.ema import EMA, make_ema, reset_ema, sigma_rel_to_gamma
from distill.core.registry import ConfigError


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def drive(ema: EMA, module: torch.nn.Module, values: list[float]) -> float:
    for v in values:
        with torch.no_grad():
            module.weight.fill_(v)
        ema.update_parameters(module)
    return float(ema.module.weight[0, 0])


def test_exponential_ema_closed_form():
    m = net()
    ema = make_ema(m, 0.9)
    vals = [1.0, 2.0, 4.0, 8.0]
    # first update copies; then e <- 0.9 e + 0.1 v
    want = vals[0]
    for v in vals[1:]:
        want = 0.9 * want + 0.1 * v
    assert drive(ema, m, vals) == pytest.approx(want, rel=1e-6)
    assert int(ema.n_averaged) == 4


def test_power_ema_weights_follow_edm2():
    """beta_t = (1 - 1/t)^(g+1): the update at step t carries weight (1 - beta_t) prod_{s>t} beta_s, which for g = 1
    is (2t - 1) / T^2 (EDM2 arXiv:2312.02696 eq. 3's discrete form)."""
    m = net()
    ema = make_ema(m, {"kind": "power", "gamma": 1.0})
    vals = [float(v) for v in range(7)]
    T = len(vals)
    want = sum((2 * t - 1) * v for t, v in zip(range(1, T + 1), vals)) / T**2
    assert drive(ema, m, vals) == pytest.approx(want, rel=1e-6)


def test_sigma_rel_matches_edm2_table():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    g = sigma_rel_to_gamma(0.07)
    assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(0.07, rel=1e-9)
    assert make_ema(net(), {"kind": "power", "sigma_rel": 0.05}).policy["gamma"] == pytest.approx(16.97, abs=0.01)


def test_copy_now_reset_and_errors():
    m = net()
    ema = make_ema(m, 0.5, copy_now=True)
    assert torch.equal(ema.module.weight, m.weight) and int(ema.n_averaged) == 1
    drive(ema, m, [3.0])
    assert float(ema.module.weight[0, 0]) == pytest.approx(0.5 * float(net().weight[0, 0]) + 1.5)
    reset_ema(ema)
    assert drive(ema, m, [7.0]) == 7.0  # the update after a reset copies
    with pytest.raises(ConfigError, match="valid kinds: exp, power"):
        make_ema(m, {"kind": "karras"})
    with pytest.raises(ConfigError, match="decay must lie in"):
        make_ema(m, 1.0)


def test_update_never_reads_the_counter_on_the_host(monkeypatch):
    m, ema = net(), make_ema(net(), 0.9)

    def boom(self):  # any host read of a tensor (bool(), int(), .item()) would call one of these
        raise AssertionError("host read")

    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    ema.update_parameters(m)
    ema.update_parameters(m)
