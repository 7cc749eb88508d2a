"""Reflow (``losses/reflow.py``): the flow <-> VE conversion against the closed-form 1-RF velocity of Gaussian data,
the loss as RF's velocity regression, its zero at the exact (linear) 2-RF of Gaussian data, straightening a
two-mode mixture's flow by one reflow, round bookkeeping with pairs made once and restored from a checkpoint, the
distillation round, and the config errors."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import batch, ctx
from omegaconf import OmegaConf

from distill.core.conversions import rf_to_ve
from distill.core.pairs import teacher_ode_pairs
from distill.core.registry import ConfigError
from distill.module import DistillModule
from losses import LOSSES, build_loss
from losses.parts.regression import pair_regression
from losses.reflow import Reflow, flow_grid, straightness, velocity_from_denoiser
from students import FlowMapStudent, build_student
from teachers import GaussianMixtureTeacher, mixture

torch.set_num_threads(1)
F64 = torch.float64
SMAX, SMIN = 80.0, 0.002
TAU_MAX = SMAX / (1 + SMAX)
M, S = torch.tensor([1.0, -0.5], dtype=F64), 0.5  # Gaussian data N(M, S^2 I) in 2-D


def gaussian_teacher() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(M[None], S)


def ctx64(k: int = 0, total: int = 100, r: int = 0):
    c = ctx(k, total, dtype=F64)
    return type(c)(c.iteration, c.total, c.device, c.dtype, r)


# ---------------------------------------------------------------------------------------------------------------
# (1) flow velocity from a denoiser == the analytic 1-RF velocity of Gaussian data
# ---------------------------------------------------------------------------------------------------------------


def test_velocity_from_denoiser_is_the_gaussian_1rf_velocity():
    """x_tau = (1 - tau) x1 + tau n, x1 ~ N(M, S^2), n ~ N(0, 1) independent, per coordinate, jointly Gaussian:
    E[x_tau] = (1 - tau) M, Var x_tau = (1 - tau)^2 S^2 + tau^2, Cov(n - x1, x_tau) = tau - (1 - tau) S^2, so
    E[n - x1 | x_tau] = -M + (tau - (1 - tau) S^2) / ((1 - tau)^2 S^2 + tau^2) (x_tau - (1 - tau) M)."""
    teacher = gaussian_teacher()
    g = torch.Generator().manual_seed(0)
    for tau_v in (0.01, 0.2, 0.5, 0.8, 0.99):
        tau = torch.full((64,), tau_v, dtype=F64)
        x = 3 * torch.randn(64, 2, generator=g, dtype=F64)
        v = velocity_from_denoiser(lambda a, s, c: teacher(a, s, c), x, tau)
        exact = -M + (tau_v - (1 - tau_v) * S**2) / ((1 - tau_v) ** 2 * S**2 + tau_v**2) * (x - (1 - tau_v) * M)
        torch.testing.assert_close(v, exact, atol=1e-6, rtol=0)
        # One VE Euler/DDIM jump J(x, s, t) = (t/s) x + (1 - t/s) D is one flow Euler step tau(s) -> tau(t).
        tau2 = tau_v / 3
        s, t = tau_v / (1 - tau_v), tau2 / (1 - tau2)
        x_ve = rf_to_ve(x, tau)
        jump = (t / s) * x_ve + (1 - t / s) * teacher(x_ve, torch.full((64,), s, dtype=F64))
        torch.testing.assert_close(jump, (x + (tau2 - tau_v) * v) / (1 - tau2), atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# (3) the loss is RF's velocity regression; zero, with zero gradient, at the exact 2-RF of Gaussian data
# ---------------------------------------------------------------------------------------------------------------

A = SMAX * S / (S**2 + SMAX**2) ** 0.5  # Gaussian pairs: x1 = ODE(SMAX z) = B + A z (exact PF-ODE solution)
B = M * (1 - S / (S**2 + SMAX**2) ** 0.5)


class LinearFlowStudent(FlowMapStudent):
    """The 2-RF of pairs x1 = b + a z: on the line x(sigma) = sigma z + c x1 (c = 1 - sigma/SMAX) z is
    (x - c b)/(sigma + c a), so E[x1 | x] = a (x - c b)/(sigma + c a) + b exactly (a deterministic coupling)."""

    kind = "generator"

    def __init__(self, a: float, b: torch.Tensor) -> None:
        super().__init__((2,), SMIN, SMAX, S)
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=F64))
        self.b = torch.nn.Parameter(b.clone())

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        s = sigma_from[:, None]
        c = 1 - s / SMAX
        return self.a * (x - c * self.b) / (s + c * self.a) + self.b


def gaussian_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return z, B + A * z


def test_loss_is_the_velocity_regression_and_vanishes_at_the_exact_2rf():
    teacher = gaussian_teacher()
    z, x1 = gaussian_pairs(512)
    # The Gaussian pairs are the teacher's: a fine Heun solve reproduces x1 = B + A z.
    torch.testing.assert_close(teacher_ode_pairs(teacher, z, SMIN, SMAX, None, 201, "heun"), x1, atol=5e-3, rtol=0)
    loss = build_loss("reflow", rounds=1, round_iters=10, pairs=512, straightness_n=256)
    exact = LinearFlowStudent(A, B)
    loss.setup(exact, teacher, ctx64(total=10))
    extras = {"pairs.z": z, "pairs.x0": x1}

    out = loss("student", exact, teacher, batch(size=512, seed=3, extras=extras, dtype=F64), ctx64())
    out["loss"].backward()
    assert float(out["loss"].detach()) < 1e-20
    assert float(exact.a.grad.abs()) < 1e-9 and float(exact.b.grad.abs().max()) < 1e-9

    # Off the optimum: the loss equals mean ||v_theta(x_tau, tau) - (n - x1)||^2 (per dimension) on the same draws,
    # with n = z - x1/SMAX the noise end of the pair's line, and its gradient is not zero.
    wrong = LinearFlowStudent(1.3 * A, B + 0.2)
    out = loss("student", wrong, teacher, batch(size=512, seed=3, extras=extras, dtype=F64), ctx64())
    twin = batch(size=512, seed=3, dtype=F64)
    lo = SMIN / (1 + SMIN)
    tau = lo + (TAU_MAX - lo) * twin.rand()
    n = z - x1 / SMAX
    x_tau = (1 - tau[:, None]) * x1 + tau[:, None] * n
    with torch.no_grad():
        v = velocity_from_denoiser(wrong.denoise, x_tau, tau)
    assert float(out["loss"].detach()) > 1e-3
    torch.testing.assert_close(out["loss"].detach(), (v - (n - x1)).pow(2).mean(), rtol=1e-9, atol=0)
    out["loss"].backward()
    assert float(wrong.a.grad.abs()) > 1e-4

    # Straightness: the teacher's (1-RF) flow of Gaussian data is curved; the exact 2-RF is straight.
    s1 = float(loss.straightness_log[0])
    with torch.no_grad():
        s2 = float(straightness(lambda a, t: velocity_from_denoiser(exact.denoise, a, t), n, x1, 16, 0.0, TAU_MAX))
    assert s1 > 1e-2 and s2 < 1e-12, (s1, s2)


# ---------------------------------------------------------------------------------------------------------------
# (2) one reflow straightens a two-mode mixture's flow
# ---------------------------------------------------------------------------------------------------------------


def test_one_reflow_straightens_a_two_mode_mixture():
    teacher = mixture(means=[[-2.0, 0.0], [2.0, 0.0]], stds=0.3)
    torch.manual_seed(0)
    student = build_student("generator", teacher, init="fresh", hidden=128, depth=3)
    steps, n_pairs = 500, 2000
    loss = build_loss("reflow", rounds=1, round_iters=steps, pairs=n_pairs, pair_nfe=35, straightness_n=0)
    loss.setup(student, teacher, ctx(total=steps))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n_pairs, 2, generator=g)
    x1 = teacher_ode_pairs(lambda x, s, c=None: teacher(x, s, c), z, SMIN, SMAX, None, 35, "heun")
    z_test = torch.randn(512, 2, generator=g, dtype=F64)

    def own_straightness(den) -> float:
        """S of the flow of ``den`` on its own coupling (z, ODE(z))."""
        x = teacher_ode_pairs(den, z_test, SMIN, SMAX, None, 35, "heun")
        n = z_test - x / SMAX
        return float(straightness(lambda a, t: velocity_from_denoiser(den, a, t), n, x, 16, 0.0, TAU_MAX)), x

    s1, _ = own_straightness(lambda x, s, c=None: teacher(x, s, c))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for k in range(steps):
        b = batch(size=256, k=k, seed=1)
        idx = b.randint(n_pairs)
        b.extras = {"pairs.z": z[idx], "pairs.x0": x1[idx]}
        opt.zero_grad()
        loss("student", student, teacher, b, ctx(k, total=steps))["loss"].backward()
        opt.step()
        sched.step()
    rf2 = copy.deepcopy(student).double().eval()
    with torch.no_grad():
        s2, samples = own_straightness(lambda x, s, c=None: rf2.denoise(x, s, c))
    assert s1 > 0.5, s1  # measured ~1.05: the 1-RF bends (first toward the mean, then out to a mode)
    assert s2 < 0.5 * s1, (s1, s2)  # measured ~0.015
    # ... and the straight 2-RF still lands on the two modes (not a collapse to a straight, useless flow): mean
    # distance of x to the nearest mode's abscissa, measured 0.28 (teacher 0.24), 0.34 in one Euler step.
    assert float((samples[:, 0].abs() - 2).abs().mean()) < 0.4 and abs(float(samples[:, 0].sign().mean())) < 0.3
    with torch.no_grad():
        one_step = rf2(SMAX * z_test, SMAX, 0.0)
    assert float((one_step[:, 0].abs() - 2).abs().mean()) < 0.5


# ---------------------------------------------------------------------------------------------------------------
# (4) rounds: bookkeeping, pairs from the frozen previous model, made once, restored from a checkpoint
# ---------------------------------------------------------------------------------------------------------------

OPTIM = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "warmup": 0,
         "decay": "none", "final_lr_ratio": 0.0, "grad_clip": 1.0}


def small_module(tmp_path) -> DistillModule:
    teacher = mixture(means=[[-2.0, 0.0], [2.0, 0.0]], stds=0.3)
    torch.manual_seed(0)
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("reflow", rounds=2, round_iters=3, distill_iters=3, distill_steps=2, pairs=32, pair_nfe=5,
                      straightness_n=16, straightness_steps=4)
    module = DistillModule(teacher, student, loss, {"student": OmegaConf.create(OPTIM)},
                           data={"dataset": None, "batch_size": 8, "out_dir": str(tmp_path)}, max_steps=9, seed=5)
    module.prepare()
    module.configure_optimizers()
    return module


def test_rounds_pairs_made_once_and_restored_from_a_checkpoint(tmp_path):
    module = small_module(tmp_path)
    loss = module.loss
    assert [loss.round_of(k) for k in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert [loss.is_distill(r) for r in range(3)] == [False, False, True]
    assert loss.sampling().gamma == 0.0 and loss.sampling().sigmas(2, SMAX).tolist() == [*flow_grid(2, SMAX), 0.0]
    for _ in range(3):
        logs = module.iterate()
    assert int(loss.pair_generations) == 0 and int(loss.pair_round) == -1  # round 0 reads the teacher cache
    assert float(logs["student/straightness"]) > 0.1  # the teacher's (1-RF) S, measured in setup
    before = copy.deepcopy(module.student).eval()
    logs = module.iterate()  # k = 3: round 1 starts, pairs from a frozen copy of the round-0 student
    assert int(loss.pair_generations) == 1 and int(loss.pair_round) == 1 and loss.generated_this_launch == 1
    assert float(logs["student/pair_network_evals"]) == 32 * 5 and float(logs["student/pair_seconds"]) > 0
    assert loss.pair_cost["network_evals"] == 32 * 5
    with torch.no_grad():
        expect = teacher_ode_pairs(before.denoise, loss.pair_z, SMIN, SMAX, None, 5, "heun")
    torch.testing.assert_close(loss.pair_x1, expect, atol=1e-5, rtol=1e-5)
    assert float(logs["student/straightness"]) >= 0  # the round-0 model's S on the fixed noise
    module.iterate()  # k = 4
    saved = copy.deepcopy(module.state_dict())
    pairs_r1 = loss.pair_x1.clone()

    # A resumed launch restores the round-1 pairs (no regeneration), and draws what the first launch draws.
    again = small_module(tmp_path)
    again.load_state_dict(saved)
    assert again.current_iteration == 5
    again.loss.on_round_start(1, again.student, again.teacher, again.context(5))  # a repeated call is a no-op
    a, b = module.iterate(), again.iterate()  # k = 5 (same weights, same batch; optimizer moments differ later)
    assert again.loss.generated_this_launch == 0 and int(again.loss.pair_generations) == 1
    torch.testing.assert_close(again.loss.pair_x1, pairs_r1, atol=0, rtol=0)
    assert float(a["student/loss"]) == float(b["student/loss"])

    logs = again.iterate()  # k = 6: the distillation round, pairs of the last reflowed model
    assert int(again.loss.pair_round) == 2 and int(again.loss.pair_generations) == 2
    assert again.loss.generated_this_launch == 1 and "student/distill_mse" in logs
    assert not torch.equal(again.loss.pair_z, module.loss.pair_z)  # fresh noise per round

    # A round whose pairs are neither generated nor restored fails loudly.
    fresh = small_module(tmp_path).loss
    with pytest.raises(RuntimeError, match="round 1 needs its pairs"):
        fresh("student", module.student, module.teacher, module.make_batch(3), module.context(3))


def test_distill_round_is_the_jump_regression():
    """k = 1: the distilled student's loss is ||J(SMAX z, SMAX, 0) - x1||^2, the project's pair regression."""
    teacher = gaussian_teacher()
    loss = build_loss("reflow", rounds=0, distill_iters=5, straightness_n=0)
    student = LinearFlowStudent(1.3 * A, B + 0.2)
    loss.setup(student, teacher, ctx64(total=5))
    z, x1 = gaussian_pairs(64)
    b = batch(size=64, seed=2, extras={"pairs.z": z, "pairs.x0": x1}, dtype=F64)
    out = loss("student", student, teacher, b, ctx64())
    ref, _ = pair_regression("test", student, b, ctx64(), SMAX)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-12, atol=0)
    assert float(out["loss"].detach()) > 1e-3
    grid = flow_grid(4, SMAX)
    taus = [s / (1 + s) for s in grid]
    assert grid[0] == SMAX and taus == pytest.approx([TAU_MAX * (4 - i) / 4 for i in range(4)], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# (5) config errors
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_and_config_errors():
    assert LOSSES.get("reflow") is Reflow and Reflow.student_kind == "generator" and Reflow.phases == ("student",)
    loss = build_loss("reflow")
    assert loss.rounds == 1 and loss.distill_steps == 1 and loss.num_rounds == 1
    assert loss.data_specs()["pairs"].source == "teacher_pairs"
    assert loss.sampling().sigmas(1, SMAX).tolist() == [SMAX, 0.0]
    for kwargs, match in [({"rounds": -1}, "rounds must be an integer >= 0"),
                          ({"rounds": 1.5}, "rounds must be an integer"),
                          ({"round_iters": 0}, "round_iters must be"),
                          ({"distill_iters": -2}, "distill_iters must be"),
                          ({"rounds": 0, "distill_iters": 0}, "nothing to train"),
                          ({"distill_steps": 0}, "distill_steps must be"),
                          ({"pairs": 0}, "pairs must be"),
                          ({"pair_nfe": 4}, "odd integer"), ({"pair_nfe": 1}, "pair_nfe must be"),
                          ({"pair_batch": 0}, "pair_batch"), ({"guidance": -1.0}, "guidance"),
                          ({"sigma_max": 0.0}, "sigma_max"), ({"straightness_n": -1}, "straightness_n"),
                          ({"round_iters": True}, "round_iters"), ({"foo": 1}, "valid keys")]:
        with pytest.raises(ConfigError, match=match) as e:
            build_loss("reflow", **kwargs)
        assert "\n" not in str(e.value)
    teacher = GaussianMixtureTeacher(M[None], S, sigma_max=40.0)
    with pytest.raises(ConfigError, match="must equal the teacher's"):
        build_loss("reflow", straightness_n=0).setup(LinearFlowStudent(A, B), teacher, ctx64(total=2000))
