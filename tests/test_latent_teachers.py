"""Latent diffusers teachers (``teachers.latent``) on tiny random pipelines saved with ``save_pretrained``.

For each kind (SD-style, SDXL-style, DiT, SD3): the folder loads through the one ``diffusers`` teacher entry; one
step of the teacher's denoiser (an Euler step in VE units, i.e. DDIM) agrees with diffusers' own scheduler ``step()``
on the raw network output the pipeline would compute, with and without classifier-free guidance (the pipeline's
``uncond + w (cond - uncond)`` prediction, built from the pipeline's own ``encode_prompt``); the VAE decodes to the
pixel shape; and every incomplete folder fails with one line naming the missing part.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _tiny_models as tm  # noqa: E402

from distill.core.solver_steps import euler_step  # noqa: E402
from teachers import build_teacher  # noqa: E402
from teachers.latent import DiTTeacher, TextLatentTeacher  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tm.all_folders(tmp_path_factory.mktemp("tiny"))


def _teacher(folders, kind, **kw):
    cfg = {"name": "diffusers", "path": str(folders[kind])}
    if kind != "dit":
        cfg["prompts"] = str(folders["prompts"])
    return build_teacher({**cfg, **kw})


def _pipeline(folder):
    import diffusers

    cls = json.loads((folder / "model_index.json").read_text())["_class_name"]
    kw = {"text_encoder_3": None, "tokenizer_3": None} if cls == "StableDiffusion3Pipeline" else {}
    return getattr(diffusers, cls).from_pretrained(folder, local_files_only=True, **kw)


@pytest.mark.parametrize("kind", list(tm.BUILDERS))
def test_loads_from_folder(folders, kind):
    t = _teacher(folders, kind)
    assert isinstance(t, DiTTeacher if kind == "dit" else TextLatentTeacher)
    assert t.data_shape == (4, 8, 8) and t.pixel_shape == (3, 16, 16) and t.latent and t.conditional
    assert t.info.extra["kind"] == kind
    assert t.info.extra["family"] == ("flow" if kind == "sd3" else "vp")
    assert not any(p.requires_grad for p in t.parameters())
    c = t.sample_cond(4, generator=torch.Generator().manual_seed(0))
    if kind == "dit":
        assert c.shape == (4,) and int(c.max()) < 10 and t.null_class == 10
    else:
        assert c.embeds.shape[0] == 4 and c.embeds.device.type == "cpu"
        assert (c.pooled is not None) == (kind in ("sdxl", "sd3"))
        assert ("time_ids" in c.added) == (kind == "sdxl")
        # same generator seed -> same prompts
        c2 = t.sample_cond(4, generator=torch.Generator().manual_seed(0))
        assert torch.equal(c.embeds, c2.embeds)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3"])
def test_prompt_embeddings_match_the_pipeline_and_are_cached(folders, kind, tmp_path):
    t = _teacher(folders, kind, cache_dir=str(tmp_path))
    files = list(tmp_path.glob("prompts_*.safetensors"))
    assert len(files) == 1
    pipe = _pipeline(folders[kind])
    kw = {} if kind == "sd" else ({"prompt_2": None} if kind == "sdxl" else {"prompt_2": None, "prompt_3": None})
    out = pipe.encode_prompt(prompt=tm.PROMPTS[1:3], device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=True, **kw)
    c = t.prompt_cond([1, 2])
    torch.testing.assert_close(c.embeds, out[0])
    null = t.null_cond(c)
    torch.testing.assert_close(null.embeds, out[1])
    if kind != "sd":
        torch.testing.assert_close(c.pooled, out[2])
        torch.testing.assert_close(null.pooled, out[3])
    # a cache hit gives identical tables without loading the text encoders
    before = files[0].stat().st_mtime_ns
    t2 = _teacher(folders, kind, cache_dir=str(tmp_path))
    assert files[0].stat().st_mtime_ns == before
    torch.testing.assert_close(t2.prompt_cond([1, 2]).embeds, c.embeds, rtol=0, atol=0)
    # another prompt set gets another cache file
    _teacher(folders, kind, cache_dir=str(tmp_path), prompts=["one prompt"])
    assert len(list(tmp_path.glob("prompts_*.safetensors"))) == 2


def _guided(out, w):
    if w == 1.0:
        return out[:1]
    return out[1:] + w * (out[:1] - out[1:])


@pytest.mark.parametrize("w", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["sd", "sdxl", "dit", "sd3"])
def test_one_step_matches_the_scheduler(folders, kind, w):
    """One Euler (= DDIM) step of our (guided) denoiser in VE units, mapped back to the scheduler's coordinates,
    equals the scheduler's ``step()`` on the pipeline-style (guided) raw prediction of the same network."""
    t = _teacher(folders, kind)
    pipe = _pipeline(folders[kind])
    sched = pipe.scheduler
    sched.set_timesteps(10)
    i = 3
    ts = sched.timesteps[i]
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, *t.data_shape), generator=g)
    # the conditioning, pipeline side and ours
    if kind == "dit":
        label = torch.tensor([3])
        ours_c = label
        labels_in = torch.cat([label, torch.tensor([10])])
    else:
        kw = {} if kind == "sd" else ({"prompt_2": None} if kind == "sdxl" else {"prompt_2": None, "prompt_3": None})
        enc = pipe.encode_prompt(prompt=[tm.PROMPTS[2]], device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, **kw)
        embeds_in = torch.cat([enc[0], enc[1]])
        ours_c = t.prompt_cond([2])
    with torch.no_grad():
        if kind in ("sd", "dit"):  # DDIM: VP coordinates x_t = sqrt(abar) x_ve
            abar = sched.alphas_cumprod
            t_prev = int(ts) - sched.config.num_train_timesteps // sched.num_inference_steps
            a, a_prev = abar[int(ts)], abar[t_prev]
            x_in = torch.cat([x, x])
            if kind == "sd":
                raw = pipe.unet(x_in, ts, encoder_hidden_states=embeds_in).sample
            else:
                raw = pipe.transformer(x_in, timestep=ts.expand(2), class_labels=labels_in).sample[:, :4]
            ref = sched.step(_guided(raw, w), ts, x).prev_sample
            sig, sig_prev = ((1 - a) / a).sqrt(), ((1 - a_prev) / a_prev).sqrt()
            ours = euler_step(lambda z, s, c: t(z, s, c, guidance=w), x / a.sqrt(), sig, sig_prev, ours_c)
            ours = ours * a_prev.sqrt()
        elif kind == "sdxl":  # Euler in k-diffusion (VE) units already
            sig, sig_prev = sched.sigmas[i], sched.sigmas[i + 1]
            x = x * sig
            add = {"text_embeds": torch.cat([enc[2], enc[3]]), "time_ids": t.prompt_cond([2]).added["time_ids"]
                   .repeat(2, 1)}
            x_in = sched.scale_model_input(torch.cat([x, x]), ts)
            raw = pipe.unet(x_in, ts, encoder_hidden_states=embeds_in, added_cond_kwargs=add).sample
            sched._step_index = i
            ref = sched.step(_guided(raw, w), ts, x).prev_sample
            ours = euler_step(lambda z, s, c: t(z, s, c, guidance=w), x, sig, sig_prev, ours_c)
        else:  # SD3: rectified flow x_s = (1 - s) x0 + s eps = x_ve / (1 + sigma)
            s, s_prev = sched.sigmas[i], sched.sigmas[i + 1]
            raw = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=ts.expand(2),
                                   encoder_hidden_states=embeds_in,
                                   pooled_projections=torch.cat([enc[2], enc[3]])).sample
            sched._step_index = i
            ref = sched.step(_guided(raw, w), ts, x).prev_sample
            sig, sig_prev = s / (1 - s), s_prev / (1 - s_prev)
            ours = euler_step(lambda z, s_, c: t(z, s_, c, guidance=w), x / (1 - s), sig, sig_prev, ours_c)
            ours = ours * (1 - s_prev)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_decode_round_trip_shape(folders, kind):
    t = _teacher(folders, kind)
    z = torch.randn(2, *t.data_shape)
    with torch.no_grad():
        px = t.decode(z)
        back = t.encode(px)
    assert px.shape == (2, 3, 16, 16) and float(px.abs().max()) <= 1.0
    assert back.shape == z.shape
    # decode divides by the scaling factor, encode multiplies: the VAE's own decode of z / 0.5
    with torch.no_grad():
        ref = t.vae.decode(z / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(px, ref)


def _copy(folders, kind, tmp_path):
    dst = tmp_path / kind
    shutil.copytree(folders[kind], dst)
    return dst


def _err(folders, kind, **kw):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        build_teacher({"name": "diffusers", "prompts": str(folders["prompts"]), **kw})
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wrong_or_incomplete_folders_fail_with_one_line(folders, tmp_path):
    # missing VAE for a latent UNet
    f = _copy(folders, "sd", tmp_path / "a")
    shutil.rmtree(f / "vae")
    assert "vae" in _err(folders, "sd", path=str(f))
    (f / "model_index.json").unlink()  # without model_index.json: detected from unet/config.json
    msg = _err(folders, "sd", path=str(f))
    assert "vae/config.json" in msg and "AutoencoderKL" in msg
    # tokenizer without text encoder
    f = _copy(folders, "sd", tmp_path / "b")
    (f / "model_index.json").unlink()
    shutil.rmtree(f / "text_encoder")
    msg = _err(folders, "sd", path=str(f))
    assert "tokenizer/ without text_encoder/" in msg
    # unknown scheduler
    f = _copy(folders, "sd", tmp_path / "c")
    cfg = json.loads((f / "scheduler" / "scheduler_config.json").read_text())
    cfg["_class_name"] = "MyScheduler"
    (f / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    msg = _err(folders, "sd", path=str(f))
    assert "MyScheduler" in msg and "DDIMScheduler" in msg
    # missing config.json of the network
    f = _copy(folders, "dit", tmp_path / "d")
    (f / "transformer" / "config.json").unlink()
    assert "transformer/config.json" in _err(folders, "dit", path=str(f))
    # an unsupported pipeline class
    f = _copy(folders, "dit", tmp_path / "e")
    idx = json.loads((f / "model_index.json").read_text())
    idx["_class_name"] = "FluxPipeline"
    (f / "model_index.json").write_text(json.dumps(idx))
    msg = _err(folders, "dit", path=str(f))
    assert "FluxPipeline" in msg and "StableDiffusionPipeline" in msg
    # a text teacher without prompts; prompts for a class-conditional one
    with pytest.raises(ValueError, match="set prompts"):
        build_teacher({"name": "diffusers", "path": str(folders["sd"])})
    assert "only for text-to-image" in _err(folders, "dit", path=str(folders["dit"]))
    # weights that do not fit the config (shape mismatch with the checkpoint)
    f = _copy(folders, "dit", tmp_path / "f")
    cfg = json.loads((f / "transformer" / "config.json").read_text())
    cfg["attention_head_dim"] = 4
    (f / "transformer" / "config.json").write_text(json.dumps(cfg))
    msg = _err(folders, "dit", path=str(f))
    assert "transformer/" in msg and "DiTTransformer2DModel" in msg
    # a folder that is not there
    assert "does not exist" in _err(folders, "dit", path=str(tmp_path / "nope"))


def _train_cfg(folders, tmp_path, loss: str, student: str, phases: dict[str, str], name: str, steps: int = 3):
    from _tiny_models import write_run_config

    from distill.config import load_config

    cfg = write_run_config(tmp_path / f"{name}.yaml", name=f"tiny_sd_{name}", out_dir=tmp_path / name,
                           teacher=folders["sd"], prompts=folders["prompts"], cache_dir=tmp_path / "cache",
                           student=student, loss=loss, phases=phases, steps=steps)
    return load_config(cfg, [])


@pytest.mark.parametrize("loss,student,phases", [
    ("{name: cd, num_levels: 6, solver: euler, x0_source: teacher, teacher_steps: 2}", "consistency",
     {"student": ""}),
    ("{name: dmd2, critic_updates: 1, fake_init: teacher}", "generator",
     {"student": ", betas: [0.0, 0.999]", "critic": ", betas: [0.0, 0.999]"}),
])
def test_distill_train_on_the_tiny_sd_teacher(folders, tmp_path, loss, student, phases):
    """A few iterations of ``distill train`` (CD and DMD2) on the text-conditional latent teacher: the student copies
    its UNet2DConditionModel, data-free batches carry prompt embeddings, the weights move and stay finite."""
    from distill.evaluate import generate_student, student_eval_kwargs
    from distill.train import build_module, run_training

    name = loss.split(",")[0].split(":")[1].strip()
    cfg = _train_cfg(folders, tmp_path, loss, student, phases, name=name)
    run_training(cfg, final_eval=False)
    module = build_module(cfg)
    module.prepare()
    ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    assert module.current_iteration == 3 and module.conditional
    before = module.teacher.net.state_dict()
    after = module.student.net.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student trained
    assert all(torch.isfinite(v).all() for v in after.values())
    batch = module.make_batch(0)
    assert batch.labels.embeds.shape == (4, 16, 16)
    # evaluation: the teacher's prompts, decoded to pixels
    x, nfe, _ = generate_student(module.ema.module, 1, n=3, seed=0, plan=module.sampling,
                                 **student_eval_kwargs(module.teacher, True))
    assert x.shape == (3, 3, 16, 16) and nfe == 1 and torch.isfinite(x).all()


@pytest.mark.parametrize("kind", ["sd", "sdxl", "dit", "sd3"])
def test_students_copy_the_latent_teachers(folders, kind):
    """A generator student copied from the SD / SDXL / DiT / SD3 teacher is the teacher's denoiser at init (same
    prediction on the teacher's conditioning); a flow-map student of them fails with one line."""
    from distill.core.registry import ConfigError
    from students import build_student

    t = _teacher(folders, kind)
    s = build_student("generator", t, init="teacher")
    c = t.sample_cond(2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, *t.data_shape)
    sig = torch.tensor([0.5, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(s.train().denoise(x, sig, c), t.denoise(x, sig, c))
    with pytest.raises(ConfigError) as e:
        build_student("flowmap", t, init="teacher")
    assert "\n" not in str(e.value)
    if kind != "dit":  # a text student needs the embeddings
        with pytest.raises(ValueError, match="text-conditional"):
            s.denoise(x, sig, None)


def test_teacher_evaluation_decodes_latents(folders):
    from distill.evaluate import generate_teacher

    t = _teacher(folders, "sd")
    x, nfe = generate_teacher(t, "euler", 2, n=3, seed=0, guidance=2.0)
    assert x.shape == (3, 3, 16, 16) and nfe == 4  # 2 steps x (cond + null) passes


def test_default_sample_cond_keeps_the_label_draws():
    """``Teacher.sample_cond`` draws exactly what the data source, evaluation and grids drew before it existed:
    ``multinomial(class_probs)`` for a teacher with class frequencies, ``randint`` otherwise, ``None`` if
    unconditional."""
    from teachers import mixture

    probs_teacher = mixture(means=[[0.0, 0.0], [3.0, 0.0]], stds=[0.1, 0.3], weights=[0.8, 0.2], conditional=True)
    got = probs_teacher.sample_cond(50, generator=torch.Generator().manual_seed(5))
    want = torch.multinomial(probs_teacher.weights.double(), 50, replacement=True,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want)

    from teachers import Teacher, TeacherInfo

    class Uniform(Teacher):  # a bare teacher with 7 classes and no frequencies
        def __init__(self):
            super().__init__(TeacherInfo(data_shape=(2,), num_classes=7))

    got = Uniform().sample_cond(50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, torch.randint(7, (50,), generator=torch.Generator().manual_seed(5)))
    assert mixture(means=[[0.0, 0.0]], stds=[1.0]).sample_cond(3) is None


def test_guided_losses_accept_a_text_teacher_and_reflow_refuses_it(folders):
    """A text-conditional teacher is conditional without class labels: the losses with a teacher-guidance option set
    up with guidance != 1, and reflow (whose pairs keep class labels only) refuses it in one line."""
    from distill.core.registry import ConfigError
    from losses import build_loss
    from losses.base import StepContext
    from students import build_student

    t = _teacher(folders, "sd")
    ctx = StepContext(0, 10, torch.device("cpu"), torch.float32)
    for name, kw in (("dmd2", {"fake_init": "teacher"}), ("sim", {}), ("fdistill", {})):
        loss = build_loss(name, guidance=3.0, **kw)
        loss.setup(build_student("generator", t, init="teacher"), t, ctx)  # no "needs a conditional teacher"
    with pytest.raises(ConfigError, match="text-conditional teachers are not supported") as e:
        build_loss("reflow").setup(build_student("flowmap", t, init="fresh", hidden=8, depth=1), t, ctx)
    assert "\n" not in str(e.value)
