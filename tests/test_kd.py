"""Closed-form checks of the ``kd`` loss (Luhman & Luhman 2021, arXiv:2101.02388; DMD v1's regression term,
arXiv:2311.18828 eq. 9) on Gaussian data ``N(M, S^2)``, whose teacher ODE map from ``sigma_max z`` is
``ODE(z) = M + (sigma_max z - M) S / sqrt(S^2 + sigma_max^2)``:

* the exact one-step map has loss 0 and zero gradient; a linear one-step student trained by the loss reaches it;
* k = 2: the DDIM chain of the exact Gaussian denoiser is not the ODE map (its loss has a closed form > 0), while a
  linear student trained with ``steps=2`` reaches loss ~0 and, sampled through ``sampling()``, the exact map;
* ``sampling()`` is the training chain (levels, gamma 0), and the loss is the distance of ``plan.sample``'s output;
* distances: l2 / pseudo-Huber values on a hand example (iCT's default c), the digits features distance;
* one-line ConfigErrors for bad keys, and ``features`` on a non-digits teacher.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from _helpers import GaussianGenerator, batch, ctx, fit, gaussian_denoiser
from torch import nn

from distill.core.pairs import teacher_ode_pairs
from distill.core.registry import ConfigError
from distill.features import DigitsFeatures
from losses import build_loss
from losses.kd import kd_distance
from students import FlowMapStudent

torch.set_num_threads(1)

F64 = torch.float64
M, S, SMAX = 1.0, 0.5, 80.0
K_EXACT = S / math.sqrt(S**2 + SMAX**2)  # ODE(z) = M + (SMAX z - M) K_EXACT
GAUSS_TEACHER = SimpleNamespace(data_shape=(1,))


def ode_map(z: torch.Tensor) -> torch.Tensor:
    return M + (SMAX * z - M) * K_EXACT


def pair_batch(n: int, seed: int = 0, x0=None, shape=(1,)) -> object:
    z = torch.randn(n, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return batch(size=n, dtype=F64, extras={"pairs.z": z, "pairs.x0": ode_map(z) if x0 is None else x0(z)})


def make(student: nn.Module, teacher=GAUSS_TEACHER, **kw):
    loss = build_loss("kd", **kw)
    loss.setup(student, teacher, ctx(dtype=F64))
    return loss


def run(loss, student, b, i: int = 0):
    return loss("student", student, None, b, ctx(i, dtype=F64))


class ExactDenoiserGenerator(FlowMapStudent):
    """Generator student whose ``D(x, s)`` is the exact Gaussian denoiser (so a DDIM chain of it)."""

    kind = "generator"

    def __init__(self) -> None:
        super().__init__((1,), 0.002, SMAX, 0.5)
        self.dummy = nn.Parameter(torch.zeros((), dtype=F64))

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        return gaussian_denoiser(x, sigma_from, M, S) + 0 * self.dummy


class ConstGenerator(FlowMapStudent):
    """``D(x, s) = v`` (a learnable constant of shape ``data_shape``)."""

    kind = "generator"

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__(tuple(v.shape), 0.002, SMAX, 0.5)
        self.v = nn.Parameter(v.clone())

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        return self.v.expand_as(x)


def test_closed_form_matches_the_teacher_pair_solver():
    """The tests' ``ODE(z)`` is the map the pair cache computes (Heun from ``sigma_max z``): its relative error in
    ``x - M`` shrinks at second order with the NFE (Heun 35 is ~5% off on this narrow Gaussian, 199 ~0.15%)."""
    z = torch.randn(512, 1, dtype=F64, generator=torch.Generator().manual_seed(3))
    errs = []
    for nfe in (35, 79, 199):
        x0 = teacher_ode_pairs(lambda x, s, c: gaussian_denoiser(x, s, M, S), z, 0.002, SMAX, None, nfe)
        errs.append(float(((x0 - M) / (ode_map(z) - M) - 1).abs().max()))
    assert errs[2] < 3e-3 and errs[1] < errs[0] / 4 and errs[2] < errs[1] / 4, errs


@pytest.mark.parametrize("input_sigma", [None, 2.5])
def test_exact_one_step_map_has_zero_loss_and_gradient(input_sigma):
    """``J(sigma_in z, sigma_in, 0) = b + a z`` with ``a = SMAX K, b = M (1 - K)`` is ODE(z): loss 0, gradient 0; the
    student is fed ``sigma_in z`` at level ``sigma_in``; a perturbed student has a positive loss and a gradient."""
    gen = GaussianGenerator(SMAX * K_EXACT, M * (1 - K_EXACT))
    loss = make(gen, input_sigma=input_sigma)
    assert loss._sigmas.tolist() == [input_sigma or SMAX, 0.0]
    out = run(loss, gen, pair_batch(1024))
    out["loss"].backward()
    assert float(out["loss"].detach()) < 1e-24
    assert abs(float(gen.a.grad)) < 1e-12 and abs(float(gen.b.grad)) < 1e-12
    off = GaussianGenerator(SMAX * K_EXACT, M * (1 - K_EXACT) + 0.1)
    out = run(loss, off, pair_batch(1024))
    out["loss"].backward()
    assert float(out["loss"].detach()) == pytest.approx(0.01, rel=1e-10)  # a constant offset of 0.1
    assert float(off.b.grad) == pytest.approx(0.2, rel=1e-10)


def test_linear_one_step_student_converges_to_the_ode_map():
    gen = GaussianGenerator(1.0, 0.0)
    loss = make(gen)
    fit(lambda i: run(loss, gen, pair_batch(256, seed=i), i)["loss"], gen.parameters(), 600, 0.05)
    assert float(gen.a.detach()) == pytest.approx(SMAX * K_EXACT, abs=1e-2)
    assert float(gen.b.detach()) == pytest.approx(M * (1 - K_EXACT), abs=1e-2)


def test_two_step_chain_of_the_exact_denoiser_is_not_the_ode_map():
    """DDIM on ``[80, 0.4, 0]`` with ``D*``: ``x_2 - M = (SMAX z - M) c1 c2``, ``c1 = r + (1 - r) S^2/(S^2 + 80^2)``
    (r = 0.4/80), ``c2 = S^2/(S^2 + 0.4^2)``, against ODE's ``K``: the loss is
    ``mean((c1 c2 - K)^2 (SMAX z - M)^2)``."""
    student = ExactDenoiserGenerator()
    loss = make(student, steps=2, floor=0.4)
    b = pair_batch(2048)
    z = b.extras["pairs.z"]
    r = 0.4 / SMAX
    c = (r + (1 - r) * S**2 / (S**2 + SMAX**2)) * S**2 / (S**2 + 0.4**2)
    expected = ((c - K_EXACT) ** 2 * (SMAX * z - M) ** 2).mean()
    value = run(loss, student, b)["loss"]
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    assert float(value.detach()) > 1e-2


def test_two_step_gradient_flows_through_both_jumps():
    """Linear student off the optimum, chain ``[80, 0.4, 0]``: ``x1 = r SMAX z + (1 - r)(b + a z)`` (r = 0.4/80),
    ``x2 = b + a x1 / 0.4``; the gradient of ``mean((x2 - y)^2)`` includes the first jump's
    ``dx2/da = x1/0.4 + a (1 - r) z / 0.4`` and ``dx2/db = 1 + a (1 - r) / 0.4`` (not only the last jump's)."""
    a0, b0 = 0.7, 0.3
    gen = GaussianGenerator(a0, b0)
    loss = make(gen, steps=2, floor=0.4)
    b = pair_batch(512)
    z, y = b.extras["pairs.z"], b.extras["pairs.x0"]
    out = run(loss, gen, b)
    out["loss"].backward()
    r = 0.4 / SMAX
    x1 = r * SMAX * z + (1 - r) * (b0 + a0 * z)
    x2 = b0 + a0 * x1 / 0.4
    torch.testing.assert_close(out["loss"].detach(), ((x2 - y) ** 2).mean(), rtol=1e-12, atol=0)
    ga = (2 * (x2 - y) * (x1 / 0.4 + a0 * (1 - r) * z / 0.4)).mean()
    gb = (2 * (x2 - y) * (1 + a0 * (1 - r) / 0.4)).mean()
    torch.testing.assert_close(gen.a.grad, ga, rtol=1e-10, atol=0)
    torch.testing.assert_close(gen.b.grad, gb, rtol=1e-10, atol=0)


def test_linear_student_trained_with_two_steps_reaches_zero_loss():
    """A linear generator ``D = b + a x / s`` can represent ODE(z) through the 2-step chain (a quadratic in ``a``);
    trained with ``steps=2`` (gradient through both jumps) it gets there, and ``sampling()`` at 2 NFE reproduces it."""
    gen = GaussianGenerator(1.0, 0.0)
    loss = make(gen, steps=2, floor=0.4)
    start = float(run(loss, gen, pair_batch(2048, seed=10**6))["kd"])
    fit(lambda i: run(loss, gen, pair_batch(256, seed=i), i)["loss"], gen.parameters(), 800, 0.02)
    end = float(run(loss, gen, pair_batch(2048, seed=10**6))["kd"])
    assert start > 1.0 and end < 1e-6, (start, end)
    r = 0.4 / SMAX  # slope of the chain a (0.4 + (1 - r) a) / 0.4 = SMAX K: the positive root
    a_star = (-0.4 + math.sqrt(0.16 + 4 * (1 - r) * 0.4 * SMAX * K_EXACT)) / (2 * (1 - r))
    assert float(gen.a.detach()) == pytest.approx(a_star, abs=1e-3)
    z = torch.linspace(-3, 3, 61, dtype=F64)[:, None]
    with torch.no_grad():
        x = loss.sampling().sample(gen, z, 2)
    torch.testing.assert_close(x, ode_map(z), rtol=0, atol=1e-2)


@pytest.mark.parametrize("kw, levels", [
    ({"steps": 1}, [SMAX, 0.0]),
    ({"steps": 2, "floor": 0.4}, [SMAX, 0.4, 0.0]),
    ({"steps": 2, "input_sigma": 2.5, "floor": 0.4}, [2.5, 0.4, 0.0]),
    ({"steps": 3, "floor": 0.4}, [SMAX, ((SMAX ** (1 / 7) + 0.4 ** (1 / 7)) / 2) ** 7, 0.4, 0.0]),
    ({"steps": 3, "levels": [10.0, 1.0, 0.1]}, [10.0, 1.0, 0.1, 0.0]),
])
def test_sampling_plan_is_the_training_chain(kw, levels):
    """``sampling()`` at ``steps`` NFE has gamma 0 and the training levels, and the loss equals the L2 distance of
    ``plan.sample``'s output (the evaluation sampler) to the pairs, exactly."""
    student = ExactDenoiserGenerator()
    loss = make(student, **kw)
    plan = loss.sampling()
    assert plan.gamma == 0.0
    torch.testing.assert_close(plan.sigmas(kw["steps"], SMAX), torch.tensor(levels, dtype=F64))
    torch.testing.assert_close(loss._sigmas, torch.tensor(levels, dtype=F64))
    b = pair_batch(64)
    with torch.no_grad():
        x = plan.sample(student, b.extras["pairs.z"], kw["steps"])
    torch.testing.assert_close(run(loss, student, b)["loss"], ((x - b.extras["pairs.x0"]) ** 2).mean(), rtol=0,
                               atol=0)


@pytest.mark.parametrize("huber_c, c", [(None, 0.00054 * math.sqrt(2)), (1.0, 1.0)])
def test_distance_values_on_a_hand_example(huber_c, c):
    """Output (3, 4) against target 0: pseudo-Huber ``sqrt(25 + c^2) - c`` (iCT's ``c = 0.00054 sqrt(2)`` by default),
    L2 ``(9 + 16) / 2``; gradient of pseudo-Huber ``(3, 4) / sqrt(25 + c^2)``."""
    teacher = SimpleNamespace(data_shape=(2,))
    b = batch(size=1, dtype=F64, extras={"pairs.z": torch.zeros(1, 2, dtype=F64), "pairs.x0": torch.zeros(1, 2,
                                                                                                          dtype=F64)})
    gen = ConstGenerator(torch.tensor([3.0, 4.0], dtype=F64))
    out = run(make(gen, teacher, distance="pseudo_huber", huber_c=huber_c), gen, b)
    assert float(out["kd"]) == pytest.approx(math.sqrt(25 + c * c) - c, rel=1e-12)
    out["loss"].backward()
    torch.testing.assert_close(gen.v.grad, torch.tensor([3.0, 4.0], dtype=F64) / math.sqrt(25 + c * c))
    assert float(run(make(gen, teacher), gen, b)["kd"]) == pytest.approx(12.5, rel=1e-12)
    assert float(kd_distance(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), "pseudo_huber", 0.1)) == pytest.approx(
        math.sqrt(25.01) - 0.1, rel=1e-6)


def test_features_distance_is_the_digits_classifier_feature_l2():
    """On an 8x8 teacher, ``features`` is the mean squared difference of the shipped classifier's penultimate
    features; it is 0 at the target and passes a gradient to the student."""
    teacher = SimpleNamespace(data_shape=(1, 8, 8))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    v = torch.rand(1, 8, 8, generator=g) * 2 - 1
    b = batch(size=4, extras={"pairs.z": torch.randn(4, 1, 8, 8, generator=g), "pairs.x0": x0})
    gen = ConstGenerator(v)
    loss = build_loss("kd", distance="features")
    loss.setup(gen, teacher, ctx())
    out = loss("student", gen, None, b, ctx())
    f = DigitsFeatures().model.features
    with torch.no_grad():
        expected = ((f(v.expand_as(x0)) - f(x0)) ** 2).mean()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-7)
    assert float(out["kd"]) > 1e-3
    out["loss"].backward()
    assert gen.v.grad.abs().sum() > 0
    same = ConstGenerator(x0[0])
    b0 = batch(size=1, extras={"pairs.z": torch.zeros(1, 1, 8, 8), "pairs.x0": x0[:1]})
    assert float(loss("student", same, None, b0, ctx())["kd"]) == 0.0
    assert "_features" not in dict(loss.named_modules()) and not loss.state_dict()  # nothing checkpointed


def test_features_on_a_non_digits_teacher_is_a_one_line_config_error():
    loss = build_loss("kd", distance="features")
    with pytest.raises(ConfigError, match="digits") as info:
        loss.setup(GaussianGenerator(1.0, 0.0), SimpleNamespace(data_shape=(2,)), ctx())
    assert "\n" not in str(info.value) and "l2" in str(info.value)


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps"), ({"steps": 1.5}, "steps"), ({"distance": "l1"}, "l2, pseudo_huber, features"),
    ({"pair_nfe": 34}, "odd"), ({"pair_nfe": 1}, "odd"), ({"pairs": 0}, "pairs"), ({"huber_c": 0.0}, "huber_c"),
    ({"input_sigma": -1.0}, "input_sigma"), ({"floor": 0.0}, "floor"),
    ({"steps": 2, "levels": [80.0]}, "levels"), ({"steps": 2, "levels": [0.4, 80.0]}, "levels"),
    ({"steps": 2, "levels": [80.0, 0.4], "input_sigma": 2.5}, "input_sigma"),
])
def test_bad_config_values_raise_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_loss("kd", **kw)
    assert "\n" not in str(info.value)


def test_floor_above_the_input_level_fails_at_setup():
    with pytest.raises(ConfigError, match="floor"):
        make(GaussianGenerator(1.0, 0.0), steps=2, input_sigma=0.3, floor=0.4)


def test_data_specs_ask_for_the_configured_pairs():
    spec = build_loss("kd", pairs=500, pair_nfe=19, guidance=2.0).data_specs()
    assert spec["data"].source == "noise"
    assert spec["pairs"].source == "teacher_pairs"
    assert dict(spec["pairs"].options) == {"n": 500, "nfe": 19, "guidance": 2.0}
