"""Teachers against closed forms: exact Gaussian-mixture teachers, the diffusers adapter's conversions for every
family / prediction type, save/load round trips, and the shipped digits teacher."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.core.nfe import count_nfe
from distill.core.registry import ConfigError
from teachers import TEACHERS, build_teacher
from teachers.analytic import GaussianMixtureTeacher, ring
from teachers.diffusers_teacher import DiffusersTeacher, load_diffusers_teacher

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _sigmas(n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# (a) Exact Gaussian-mixture teachers
# ---------------------------------------------------------------------------------------------------------------


def _hetero_mixture() -> GaussianMixtureTeacher:
    means = torch.tensor([[[0.0, 1.0, -1.0]], [[2.0, -1.0, 0.5]], [[-2.0, 0.0, 1.5]]], dtype=F64)  # [3, 1, 3]
    return GaussianMixtureTeacher(means, torch.tensor([0.1, 0.3, 0.0]), weights=torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("make", [lambda: ring(8, 2.0, 0.05), _hetero_mixture], ids=["ring", "hetero3d"])
def test_gmm_denoiser_is_tweedie(make):
    """D*(x, sigma) = x + sigma^2 grad_x log p_sigma(x) (Tweedie / Robbins; Efron 2011), by autograd of log_prob."""
    t = make()
    g = torch.Generator().manual_seed(0)
    sigma = _sigmas(16, 0.01, 50.0)
    x0 = t.sample(16, generator=g).to(F64)
    x = (x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * torch.randn(x0.shape, generator=g, dtype=F64)).requires_grad_()
    (grad,) = torch.autograd.grad(t.log_prob(x, sigma).sum(), x)
    expected = x.detach() + sigma.view(-1, *[1] * (x.ndim - 1)) ** 2 * grad
    torch.testing.assert_close(t(x.detach(), sigma), expected, rtol=1e-9, atol=1e-9)


def test_conditional_gmm_gives_component_denoiser_and_cfg_costs_two_nfe():
    t = ring(8, 2.0, 0.05, conditional=True)
    assert t.num_classes == 8
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(12, 2, generator=g, dtype=F64)
    sigma = _sigmas(12, 0.02, 20.0)
    k = torch.arange(12) % 8
    s2, sig2 = 0.05**2, sigma[:, None] ** 2
    exact = (s2 * x + sig2 * t.means[k]) / (s2 + sig2)  # Gaussian posterior mean of component k
    torch.testing.assert_close(t(x, sigma, k), exact, rtol=1e-12, atol=1e-12)

    d_u = t(x, sigma)
    w = 3.5
    with count_nfe(t) as c:
        out = t(x, sigma, k, guidance=w)
    assert c.nfe == 2
    torch.testing.assert_close(out, d_u + w * (exact - d_u), rtol=1e-12, atol=1e-12)
    with count_nfe(t) as c:
        t(x, sigma, k, guidance=1.0)
    assert c.nfe == 1


def test_gmm_samples_have_the_right_mass_and_std():
    means = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=F64)
    stds, weights = torch.tensor([0.1, 0.4, 0.2], dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    t = GaussianMixtureTeacher(means, stds, weights=weights)
    x, labels = t.sample(60_000, generator=torch.Generator().manual_seed(2), return_labels=True)
    # Labels agree with the nearest mode (the modes are > 12 std apart), so mass is checked on positions.
    assert torch.equal(torch.cdist(x.to(F64), means).argmin(1), labels)
    mass = torch.bincount(labels, minlength=3).to(F64) / len(labels)
    torch.testing.assert_close(mass, weights, atol=0.008, rtol=0)  # binomial std <= 0.002
    for k in range(3):
        std_k = (x[labels == k].to(F64) - means[k]).std(0)  # per-axis
        torch.testing.assert_close(std_k, stds[k].expand(2), rtol=0.03, atol=0)


def test_empirical_digits_teacher_is_exact_at_the_extremes():
    from distill.core.data import load_digits_tensor

    data = load_digits_tensor()[0].to(F64)
    t = build_teacher({"name": "empirical_digits"})
    assert t.data_shape == (1, 8, 8) and t.n_components == 1797
    x = data[:4]
    # At tiny sigma the nearest data point is returned; at huge sigma the posterior is uniform: the data mean.
    torch.testing.assert_close(t(x, torch.full((4,), 1e-3, dtype=F64)), x, rtol=0, atol=1e-9)
    far = t(torch.zeros(2, 1, 8, 8, dtype=F64), torch.full((2,), 1e4, dtype=F64))
    torch.testing.assert_close(far, data.mean(0, keepdim=True).expand(2, -1, -1, -1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (b) DiffusersTeacher conversions, with a fake network that is exact for Gaussian data
# ---------------------------------------------------------------------------------------------------------------

M, S = 0.3, 0.7  # data ~ N(M, S^2) per pixel


def gauss_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact VE denoiser of N(M, S^2): (S^2 x + sigma^2 M) / (S^2 + sigma^2). ``x: [B, ...]``, ``sigma: [B]``."""
    s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
    return (S**2 * x + s2 * M) / (S**2 + s2)


class FakeGaussianNet(nn.Module):
    """Returns the exact eps / v / x0 / EDM-F / flow velocity of N(M, S^2) data, in its *own* coordinates and
    timestep, i.e. it inverts the documented timestep maps independently of the adapter."""

    def __init__(self, family: str, prediction_type: str, *, log_sigmas=None, edm_scale=None, sigma_data=0.5,
                 num_train_timesteps=1000, shape=(1, 4, 4)):
        super().__init__()
        self.config = {"in_channels": shape[0], "sample_size": shape[1], "num_class_embeds": None}
        self.family, self.pred = family, prediction_type
        self.log_sigmas, self.edm_scale, self.sd, self.T = log_sigmas, edm_scale, sigma_data, num_train_timesteps
        self.seen_timesteps: list[torch.Tensor] = []

    def forward(self, sample, timestep, class_labels=None):
        self.seen_timesteps.append(timestep)
        t = timestep.to(F64)
        bc = lambda v: v.view(-1, *[1] * (sample.ndim - 1))  # noqa: E731
        if self.family == "vp":
            # Fractional index into the table, linear in log sigma (k-diffusion's discrete wrapper convention).
            ls = self.log_sigmas
            lo = t.floor().long().clamp(0, ls.numel() - 2)
            sigma = (ls[lo] + (t - lo) * (ls[lo + 1] - ls[lo])).exp()
            abar = 1 / (1 + sigma**2)
            x = sample / bc(abar.sqrt())
            x0 = gauss_denoiser(x, sigma)
            eps = (x - x0) / bc(sigma)
            out = {"epsilon": eps, "sample": x0,
                   "v_prediction": bc(abar.sqrt()) * eps - bc((1 - abar).sqrt()) * x0}[self.pred]
        elif self.family == "edm":
            sigma = (t / self.edm_scale).exp()
            s, sd = bc(sigma), self.sd
            c_in, c_skip = 1 / (s**2 + sd**2).sqrt(), sd**2 / (s**2 + sd**2)
            c_out = s * sd / (s**2 + sd**2).sqrt()
            x = sample / c_in
            out = (gauss_denoiser(x, sigma) - c_skip * x) / c_out
            if self.pred == "v_prediction":
                out = -out
        else:  # rectified flow: x_t = (1 - t) x0 + t eps, velocity u = eps - x0
            rt = t / self.T
            sigma = rt / (1 - rt)
            x = sample / bc(1 - rt)
            x0 = gauss_denoiser(x, sigma)
            out = (x - x0) / bc(sigma) - x0
        return SimpleNamespace(sample=out.to(sample.dtype))


def _config(cls_name: str, **kwargs) -> dict:
    import diffusers

    cfg = dict(getattr(diffusers, cls_name)(**kwargs).config)
    cfg["_class_name"] = cls_name
    return cfg


def _check_exact(teacher: DiffusersTeacher, lo: float, hi: float) -> None:
    g = torch.Generator().manual_seed(3)
    sigma = _sigmas(24, lo, hi)
    x0 = M + S * torch.randn(24, 1, 4, 4, generator=g, dtype=F64)
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=F64)
    torch.testing.assert_close(teacher(x, sigma), gauss_denoiser(x, sigma), rtol=1e-5, atol=1e-5)


VP_CASES = [
    ("DDPMScheduler", {}, "epsilon"),
    ("DDPMScheduler", {}, "v_prediction"),
    ("DDPMScheduler", {}, "sample"),
    ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2"}, "epsilon"),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, "v_prediction"),
    ("DDIMScheduler", {}, "sample"),
]


@pytest.mark.parametrize("cls_name,kwargs,pred", VP_CASES, ids=[f"{c}-{k.get('beta_schedule', 'linear')}-{p}"
                                                                for c, k, p in VP_CASES])
def test_vp_adapter_reproduces_gaussian_denoiser(cls_name, kwargs, pred):
    import diffusers

    cfg = _config(cls_name, prediction_type=pred, **kwargs)
    # The fake net takes its table from the scheduler class itself, not from the adapter.
    abar = getattr(diffusers, cls_name)(**kwargs).alphas_cumprod.to(F64)
    table = ((1 - abar) / abar).sqrt()
    net = FakeGaussianNet("vp", pred, log_sigmas=table.log())
    teacher = DiffusersTeacher(net, cfg)
    assert teacher.info.extra["family"] == "vp" and teacher.prediction_type == pred
    assert teacher.sigma_min == pytest.approx(float(table[0]))
    assert teacher.sigma_max == pytest.approx(min(float(table[-1]), 80.0))
    torch.testing.assert_close(teacher.native_sigmas(), table.flip(0))
    _check_exact(teacher, max(0.01, 1.001 * float(table[0])), min(50.0, 0.999 * float(table[-1])))
    # Table levels map to integer timesteps.
    t = teacher.sigma_to_timestep(table[[0, 10, 500, 999]])
    torch.testing.assert_close(t, torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=F64))


@pytest.mark.parametrize("pred,scale,sd", [("epsilon", 0.25, 0.5), ("epsilon", 250.0, 0.5),
                                           ("v_prediction", 250.0, 0.5), ("epsilon", 250.0, 1.0)])
def test_edm_adapter_reproduces_gaussian_denoiser(pred, scale, sd):
    cfg = _config("EDMEulerScheduler", prediction_type=pred, sigma_data=sd)
    net = FakeGaussianNet("edm", pred, edm_scale=scale, sigma_data=sd)
    teacher = DiffusersTeacher(net, cfg, edm_timestep_scale=scale)
    assert teacher.sigma_data == sd and (teacher.sigma_min, teacher.sigma_max) == (0.002, 80.0)
    _check_exact(teacher, 0.01, 50.0)
    sigma = torch.tensor([0.5, 2.0], dtype=F64)
    teacher(torch.zeros(2, 1, 4, 4, dtype=F64), sigma)
    torch.testing.assert_close(net.seen_timesteps[-1], scale * sigma.log())  # c_noise = scale * ln(sigma)


def test_flow_adapter_reproduces_gaussian_denoiser():
    cfg = _config("FlowMatchEulerDiscreteScheduler")
    teacher = DiffusersTeacher(FakeGaussianNet("flow", "epsilon"), cfg)
    assert teacher.info.extra["family"] == "flow"
    _check_exact(teacher, 0.01, 50.0)


def test_unsupported_prediction_type_is_one_clear_error():
    cfg = _config("EDMEulerScheduler")
    cfg["prediction_type"] = "sample"
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'.*valid: epsilon, v_prediction"):
        DiffusersTeacher(FakeGaussianNet("edm", "epsilon", edm_scale=0.25), cfg)


# ---------------------------------------------------------------------------------------------------------------
# (c) Save / load round trips with tiny random UNets
# ---------------------------------------------------------------------------------------------------------------


def _tiny_unet(**kwargs):
    from teachers.nets import small_unet

    torch.manual_seed(0)
    return small_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, **kwargs)


def _xs(n=3):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([0.05, 1.0, 30.0][:n])


@pytest.mark.parametrize("cfg", [("EDMEulerScheduler", {}), ("DDPMScheduler", {"prediction_type": "v_prediction"})],
                         ids=["edm", "vp-v"])
def test_save_load_round_trip_is_identical(tmp_path, cfg):
    teacher = DiffusersTeacher(_tiny_unet(), _config(cfg[0], **cfg[1]), edm_timestep_scale=250.0)
    teacher.save_pretrained(tmp_path)
    loaded = load_diffusers_teacher(tmp_path)
    assert loaded.family == teacher.family and loaded.prediction_type == teacher.prediction_type
    assert loaded.edm_timestep_scale == (250.0 if teacher.family == "edm" else 0.25)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x, sigma = _xs()
    torch.testing.assert_close(loaded(x, sigma), teacher(x, sigma), rtol=0, atol=1e-6)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_class_conditional_round_trip_with_null_class_and_cfg(tmp_path):
    teacher = DiffusersTeacher(_tiny_unet(num_class_embeds=11), _config("EDMEulerScheduler"), null_class=10,
                               edm_timestep_scale=250.0)
    assert teacher.num_classes == 10
    teacher.save_pretrained(tmp_path)
    loaded = load_diffusers_teacher(tmp_path)
    assert loaded.null_class == 10 and loaded.num_classes == 10
    x, sigma = _xs()
    cond = torch.tensor([1, 4, 7])
    d_c = loaded(x, sigma, cond)
    d_u = loaded(x, sigma, torch.full((3,), 10))
    torch.testing.assert_close(loaded(x, sigma), d_u)  # no label = the null class
    assert (d_c - d_u).abs().max() > 1e-4  # the label embedding actually changes the output
    with count_nfe(loaded) as c:
        out = loaded(x, sigma, cond, guidance=2.0)
    assert c.nfe == 2
    torch.testing.assert_close(out, d_u + 2.0 * (d_c - d_u))
    torch.testing.assert_close(out, teacher(x, sigma, cond, guidance=2.0), rtol=0, atol=1e-6)


def test_missing_folder_and_scheduler_raise_with_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_diffusers_teacher(missing)
    _tiny_unet().save_pretrained(tmp_path / "t" / "unet")
    with pytest.raises(FileNotFoundError, match=r"t'.*scheduler/scheduler_config\.json"):
        load_diffusers_teacher(tmp_path / "t")


def test_wrong_input_shape_names_both_shapes():
    teacher = DiffusersTeacher(_tiny_unet(), _config("EDMEulerScheduler"))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\].*\[2, 1, 4, 4\]"):
        teacher(torch.zeros(2, 1, 4, 4), torch.ones(2))


def test_shipped_loader_errors(tmp_path, monkeypatch):
    import teachers.shipped as shipped

    with pytest.raises(ConfigError, match="valid names: digits, digits_cond, mnist"):
        shipped.shipped_teacher_path("cifar")
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"digits.*python scripts/train_teacher\.py"):
        shipped.load_shipped_teacher("digits")


# ---------------------------------------------------------------------------------------------------------------
# The training script: EDM loss closed form and a 3-step run that saves a loadable teacher
# ---------------------------------------------------------------------------------------------------------------


def _train_script():
    spec = importlib.util.spec_from_file_location("train_teacher", ROOT / "scripts" / "train_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_edm_loss_is_one_for_the_exact_denoiser_of_gaussian_data():
    """For data N(0, sigma_d^2) the exact denoiser's error variance is sigma_d^2 sigma^2 / (sigma_d^2 + sigma^2),
    which EDM's weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 turns into exactly 1 at every sigma (eq. 8)."""
    mod = _train_script()
    sd = mod.SIGMA_DATA

    class Exact:
        def denoise(self, x, sigma, cond=None):
            s2 = sigma.view(-1, 1, 1, 1) ** 2
            return sd**2 * x / (sd**2 + s2)

    g = torch.Generator().manual_seed(5)
    y = sd * torch.randn(4096, 1, 4, 4, generator=g, dtype=F64)
    loss = mod.edm_loss(Exact(), y, -1.2, 1.2, generator=g)
    assert abs(loss.item() - 1.0) < 0.03  # chi-square(1) mean over 65k terms: std 0.006


def test_train_script_runs_and_saves_a_loadable_edm_teacher(tmp_path):
    mod = _train_script()
    out = tmp_path / "teacher"
    mod.main(["--steps", "3", "--batch-size", "8", "--warmup", "1", "--channels", "8", "16", "--threads", "1",
              "--out", str(out)])
    rec = json.loads((out / "training.json").read_text())
    assert rec["steps"] == 3 and rec["dataset"] == "digits" and math.isfinite(rec["final_loss"])
    t = load_diffusers_teacher(out)
    assert t.family == "edm" and t.edm_timestep_scale == 250.0 and t.sigma_data == 0.5
    assert t.scheduler_config["_class_name"] == "EDMEulerScheduler" and t.data_shape == (1, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# (d) The shipped digits teacher
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_digits_teacher_loads_and_denoises():
    from distill.core.data import load_digits_tensor

    t = TEACHERS.build("digits")
    assert isinstance(t, DiffusersTeacher) and t.family == "edm" and t.edm_timestep_scale == 250.0
    assert t.data_shape == (1, 8, 8) and t.sigma_data == 0.5 and (t.sigma_min, t.sigma_max) == (0.002, 80.0)
    assert not any(p.requires_grad for p in t.parameters())
    files = [p for p in (ROOT / "teachers" / "shipped" / "digits").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8e6
    x = load_digits_tensor()[0][:64]
    g = torch.Generator().manual_seed(6)
    n = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        # At sigma_min the denoiser is nearly the identity (c_skip ~ 1, c_out ~ sigma).
        small = torch.full((64,), 0.002)
        assert (t(x + 0.002 * n, small) - x).abs().max() < 0.02
        # At sigma = 0.3 it removes most of the noise: its error is well below the noise's.
        mid = torch.full((64,), 0.3)
        err = (t(x + 0.3 * n, mid) - x).pow(2).mean()
    assert err < 0.25 * 0.3**2
