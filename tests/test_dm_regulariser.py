"""The distribution-matching regulariser of trajectory losses (``losses/parts/dm_regulariser.py``, on ``ayf``), in
float64 closed forms on Gaussian data N(M, S^2) whose exact flow map is J*(x, a, b) = M + (x - M) q(b)/q(a),
q(sigma) = sqrt(S^2 + sigma^2):

* the deterministic (gamma = 0) backward simulation of an exact flow map gives J*(sigma_max z, sigma_max, 0) on every
  row, whatever its level; for an inexact map the deepest rows are the sampler's own chain;
* with the fake equal to the teacher the term injects nothing and the student phase is the plain AYF loss, draw for
  draw; against a teacher N(M2, S^2), a one-step generator whose samples sit off M2 is pushed back (sign), and
  gradient descent on the term alone reaches the shift whose samples have mean M2, in closed form; all three for
  both divergences (DMD's reverse KL and SIM's score divergence, whose term is also checked against the ``sim``
  loss's own sample gradient);
* ``dm_intermediate="above_next"``: the rows graded after an intermediate jump are matched and fitted only at levels
  ``>=`` the next chain level (per-row grid floors), the final rows at exactly the levels ``"full"`` gives them;
* the schedule (host-only, fake warm-up, TTUR), the sampling plan's levels and the config errors; a ring run with the
  regulariser resumes bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import batch, ctx, fit, gaussian_denoiser
from torch import nn

from distill.core.registry import ConfigError
from losses import build_loss
from losses.base import NONFINITE_ROWS
from losses.parts import generator_rollout
from losses.parts.dm_regulariser import score_implicit_matching
from losses.parts.sigmas import SigmaSampler
from students import FlowMapStudent
from students.sampling import sample_student
from teachers import GaussianMixtureTeacher

torch.set_num_threads(1)

M, S, SMAX = 0.7, 0.5, 80.0
DT = torch.float64


def q(sigma):
    return (S**2 + torch.as_tensor(sigma, dtype=DT) ** 2).sqrt()


class ShiftedFlowMap(FlowMapStudent):
    """J(x, a, b) = M + (x - M) (q(b)/q(a))^theta + shift (a - b)/(1 + a); theta = 1, shift = 0: the exact map."""

    kind = "flowmap"

    def __init__(self, theta: float = 1.0, shift: float = 0.0) -> None:
        super().__init__((1,), 0.002, SMAX, S)
        self.theta = nn.Parameter(torch.tensor(theta, dtype=DT))
        self.shift = nn.Parameter(torch.tensor(shift, dtype=DT))

    def forward(self, x, sigma_from, sigma_to, cond=None):
        a = torch.as_tensor(sigma_from, dtype=DT).expand(x.shape[0])
        b = torch.as_tensor(sigma_to, dtype=DT).expand(x.shape[0])
        return M + (x - M) * ((q(b) / q(a)) ** self.theta)[:, None] + self.shift * ((a - b) / (1 + a))[:, None]

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        a, b = sigma_from[:, None], sigma_to[:, None]
        return (a * self(x, sigma_from, sigma_to) - b * x) / (a - b)


class GaussianFake(nn.Module):
    """The exact denoiser of N(mean(), S_G^2) (``mean`` read at call time, detached)."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def denoise(self, x, sigma, cond=None):
        return gaussian_denoiser(x, sigma, float(self.mean()), self.std)


def teacher() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(torch.full((1, 1), M, dtype=DT), S)


def dm_ayf(**kw):
    cfg = {"objective": "lagrangian", "warmup": 0, "units": "ve", "dm_weight": 1.0, "dm_levels": [SMAX, 1.0],
           "fake_init": "fresh"}
    cfg.update(kw)
    loss = build_loss("ayf", **cfg)
    loss.setup(ShiftedFlowMap(), teacher(), ctx(dtype=DT))
    return loss


# one-step samples of the exact map from sigma_max z, z ~ N(0, 1): N(M (1 - S/q(80)), (80 S / q(80))^2)
ONE_STEP_MEAN = M * (1 - S / float(q(SMAX)))
ONE_STEP_STD = SMAX * S / float(q(SMAX))


def test_deterministic_backward_simulation_is_the_samplers_chain():
    levels = [SMAX, 1.0, 0.3]
    exact = ShiftedFlowMap()
    b = batch(size=400, seed=2, dtype=DT)
    out = generator_rollout(exact, b, ctx(dtype=DT), levels, (1,), gamma=0.0)
    z = batch(size=400, seed=2, dtype=DT).randn(1)
    # an exact map composes: every row, whatever its level k, is the one-jump map of its start point
    torch.testing.assert_close(out, exact(SMAX * z, SMAX, 0.0))
    # an inexact map: the rows that ran every jump are the gamma-0 sampler's chain on the same z
    inexact = ShiftedFlowMap(theta=0.8, shift=0.3)
    b = batch(size=400, seed=2, dtype=DT)
    out = generator_rollout(inexact, b, ctx(dtype=DT), levels, (1,), gamma=0.0)
    replay = batch(size=400, seed=2, dtype=DT)
    z, k = replay.randn(1), replay.randint(3)
    chain = sample_student(inexact, z, torch.tensor(levels + [0.0], dtype=DT), gamma=0.0)
    rows = k == 2
    assert 0.2 < float(rows.double().mean()) < 0.5
    torch.testing.assert_close(out[rows], chain[rows])
    with pytest.raises(ConfigError, match="gamma"):
        generator_rollout(inexact, b, ctx(dtype=DT), levels, (1,), gamma=1.5)
    with pytest.raises(ConfigError, match="gamma"):  # checked for a one-step generator too
        generator_rollout(inexact, b, ctx(dtype=DT), [SMAX], (1,), gamma=-0.5)


def test_rollout_returns_each_rows_step():
    levels = [SMAX, 1.0, 0.3]
    st = ShiftedFlowMap(theta=0.8, shift=0.3)
    out = generator_rollout(st, batch(size=300, seed=2, dtype=DT), ctx(dtype=DT), levels, (1,), gamma=0.5)
    x, k = generator_rollout(st, batch(size=300, seed=2, dtype=DT), ctx(dtype=DT), levels, (1,), gamma=0.5,
                             return_steps=True)
    replay = batch(size=300, seed=2, dtype=DT)
    replay.randn(1)
    torch.testing.assert_close(x, out)
    assert torch.equal(k, replay.randint(3)) and k.dtype == torch.long
    x1, k1 = generator_rollout(st, batch(size=5, seed=2, dtype=DT), ctx(dtype=DT), [SMAX], (1,), return_steps=True)
    assert x1.shape == (5, 1) and torch.equal(k1, torch.zeros(5, dtype=torch.long))


def test_sigma_sampler_floors_per_row():
    """Per-row floors keep the draws (a zero floor changes nothing), bound every level from below, stay uniform over
    the admissible grid levels, and fall back to the range's largest level when the floor is above it."""
    smp = SigmaSampler("grid", 0.002, SMAX, t_min=0.2, t_max=1.0)
    top = float(smp.grid[int(0.2 * 999)])
    n = 20000
    plain = smp(batch(size=n, seed=3, dtype=DT), torch.zeros(n, dtype=DT))
    zero = smp(batch(size=n, seed=3, dtype=DT), torch.zeros(n, dtype=DT), torch.zeros(n, dtype=DT))
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    floor = torch.where(torch.arange(n) % 2 == 0, 1.0, 0.0).to(DT)
    got = smp(batch(size=n, seed=3, dtype=DT), torch.zeros(n, dtype=DT), floor)
    assert float(got[floor > 0].min()) >= 1.0 and float(plain.min()) < 0.01 and float(got.max()) <= top
    torch.testing.assert_close(got[floor == 0], plain[floor == 0], rtol=0, atol=0)  # unbounded rows: same levels
    allowed = smp.grid[(smp.grid >= 1.0) & (smp.grid <= top)]
    hits = torch.stack([(got[floor > 0] == lv).sum() for lv in allowed]).double()
    # every admissible level, about uniformly (~25 hits each: Poisson spread 0.2 of the mean)
    assert int(hits.sum()) == n // 2 and float(hits.min()) > 0 and float(hits.std() / hits.mean()) < 0.3
    above = smp(batch(size=8, seed=3, dtype=DT), torch.zeros(8, dtype=DT), torch.full((8,), 200.0, dtype=DT))
    torch.testing.assert_close(above, torch.full((8,), top, dtype=DT))
    with pytest.raises(ValueError, match="grid"):
        SigmaSampler("lognormal", 0.002, SMAX)(batch(size=4, seed=0, dtype=DT), torch.zeros(4, dtype=DT),
                                               torch.zeros(4, dtype=DT))


class _Recorder:
    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def __call__(self, b, like, floor=None):
        out = self.sampler(b, like, floor)
        self.calls.append((floor, out))
        return out


@pytest.mark.parametrize("phase", ["student", "critic"])
def test_above_next_matches_intermediate_outputs_above_the_next_level(phase):
    """Under ``above_next`` the rows graded after the first jump of a [80, 1.0, 0.3] chain get levels >= 1.0, those
    after the second >= 0.3, and the final rows the very levels ``"full"`` draws for them; the student phase still
    injects a gradient."""
    levels = [SMAX, 1.0, 0.3]
    st, te = ShiftedFlowMap(theta=0.9, shift=0.2), teacher()
    data = M + S * torch.randn(512, 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    runs = {}
    for mode in ("full", "above_next"):
        loss = dm_ayf(dm_levels=levels, dm_intermediate=mode, dm_t_min=0.02, dm_t_max=1.0, fake_sigma="grid")
        loss.fake = GaussianFake(lambda: M + 0.3, S)
        name = "_dm_sampler" if phase == "student" else "_fake_sampler"
        rec = _Recorder(getattr(loss, name))
        setattr(loss, name, rec)
        out = loss(phase, st, te, batch(data, seed=4), ctx(5, dtype=DT))
        (floor, sigma), = rec.calls
        runs[mode] = (floor, sigma, out)
    assert runs["full"][0] is None
    floor, sigma, out = runs["above_next"]
    steps = {float(v) for v in floor.unique()}
    assert steps == {1.0, 0.3, 0.0}  # rows of every step
    assert bool((sigma >= floor).all())
    last = floor == 0
    torch.testing.assert_close(sigma[last], runs["full"][1][last], rtol=0, atol=0)
    assert float(runs["full"][1][~last].min()) < 0.3  # "full" did draw fine levels for intermediate rows
    if phase == "student":
        (g,) = torch.autograd.grad(out["loss"], st.shift)
        assert float(g.abs()) > 0 and float(out[NONFINITE_ROWS]) == 0


DIVERGENCES = [{"dm_divergence": "reverse_kl"}, {"dm_divergence": "sim"},
               {"dm_divergence": "sim", "dm_distance": "l2"}]


@pytest.mark.parametrize("kw", DIVERGENCES)
def test_fake_equal_to_teacher_adds_nothing_to_the_ayf_step(kw):
    st, te = ShiftedFlowMap(theta=0.9, shift=0.2), teacher()
    plain = build_loss("ayf", objective="lagrangian", warmup=0, units="ve")
    plain.setup(st, te, ctx(dtype=DT))
    loss = dm_ayf(**kw)
    loss.fake = GaussianFake(lambda: M, S)  # the fake score *is* the real one: the DMD gradient is zero
    data = M + S * torch.randn(256, 1, dtype=DT, generator=torch.Generator().manual_seed(0))
    ref = plain("student", st, te, batch(data, seed=4), ctx(5, dtype=DT))
    out = loss("student", st, te, batch(data, seed=4), ctx(5, dtype=DT))
    assert float(out["dm_grad_norm"]) < 1e-12 and float(out[NONFINITE_ROWS]) == 0  # float64 rounding only
    torch.testing.assert_close(out["ayf_loss"], ref["loss"].detach())  # the AYF draws come first, unchanged
    torch.testing.assert_close(out["loss"], ref["loss"])
    (g_ref,) = torch.autograd.grad(ref["loss"], st.theta)
    (g_out,) = torch.autograd.grad(out["loss"], st.theta)
    torch.testing.assert_close(g_out, g_ref)


# a teacher N(M2, S^2) away from the data the map was built for: the one-step generator's samples match its mean at
# shift* = (M2 - ONE_STEP_MEAN) (1 + 80)/80 (their std is 80 S/q(80), S to 1e-4)
M2 = M + 0.25
SHIFT_STAR = (M2 - ONE_STEP_MEAN) * (1 + SMAX) / SMAX


def _one_step_setup(shift: float, **kw):
    st = ShiftedFlowMap(shift=shift)
    te = GaussianMixtureTeacher(torch.full((1, 1), M2, dtype=DT), S)
    loss = dm_ayf(dm_levels=[SMAX], **kw)  # a one-step generator: its samples are N(ONE_STEP_MEAN + shift 80/81, .)
    loss.fake = GaussianFake(lambda: ONE_STEP_MEAN + float(st.shift) * SMAX / (1 + SMAX), ONE_STEP_STD)
    return st, te, loss


@pytest.mark.parametrize("kw", DIVERGENCES)
@pytest.mark.parametrize("shift, sign", [(SHIFT_STAR + 0.4, 1), (SHIFT_STAR - 0.4, -1)])
def test_dm_term_pushes_an_off_mean_generator_back(shift, sign, kw):
    st, te, loss = _one_step_setup(shift, **kw)
    out = {}
    term = loss.dm_term(st, te, batch(size=20000, seed=1, dtype=DT), ctx(0, dtype=DT), out)
    (g,) = torch.autograd.grad(term, st.shift)
    assert sign * float(g) > 0 and float(out["dm_grad_norm"]) > 0


@pytest.mark.parametrize("kw", DIVERGENCES)
def test_dm_term_alone_reaches_the_mean_matching_shift(kw):
    st, te, loss = _one_step_setup(0.0, **kw)
    fit(lambda i: loss.dm_term(st, te, batch(size=2048, seed=i, dtype=DT), ctx(i, dtype=DT), {}), [st.shift],
        300, 2e-2)
    assert SHIFT_STAR > 0.25 and float(st.shift.detach()) == pytest.approx(SHIFT_STAR, abs=1e-2)


def test_sim_divergence_is_the_sim_losss_sample_gradient():
    """``dm_divergence="sim"`` injects exactly the ``sim`` loss's per-sample gradient (same levels, same draws)."""
    te = GaussianMixtureTeacher(torch.full((1, 1), M2, dtype=DT), S)
    fake = GaussianFake(lambda: M, 0.8)
    sim = build_loss("sim", huber_c=0.3, t_min=0.2, t_max=1.0, fake_init="fresh")
    sim.setup(ShiftedFlowMap(), te, ctx(dtype=DT))
    sim.fake = fake
    loss = dm_ayf(dm_levels=[SMAX], dm_divergence="sim", dm_huber_c=0.3, dm_t_min=0.2, dm_t_max=1.0)
    x0 = M + 0.9 * torch.randn(64, 1, dtype=DT, generator=torch.Generator().manual_seed(5))
    rows, g, bad, _ = sim.sample_grad(x0, te, batch(size=64, seed=9, dtype=DT))
    x = x0.clone().requires_grad_(True)
    b = batch(size=64, seed=9, dtype=DT)
    value, terms = score_implicit_matching(x, loss._dm_sampler(b, x), te, fake, b, 1.0, "pseudo_huber", 0.3)
    (gx,) = torch.autograd.grad(value, x)
    assert not bad.any() and float(g.abs().max()) > 1e-3
    torch.testing.assert_close(gx * 64, g)
    torch.testing.assert_close(terms["dm_loss"], rows.mean())


def test_gan_head_on_the_regulariser_fake_score():
    """``dm_gan_weight``: DMD2's GAN head on the (fresh MLP) fake score's last hidden layer is a critic-phase group of
    its own; the critic loss is DSM + ``dm_gan_critic_weight`` x classifier on noised real vs generated samples, the
    student loss adds ``dm_gan_weight`` x the non-saturating term, whose gradient reaches the student only."""
    st, te = ShiftedFlowMap(theta=0.9, shift=0.2), teacher()
    loss = dm_ayf(dm_gan_weight=0.3, dm_gan_critic_weight=0.05)
    assert set(loss.phase_groups("critic", st)) == {"fake", "gan_head"}
    assert set(loss.phase_groups("student", st)) == {"student"}
    data = M + S * torch.randn(64, 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    out = loss("critic", st, te, batch(data, seed=2), ctx(5, dtype=DT))
    torch.testing.assert_close(out["loss"].detach(), out["dsm"] + 0.05 * out["gan_d"])
    assert 0 < float(out["d_real"]) < 1 and 0 < float(out["d_fake"]) < 1
    out["loss"].backward()
    assert all(p.grad is not None for p in loss.gan_head.parameters()) and st.theta.grad is None
    loss.zero_grad(set_to_none=True)
    plain = dm_ayf()
    plain.fake.load_state_dict(loss.fake.state_dict())
    out = loss("student", st, te, batch(data, seed=3), ctx(5, dtype=DT))
    ref = plain("student", st, te, batch(data, seed=3), ctx(5, dtype=DT))  # the same draws before the GAN term
    torch.testing.assert_close(out["loss"].detach(), ref["loss"].detach() + 0.3 * out["gan_g"])
    (g_gan,) = torch.autograd.grad(out["loss"] - ref["loss"], st.shift)
    assert float(g_gan.abs()) > 0
    out = loss("student", st, te, batch(data, seed=3), ctx(5, dtype=DT))
    out["loss"].backward()
    assert all(p.grad is None for p in loss.parameters())
    assert all(p.requires_grad for p in loss.fake.parameters())  # restored after the student phase
    with pytest.raises(ValueError, match="real data"):
        loss("critic", st, te, batch(size=64, seed=2, dtype=DT), ctx(5, dtype=DT))


def test_schedule_plan_and_phases():
    assert build_loss("ayf").phases == ("student",)
    assert build_loss("ayf").phases_for_step(7) == ["student"]
    loss = build_loss("ayf", dm_weight=1.0, dm_levels=[80.0, 0.8], dm_start=3, fake_warmup=2, critic_updates=3)
    assert loss.phases == ("critic", "student") and loss.update_every() == {"critic": 1, "student": 3}
    got = [loss.phases_for_step(k) for k in range(10)]
    assert got == [["student"]] * 3 + [["critic"]] * 2 + [["critic", "student"], ["critic"], ["critic"],
                                                          ["critic", "student"], ["critic"]]
    assert loss.sampling().levels[2] == (80.0, 0.8)


@pytest.mark.parametrize("kwargs, match", [
    ({"dm_weight": -1.0}, "dm_weight"),
    ({"dm_weight": 1.0}, "dm_levels"),
    ({"dm_weight": 1.0, "dm_levels": [0.8, 80.0]}, "descending"),
    ({"dm_weight": 1.0, "dm_levels": [80.0], "critic_updates": 0}, "critic_updates"),
    ({"dm_weight": 1.0, "dm_levels": [80.0], "dm_sigma": "uniform"}, "sigma density"),
    ({"dm_weight": 1.0, "dm_levels": [80.0], "fake_init": "copy"}, "fake_init"),
    ({"dm_start": -2}, "dm_start"),
    ({"dm_divergence": "kl"}, "dm_divergence"),
    ({"dm_distance": "l1"}, "dm_distance"),
    ({"dm_huber_c": 0.0}, "dm_huber_c"),
    ({"dm_t_min": 0.5, "dm_t_max": 0.4}, "dm_t_min"),
    ({"dm_weight": 1.0, "dm_levels": [80.0], "dm_gan_weight": -0.1}, "dm_gan_weight"),
    ({"dm_gan_weight": 0.1}, "needs dm_weight"),
    ({"dm_intermediate": "coarse"}, "dm_intermediate"),
    ({"dm_intermediate": "above_next", "fake_sigma": "lognormal"}, "needs dm_sigma and fake_sigma 'grid'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_loss("ayf", **kwargs)


def test_ring_run_with_the_regulariser_resumes_exactly(tmp_path):
    """Through ``distill train`` on the ring: the host-only start, the fake warm-up and the TTUR schedule all cross the
    resume point; every checkpoint tensor (student, EMA, the fake score, both optimizers) matches a straight run."""
    from _helpers import assert_resume_exact

    from distill.config import load_config

    def cfg(name: str, steps: int):
        return load_config(None, [
            "teacher.name=ring", "student.name=flowmap", "student.init=fresh", "student.hidden=16", "student.depth=1",
            "loss.name=ayf", "loss.objective=lagrangian", "loss.warmup=2", "loss.dm_weight=1.0",
            "loss.dm_levels=[80.0,1.0]", "loss.dm_start=3", "loss.fake_warmup=2", "loss.critic_updates=2",
            "loss.fake_init=residual", "data.name=teacher", "data.batch_size=32", "optim.student.lr=1e-3",
            "optim.critic.lr=1e-3", f"trainer.max_steps={steps}", "eval.every=0", "trainer.grid_every=0",
            "trainer.progress_bar=false", "trainer.ckpt_every=5", "trainer.log_every=3", f"out_dir={tmp_path / name}"])

    ckpt = assert_resume_exact(cfg, 12, split=5, tag="ayf+dm")
    assert int(ckpt["state_dict"]["iteration"]) == 12
    assert any(k.startswith("loss.fake.") for k in ckpt["state_dict"])
