"""Students: boundary conditions, teacher-copy equivalences, config round trips, builder errors, and the student
sampler against hand-written loops and an exact (Gaussian-data) flow map."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill.core.nfe import count_nfe
from distill.core.registry import ConfigError
from students import (
    STUDENTS,
    ConsistencyStudent,
    FlowMapStudent,
    MLPDenoiser,
    UNetBackbone,
    build_student,
    build_student_from_config,
    sample_student,
    sinusoidal_embedding,
)
from teachers import DiffusersTeacher, GaussianMixtureTeacher, ring
from teachers.nets import small_unet

torch.set_num_threads(1)
F64 = torch.float64

EDM_SCHED = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "prediction_type": "epsilon"}
VP_SCHED = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
            "beta_schedule": "linear", "prediction_type": "epsilon"}
KINDS = ("generator", "consistency", "flowmap")


def tiny_teacher(sched: dict = EDM_SCHED, num_class_embeds: int | None = None, seed: int = 0,
                 scale: float = 250.0) -> DiffusersTeacher:
    torch.manual_seed(seed)
    net = small_unet(block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=num_class_embeds)
    # Random non-zero weights everywhere (diffusers zero-inits some output convs), so equalities are not vacuous.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    null = num_class_embeds - 1 if num_class_embeds else None
    return DiffusersTeacher(net, sched, null_class=null, edm_timestep_scale=scale)


@pytest.fixture(scope="module")
def edm_teacher() -> DiffusersTeacher:
    return tiny_teacher()


# ---------------------------------------------------------------------------------------------------------------
# Boundary condition and the J parameterisation
# ---------------------------------------------------------------------------------------------------------------


def test_consistency_boundary_is_bit_exact_in_float64():
    student = build_student("consistency", ring(), init="fresh", hidden=32, depth=2).double()
    x = 3 * torch.randn(64, 2, dtype=torch.float64)
    out = student.denoise(x, torch.full((64,), student.sigma_min, dtype=torch.float64))
    assert torch.equal(out, x)
    # ... and not the identity anywhere else (the network does act).
    assert (student.denoise(x, torch.full((64,), 0.5, dtype=torch.float64)) - x).abs().max() > 1e-3


@pytest.mark.parametrize("sched", [EDM_SCHED, VP_SCHED], ids=["edm", "vp"])
def test_consistency_boundary_teacher_copy_float32(sched):
    teacher = tiny_teacher(sched)
    student = build_student("consistency", teacher)
    x = torch.randn(4, 1, 8, 8)
    out = student.denoise(x, torch.full((4,), student.sigma_min))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    assert (student.denoise(x, torch.full((4,), 1.0)) - x).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_jump_to_same_level_is_identity(kind):
    student = build_student(kind, ring(), init="fresh", hidden=16, depth=1).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    s = torch.rand(8, dtype=torch.float64) * 5 + 0.01
    torch.testing.assert_close(student(x, s, s), x, rtol=0, atol=1e-14)


def test_generator_ignores_target_level_and_flowmap_does_not():
    x, s = torch.randn(8, 2), torch.full((8,), 2.0)
    gen = build_student("generator", ring(), init="fresh", hidden=16, depth=1)
    fm = build_student("flowmap", ring(), init="fresh", hidden=16, depth=1)
    assert torch.equal(gen.x0_estimate(x, s, s * 0.1), gen.x0_estimate(x, s, s * 0.5))
    assert not torch.allclose(fm.x0_estimate(x, s, s * 0.1), fm.x0_estimate(x, s, s * 0.5))


# ---------------------------------------------------------------------------------------------------------------
# Teacher-copied students
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["generator", "flowmap", "trigflow"])
def test_teacher_copy_equals_teacher_at_init(edm_teacher, kind):
    student = build_student(kind, edm_teacher)
    x = 2 * torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    ref = edm_teacher(x, sigma)
    # TrigFlow's float32 time t = arctan(s / sd) is ill-conditioned near pi/2 (ds / s = dt / (sin t cos t)): at
    # s = 20 its rounding moves the copied UNet's EDM time by ~1e-5 (exact in float64: the v_prediction test below)
    atol = 1e-4 if kind == "trigflow" else 1e-6
    for t in (torch.zeros(3), sigma * 0.3):  # the flow map's target-level embedding starts at exactly zero
        torch.testing.assert_close(student.x0_estimate(x, sigma, t), ref, rtol=0, atol=atol)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in edm_teacher.parameters())
    assert student.training and not edm_teacher.training


def test_trigflow_copy_of_a_v_prediction_edm_teacher_equals_it_and_takes_trigflow_time():
    """v_prediction EDM networks carry TrigFlow's output sign already (sign +1); the raw call's time is t."""
    teacher = tiny_teacher({**EDM_SCHED, "prediction_type": "v_prediction"}, seed=3)
    student = build_student("trigflow", teacher).double()
    assert student.net.trig_time == {"sigma_data": 0.5, "sign": 1.0}
    x, sigma = 2 * torch.randn(3, 1, 8, 8, dtype=F64), torch.tensor([0.01, 0.7, 60.0], dtype=F64)
    teacher.net.double()
    torch.testing.assert_close(student.denoise(x, sigma), teacher(x, sigma), rtol=0, atol=1e-10)
    assert torch.equal(student.scalings(sigma)[3], torch.atan(sigma / 0.5))


def test_consistency_copy_matches_diffusers_consistency_pipeline_convention(edm_teacher):
    """f = c_skip x + c_out F(c_in x, 250 log s): the exact step of diffusers' CMStochasticIterativeScheduler."""
    from diffusers import CMStochasticIterativeScheduler

    student = build_student("consistency", edm_teacher)
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    for ts in ([39], [22], [5]):
        sched.set_timesteps(timesteps=ts)  # a single step: the scheduler adds no noise and returns f(x, sigma)
        t, sigma = sched.timesteps[0], sched.sigmas[0]
        x = float(sigma) * torch.randn(2, 1, 8, 8)
        scaled = sched.scale_model_input(x, t)
        ref = sched.step(edm_teacher.net(scaled, t).sample, t, x).prev_sample
        torch.testing.assert_close(student.denoise(x, sigma.expand(2)), ref, rtol=1e-5, atol=1e-5)


def test_flowmap_teacher_copy_rejects_class_conditional_teacher():
    teacher = tiny_teacher(num_class_embeds=4)
    with pytest.raises(ConfigError, match="without class labels"):
        build_student("flowmap", teacher)
    # The other kinds take the labels through the copied class embedding.
    student = build_student("generator", teacher)
    x, s, y = torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([0, 2])
    torch.testing.assert_close(student.denoise(x, s, y), teacher(x, s, y), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Config round trips and builder errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", ["fresh", "teacher"])
def test_config_round_trip(edm_teacher, kind, init):
    teacher = ring(conditional=True) if init == "fresh" else edm_teacher
    kw = {"hidden": 24, "depth": 2} if init == "fresh" else {}
    student = build_student(kind, teacher, init=init, **kw)
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = json.loads(json.dumps(student.config()))  # JSON-serialisable, no teacher object needed
    assert cfg["kind"] == kind
    clone = build_student_from_config(cfg)
    assert type(clone) is type(student)
    clone.load_state_dict(student.state_dict(), strict=True)
    x = torch.randn(3, *student.data_shape)
    s, t = torch.tensor([0.3, 2.0, 30.0]), torch.tensor([0.0, 0.5, 3.0])
    cond = torch.tensor([0, 3, 7]) if init == "fresh" else None
    assert torch.equal(clone(x, s, t, cond), student(x, s, t, cond))


def test_builder_errors(edm_teacher):
    with pytest.raises(ConfigError, match="valid keys: hidden, depth"):
        build_student("consistency", ring(), init="fresh", width=3)
    with pytest.raises(ConfigError, match="init: fresh"):
        build_student("consistency", ring(), init="teacher")
    with pytest.raises(ConfigError, match="valid inits: teacher, fresh"):
        build_student("consistency", ring(), init="random")
    with pytest.raises(ConfigError, match="valid students: consistency, flowmap, generator, trigflow"):
        build_student("cm", ring(), init="fresh")
    with pytest.raises(ConfigError, match="needs an EDM-family teacher network, got a vp one; use init: fresh"):
        build_student("trigflow", tiny_teacher(VP_SCHED))
    with pytest.raises(ConfigError, match="need init: fresh"):
        build_student("generator", edm_teacher, hidden=8)
    with pytest.raises(ConfigError, match="needs a 'kind'"):
        build_student_from_config({"data_shape": [2]})
    assert STUDENTS.names() == ["consistency", "flowmap", "generator", "trigflow"]


def test_mlp_denoiser_and_embedding_shapes():
    emb = sinusoidal_embedding(torch.linspace(-2, 2, 5), 8)
    assert emb.shape == (5, 8)
    torch.testing.assert_close(emb[:, :4] ** 2 + emb[:, 4:] ** 2, torch.ones(5, 4))
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(torch.zeros(2), 7)
    net = MLPDenoiser(3, hidden=16, depth=2, two_levels=True, num_classes=5)
    assert net(torch.randn(4, 3), torch.zeros(4), torch.ones(4), torch.tensor([0, 1, 2, 3])).shape == (4, 3)
    assert net(torch.randn(4, 3), torch.zeros(4), torch.ones(4)).shape == (4, 3)  # unconditional row
    with pytest.raises(ValueError, match="c_noise_to"):
        net(torch.randn(4, 3), torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------------
# The student sampler
# ---------------------------------------------------------------------------------------------------------------

M, S = 0.7, 0.4  # Gaussian data N(M, S^2) per coordinate


class ExactGaussianFlowMap(FlowMapStudent):
    """The exact flow map of N(M, S^2 I) data: J(x, s, t) = M + (x - M) sqrt((S^2 + t^2)/(S^2 + s^2)), written as the
    x0 estimate D with J = (t/s) x + (1 - t/s) D (the PF-ODE solution, docs/methods.md §4.0)."""

    def __init__(self) -> None:
        super().__init__((3,), 0.002, 80.0, S)

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        s, t = sigma_from[:, None], sigma_to[:, None]
        jump = M + (x - M) * ((S**2 + t**2) / (S**2 + s**2)).sqrt()
        return (jump - (t / s) * x) / (1 - t / s)


def test_exact_flow_map_gives_exact_ode_solution_for_any_step_count():
    student = ExactGaussianFlowMap()
    noise = torch.randn(256, 3, dtype=torch.float64)
    exact = M + (80.0 * noise - M) * S / math.sqrt(S**2 + 80.0**2)
    for steps in (1, 2, 5, 17):
        sigmas = torch.cat([torch.logspace(math.log10(80.0), -2, steps, dtype=torch.float64), torch.zeros(1)])
        with count_nfe(student, "x0_estimate") as c:
            out = sample_student(student, noise, sigmas, gamma=0.0)
        assert c.nfe == steps  # one network evaluation per jump
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)


def test_gamma_zero_is_deterministic():
    student = build_student("flowmap", ring(), init="fresh", hidden=16, depth=2)
    noise, sigmas = torch.randn(32, 2), torch.tensor([80.0, 2.0, 0.3, 0.0])
    a = sample_student(student, noise, sigmas, 0.0, generator=torch.Generator().manual_seed(1))
    b = sample_student(student, noise, sigmas, 0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sample_student(student, noise, sigmas, 0.5, generator=torch.Generator().manual_seed(1))
    d = sample_student(student, noise, sigmas, 0.5, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, d)  # gamma > 0 does draw fresh noise


def test_gamma_one_is_multistep_consistency_sampling():
    student = build_student("consistency", ring(), init="fresh", hidden=16, depth=2)
    noise, taus = torch.randn(64, 2), [80.0, 1.5, 0.4]
    sigmas = torch.tensor(taus + [0.0])
    with count_nfe(student, "x0_estimate") as c:
        out = sample_student(student, noise, sigmas, 1.0, generator=torch.Generator().manual_seed(3))
    assert c.nfe == 3

    # Hand-written multistep CM sampling (arXiv:2303.01469 Alg. 1): x = f(x_T, T); x_tau = x + tau z; x = f(x_tau, tau)
    g = torch.Generator().manual_seed(3)
    x = student.denoise(taus[0] * noise, torch.full((64,), taus[0]))
    for tau in taus[1:]:
        x_tau = x + tau * torch.randn(x.shape, generator=g)
        x = student.denoise(x_tau, torch.full((64,), tau))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_gamma_sampling_renoises_to_the_right_marginal():
    """An exact flow map with gamma-noise keeps the exact marginal: output mean M, std S for any gamma."""
    student = ExactGaussianFlowMap()
    noise = torch.randn(20000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_student(student, noise, torch.tensor([80.0, 3.0, 0.5, 0.0], dtype=torch.float64), 0.6,
                         generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - M) < 0.01 and abs(out.std().item() - S) < 0.01


def test_sampler_rejects_bad_arguments():
    student = ExactGaussianFlowMap()
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="gamma must lie in"):
        sample_student(student, noise, torch.tensor([1.0, 0.0]), gamma=1.5)
    with pytest.raises(ValueError, match="end in 0"):
        sample_student(student, noise, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="descending"):
        sample_student(student, noise, torch.tensor([1.0, 2.0, 0.0]))


def _rk4_pf_ode(teacher, x: torch.Tensor, s: float, t: float, steps: int = 400) -> torch.Tensor:
    """Solve the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3) from s to t > 0 with classical RK4 on a
    geometric sigma grid, using only the teacher's denoiser."""
    grid = torch.logspace(math.log10(s), math.log10(t), steps + 1, dtype=torch.float64)

    def f(x, sig):
        sv = torch.full((x.shape[0],), float(sig), dtype=torch.float64)
        return (x - teacher(x, sv)) / sig

    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_exact_gaussian_flow_map_matches_an_ode_solve_of_the_analytic_teacher():
    """The test's closed-form flow map against an independent route: RK4 on the PF-ODE driven by the analytic
    (Tweedie) Gaussian teacher, from several s to several t, including t -> 0."""
    teacher = GaussianMixtureTeacher(torch.full((1, 3), M, dtype=torch.float64), S)
    student = ExactGaussianFlowMap()
    g = torch.Generator().manual_seed(4)
    for s, t in ((5.0, 1.0), (2.0, 0.05), (0.8, 0.3), (3.0, 1e-6)):
        x = M + math.sqrt(S**2 + s**2) * torch.randn(8, 3, dtype=torch.float64, generator=g)
        sv, tv = torch.full((8,), s, dtype=torch.float64), torch.full((8,), t, dtype=torch.float64)
        torch.testing.assert_close(student(x, sv, tv), _rk4_pf_ode(teacher, x, s, t), rtol=1e-7, atol=1e-7)
    assert isinstance(build_student("consistency", ring(), init="fresh", hidden=8, depth=1), ConsistencyStudent)


# ---------------------------------------------------------------------------------------------------------------
# Structure: parameterisation x backbone, the jvp entry point, no teacher internals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sched", [VP_SCHED, dict(VP_SCHED, prediction_type="v_prediction"),
                                   {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}],
                         ids=["vp-eps", "vp-v", "flow"])
def test_vp_and_flow_teacher_copies_equal_the_teacher_at_init(sched):
    teacher = tiny_teacher(sched)
    x, sigma = 2 * torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 20.0])
    ref = teacher(x, sigma)
    for kind in ("generator", "flowmap"):
        student = build_student(kind, teacher)
        torch.testing.assert_close(student.x0_estimate(x, sigma, 0.3 * sigma), ref, rtol=1e-5, atol=1e-5)
    clone = build_student_from_config(json.loads(json.dumps(student.config())))
    clone.load_state_dict(student.state_dict())
    assert torch.equal(clone.denoise(x, sigma), student.denoise(x, sigma))


def test_trigflow_student_boundary_and_round_trip():
    student = build_student("trigflow", ring(), init="fresh", hidden=16, depth=2).double()
    x = torch.randn(6, 2, dtype=F64)
    zero = torch.zeros(6, dtype=F64)
    assert torch.equal(student.x0_estimate(x, zero, zero), x)  # f(x, 0) = x (sCM boundary)
    s = torch.full((6,), 0.8, dtype=F64)
    c_skip, c_out, c_in, c_noise = student.scalings(s)
    f = student.raw(c_in[:, None] * x, c_noise)
    torch.testing.assert_close(student.x0_estimate(x, s, zero), c_skip[:, None] * x + c_out[:, None] * f)
    clone = build_student_from_config(json.loads(json.dumps(student.config()))).double()
    clone.load_state_dict(student.state_dict())
    assert torch.equal(clone(x, s, 0.2 * s), student(x, s, 0.2 * s))


def test_unet_backbone_jvp_matches_central_differences():
    """torch.func.jvp through the raw UNet backbone (flow map: both noise inputs) vs central finite differences.

    float32: diffusers' timestep embedding casts to float32 (a float64 flow-map UNet does not run), so the UNet's
    timestep per unit c_noise is 1 here (edm_timestep_scale 0.25) to keep h = 3e-3 differences well resolved."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    student = build_student("flowmap", tiny_teacher(scale=0.25))
    assert student.net.timestep_scale == 1.0
    with torch.no_grad():  # make the zero-initialised target-level path act
        for p in student.net.unet.class_embedding.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(5)
    x_in = torch.randn(2, 1, 8, 8, generator=g)
    primals = (x_in, torch.tensor([0.3, -0.5]), torch.tensor([-0.2, -1.0]))
    tangents = (torch.randn(x_in.shape, generator=g), torch.tensor([1.0, -0.5]), torch.tensor([0.7, 2.0]))
    fn = student.raw_fn()
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        _, jvp = torch.func.jvp(fn, primals, tangents)
        h = 3e-3
        plus = fn(*(p + h * v for p, v in zip(primals, tangents)))
        minus = fn(*(p - h * v for p, v in zip(primals, tangents)))
        fd = (plus - minus) / (2 * h)
        # each direction acts (so a dropped tangent would be caught)
        for i in range(3):
            only = tuple(v if j == i else torch.zeros_like(v) for j, v in enumerate(tangents))
            assert torch.func.jvp(fn, primals, only)[1].norm() > 1e-2 * jvp.norm()
    assert (jvp - fd).norm() < 1e-3 * jvp.norm(), ((jvp - fd).norm() / jvp.norm()).item()


def test_students_hold_no_teacher_and_use_no_teacher_internals(edm_teacher):
    import ast
    from pathlib import Path

    import students as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "DiffusersTeacher" not in [a.name for a in node.names], path
            if isinstance(node, ast.ClassDef):
                assert "DiffusersTeacher" not in [ast.unparse(b) for b in node.bases], path
            if isinstance(node, ast.Attribute):  # no private teacher methods
                assert node.attr not in ("_net", "sigma_to_timestep"), (path, node.lineno)
    for kind in KINDS:
        student = build_student(kind, edm_teacher)
        assert not any(isinstance(m, DiffusersTeacher) for m in student.modules())
        assert isinstance(student.net, UNetBackbone) and student.net.mid_block is student.net.unet.mid_block
        assert "net.unet.mid_block" in dict(student.named_modules())
    assert isinstance(build_student("generator", ring(), init="fresh").net, MLPDenoiser)
