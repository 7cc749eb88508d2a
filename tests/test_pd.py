"""Progressive distillation (``losses/pd.py``; Salimans & Ho 2022, arXiv:2202.00512 Alg. 2; shared/methods.md §2.11):
the target ``x~`` makes one student DDIM step land exactly on the teacher's two DDIM steps (Gaussian data, exact
denoiser, float64; and through the loss object, where an oracle student has zero loss and the exact denoiser does
not), the round bookkeeping (N_r halves, round_of, grids, sampling plan), the round resets and the round teacher's
refresh through ``DistillModule``, bit-exact resume across a round boundary through ``distill train``, and the
one-line config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import gaussian_denoiser
from torch import Tensor, nn

from distill.config import load_config
from distill.core.registry import ConfigError
from distill.train import build_module, run_training
from losses import build_loss
from losses.base import Batch, StepContext
from losses.pd import ddim_step, pd_target
from students import FlowMapStudent

torch.set_num_threads(1)

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
M, S = 0.7, 0.4  # the Gaussian data N(M, S^2)


def two_step_closed_form(x: Tensor, t: Tensor, t_mid: Tensor, t_end: Tensor, m: float, s: float) -> Tensor:
    """Two VE DDIM steps with the exact denoiser of N(m, s^2), by hand: one step t -> u maps ``x - m`` to
    ``(x - m)(s^2 + u t) / (s^2 + t^2)``."""
    a = (s**2 + t_mid * t) / (s**2 + t**2) * (s**2 + t_end * t_mid) / (s**2 + t_mid**2)
    return m + (x - m) * a[:, None]


# ---------------------------------------------------------------------------------------------------------------
# (1) closed forms
# ---------------------------------------------------------------------------------------------------------------


def test_target_makes_one_student_step_land_on_the_teachers_two_steps():
    torch.manual_seed(0)
    loss = build_loss("pd", start_steps=16, final_steps=1)
    n = 4096
    for r in range(loss.num_rounds):
        i = torch.randint(0, loss.steps_of(r), (n,))
        t, t_mid, t_end = loss.levels(r, i, torch.zeros((), dtype=F64))
        x_t = M + S * torch.randn(n, 3, dtype=F64) + t[:, None] * torch.randn(n, 3, dtype=F64)
        den = lambda x, s: gaussian_denoiser(x, s, M, S)  # noqa: E731
        x_mid = ddim_step(den(x_t, t), x_t, t, t_mid)
        x_end = ddim_step(den(x_mid, t_mid), x_mid, t_mid, t_end)
        torch.testing.assert_close(x_end, two_step_closed_form(x_t, t, t_mid, t_end, M, S), rtol=1e-12, atol=1e-12)
        x_tilde = pd_target(x_t, x_end, t, t_end)
        # one student DDIM step t -> t'' around D_student := x~ lands on the teacher's result
        torch.testing.assert_close(ddim_step(x_tilde, x_t, t, t_end), x_end, rtol=1e-12, atol=1e-12)
        last = t_end == 0
        assert torch.equal(x_tilde[last], x_end[last])  # t'' = 0: the target is x_{t''} itself
        # the exact denoiser is not the target: its one DDIM step misses the two-step result wherever t'' > 0
        one = ddim_step(den(x_t, t), x_t, t, t_end)
        miss = (one - x_end).abs().amax(1)
        assert (miss[~last] > 1e-9 * x_t[~last].abs().amax(1)).all()
        assert (~last).any() == (loss.steps_of(r) > 1)  # every round but the one-step one has t'' > 0 steps


class StubTeacher(nn.Module):
    """The exact denoiser of N(m, s^2) in the teacher contract (float64)."""

    sigma_min, sigma_max, data_shape, num_classes = 0.002, 80.0, (3,), None

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, sigma, cond=None, guidance=1.0):
        return gaussian_denoiser(x, sigma, self.m, self.s)


class GaussianStudent(FlowMapStudent):
    """``D(x, s)`` = the exact denoiser of N(m, s^2) (``oracle=None``), or the PD target of round ``r`` computed by hand
    for a teacher with that exact denoiser (``oracle=(loss, r)``)."""

    def __init__(self, m: float, s: float, oracle=None, offset: float = 0.0) -> None:
        super().__init__((3,), 0.002, 80.0, 0.5)
        self.m, self.s, self.oracle, self.offset = m, s, oracle, offset
        self.dummy = nn.Parameter(torch.zeros((), dtype=F64))

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        if self.oracle is None:
            return gaussian_denoiser(x, sigma_from, self.m, self.s) + 0 * self.dummy
        loss, r = self.oracle
        grid = loss.student_grid(r)
        j = (grid[:-1, None] - sigma_from[None]).abs().argmin(0)
        t, t_mid, t_end = grid[j], loss.base[(2 * j + 1) * 2**r], grid[j + 1]
        x_end = two_step_closed_form(x, t, t_mid, t_end, self.m, self.s)
        ratio = (t_end / t)[:, None]
        return (x_end - ratio * x) / (1 - ratio) + self.offset


@pytest.mark.parametrize("r", [0, 1, 3])
def test_loss_vanishes_for_the_oracle_student_only(r):
    """Through ``forward``: round 0 regresses onto the real teacher's two steps, later rounds onto the round teacher's
    (here an exact denoiser of another Gaussian than the real teacher's, so using the wrong one shows)."""
    loss = build_loss("pd", start_steps=16, final_steps=1, round_iters=3)
    real = StubTeacher(M, S)
    m_r, s_r = (M, S) if r == 0 else (-0.3, 1.1)
    loss.setup(GaussianStudent(M, S), real, StepContext(0, 12, torch.device("cpu"), F64))
    if r > 0:
        loss.round_teacher = GaussianStudent(m_r, s_r).requires_grad_(False)
    ctx = StepContext(3 * r, 12, torch.device("cpu"), F64, round=r)
    data = M + S * torch.randn(512, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    batch = lambda: Batch(512, data, seed=2, iteration=3 * r, dtype=F64)  # noqa: E731
    oracle = loss("student", GaussianStudent(m_r, s_r, oracle=(loss, r)), real, batch(), ctx)
    assert float(oracle["loss"]) < 1e-18 and float(oracle["round"]) == r
    assert float(oracle["student_steps"]) == 16 >> (r + 1)
    exact = loss("student", GaussianStudent(m_r, s_r), real, batch(), ctx)
    assert float(exact["loss"]) > 1e-6  # the exact denoiser is not the distilled N_r-step model
    if r > 0:  # an oracle for the real teacher's Gaussian is wrong in rounds >= 1
        wrong = loss("student", GaussianStudent(M, S, oracle=(loss, r)), real, batch(), ctx)
        assert float(wrong["loss"]) > 1e-6


class ShiftedFlowMap(FlowMapStudent):
    """A flow map whose ``D(x, s, u) = D*(x, s) + k u`` depends on the target level (``D*``: N(m, s^2)'s exact
    denoiser); with ``oracle=(loss, r)`` instead the PD target of round ``r`` for a round teacher that is such a
    flow map, by hand, exact only when queried at the target level ``u = t''`` (off by 1 at any other ``u``)."""

    def __init__(self, m: float, s: float, k: float, oracle=None) -> None:
        super().__init__((3,), 0.002, 80.0, 0.5)
        self.m, self.s, self.k, self.oracle = m, s, k, oracle

    def jump(self, x, t, u):
        d = gaussian_denoiser(x, t, self.m, self.s) + self.k * u[:, None]
        return (u / t)[:, None] * x + (1 - u / t)[:, None] * d

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        if self.oracle is None:
            return gaussian_denoiser(x, sigma_from, self.m, self.s) + self.k * sigma_to[:, None]
        loss, r = self.oracle
        grid = loss.student_grid(r)
        j = (grid[:-1, None] - sigma_from[None]).abs().argmin(0)
        t, t_mid, t_end = grid[j], loss.base[(2 * j + 1) * 2**r], grid[j + 1]
        x_end = self.jump(self.jump(x, t, t_mid), t_mid, t_end)
        ratio = (t_end / t)[:, None]
        return (x_end - ratio * x) / (1 - ratio) + (sigma_to != t_end).to(x.dtype)[:, None]


@pytest.mark.parametrize("r", [1, 2])
def test_flow_map_round_teacher_jumps_and_student_is_queried_at_the_target_level(r):
    """Rounds >= 1 step with the round teacher's jumps ``J(x, t, t')`` (not DDIM around ``J(x, t, 0)``) and regress
    the student's ``D(x_t, t, t'')``; for a generator (``D`` ignores the level) this is the DDIM form tested above."""
    loss = build_loss("pd", start_steps=16, final_steps=1, round_iters=3)
    real = StubTeacher(M, S)
    loss.setup(GaussianStudent(M, S), real, StepContext(0, 12, torch.device("cpu"), F64))
    loss.round_teacher = ShiftedFlowMap(-0.3, 1.1, 0.3).requires_grad_(False)
    ctx = StepContext(3 * r, 12, torch.device("cpu"), F64, round=r)
    data = M + S * torch.randn(512, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    batch = lambda: Batch(512, data, seed=2, iteration=3 * r, dtype=F64)  # noqa: E731
    out = loss("student", ShiftedFlowMap(-0.3, 1.1, 0.3, oracle=(loss, r)), real, batch(), ctx)
    assert float(out["loss"]) < 1e-18
    no_shift = loss("student", ShiftedFlowMap(-0.3, 1.1, 0.0, oracle=(loss, r)), real, batch(), ctx)
    assert float(no_shift["loss"]) > 1e-6  # the oracle of D(x, s, u) = D*(x, s): the teacher's jumps matter


@pytest.mark.parametrize("weighting", ["snr_trunc", "none"])
def test_weighting_is_max_snr_1_of_the_drawn_level(weighting):
    """An oracle off by ``c`` in every coordinate has per-sample distance ``c^2``: the loss is ``c^2 mean(w(t))``
    with ``w = max(1/t^2, 1)`` (or 1) at the levels of the batch's first draw, ``i ~ U{0..N_r-1}``."""
    loss = build_loss("pd", start_steps=16, final_steps=1, weighting=weighting)
    real, c, r = StubTeacher(M, S), 0.01, 0
    loss.setup(GaussianStudent(M, S), real, StepContext(0, 4000, torch.device("cpu"), F64))
    data = M + S * torch.randn(256, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    out = loss("student", GaussianStudent(M, S, oracle=(loss, r), offset=c), real,
               Batch(256, data, seed=4, iteration=7, dtype=F64), StepContext(7, 4000, torch.device("cpu"), F64))
    t = loss.student_grid(r)[Batch(256, data, seed=4, iteration=7, dtype=F64).randint(loss.steps_of(r))]
    w = (1 / t**2).clamp_min(1.0) if weighting == "snr_trunc" else torch.ones_like(t)
    torch.testing.assert_close(out["loss"], c**2 * w.mean(), rtol=1e-9, atol=0)
    torch.testing.assert_close(out["sigma_mean"], t.mean(), rtol=1e-12, atol=0)
    assert (w > 1).any() == (weighting == "snr_trunc")  # the grid reaches below t = 1


# ---------------------------------------------------------------------------------------------------------------
# (2) round bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def test_round_bookkeeping_grids_and_sampling_plan():
    loss = build_loss("pd", start_steps=32, final_steps=2, round_iters=7)
    assert loss.num_rounds == 4 and [loss.steps_of(r) for r in range(4)] == [16, 8, 4, 2]
    rounds = [loss.round_of(k) for k in range(100)]
    assert rounds == sorted(rounds) and rounds[0] == 0 and rounds[6] == 0 and rounds[7] == 1
    assert rounds[27] == 3 and rounds[28] == 3 and rounds[99] == 3  # capped at the last round
    assert loss.steps_of(loss.round_of(10**6)) == loss.final_steps
    base = loss.base
    assert base.shape == (33,) and base[0] == 80.0 and abs(float(base[31]) - 0.002) < 1e-12 and base[32] == 0
    assert (base[:-1] > base[1:]).all()
    plan = loss.sampling()
    assert plan.gamma == 0.0 and set(plan.levels) == {16, 8, 4, 2}
    for r in range(4):
        grid, n = loss.student_grid(r), loss.steps_of(r)
        assert grid.shape == (n + 1,) and grid[0] == 80.0 and grid[-1] == 0
        if r > 0:  # round r's teacher grid (stride 2^r) is round r-1's student grid
            assert torch.equal(base[:: 2**r], loss.student_grid(r - 1))
        i = torch.arange(n)
        t, t_mid, t_end = loss.levels(r, i, torch.zeros((), dtype=F64))
        assert torch.equal(t, grid[:-1]) and torch.equal(t_end, grid[1:])
        assert (t > t_mid).all() and (t_mid > t_end).all() and set(t_mid.tolist()) <= set(base.tolist())
        assert torch.equal(plan.sigmas(n, 80.0), grid)


# ---------------------------------------------------------------------------------------------------------------
# (3) resets and round teacher through DistillModule; (4) exact resume through distill train
# ---------------------------------------------------------------------------------------------------------------


def ring_cfg(tmp: Path, steps: int, name: str, round_iters: int, **over: str):
    ov = [f"trainer.max_steps={steps}", "eval.every=0", "trainer.grid_every=0", "trainer.progress_bar=false",
          "trainer.ckpt_every=4", "trainer.log_every=3", "data.batch_size=32", "student.hidden=32", "student.depth=2",
          "loss.start_steps=8", "loss.final_steps=1", f"loss.round_iters={round_iters}", "optim.student.warmup=2",
          "eval.n_samples=256", "eval.batch_size=256", f"out_dir={tmp / name}"]
    return load_config(ROOT / "configs" / "ring_pd.yaml", ov + [f"{k}={v}" for k, v in over.items()])


def state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_start_resets_and_refreshes_the_round_teacher(tmp_path):
    module = build_module(ring_cfg(tmp_path, 15, "probe", 5))
    module.prepare()
    module.configure_optimizers()
    loss, po = module.loss, module._optims["student"]
    assert loss.num_rounds == 3 and not any(p.requires_grad for p in loss.round_teacher.parameters())
    assert same(state(loss.round_teacher), state(module.student))  # setup: a copy of the initial student
    lrs: list[float] = []
    po.optimizer.register_step_pre_hook(lambda opt, args, kw: lrs.append(opt.param_groups[0]["lr"]))
    teachers = []
    for k in range(15):
        before, held = state(module.student), state(loss.round_teacher)
        logs = module.iterate()
        assert float(logs["student/round"]) == k // 5 and float(logs["student/student_steps"]) == 4 >> (k // 5)
        n_step = int(next(iter(po.optimizer.state.values()))["step"])
        assert n_step == k % 5 + 1  # Adam's state cleared at k = 5 and 10
        assert int(module.ema.n_averaged) == k % 5 + 1  # the EMA restarted at k = 5 and 10
        if k in (5, 10):
            assert same(state(loss.round_teacher), before)  # teacher <- the student at the boundary
            assert not same(before, held)  # ... which had moved during the round
            teachers.append(state(loss.round_teacher))
        else:
            assert same(state(loss.round_teacher), held)  # untouched inside a round
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3] * 3)  # warm-up 2 restarts each round
    assert not same(*teachers)


@pytest.mark.parametrize("split", [4, 6])
def test_resume_across_a_round_boundary_is_exact(tmp_path, split):
    """12 iterations straight == ``split`` + resume + rest, with rounds of 4 (boundaries at 4 and 8): a checkpoint
    exactly at a boundary, and one mid-round whose resumed part crosses the next boundary."""
    steps, r_it = 12, 4
    run_training(ring_cfg(tmp_path, steps, "straight", r_it), final_eval=False)
    run_training(ring_cfg(tmp_path, split, "split", r_it), final_eval=False)
    run_training(ring_cfg(tmp_path, steps, "split", r_it), resume=True, final_eval=False)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs after resume"
    assert any(k.startswith("loss.round_teacher.") for k in a["state_dict"])  # checkpointed with the run
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for i, st in oa["state"].items():
            for key, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][key])), (i, key)
    assert int(a["state_dict"]["iteration"]) == steps and int(a["state_dict"]["ema.n_averaged"]) == 4
    assert {int(st["step"]) for st in a["optimizer_states"][0]["state"].values()} == {4}
    # the round teacher is not the final student (the comparison above compares something that moved)
    rt = {k[len("loss.round_teacher."):]: v for k, v in a["state_dict"].items() if k.startswith("loss.round_teacher.")}
    assert any(not torch.equal(v, a["state_dict"][f"student.{k}"]) for k, v in rt.items())


# ---------------------------------------------------------------------------------------------------------------
# (5) config errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"start_steps": 12}, "start_steps must be a power of two"),
    ({"start_steps": 1}, "start_steps must be a power of two"),
    ({"start_steps": 32, "final_steps": 64}, "final_steps must be a power of two below start_steps"),
    ({"start_steps": 32, "final_steps": 32}, "final_steps must be a power of two below start_steps"),
    ({"start_steps": 32, "final_steps": 3}, "final_steps must be a power of two below start_steps"),
    ({"weighting": "snr"}, "unknown weighting 'snr'; valid: snr_trunc, none"),
    ({"round_iters": 0}, "round_iters must be an integer >= 1"),
    ({"sigma_min": 1.0, "sigma_max": 0.5}, "need 0 < sigma_min < sigma_max"),
])
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_loss("pd", **kw)
    assert "\n" not in str(info.value)


def test_grid_outside_the_teachers_range_fails_in_setup():
    loss = build_loss("pd", sigma_max=100.0)
    with pytest.raises(ConfigError, match="leaves the teacher's range"):
        loss.setup(GaussianStudent(M, S), StubTeacher(M, S), StepContext(0, 10, torch.device("cpu"), F64))
