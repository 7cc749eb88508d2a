"""Closed-form checks of the SiD loss (arXiv:2404.04057 §4; /work/shared/methods.md §2.7, §4.2): the fused per-sample
loss and its gradient on affine denoisers match hand-derived formulas, the generator gradient vanishes when a
Gaussian generator equals the target N(M, S^2) (exact fake score), such a generator trained with the loss converges to
the target (pure function and loss object), NaN/Inf rows are zeroed and counted, the residual fake keeps the
teacher's input Jacobian, and the full ``sid`` loss trains an MLP generator on the ring teacher."""

from __future__ import annotations

import pytest
import torch
from _helpers import ExactGaussianFake, GaussianGenerator, fit, gaussian_denoiser
from torch import Tensor, nn

from distill.core.registry import ConfigError
from distill.core.schedules import karras_sigmas, sample_discrete_index_sigma
from losses import LOSSES, build_loss
from losses.base import NONFINITE_ROWS, Batch, DataSpec, StepContext
from losses.sid import SiD, sid_generator_loss
from students import build_student
from teachers import GaussianMixtureTeacher, ring

torch.set_num_threads(1)

F64 = torch.float64
M, S = 1.0, 0.5


def ctx(i: int = 0, dtype: torch.dtype = torch.float32) -> StepContext:
    return StepContext(i, 100, device=torch.device("cpu"), dtype=dtype)


def batch(n: int, data: Tensor | None = None, *, seed: int = 0, i: int = 0, dtype=torch.float32) -> Batch:
    return Batch(n, data, seed=seed, iteration=i, dtype=dtype)


def pure_step(a: Tensor, b: Tensor, alpha: float, n: int) -> Tensor:
    """One SiD generator loss on ``N(b, a^2)`` against ``N(M, S^2)`` with SiD's sigma range and the exact fake."""
    grid = karras_sigmas(1000, 0.002, 80.0, append_zero=False)
    x = b + a * torch.randn(n, 1, dtype=F64)
    _, sigma = sample_discrete_index_sigma(n, grid, 0.2, 1.0)
    x_t = x + sigma[:, None] * torch.randn_like(x)
    f_real = gaussian_denoiser(x_t, sigma, M, S)
    f_fake = gaussian_denoiser(x_t, sigma, b.detach(), a.detach().abs())
    return sid_generator_loss(x, f_real, f_fake, alpha)[0].mean()


def test_fused_loss_value_and_gradient_closed_form():
    """Affine denoisers ``f = c x_t + e`` per sample: the value is ``w mean[(1-alpha) D^2 + D (f_fake - x)]`` (= SiD
    code's ``D ((f_real - x) - alpha D)``) and ``dl/dx`` (through ``x`` and ``x_t = x + sigma n``, ``w`` held) is
    ``w/d [2 (1-alpha) D (c_r - c_f) + (c_r - c_f)(f_fake - x) + D (c_f - 1)]``."""
    torch.manual_seed(0)
    alpha, b, d = 1.2, 5, 3
    x0, n = torch.randn(b, d, dtype=F64), torch.randn(b, d, dtype=F64)
    sigma = torch.rand(b, dtype=F64) + 0.1
    c_r, c_f = torch.rand(b, 1, dtype=F64), torch.rand(b, 1, dtype=F64)
    e_r, e_f = torch.randn(b, d, dtype=F64), torch.randn(b, d, dtype=F64)
    x = x0.clone().requires_grad_(True)
    x_t = x + sigma[:, None] * n
    f_r, f_f = c_r * x_t + e_r, c_f * x_t + e_f
    rows, bad = sid_generator_loss(x, f_r, f_f, alpha)
    assert not bad.any()
    with torch.no_grad():
        w = 1 / (x - f_r).abs().mean(1)
        dd = f_r - f_f
        torch.testing.assert_close(rows, w * (dd * ((f_r - x) - alpha * dd)).mean(1), rtol=1e-12, atol=0)
        expected = w[:, None] / d * (2 * (1 - alpha) * dd * (c_r - c_f) + (c_r - c_f) * (f_f - x) + dd * (c_f - 1))
    (grad,) = torch.autograd.grad(rows.sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_generator_gradient_vanishes_at_the_target(alpha):
    """At ``(a, b) = (S, M)`` the exact fake equals the teacher as a function, so every sample's gradient is 0 for any
    alpha; off the target it is not (a mean shift gets a gradient toward M)."""
    torch.manual_seed(1)
    a, b = torch.tensor(S, dtype=F64, requires_grad=True), torch.tensor(M, dtype=F64, requires_grad=True)
    pure_step(a, b, alpha, 4096).backward()
    assert abs(float(a.grad)) < 1e-12 and abs(float(b.grad)) < 1e-12, (a.grad, b.grad)
    b2 = torch.tensor(M + 0.5, dtype=F64, requires_grad=True)
    pure_step(a, b2, alpha, 4096).backward()
    assert float(b2.grad) > 1e-3  # descent moves b back toward M


def test_gaussian_generator_converges_with_the_pure_loss():
    """alpha = 1 (methods card §4.2: alpha > 1 with SiD's normaliser diverges from a far start on this toy)."""
    torch.manual_seed(3)
    a, b = torch.tensor(1.0, dtype=F64, requires_grad=True), torch.tensor(0.0, dtype=F64, requires_grad=True)
    fit(lambda _: pure_step(a, b, 1.0, 512), [a, b], 600, 5e-2)
    assert abs(a.item() - S) < 1e-2 and abs(b.item() - M) < 1e-2, (a.item(), b.item())


def test_gaussian_generator_converges_through_the_loss_object():
    teacher = GaussianMixtureTeacher(torch.tensor([[M]]), S)
    gen = GaussianGenerator(1.0, 0.0)
    loss = build_loss("sid", alpha=1.0, fake_init="fresh", fake_hidden=4, fake_depth=1)
    loss.setup(gen, teacher, ctx(dtype=F64))
    loss.fake = ExactGaussianFake(gen)
    c = ctx(dtype=F64)
    fit(lambda i: loss("student", gen, teacher, batch(512, i=i, dtype=F64), c)["loss"], gen.parameters(), 600, 5e-2)
    assert abs(gen.a.item() - S) < 1e-2 and abs(gen.b.item() - M) < 1e-2, (gen.a.item(), gen.b.item())
    with torch.no_grad():  # at the optimum the loss object's gradient vanishes too (default alpha 1.2)
        gen.a.fill_(S)
        gen.b.fill_(M)
    loss.alpha = 1.2
    gen.zero_grad()
    out = loss("student", gen, teacher, batch(1024, seed=7, dtype=F64), c)
    out["loss"].backward()
    assert abs(float(gen.a.grad)) < 1e-12 and abs(float(gen.b.grad)) < 1e-12
    assert float(out["score_gap"]) < 1e-20 and int(out[NONFINITE_ROWS]) == 0


def test_nonfinite_rows_are_zeroed_and_counted():
    torch.manual_seed(4)
    x = torch.randn(5, 2, dtype=F64, requires_grad=True)
    f_r, f_f = torch.randn(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64)
    ref, _ = sid_generator_loss(x, f_r, f_f, 1.2)
    f_r[1, 0], f_f[3, 1] = float("nan"), float("inf")
    rows, bad = sid_generator_loss(x, f_r, f_f, 1.2)
    assert bad.tolist() == [False, True, False, True, False]
    assert rows[[1, 3]].eq(0).all() and torch.equal(rows[[0, 2, 4]], ref[[0, 2, 4]])
    (grad,) = torch.autograd.grad(rows.sum(), x)
    assert torch.isfinite(grad).all() and grad[[1, 3]].eq(0).all()

    class NaNRowTeacher(nn.Module):  # the ring teacher, with row 2's output NaN
        def __init__(self, t):
            super().__init__()
            self.t = t

        def __getattr__(self, name):
            return getattr(self._modules["t"], name) if name != "t" else super().__getattr__(name)

        def forward(self, x, sigma, cond=None, guidance=1.0):
            out = self.t(x, sigma, cond, guidance).clone()
            out[2] = float("nan")
            return out

    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=1)
    loss = build_loss("sid", fake_init="fresh", fake_hidden=16, fake_depth=1)
    loss.setup(student, teacher, ctx())
    out = loss("student", student, NaNRowTeacher(teacher), batch(8), ctx())
    assert int(out[NONFINITE_ROWS]) == 1 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_residual_fake_keeps_the_teacher_input_jacobian():
    """A fresh residual fake equals the teacher as a function, so the generator gradient is exactly 0 - only if the
    gradient through ``x_t`` reaches the residual's (no-grad) teacher base as it reaches the real branch."""
    torch.manual_seed(5)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=2)
    loss = build_loss("sid", fake_init="residual", fake_hidden=16, fake_depth=2)
    loss.setup(student, teacher, ctx())
    out = loss("student", student, teacher, batch(64), ctx())
    out["loss"].backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and max(float(g.abs().max()) for g in grads) < 1e-6
    assert all(p.grad is None for p in loss.fake.parameters())  # the fake is a constant of the student phase


def test_full_loss_trains_an_mlp_generator_on_the_ring():
    """critic/student phases of the registered loss (residual fake, SiDA head on) on the ring: finite terms, the
    count of non-finite rows reported, each phase touching only its own networks."""
    torch.manual_seed(6)
    teacher = ring()
    student = build_student("generator", teacher, init="fresh", hidden=32, depth=2)
    loss = build_loss("sid", fake_init="residual", fake_hidden=32, fake_depth=2, gan_weight=0.1)
    loss.setup(student, teacher, ctx())
    assert loss.data_specs() == {"data": DataSpec("real")} and loss.update_every() == {"critic": 1, "student": 1}
    opts = {ph: torch.optim.Adam([p for g in loss.phase_groups(ph, student).values() for p in g], lr=1e-3,
                                 betas=(0.0, 0.999)) for ph in loss.phases}
    for i in range(4):
        b = batch(64, teacher.sample(64, generator=torch.Generator().manual_seed(i)), i=i)
        for phase in loss.phases_for_step(i):
            student.zero_grad()
            loss.zero_grad()
            out = loss(phase, student, teacher, b, ctx(i))
            assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values()), (phase, out)
            out["loss"].backward()
            if phase == "critic":
                assert all(p.grad is None for p in student.parameters())
                torch.testing.assert_close(out["loss"].detach(), out["dsm"] + 1e-2 * out["gan_d"])
            else:
                assert int(out[NONFINITE_ROWS]) == 0 and "gan_g" in out
                assert all(p.grad is None for p in loss.fake.parameters())
                assert all(p.grad is None for p in loss.gan_head.parameters())
            opts[phase].step()
    assert float(out["score_gap"]) > 0  # the fake moved off the teacher: the SiD term is live


def test_defaults_sigma_range_sampling_and_config_errors():
    assert LOSSES.get("sid") is SiD and SiD.phases == ("critic", "student") and SiD.student_kind == "generator"
    loss = build_loss("sid")
    assert loss.alpha == 1.2 and loss.init_sigma == 2.5 and loss.data_specs() == {"data": DataSpec("noise")}
    assert loss.sampling().sigmas(1, 80.0).tolist() == [2.5, 0.0]
    teacher = ring()
    loss = build_loss("sid", fake_init="fresh", fake_hidden=8, fake_depth=1)
    loss.setup(build_student("generator", teacher, init="fresh", hidden=8, depth=1), teacher, ctx())
    sig = loss._sid_sigma(batch(20000, dtype=F64), torch.zeros(1, dtype=F64))
    rho, lo, hi = 7.0, 0.002, 80.0  # SiD: t ~ U[0, 0.8] on the Karras curve from sigma_min: sigma <= its 80% point
    top = (hi ** (1 / rho) + 0.2 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    assert float(sig.min()) == pytest.approx(lo) and float(sig.max()) == pytest.approx(top, rel=1e-2)
    for kwargs, match in [({"sid_sigma": "x"}, "valid: grid"), ({"fake_init": "copy"}, "valid: teacher"),
                          ({"critic_updates": 0}, "critic_updates"), ({"init_sigma": -1.0}, "init_sigma"),
                          ({"foo": 1}, "valid keys")]:
        with pytest.raises(ConfigError, match=match) as e:
            build_loss("sid", **kwargs)
        assert "\n" not in str(e.value)
