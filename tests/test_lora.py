"""LoRA students and critics (issue 13 item 4): peft adapters on a frozen copy of the teacher's network.

Only adapter tensors train, sit in optimizers, EMAs and checkpoints; at init the adapted student is the teacher's
copy exactly (LoRA's ``B = 0``); adapter-only checkpoints resume exactly; the exported adapter loads back into the
plain network (peft) or a diffusers pipeline and reproduces the student; the merged export equals the adapter model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import assert_resume_exact

from distill.config import load_config
from distill.core.ema import make_ema
from distill.core.registry import ConfigError
from students import build_student, build_student_from_config
from students.lora import is_adapter_name, merged_copy
from teachers import DiffusersTeacher, build_teacher
from teachers.nets import small_unet

LORA = {"rank": 2, "alpha": 4, "dropout": 0.0}


def tiny_teacher() -> DiffusersTeacher:
    torch.manual_seed(0)
    net = small_unet(8, 1, (8, 16), norm_num_groups=4, attention_head_dim=4)
    return DiffusersTeacher(net, {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
                                  "sigma_data": 0.5, "prediction_type": "epsilon"}, edm_timestep_scale=250.0)


def tiny_teacher_folder(folder: Path) -> Path:
    if not (folder / "unet").is_dir():
        tiny_teacher().save_pretrained(folder)
    return folder


def perturb_adapters(student, scale: float = 0.05, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if is_adapter_name(name):
                p.add_(scale * torch.randn(p.shape, generator=g))


def inputs(n: int = 4):
    g = torch.Generator().manual_seed(1)
    x = 5.0 * torch.randn(n, 1, 8, 8, generator=g)
    return x, torch.tensor([5.0, 1.0, 0.3, 20.0][:n])


@pytest.mark.parametrize("kind", ["consistency", "generator", "flowmap"])
def test_lora_student_is_the_teacher_copy_at_init_and_trains_only_adapters(kind):
    teacher = tiny_teacher()
    full = build_student(kind, teacher)
    lora = build_student(kind, teacher, lora=LORA)
    x, s = inputs()
    with torch.no_grad():
        assert torch.equal(full.denoise(x, s), lora.denoise(x, s))  # LoRA B = 0: exactly the copy
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_name(n) or (kind == "flowmap" and ".class_embedding." in n)
                             for n in trainable)
    assert any(".class_embedding." in n for n in trainable) == (kind == "flowmap")  # a layer the teacher lacks
    assert lora.rebuilt_state_keys == lora.frozen_state_keys
    assert lora.frozen_state_keys == {n for n, p in lora.named_parameters() if not p.requires_grad}
    n_train = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert n_train < 0.5 * sum(p.numel() for p in full.parameters())
    # the config rebuilds the same adapted structure without the teacher
    again = build_student_from_config(lora.config())
    assert again.config() == lora.config() and again.lora == lora.lora
    again.load_state_dict(lora.state_dict(), strict=True)


def test_lora_gradients_reach_only_adapters_and_the_ema_shares_the_base():
    teacher = tiny_teacher()
    student = build_student("consistency", teacher, lora=LORA)
    ema = make_ema(student, 0.5)
    params = dict(student.named_parameters())
    eparams = dict(ema.module.named_parameters())
    for k in student.frozen_state_keys:
        assert eparams[k] is params[k]  # one copy of the frozen base
    for n, p in params.items():
        if n not in student.frozen_state_keys:
            assert eparams[n] is not p
    x, s = inputs()
    perturb_adapters(student)  # B != 0 so that A receives gradient too
    student.denoise(x, s).square().mean().backward()
    assert all(p.grad is None for n, p in params.items() if n in student.frozen_state_keys)
    assert all(p.grad is not None for n, p in params.items() if is_adapter_name(n))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update_parameters(student)  # first update copies
    ema.update_parameters(student)
    after = ema.module.state_dict()
    for k in before:
        if k in student.frozen_state_keys:
            assert torch.equal(before[k], after[k])
    assert any(not torch.equal(before[k], after[k]) for k in before if is_adapter_name(k))


def test_lora_mlp_student_and_merge():
    """A fresh MLP with LoRA on its linear layers (no teacher network: its random base is frozen but checkpointed);
    the merged copy computes what the adapted network computes."""
    teacher = build_teacher({"name": "ring"})
    student = build_student("generator", teacher, init="fresh", hidden=16, depth=1, lora=LORA)
    assert student.frozen_state_keys and not student.rebuilt_state_keys
    perturb_adapters(student)
    plain = build_student_from_config({k: v for k, v in student.config().items() if k != "lora"})
    plain.net.load_state_dict(merged_copy(student.net).state_dict(), strict=True)
    x = torch.randn(8, 2, dtype=torch.float32)
    s = torch.full((8,), 3.0)
    with torch.no_grad():
        assert torch.allclose(plain.denoise(x, s), student.denoise(x, s), atol=1e-5)


def test_bad_lora_configs_fail_with_one_line():
    teacher = tiny_teacher()
    cases = [({"rank": 2, "alpah": 2}, "unknown student lora key(s) ['alpah']; valid keys: rank, alpha, "
              "target_modules, dropout"),
             ({"rank": 0}, "rank must be an integer >= 1"),
             ({"rank": 2, "dropout": 1.5}, "dropout must lie in"),
             ({"rank": 2, "target_modules": ["nope"]}, "match no layer of UNet2DModel"),
             ("yes", "must be a mapping")]
    for spec, msg in cases:
        with pytest.raises(ConfigError) as exc:
            build_student("consistency", teacher, lora=spec)
        assert msg in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


STEPS = 8


def lora_cfg(tmp: Path, name: str, steps: int, loss: str = "cd", **over: str):
    ov = [f"loss.name={loss}", f"trainer.max_steps={steps}", "eval.every=0", "trainer.grid_every=0",
          "trainer.progress_bar=false", "trainer.ckpt_every=4", "trainer.log_every=3", f"out_dir={tmp / name}",
          "data.batch_size=8", "data.name=digits", "optim.student.lr=1e-3", "optim.student.warmup=2",
          "teacher.name=diffusers", f"teacher.path={tiny_teacher_folder(tmp / 'teacher')}", "student.init=teacher",
          "student.lora.rank=2", "student.lora.alpha=4", "ema.decay=0.9", "trainer.num_threads=1"]
    if loss == "cd":
        ov += ["loss.num_levels=6", "loss.target=ema"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, ov)


def test_adapter_only_checkpoints_resume_exactly(tmp_path):
    """CD (with an EMA target network) on a LoRA student: 8 straight == 4 + resume + 4, bit for bit, and the
    checkpoint holds adapter tensors only (student, EMA, target network, optimizer state), never the frozen base."""
    from distill.train import build_module

    a = assert_resume_exact(lambda name, steps: lora_cfg(tmp_path, name, steps), STEPS, tag="lora cd")
    nets = [k for k in a["state_dict"] if k.startswith(("student.", "ema.module.", "loss.target_net.module."))]
    assert nets and all(is_adapter_name(k) for k in nets), [k for k in nets if not is_adapter_name(k)][:3]
    assert {k.split(".", 1)[0] for k in nets} == {"student", "ema", "loss"}
    module = build_module(lora_cfg(tmp_path, "straight", STEPS))
    n_adapter = sum(p.numel() for n, p in module.student.named_parameters() if is_adapter_name(n))
    assert sum(a["state_dict"][k].numel() for k in nets if k.startswith("student.")) == n_adapter
    assert sum(v.numel() for st in a["optimizer_states"][0]["state"].values() for v in st.values()
               if torch.is_tensor(v) and v.ndim) == 2 * n_adapter  # Adam's two moments, adapters only
    # loading the adapter-only checkpoint rebuilds the base from the teacher: the student equals the trained one
    module.prepare()
    module.load_state_dict(a["state_dict"])
    trained = {k: v for k, v in module.student.state_dict().items() if is_adapter_name(k)}
    assert all(torch.equal(trained[k[len("student."):]], a["state_dict"][k]) for k in nets if k.startswith("student."))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items() if "lora_B" in k)  # it trained


def test_export_adapter_loads_back_and_merge_equals_adapter_model(tmp_path):
    """``distill export`` of a LoRA run (adapter-only checkpoint): the standalone folder reproduces the EMA
    student's samples; ``lora/`` put on the teacher's plain UNet (peft's ``PeftModel.from_pretrained`` and
    ``students.lora.load_adapter``) reproduces them; ``--merge`` gives a plain student with the same samples; the
    diffusers ``ConsistencyModelPipeline`` folder carries the merged UNet."""
    from diffusers import ConsistencyModelPipeline, UNet2DModel
    from peft import PeftModel

    from distill.cli import main
    from distill.export import load_exported
    from distill.train import build_module, run_training
    from students import sample_student
    from students.lora import load_adapter

    run_training(lora_cfg(tmp_path, "run", 4), final_eval=False)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    module = build_module(lora_cfg(tmp_path, "run", 4))
    module.prepare()
    module.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    ema = module.ema.module.eval()
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ema.state_dict().items() if "lora_B" in k)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    sig = torch.tensor([80.0, 0.8, 0.0], dtype=torch.float64)
    with torch.no_grad():
        want = sample_student(ema, z, sig)
        exported, _ = load_exported(tmp_path / "exp")
        assert exported.lora is not None
        assert torch.equal(sample_student(exported, z, sig), want)
        merged, _ = load_exported(tmp_path / "merged")
        assert "lora" not in merged.config() and not any(is_adapter_name(k) for k in merged.state_dict())
        assert torch.allclose(sample_student(merged, z, sig), want, atol=1e-5)
        # the adapter alone, on the teacher's plain network
        plain = build_student_from_config({k: v for k, v in ema.config().items() if k != "lora"}).eval()
        teacher_unet = UNet2DModel.from_pretrained(tmp_path / "teacher" / "unet")
        plain.net.unet.load_state_dict(teacher_unet.state_dict())
        load_adapter(plain.net.unet, tmp_path / "exp" / "lora")
        # float32 rounding only: the same adapters on a freshly built UNet need not sum in the same order on every
        # CPU (3e-7 on an AMD EPYC, bitwise equal elsewhere)
        torch.testing.assert_close(sample_student(plain, z, sig), want, rtol=1e-6, atol=1e-6)
        peft_unet = PeftModel.from_pretrained(teacher_unet, tmp_path / "exp" / "lora").eval()
        t = torch.tensor([900.0, 10.0, -300.0])
        assert torch.allclose(peft_unet(z, t).sample, ema.net.unet(z, t).sample, atol=1e-6)
        # the ConsistencyModelPipeline folder holds the merged UNet: its one step is the student's
        pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "exp" / "diffusers")
        one = sample_student(ema, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                             torch.tensor([80.0, 0.0], dtype=torch.float64))
        theirs = pipe(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(1),
                      output_type="pt").images
    assert torch.allclose(theirs, (one / 2 + 0.5).clamp(0, 1), atol=1e-5)
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "base + adapters" in card
    assert "merged (full weights" in (tmp_path / "merged" / "README.md").read_text()


def tiny_sd_pipeline(folder: Path):
    """A tiny Stable-Diffusion-style pipeline built locally: UNet2DConditionModel + AutoencoderKL + CLIP text encoder
    from a tiny config + a CLIPTokenizer from a tiny local vocab (nothing downloads)."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                        num_hidden_layers=1, max_position_embeddings=8, projection_dim=8))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5, "!": 6, "!</w>": 7}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_text_unet_adapter_loads_with_stable_diffusion_load_lora_weights(tmp_path):
    """A LoRA on a ``UNet2DConditionModel`` (diffusers' own ``add_adapter``), exported by
    :func:`distill.export.export_lora_adapter`, loads with ``StableDiffusionPipeline.load_lora_weights`` into a tiny
    local pipeline and reproduces the adapted UNet. (At the network level: text-conditional student backbones are
    another branch's work; this is the export format they will use.)"""
    from diffusers import StableDiffusionPipeline

    from distill.export import SD_LORA_WEIGHTS, export_lora_adapter
    from students.lora import add_lora

    path = tiny_sd_pipeline(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    net = add_lora(pipe.unet, {"rank": 2, "alpha": 4})  # the default UNet targets
    assert getattr(net, "_hf_peft_config_loaded", False)  # went through diffusers' integration
    perturb_adapters(net, 0.1)
    note = export_lora_adapter(net, tmp_path / "lora")
    assert "load_lora_weights" in note and (tmp_path / "lora" / SD_LORA_WEIGHTS).is_file()
    fresh = StableDiffusionPipeline.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        base = fresh.unet(x, t, encoder_hidden_states=e).sample
        fresh.load_lora_weights(tmp_path / "lora")  # as the model card says
        loaded = fresh.unet(x, t, encoder_hidden_states=e).sample
        want = net(x, t, encoder_hidden_states=e).sample
    assert torch.allclose(loaded, want, atol=1e-6) and not torch.allclose(base, want, atol=1e-3)


def test_lora_critic_shares_the_teacher_and_resumes_exactly(tmp_path):
    """DMD2 with a LoRA student and a LoRA fake score (``loss.fake_lora``): the fake is the teacher at init, shares
    the teacher's parameters, trains only adapters in its own phase, and 6 straight == 3 + resume + 3 with
    adapter-only checkpoints."""
    from distill.train import build_module
    from losses.parts import build_fake_score

    teacher = tiny_teacher()
    fake = build_fake_score("teacher", teacher, torch.device("cpu"), torch.float32, lora=LORA, owner="dmd2")
    x, s = inputs()
    with torch.no_grad():
        assert torch.equal(fake.eval().denoise(x, s), teacher.denoise(x, s))  # (eval: the teacher's attention path)
    tparams = {id(p) for p in teacher.parameters()}
    assert all(id(p) in tparams for n, p in fake.named_parameters() if not is_adapter_name(n))
    assert {n for n, p in fake.named_parameters() if p.requires_grad} == \
        {n for n, _ in fake.named_parameters() if is_adapter_name(n)}
    with pytest.raises(ConfigError, match="fake_lora puts adapters on the teacher's network; it needs fake_init"):
        build_module(lora_cfg(tmp_path, "bad", 2, loss="dmd2", **{
            "loss.fake_init": "fresh", "loss.fake_lora.rank": 2, "optim.critic.lr": "1e-3",
            "student.name": "generator"}))

    def cfg(name, steps):
        return lora_cfg(tmp_path, name, steps, loss="dmd2", **{
            "loss.fake_lora.rank": 2, "loss.critic_updates": 2, "loss.num_levels": 20, "optim.critic.lr": "1e-3",
            "student.name": "generator", "data.name": "null", "trainer.ckpt_every": 3})

    a = assert_resume_exact(cfg, 6, tag="lora critic")
    fake_keys = [k for k in a["state_dict"] if k.startswith("loss.fake.")]
    assert fake_keys and all(is_adapter_name(k) for k in fake_keys)
    assert any(not torch.equal(a["state_dict"][k], torch.zeros_like(a["state_dict"][k]))
               for k in fake_keys if "lora_B" in k)  # the critic trained
    module = build_module(cfg("straight", 6))
    module.prepare()
    critic = [p for g in module.loss.phase_groups("critic", module.student).values() for p in g]
    adapters = [p for n, p in module.loss.fake.named_parameters() if is_adapter_name(n)]
    assert len(critic) == len(adapters) and all(any(p is q for q in adapters) for p in critic)
