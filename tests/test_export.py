"""Export of a UNet consistency student to diffusers' ConsistencyModelPipeline: one step must match ours exactly."""

from __future__ import annotations

import pytest
import torch

from distill.export import export_consistency_pipeline
from students import build_student, sample_student
from teachers import DiffusersTeacher
from teachers.nets import small_unet


def tiny_edm_teacher(scale: float = 250.0) -> DiffusersTeacher:
    torch.manual_seed(0)
    net = small_unet(8, 1, (8, 16), norm_num_groups=4, attention_head_dim=4)
    return DiffusersTeacher(net, {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
                                  "sigma_data": 0.5, "prediction_type": "epsilon"}, edm_timestep_scale=scale)


def test_consistency_pipeline_one_step_matches(tmp_path):
    from diffusers import ConsistencyModelPipeline

    student = build_student("consistency", tiny_edm_teacher()).eval()
    with torch.no_grad():  # perturb so the check does not pass by accident at the teacher's weights
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sampling = {"sigmas": {"1": [80.0, 0.0], "2": [80.0, 0.4, 0.0]}, "gamma": 1.0}
    note = export_consistency_pipeline(student, tmp_path / "pipe", sampling)
    assert "timesteps=[0," in note
    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = sample_student(student, z, torch.tensor([80.0, 0.0], dtype=torch.float64))
        # diffusers' check_inputs assumes 3-channel latents, so the 1-channel noise goes in through the generator
        # (randn_tensor on CPU draws exactly torch.randn with it).
        theirs = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(1),
                      output_type="pt").images
    want = (ours / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(theirs, want, atol=1e-5), (theirs - want).abs().max()


def test_pipeline_export_refuses_other_students(tmp_path):
    with pytest.raises(NotImplementedError, match="no pipeline for a generator"):
        export_consistency_pipeline(build_student("generator", tiny_edm_teacher()), tmp_path / "g", {"sigmas": {}})
    with pytest.raises(NotImplementedError, match="edm_timestep_scale=250"):
        export_consistency_pipeline(build_student("consistency", tiny_edm_teacher(0.25)), tmp_path / "c",
                                    {"sigmas": {}})


def _write_export(student, folder):
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "student_config.json").write_text(json.dumps(student.config()))


def test_warm_start_from_an_export_loads_its_weights_and_refuses_misfits(tmp_path):
    from distill.core.registry import ConfigError
    from distill.export import warm_start_student

    teacher = tiny_edm_teacher()
    trained = build_student("flowmap", teacher)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _write_export(trained, tmp_path / "ok")
    fresh = build_student("flowmap", teacher)
    warm_start_student(fresh, tmp_path / "ok")
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="holds a 'flowmap' student, the config builds a 'consistency' one"):
        warm_start_student(build_student("consistency", teacher), tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="not an exported student folder"):
        warm_start_student(fresh, tmp_path / "missing")
    other = build_student("flowmap", DiffusersTeacher(small_unet(8, 1, (8, 8), norm_num_groups=4, attention_head_dim=4),
                                                      {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002,
                                                       "sigma_max": 80.0, "sigma_data": 0.5,
                                                       "prediction_type": "epsilon"}, edm_timestep_scale=250.0))
    with pytest.raises(ConfigError, match="does not fit the configured student"):
        warm_start_student(other, tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        warm_start_student(fresh, tmp_path / "ok")



@pytest.mark.parametrize("name, divergence", [("digits_ayf_dm", "reverse_kl"), ("digits_ayf_sim", "sim")])
def test_config_from_export_starts_the_run_from_the_exported_weights(tmp_path, name, divergence):
    """``student.from_export`` in the shipped fine-tune configs: the built student carries the export's weights, not
    the teacher copy's."""
    from pathlib import Path

    from distill.config import load_config
    from distill.train import build_components
    from teachers import build_teacher

    trained = build_student("flowmap", build_teacher({"name": "digits"}))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _write_export(trained, tmp_path / "ayf")
    cfg_path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    _, student, loss = build_components(load_config(cfg_path, [f"student.from_export={tmp_path / 'ayf'}"]))
    assert loss.phases == ("critic", "student") and loss.dm_weight > 0 and loss.dm_divergence == divergence
    for (k, a), b in zip(trained.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), k
