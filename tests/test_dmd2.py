"""Closed-form checks of the DMD2 loss and its parts (docs/methods.md §4.2, §2.2): the injected gradient is exactly
``g / numel`` with DMD's normaliser, a Gaussian generator trained with the exact fake score converges to the target
(and the gradient vanishes there and points to the target off it, also per class under guidance), the fake score's
DSM is minimised by the Gaussian posterior mean, backward simulation runs ``k`` re-noised jumps, every draw goes
through the batch (so 2 processes at B/2 compute what 1 does at B), and the GAN head and multi-step student work on
a tiny 8x8 UNet teacher."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import ExactGaussianFake, GaussianGenerator, fit, gaussian_denoiser
from torch import Tensor, nn

from distill.core.precond import edm_scalings
from distill.core.registry import ConfigError
from distill.core.schedules import (
    discrete_index_sigma_from_uniform,
    karras_sigmas,
    lognormal_sigma_from_normal,
    sample_discrete_index_sigma,
)
from losses import LOSSES, build_loss
from losses.base import Batch, DataSpec, StepContext
from losses.dmd2 import DMD2
from losses.parts import (
    GANHead,
    ResidualFakeScore,
    SigmaSampler,
    dmd_gradient,
    dsm_loss,
    edm_loss_weight,
    gan_critic_loss,
    gan_generator_loss,
    generator_rollout,
    gradient_injection_loss,
)
from students import FlowMapStudent, SamplingPlan, build_student, sinusoidal_embedding
from teachers import DiffusersTeacher, GaussianMixtureTeacher, ring
from teachers.nets import small_unet

F64 = torch.float64
CPU = torch.device("cpu")
TARGET_M, TARGET_S = 1.0, 0.5


def ctx(iteration: int = 0, dtype: torch.dtype = torch.float32, total: int = 100) -> StepContext:
    return StepContext(iteration, total, device=CPU, dtype=dtype)


def batch(size: int, data: Tensor | None = None, labels: Tensor | None = None, extras=None, *, seed: int = 0,
          iteration: int = 0, dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1) -> Batch:
    return Batch(size, data, labels, extras, seed=seed, iteration=iteration, dtype=dtype, rank=rank,
                 world_size=world_size)


class AffineFake(nn.Module):
    """A fake score ``D(x, sigma) = alpha x + beta`` (enough to represent a Gaussian's denoiser at one sigma)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.0, dtype=F64))
        self.beta = nn.Parameter(torch.tensor(0.0, dtype=F64))

    def denoise(self, x, sigma, cond=None):
        return self.alpha * x + self.beta


def gaussian_dmd2(**kw) -> DMD2:
    return build_loss("dmd2", fake_init="fresh", fake_hidden=8, fake_depth=1, **kw)


def tiny_unet_teacher(num_class_embeds: int | None = None) -> DiffusersTeacher:
    torch.manual_seed(0)
    net = small_unet(8, 1, (16, 32, 32), num_class_embeds=num_class_embeds)
    sched = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "prediction_type": "epsilon"}
    return DiffusersTeacher(net, sched, null_class=(num_class_embeds - 1) if num_class_embeds else None)


# ---------------------------------------------------------------------------------------------------------------
# (a) the DMD gradient and its injection: the gradient on x is (mu_fake - mu_real) / mean|x - mu_real| / numel
# ---------------------------------------------------------------------------------------------------------------


def test_injected_gradient_equals_normalised_dmd_gradient():
    torch.manual_seed(0)
    x, mu_r, mu_f = (torch.randn(5, 3, 4, dtype=F64) for _ in range(3))
    # g computed independently, row by row
    g = torch.stack([(mu_f[i] - mu_r[i]) / (x[i] - mu_r[i]).abs().mean() for i in range(5)])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gradient_injection_loss(xg, dmd_gradient(x, mu_r, mu_f)[0]), xg)
    torch.testing.assert_close(grad, g / x.numel(), rtol=1e-12, atol=0)
    # one plain SGD step on x moves it by exactly -lr g / numel
    opt = torch.optim.SGD([xg], lr=3.0)
    opt.zero_grad()
    gradient_injection_loss(xg, dmd_gradient(x, mu_r, mu_f)[0]).backward()
    opt.step()
    torch.testing.assert_close(xg.detach(), x - 3.0 * g / x.numel(), rtol=1e-12, atol=1e-15)
    # the normaliser is per sample: scaling one row's residual x - mu_real by c scales only that row's g by 1/c
    x2 = x.clone()
    x2[1] = mu_r[1] + 4.0 * (x[1] - mu_r[1])
    g2 = dmd_gradient(x2, mu_r, mu_f)[0]
    torch.testing.assert_close(g2[1], g[1] / 4.0)
    torch.testing.assert_close(g2[[0, 2, 3, 4]], g[[0, 2, 3, 4]])
    # a sample the teacher reproduces exactly: the clamped normaliser keeps g finite (= diff / eps)
    g0 = dmd_gradient(x[:1], x[:1], x[:1] + 1e-7, eps=1e-5)[0]
    torch.testing.assert_close(g0, torch.full_like(g0, 1e-2))
    # a NaN/Inf row is zeroed and reported, never silently absorbed; the other rows are untouched
    mu_bad = mu_f.clone()
    mu_bad[2, 0, 1] = float("nan")
    mu_bad[4, 1, 0] = float("inf")
    gb, bad = dmd_gradient(x, mu_r, mu_bad)
    assert bad.tolist() == [False, False, True, False, True]
    assert torch.equal(gb[[2, 4]], torch.zeros_like(gb[[2, 4]]))
    torch.testing.assert_close(gb[[0, 1, 3]], g[[0, 1, 3]])


def test_gradient_injection_surrogate_value():
    torch.manual_seed(2)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    g = torch.randn(4, 2, 3, dtype=F64)
    torch.testing.assert_close(gradient_injection_loss(x, g), 0.5 * (g**2).mean())


# ---------------------------------------------------------------------------------------------------------------
# (b) Gaussian generator -> N(1, 0.5^2) with the exact fake score (docs/methods.md §4.2)
# ---------------------------------------------------------------------------------------------------------------


def test_gaussian_generator_converges_with_pure_functions():
    torch.manual_seed(3)
    gen = GaussianGenerator(1.0, 0.0)
    grid = karras_sigmas(1000, 0.002, 80.0, append_zero=False)

    def step(_: int) -> Tensor:
        z = torch.randn(1024, 1, dtype=F64)
        x = gen.b + gen.a * z
        _, sigma = sample_discrete_index_sigma(1024, grid, 0.02, 0.98)
        x_t = x.detach() + sigma[:, None] * torch.randn_like(x)
        mu_real = gaussian_denoiser(x_t, sigma, TARGET_M, TARGET_S)
        mu_fake = gaussian_denoiser(x_t, sigma, gen.b.detach(), gen.a.detach().abs())
        return gradient_injection_loss(x, dmd_gradient(x.detach(), mu_real, mu_fake)[0])

    fit(step, gen.parameters(), steps=400, lr=5e-2)
    assert abs(gen.a.item() - TARGET_S) < 1e-2 and abs(gen.b.item() - TARGET_M) < 1e-2, (gen.a.item(), gen.b.item())


def _gaussian_setup(a0: float, b0, conditional: bool = False, **kw):
    means = torch.tensor([[-2.0], [2.0]]) if conditional else torch.tensor([[TARGET_M]])
    teacher = GaussianMixtureTeacher(means, TARGET_S, conditional=conditional)
    gen = GaussianGenerator(a0, b0)
    loss = gaussian_dmd2(**kw)
    loss.setup(gen, teacher, ctx(dtype=F64))
    loss.fake = ExactGaussianFake(gen)
    return teacher, gen, loss


def test_gaussian_generator_converges_through_the_loss_object():
    """The same fit, through DMD2's student phase (sigma_max z input, DMD2 grid, normaliser, surrogate)."""
    teacher, gen, loss = _gaussian_setup(1.0, 0.0)
    c = ctx(dtype=F64)
    fit(lambda i: loss("student", gen, teacher, batch(1024, iteration=i), c)["loss"], gen.parameters(), 400, 5e-2)
    assert abs(gen.a.item() - TARGET_S) < 1e-2 and abs(gen.b.item() - TARGET_M) < 1e-2, (gen.a.item(), gen.b.item())
    # at the optimum the injected gradient vanishes
    with torch.no_grad():
        gen.a.fill_(TARGET_S)
        gen.b.fill_(TARGET_M)
    gen.zero_grad()
    out = loss("student", gen, teacher, batch(1024, seed=1), c)
    assert float(out["dm_grad_norm"]) < 1e-12
    out["loss"].backward()
    assert gen.a.grad.abs() < 1e-12 and gen.b.grad.abs() < 1e-12


@pytest.mark.parametrize("a0, b0, param, sign", [(1.0, 1.0, "a", 1), (0.25, 1.0, "a", -1), (1.0, 0.0, "b", -1),
                                                  (1.0, 2.0, "b", 1)])
def test_gaussian_generator_gradient_points_to_target(a0, b0, param, sign):
    """Sign/unit check of g: a too wide (narrow) generator at the right mean is narrowed (widened); a shifted one is
    moved toward the target mean (gradient descent moves against the sign of the gradient)."""
    teacher, gen, loss = _gaussian_setup(a0, b0)
    loss("student", gen, teacher, batch(20000, seed=5), ctx(dtype=F64))["loss"].backward()
    assert sign * float(getattr(gen, param).grad) > 0


def test_conditional_teacher_labels_and_guidance():
    """Per-class Gaussians N(-2, s^2), N(2, s^2): a generator equal to the teacher's class-conditionals gets exactly
    zero gradient at guidance 1 - only if the batch's labels reach the generator, the teacher and the fake alike.
    With guidance 3 the guided teacher ``d_u + w (d_c - d_u)`` points away from the other class, so each class mean
    is pushed outward."""
    labels = torch.arange(4000) % 2
    teacher, gen, loss = _gaussian_setup(TARGET_S, [-2.0, 2.0], conditional=True)
    out = loss("student", gen, teacher, batch(4000, labels=labels), ctx(dtype=F64))
    assert float(out["dm_grad_norm"]) < 1e-12
    teacher, gen, loss = _gaussian_setup(TARGET_S, [-2.0, 2.0], conditional=True, guidance=3.0)
    out = loss("student", gen, teacher, batch(4000, labels=labels), ctx(dtype=F64))
    assert float(out["dm_grad_norm"]) > 1e-3
    out["loss"].backward()
    assert gen.b.grad[0] > 0 > gen.b.grad[1]  # descent moves b[0] below -2 and b[1] above 2


# ---------------------------------------------------------------------------------------------------------------
# (c) the fake score's DSM is minimised by the posterior mean, with EDM's unit-variance weighting
# ---------------------------------------------------------------------------------------------------------------


def test_edm_weighted_dsm_of_exact_gaussian_denoiser_is_one():
    """For N(m, s^2) data with sigma_data = s the weighted DSM of the exact denoiser is exactly 1 at every sigma:
    lambda(sigma) * posterior variance = (sigma^2 + s^2) / (sigma s)^2 * s^2 sigma^2 / (s^2 + sigma^2) = 1."""
    torch.manual_seed(6)
    n = 200_000
    x0 = TARGET_M + TARGET_S * torch.randn(n, 1, dtype=F64)
    for sig in (0.01, 2.0, 50.0):
        sigma = torch.full((n,), sig, dtype=F64)
        post_var = TARGET_S**2 * sig**2 / (TARGET_S**2 + sig**2)
        assert float(edm_loss_weight(sigma[:1], TARGET_S)) * post_var == pytest.approx(1.0, rel=1e-12)
        x_t = x0 + sig * torch.randn_like(x0)
        exact = dsm_loss(gaussian_denoiser(x_t, sigma, TARGET_M, TARGET_S), x0, sigma, TARGET_S).mean()
        assert abs(float(exact) - 1.0) < 0.02, (sig, float(exact))


@pytest.mark.parametrize("sig", [0.3, 1.5])
def test_critic_phase_dsm_minimiser_is_the_gaussian_posterior_mean(sig):
    """Critic phase on generator samples N(m, s^2) at (essentially) one noise level sigma: an affine fake
    ``alpha x + beta`` trained on it converges to the posterior mean ``(s^2 x + sigma^2 m) / (s^2 + sigma^2)``."""
    teacher, gen, loss = _gaussian_setup(TARGET_S, TARGET_M, fake_sigma="lognormal", p_mean=math.log(sig),
                                         p_std=1e-12)
    fake = AffineFake()
    loss.fake = fake
    c = ctx(dtype=F64)
    fit(lambda i: loss("critic", gen, teacher, batch(4096, iteration=i), c)["loss"], fake.parameters(), 300, 5e-2)
    den = TARGET_S**2 + sig**2
    assert fake.alpha.item() == pytest.approx(TARGET_S**2 / den, abs=1e-2)
    assert fake.beta.item() == pytest.approx(sig**2 * TARGET_M / den, abs=1e-2)
    assert gen.a.grad is None and gen.b.grad is None  # the generator is a constant of the critic phase


# ---------------------------------------------------------------------------------------------------------------
# (d) backward simulation, batch-drawn randomness, process-count invariance
# ---------------------------------------------------------------------------------------------------------------


class AffineStudent(FlowMapStudent):
    """``D(x, s) = w x / s + v`` (depends on its input); records ``(x, s, grad enabled)`` of every call."""

    kind = "generator"

    def __init__(self) -> None:
        super().__init__((2,), 0.002, 80.0, 1.0)
        self.w = nn.Parameter(torch.tensor(0.7))
        self.v = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.calls: list[tuple[Tensor, Tensor, bool]] = []

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        self.calls.append((x.detach().clone(), sigma_from.detach().clone(), torch.is_grad_enabled()))
        return self.w * x / sigma_from[:, None] + self.v


def test_backward_simulation_runs_k_renoised_jumps():
    levels = [80.0, 2.0, 0.5]
    gen = AffineStudent()
    out = generator_rollout(gen, batch(600, seed=3, iteration=7), ctx(), levels, (2,))
    assert out.requires_grad
    assert [c[2] for c in gen.calls] == [False, False, True]  # L - 1 simulated jumps without grad, one graded

    # Replay the documented draws (z, k, then one noise per simulated jump) and the recursion by hand.
    b = batch(600, seed=3, iteration=7)
    z, k = b.randn(2), b.randint(3)
    noises = [b.randn(2), b.randn(2)]
    w, v = 0.7, torch.tensor([0.3, -0.2])
    x = levels[0] * z
    for j in range(2):
        x = torch.where((k > j)[:, None], w * x / levels[j] + v + levels[j + 1] * noises[j], x)
    sig_k = torch.tensor(levels)[k]
    torch.testing.assert_close(gen.calls[-1][1], sig_k)  # graded jump from level k
    torch.testing.assert_close(gen.calls[-1][0], x)  # ... at the re-noised state after k jumps
    torch.testing.assert_close(out.detach(), w * x / sig_k[:, None] + v)
    assert all(float((k == lvl).float().mean()) > 0.25 for lvl in range(3))
    # the graded input of a level-2 row is x0 + 0.5 n: given the level-1 jump's output, fresh noise of std 0.5
    rows = k == 2
    resid = gen.calls[-1][0][rows] - (w * gen.calls[1][0][rows] / levels[1] + v)
    assert float(resid.std()) == pytest.approx(0.5, rel=0.1)
    # gradients reach the student through the graded jump only: d out / d v = 1 per row and coordinate
    (gv,) = torch.autograd.grad(out.sum(), gen.v)
    torch.testing.assert_close(gv, torch.full((2,), 600.0))


@pytest.mark.parametrize("student_sigmas", [None, [80.0, 2.0, 0.5]])
def test_two_processes_at_half_batch_compute_what_one_does(student_sigmas):
    """Every draw goes through the batch: critic and student losses of one process at B equal the mean over two
    ranks at B/2, whatever torch's global RNG holds."""
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=16, fake_depth=2, student_sigmas=student_sigmas,
                      dm_sigma="lognormal", fake_sigma="grid")
    loss.setup(student, teacher, ctx())
    for phase in ("critic", "student"):
        torch.manual_seed(1)
        one = float(loss(phase, student, teacher, batch(16, seed=4, iteration=9), ctx())["loss"].detach())
        torch.manual_seed(2)
        two = [float(loss(phase, student, teacher, batch(8, seed=4, iteration=9, rank=r, world_size=2),
                          ctx())["loss"].detach()) for r in (0, 1)]
        assert one == pytest.approx(sum(two) / 2, rel=1e-5), phase


def test_sigma_densities_from_batch_draws():
    grid = karras_sigmas(1000, 0.002, 80.0, append_zero=False)
    idx, s = discrete_index_sigma_from_uniform(torch.tensor([0.0, 1 - 1e-12, 0.5]), grid, 0.02, 0.98)
    assert idx.tolist() == [math.floor(0.02 * 999), math.ceil(0.98 * 999), 19 + 481]  # 962 indices: half way
    assert torch.equal(s, grid[idx])
    torch.testing.assert_close(lognormal_sigma_from_normal(torch.tensor([0.0, 1.0]), -1.2, 1.2),
                               torch.tensor([math.exp(-1.2), 1.0]))
    b = batch(20000)
    s = SigmaSampler("grid", 0.002, 80.0, 1000)(b, torch.zeros(1))
    assert float(s.max()) == pytest.approx(float(grid[19]), rel=1e-6)
    assert float(s.min()) == pytest.approx(float(grid[980]), rel=1e-6)
    s = SigmaSampler("lognormal", 0.002, 80.0, 1000)(b, torch.zeros(1))
    assert float(s.log().mean()) == pytest.approx(-1.2, abs=0.05)


# ---------------------------------------------------------------------------------------------------------------
# (e) the GAN head, the TTUR schedule and the multi-step student on real networks
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_teacher() -> DiffusersTeacher:
    return tiny_unet_teacher()


def _grads(params) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_unet_teacher_copy_gives_zero_gradient_at_init(unet_teacher):
    torch.manual_seed(9)
    student = build_student("generator", unet_teacher, init="teacher")
    loss = build_loss("dmd2", num_levels=50)
    loss.setup(student, unet_teacher, ctx())
    out = loss("student", student, unet_teacher, batch(2), ctx())
    # fake = copy of the teacher: mu_fake == mu_real up to float32 kernel differences (train vs eval mode)
    assert float(out["dm_grad_norm"]) < 1e-4
    assert not any(p.requires_grad for p in unet_teacher.parameters())
    with torch.no_grad():
        next(loss.fake.parameters()).add_(0.05)  # a fake score that no longer equals the teacher
    assert float(loss("student", student, unet_teacher, batch(2), ctx())["dm_grad_norm"]) > 1e-2


def test_multistep_student_with_gan_head_on_unet(unet_teacher):
    torch.manual_seed(10)
    student = build_student("generator", unet_teacher, init="teacher")
    loss = build_loss("dmd2", num_levels=50, gan_weight=0.1, student_sigmas=[80.0, 2.0, 0.5])
    assert loss.data_specs() == {"data": DataSpec("real")}
    assert loss.sampling() == SamplingPlan(gamma=1.0, levels={3: (80.0, 2.0, 0.5)})
    loss.setup(student, unet_teacher, ctx())
    assert isinstance(loss.gan_head, GANHead) and loss.gan_head.feature_shape == (32, 2, 2)  # the UNet bottleneck
    groups = loss.phase_groups("critic", student)
    assert set(groups) == {"fake", "gan_head"}
    assert {id(p) for p in groups["fake"]} == {id(p) for p in loss.fake.parameters()}
    assert set(loss.phase_groups("student", student)) == {"student"}
    b = lambda: batch(4, data=torch.randn(4, 1, 8, 8).clamp(-1, 1))  # noqa: E731
    # critic: fake score + head get gradients, the student none; the loss is DSM + weighted classifier loss
    out = loss("critic", student, unet_teacher, b(), ctx())
    torch.testing.assert_close(out["loss"].detach(), out["dsm"] + 1e-2 * out["gan_d"])
    out["loss"].backward()
    assert all(_grads(loss.gan_head.parameters())) and any(_grads(loss.fake.parameters()))
    assert not any(_grads(student.parameters()))
    loss.zero_grad(set_to_none=True)
    # student: the generator gets gradients (through the GAN term via the frozen fake encoder), nothing else does
    out = loss("student", student, unet_teacher, b(), ctx())
    torch.testing.assert_close(out["loss"].detach(), out["dm_loss"] + 0.1 * out["gan_g"])
    out["loss"].backward()
    assert any(_grads(student.parameters()))
    assert all(p.grad is None for p in loss.parameters())
    assert all(p.requires_grad for p in loss.fake.parameters())  # restored after the student phase
    assert all(p.grad is None for p in unet_teacher.parameters())
    with pytest.raises(ValueError, match="real data"):
        loss("critic", student, unet_teacher, batch(4), ctx())


def test_conditional_unet_teacher_with_guidance():
    teacher = tiny_unet_teacher(num_class_embeds=3)  # 2 classes + null class
    student = build_student("generator", teacher, init="teacher")
    loss = build_loss("dmd2", num_levels=50, guidance=2.0)
    loss.setup(student, teacher, ctx())
    out = loss("student", student, teacher, batch(3, labels=torch.tensor([0, 1, 0])), ctx())
    assert torch.isfinite(out["loss"]) and float(out["dm_grad_norm"]) > 0  # CFG makes mu_real != mu_fake


def test_mlp_gan_head_features_and_ttur_schedule():
    torch.manual_seed(12)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("dmd2", fake_init="fresh", fake_hidden=16, fake_depth=2, gan_weight=0.5, critic_updates=5)
    loss.setup(student, teacher, ctx())
    assert loss.update_every() == {"critic": 1, "student": 5}
    assert [loss.phases_for_step(i) for i in (0, 1, 4, 5)] == [["critic", "student"], ["critic"], ["critic"],
                                                                ["critic", "student"]]
    # The tap grabs the MLP's last hidden activations (the output layer's input), computed here by hand.
    fake = loss.fake
    x, sigma = torch.randn(6, 2), torch.rand(6) * 3 + 0.1
    _, _, c_in, c_noise = edm_scalings(sigma, fake.sigma_data)
    net = fake.net
    manual = net.mlp[:-1](torch.cat([c_in[:, None] * x, sinusoidal_embedding(c_noise, net.emb_dim, net.max_freq)], 1))
    feats = loss._tap.grab(fake.denoise, x, sigma, None)
    torch.testing.assert_close(feats, manual)
    assert loss.gan_head.feature_shape == (16,)
    torch.testing.assert_close(loss.gan_head(feats), feats @ loss.gan_head.net.weight[0] + loss.gan_head.net.bias)
    out = loss("critic", student, teacher, batch(8, data=teacher.sample(8)), ctx())
    torch.testing.assert_close(out["loss"].detach(), out["dsm"] + 1e-2 * out["gan_d"])


def test_gan_losses_closed_form():
    logits = torch.tensor([0.0, 2.0, -1.0], dtype=F64)
    torch.testing.assert_close(gan_generator_loss(logits), -torch.log(torch.sigmoid(logits)))
    expected = (-torch.log(1 - torch.sigmoid(logits))).mean() + (-torch.log(torch.sigmoid(logits[:2]))).mean()
    torch.testing.assert_close(gan_critic_loss(logits, logits[:2]), expected)


# ---------------------------------------------------------------------------------------------------------------
# Configuration, data specs, sampling plan, errors
# ---------------------------------------------------------------------------------------------------------------


def test_registered_tiny_config_specs_and_sampling():
    assert LOSSES.get("dmd2") is DMD2 and DMD2.student_kind == "generator"
    assert DMD2.phases == ("critic", "student") and DMD2.ema_phases == ("student",)
    DMD2(**DMD2.tiny_config())
    loss = build_loss("dmd2")
    assert loss.data_specs() == {"data": DataSpec("noise")} and loss.sampling() is None
    loss = build_loss("dmd2", regression_weight=1.0, regression_pairs=123, regression_nfe=7, guidance=2.0)
    assert loss.data_specs()["pairs"] == DataSpec("teacher_pairs", options={"n": 123, "nfe": 7, "guidance": 2.0})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dm_sigma": "uniform"}, "valid: grid, lognormal"),
        ({"fake_sigma": "x"}, "valid: grid, lognormal"),
        ({"fake_init": "copy"}, "valid: teacher, fresh"),
        ({"student_sigmas": [0.5, 2.0]}, "strictly descending"),
        ({"critic_updates": 0}, "critic_updates"),
        ({"t_min": 0.9, "t_max": 0.1}, "t_min"),
        ({"regression_steps": -1}, "regression_steps"),
        ({"regression_steps": 10, "regression_nfe": 4}, "odd"),
        ({"foo": 1}, "valid keys"),
    ],
)
def test_bad_config_raises_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_loss("dmd2", **kwargs)
    assert "\n" not in str(e.value)


def test_setup_errors():
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=8, depth=1)
    with pytest.raises(ConfigError, match="fake_init='fresh'"):
        build_loss("dmd2").setup(student, teacher, ctx())
    with pytest.raises(ConfigError, match="needs a conditional"):
        build_loss("dmd2", fake_init="fresh", guidance=2.0).setup(student, teacher, ctx())
    with pytest.raises(RuntimeError, match="setup"):
        build_loss("dmd2")("student", student, teacher, batch(2), ctx())


# ---------------------------------------------------------------------------------------------------------------
# Warm-start regression on teacher ODE pairs (DMD's regression loss / DMD2's one-step warm start)
# ---------------------------------------------------------------------------------------------------------------


def test_regression_warm_start_schedule():
    loss = build_loss("dmd2", critic_updates=5, regression_steps=3, fake_warmup=2)
    got = [loss.phases_for_step(i) for i in range(12)]
    assert got[:3] == [["student"]] * 3 and got[3:5] == [["critic"]] * 2
    assert got[5] == ["critic", "student"] and got[6:10] == [["critic"]] * 4 and got[10] == ["critic", "student"]


def gaussian_pairs(n: int, seed: int) -> dict[str, Tensor]:
    """Exact teacher pairs of N(m, s^2): the PF-ODE maps sigma_T z to m + (sigma_T z - m) s / sqrt(s^2 + sigma_T^2)."""
    z = torch.randn(n, 1, dtype=F64, generator=torch.Generator().manual_seed(seed))
    x0 = TARGET_M + (80.0 * z - TARGET_M) * TARGET_S / math.sqrt(TARGET_S**2 + 80.0**2)
    return {"pairs.z": z, "pairs.x0": x0}


def test_regression_phase_fits_the_ode_map():
    teacher, gen, loss = _gaussian_setup(1.0, 0.0, regression_steps=10)
    assert loss.data_specs()["pairs"].source == "teacher_pairs"
    out = loss("student", gen, teacher, batch(4, extras=gaussian_pairs(4, 0)), ctx(0, F64))
    assert set(out) >= {"loss", "regression"} and "dm_grad_norm" not in out
    with pytest.raises(ValueError, match="pairs"):
        loss("student", gen, teacher, batch(4), ctx(0, F64))
    fit(lambda i: loss("student", gen, teacher, batch(512, extras=gaussian_pairs(512, i)), ctx(i % 10, F64))["loss"],
         gen.parameters(), 300, 5e-2)
    root = math.sqrt(TARGET_S**2 + 80.0**2)
    a_star, b_star = 80.0 * TARGET_S / root, TARGET_M * (1 - TARGET_S / root)  # G(sigma_T z) = b + a z = ODE(z)
    assert abs(gen.a.item() - a_star) < 5e-3 and abs(gen.b.item() - b_star) < 5e-3, (gen.a.item(), gen.b.item())
    assert not any("ode" in k for k in loss.state_dict())  # pairs are data, not checkpoint state


def test_residual_fake_starts_at_the_teacher_and_learns_the_difference():
    torch.manual_seed(15)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("dmd2", fake_init="residual", fake_hidden=16, fake_depth=2, gan_weight=0.1)
    loss.setup(student, teacher, ctx())
    assert isinstance(loss.fake, ResidualFakeScore)
    assert not any(k.startswith("fake.teacher") for k in loss.state_dict())  # the teacher is only referenced
    x = torch.randn(64, 2) * 2
    sigma = torch.rand(64) * 3 + 0.01
    assert torch.equal(loss.fake.denoise(x, sigma), teacher(x, sigma))  # mu_fake == mu_real exactly at init
    out = loss("student", student, teacher, batch(32, data=teacher.sample(32)), ctx())
    assert float(out["dm_grad_norm"]) == 0.0
    torch.testing.assert_close(out["loss"].detach(), 0.1 * out["gan_g"])  # only the GAN term is left
    out = loss("critic", student, teacher, batch(32, data=teacher.sample(32)), ctx())
    out["loss"].backward()
    assert all(p.grad is not None for p in loss.fake.correction.net.mlp[-1].parameters())


def test_regression_term_kept_during_distribution_matching():
    teacher, gen, loss = _gaussian_setup(1.0, 0.0, regression_weight=2.0, regression_pairs=64)
    out = loss("student", gen, teacher, batch(32, extras=gaussian_pairs(32, 1)), ctx(5, F64))
    torch.testing.assert_close(out["loss"].detach(), out["dm_loss"] + 2.0 * out["regression"])
    pairs = gaussian_pairs(32, 1)
    expected = ((gen.b + gen.a * pairs["pairs.z"]) - pairs["pairs.x0"]).pow(2).mean()
    torch.testing.assert_close(out["regression"], expected.detach())
