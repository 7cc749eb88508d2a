"""``distill train`` -> ``distill export`` -> ``Pipeline.from_pretrained(export/diffusers)`` round trips on the tiny
latent teachers: the pipeline, given the exported timesteps/sigmas, the same initial latents (scaled by the
exported ``latents_scale``) and the same re-noising draws, reproduces the toolkit's own student samples
(``students.sample_student`` at the exported levels) in latent space (``output_type="latent"``) and in pixels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _tiny_models as tm  # noqa: E402

torch.set_num_threads(1)
CD = "{name: cd, num_levels: 6, solver: euler, x0_source: teacher, teacher_steps: 2}"
DMD2 = "{name: dmd2, critic_updates: 1, fake_init: teacher}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tm.all_folders(tmp_path_factory.mktemp("tiny"))


def _train_and_export(folders, tmp_path, kind, loss, student, steps=3, extra=""):
    """A ``steps``-iteration ``distill train`` on the tiny ``kind`` teacher, exported with ``distill export``."""
    from distill.cli import main

    phases = {"student": ""} if student == "consistency" else {"student": ", betas: [0.0, 0.999]",
                                                               "critic": ", betas: [0.0, 0.999]"}
    cfg = tm.write_run_config(tmp_path / "run.yaml", name=f"tiny_{kind}", out_dir=tmp_path / "run",
                              teacher=folders[kind], prompts=None if kind == "dit" else folders["prompts"],
                              cache_dir=tmp_path / "cache", student=student, loss=loss, phases=phases, lr=1e-3,
                              batch_size=2, ema=0.5, steps=steps, nfe=(1, 2), extra=extra)
    assert main(["train", str(cfg), "--no-final-eval"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    return tmp_path / "export"


def _load(export):
    import diffusers

    sampling = json.loads((export / "sampling.json").read_text())
    rec = sampling["pipeline"]
    kw = {"text_encoder_3": None, "tokenizer_3": None} if rec["class"] == "StableDiffusion3Pipeline" else {}
    pipe = getattr(diffusers, rec["class"]).from_pretrained(export / "diffusers", local_files_only=True,
                                                            trust_remote_code=rec["trust_remote_code"], **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sampling, rec


def _ours(export, sampling, rec, nfe, z, cond, renoise):
    from distill.export import load_exported
    from students import sample_student

    student, _ = load_exported(export)
    levels = torch.tensor(rec["levels"][str(nfe)], dtype=torch.float64)
    with torch.no_grad():
        return student, sample_student(student, z, levels, sampling["gamma"], cond, renoise=renoise)


@pytest.mark.parametrize("kind,loss,student", [
    ("sd", CD, "consistency"),
    ("sd", DMD2, "generator"),
    ("sdxl", CD, "consistency"),
    ("sd3", CD, "consistency"),
    ("sd3", DMD2, "generator"),
])
def test_text_pipeline_round_trip(folders, tmp_path, kind, loss, student):
    from distill.export_pipelines import exported_eval_kwargs

    export = _train_and_export(folders, tmp_path, kind, loss, student)
    pipe, sampling, rec = _load(export)
    card = (export / "README.md").read_text()
    assert rec["class"] in card and rec["scheduler"] in card
    assert rec["trust_remote_code"] == (student == "consistency")
    prompts = [tm.PROMPTS[1], tm.PROMPTS[3]]
    kw = exported_eval_kwargs(export, sampling)
    from safetensors.torch import load_file

    table = load_file(str(export / "prompts.safetensors"))
    idx = torch.tensor([1, 3])
    from distill.core.cond import Cond

    cond = Cond(embeds=table["embeds"][idx], pooled=table["pooled"][idx] if "pooled" in table else None,
                added={"time_ids": table["time_ids"][idx]} if "time_ids" in table else {})
    for nfe in (1, 2):
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(nfe))
        g = torch.Generator().manual_seed(10 + nfe)
        renoise = torch.stack([torch.randn(2, 4, 8, 8, generator=g) for _ in range(nfe - 1)]) if nfe > 1 else None
        _, ours = _ours(export, sampling, rec, nfe, z, cond, renoise)
        call = dict(prompt=prompts, guidance_scale=1.0, latents=rec["latents_scale"] * z)
        if rec["scheduler"] == "LCMScheduler":
            call.update(timesteps=rec["timesteps"][str(nfe)], num_inference_steps=None)
        else:
            call.update(sigmas=rec["sigmas"][str(nfe)], num_inference_steps=nfe)
        with torch.no_grad():
            # the re-noising draws come from the pipeline's generator (SD, SDXL; a fresh one per call) or, where
            # the pipeline does not pass it to the scheduler (SD3), from torch's global RNG
            torch.manual_seed(10 + nfe)
            lat = pipe(**call, generator=torch.Generator().manual_seed(10 + nfe), output_type="latent").images
            torch.manual_seed(10 + nfe)
            img = pipe(**call, generator=torch.Generator().manual_seed(10 + nfe), output_type="pt").images \
                if kind != "sd3" else None  # the tiny VAE has no shift_factor, which SD3's decoding needs
        torch.testing.assert_close(lat, ours, rtol=1e-4, atol=1e-4)
        if img is None:
            continue
        with torch.no_grad():
            px = (kw["decode"](ours) / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(img, px, rtol=1e-4, atol=1e-4)


def test_dit_pipeline_one_step(folders, tmp_path):
    """DiTPipeline takes no latents or timesteps: 1 NFE from the same generator (its timestep is LCM's 999, the
    student's sigma_max) equals the toolkit's 1-step sample, in pixels."""
    from distill.export_pipelines import exported_eval_kwargs

    export = _train_and_export(folders, tmp_path, "dit", CD, "consistency")
    pipe, sampling, rec = _load(export)
    assert rec["timesteps"]["1"] == [999]
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 5, 7])
    _, ours = _ours(export, sampling, rec, 1, z / rec["latents_scale"], labels, None)
    with torch.no_grad():
        img = pipe(class_labels=labels.tolist(), num_inference_steps=1, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(4), output_type="pt").images
        px = (exported_eval_kwargs(export, sampling)["decode"](ours) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(img, px, rtol=1e-4, atol=1e-4)


def test_latent_export_samples_without_the_teacher(folders, tmp_path):
    """``distill sample --student`` on a latent export decodes to pixels with the exported VAE and prompts."""
    import numpy as np

    from distill.cli import main

    export = _train_and_export(folders, tmp_path, "sd", CD, "consistency", steps=1)
    assert main(["sample", "--student", str(export), "--n", "3", "--out", str(tmp_path / "s")]) == 0
    x = np.load(tmp_path / "s" / "samples.npy")
    assert x.shape == (3, 3, 16, 16) and np.isfinite(x).all() and np.abs(x).max() <= 1.0


def test_unexportable_student_says_why(folders, tmp_path, capsys):
    """No pipeline folder for what a pipeline cannot load: ``distill export`` still writes the standalone student and
    prints one line saying why (here: a teacher folder without model_index.json); a student kind the schedulers
    cannot run is refused with one line."""
    import shutil

    from distill.export_pipelines import export_latent_pipeline

    bare = tmp_path / "bare_sd"
    shutil.copytree(folders["sd"], bare)
    (bare / "model_index.json").unlink()
    export = _train_and_export({**folders, "sd": bare}, tmp_path, "sd", CD, "consistency", steps=1)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "no diffusers/ pipeline folder" in ln]
    assert len(lines) == 1 and "model_index.json" in lines[0]
    assert not (export / "diffusers").exists() and (export / "vae").is_dir()

    class Flowmap:
        kind = "flowmap"

    cfg = {"teacher": {"name": "diffusers", "path": str(folders["sd"])}}
    with pytest.raises(NotImplementedError) as e:
        export_latent_pipeline(Flowmap(), tmp_path / "x", {"gamma": 1.0, "sigmas": {}}, cfg)
    assert "\n" not in str(e.value) and "flowmap" in str(e.value)
