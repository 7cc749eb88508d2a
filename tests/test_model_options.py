"""The ``model`` section (distill.model_options): one-line refusals of combinations that cannot work, gradient
checkpointing that changes nothing but memory, and accelerate's teacher offload that changes nothing but placement."""

import pytest
import torch

from distill.config import load_config
from distill.core.registry import ConfigError
from distill.train import build_components, build_module

DIGITS_CD = ["trainer.num_threads=1", "eval.every=0", "data.batch_size=4"]


@pytest.mark.parametrize("config,overrides,match", [
    ("configs/digits_cd.yaml", ["model.attention=flash"], "unknown model.attention 'flash'; valid: sdpa, xformers"),
    ("configs/digits_cd.yaml", ["model.teacher_offload=disk"], "unknown model.teacher_offload"),
    ("configs/digits_scm.yaml", ["model.attention=xformers"], "no forward-mode AD"),
    ("configs/digits_scm.yaml", ["model.gradient_checkpointing=true"], "forward-mode JVP"),
    ("configs/digits_cd.yaml", ["model.teacher_offload=cpu"], "needs trainer.accelerator: gpu"),
    ("configs/ring_cd.yaml", ["model.gradient_checkpointing=true"], "does not support it"),
])
def test_impossible_model_options_fail_with_one_line(config, overrides, match, tmp_path):
    cfg = load_config(config, [*DIGITS_CD, f"out_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=match) as e:
        build_components(cfg)
    assert "\n" not in str(e.value)


def test_xformers_is_refused_without_its_package_or_a_gpu(tmp_path):
    cfg = load_config("configs/digits_cd.yaml", [*DIGITS_CD, f"out_dir={tmp_path}", "model.attention=xformers"])
    with pytest.raises(ConfigError, match="xformers"):
        build_components(cfg)


def test_finite_difference_jvp_allows_checkpointing(tmp_path):
    cfg = load_config("configs/digits_scm.yaml", [*DIGITS_CD, f"out_dir={tmp_path}", "loss.jvp=finite_difference",
                                                  "model.gradient_checkpointing=true"])
    _, student, _ = build_components(cfg)
    assert student.net.unet.is_gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    """One CD iteration on the digits UNet with and without diffusers' gradient checkpointing: same loss, same
    gradients (checkpointing recomputes the forward; it must not change the math)."""
    out = []
    for flag in (False, True):
        cfg = load_config("configs/digits_cd.yaml", [*DIGITS_CD, f"out_dir={tmp_path}",
                                                     f"model.gradient_checkpointing={str(flag).lower()}"])
        module = build_module(cfg)
        module.prepare()
        module.configure_optimizers()
        module.student.train()
        assert module.student.net.unet.is_gradient_checkpointing is flag
        logs = module.iterate()
        out.append((float(logs["student/loss"]), [p.detach().clone() for p in module.student.parameters()]))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_offloaded_teacher_denoises_the_same():
    """accelerate's cpu_offload on the digits teacher (execution device: the CPU here; a GPU in real use) keeps the
    denoiser's values."""
    from distill.model_options import offload_teacher
    from teachers import build_teacher

    t = build_teacher({"name": "digits"})
    x, sigma = torch.randn(3, *t.data_shape), torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        want = t(x, sigma)
        nets = offload_teacher(t, "cpu")
        got = t(x, sigma)
    assert nets and all(p.device.type == "meta" for n in nets for p in n.parameters())  # weights left the network
    torch.testing.assert_close(got, want)
