"""Guidance distillation: guidance-conditioned students (the CFG scale as a student input), the per-sample scale drawn
for every training batch, evaluation at a guidance scale and per-class FID."""

from __future__ import annotations

import json

import pytest
import torch

from distill.core.cond import Cond
from distill.core.registry import ConfigError
from students import GuidanceEmbedding, build_student, build_student_from_config
from teachers import DiffusersTeacher, ring
from teachers.nets import small_unet

torch.set_num_threads(1)

EDM_SCHED = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "prediction_type": "epsilon"}


def cond_teacher(seed: int = 0, scale: float = 250.0) -> DiffusersTeacher:
    """A tiny class-conditional EDM UNet teacher with a null class (label 3 of 4 embeddings), random weights."""
    torch.manual_seed(seed)
    net = small_unet(block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=4)
    with torch.no_grad():  # non-zero everywhere (diffusers zero-inits some convs): equalities are not vacuous
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DiffusersTeacher(net, EDM_SCHED, null_class=3, edm_timestep_scale=scale)


@pytest.fixture(scope="module")
def teacher() -> DiffusersTeacher:
    return cond_teacher()


# ---------------------------------------------------------------------------------------------------------------
# The guidance input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["generator", "consistency", "trigflow"])
def test_guidance_embedding_is_exactly_zero_at_init_so_the_copy_is_the_teacher_for_any_w(teacher, kind):
    student = build_student(kind, teacher, guidance_input=True)
    plain = build_student(kind, teacher)
    assert student.net.guidance_emb is not None and plain.net.guidance_emb is None
    x, sigma, y = 2 * torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 20.0]), torch.tensor([0, 2, 1])
    ref = plain.denoise(x, sigma, y)
    for w in (torch.ones(3), torch.tensor([1.0, 2.5, 7.0])):
        out = student.denoise(x, sigma, Cond(labels=y, guidance=w))
        assert torch.equal(out, ref)  # bit-exact: the added embedding is 0.0 exactly
    # ... and it is a real input: once the zero layer moves, the output depends on w
    with torch.no_grad():
        student.net.guidance_emb.proj[-1].weight.normal_(0, 0.1)
    a = student.denoise(x, sigma, Cond(labels=y, guidance=torch.full((3,), 1.0)))
    b = student.denoise(x, sigma, Cond(labels=y, guidance=torch.full((3,), 3.0)))
    assert (a - b).abs().max() > 1e-4
    # the UNet's own state dict is still the teacher's layout (the embedding lives beside it)
    assert set(student.net.unet.state_dict()) == set(teacher.net.state_dict())


def test_guidance_embedding_gets_gradients_at_init(teacher):
    student = build_student("consistency", teacher, guidance_input={"hidden": 16, "emb_dim": 8})
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([0, 1])
    student.denoise(x, sigma, Cond(labels=y, guidance=torch.tensor([1.5, 3.0]))).square().sum().backward()
    assert student.net.guidance_emb.proj[-1].weight.grad.abs().sum() > 0


def test_students_without_guidance_input_reject_a_scale_and_bad_specs_fail(teacher):
    plain = build_student("generator", teacher)
    c = Cond(labels=torch.tensor([0, 1]), guidance=torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="no guidance input"):
        plain.denoise(torch.randn(2, 1, 8, 8), torch.ones(2), c)
    with pytest.raises(ConfigError, match="valid keys: emb_dim, max_freq, hidden, default"):
        build_student("generator", teacher, guidance_input={"width": 3})
    with pytest.raises(ConfigError, match="true/false or a dict"):
        build_student("generator", teacher, guidance_input="yes")


def test_missing_scale_means_the_default(teacher):
    student = build_student("generator", teacher, guidance_input={"default": 2.0})
    with torch.no_grad():
        student.net.guidance_emb.proj[-1].weight.normal_(0, 0.1)
    x, s, y = torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([0, 1])
    torch.testing.assert_close(student.denoise(x, s, y), student.denoise(x, s, Cond(labels=y, guidance=2 * s)),
                               rtol=0, atol=0)


def test_mlp_guidance_input_concatenates_sinusoidal_features():
    t = ring(conditional=True)
    student = build_student("consistency", t, init="fresh", guidance_input=True, hidden=16, depth=2)
    emb = student.net.guidance_emb
    assert isinstance(emb, GuidanceEmbedding) and emb.proj is None and not list(emb.parameters())
    assert student.net.mlp[0].in_features == 2 + 64 * 2 + emb.emb_dim
    x, s, y = torch.randn(4, 2), torch.full((4,), 1.0), torch.tensor([0, 1, 2, 3])
    a = student.denoise(x, s, Cond(labels=y, guidance=torch.full((4,), 1.0)))
    b = student.denoise(x, s, Cond(labels=y, guidance=torch.full((4,), 4.0)))
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("init", ["fresh", "teacher"])
def test_guidance_student_config_round_trip(teacher, init):
    t = ring(conditional=True) if init == "fresh" else teacher
    kw = {"hidden": 16, "depth": 2} if init == "fresh" else {}
    student = build_student("consistency", t, init=init, guidance_input={"emb_dim": 8, "hidden": 12}, **kw)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = json.loads(json.dumps(student.config()))
    assert cfg["backbone"]["guidance"] == {"emb_dim": 8, "max_freq": 4.0, "hidden": 12, "default": 1.0}
    clone = build_student_from_config(cfg)
    clone.load_state_dict(student.state_dict(), strict=True)
    x = torch.randn(3, *student.data_shape)
    c = Cond(labels=torch.tensor([0, 2, 1]), guidance=torch.tensor([1.0, 2.0, 3.5]))
    s = torch.tensor([0.3, 2.0, 30.0])
    assert torch.equal(clone.denoise(x, s, c), student.denoise(x, s, c))


def test_jvp_through_the_guidance_conditioned_unet_matches_central_differences():
    """sCM's raw_fn path: torch.func.jvp with the guidance scale (in cond) closed over, float32 (see
    tests/test_students.py's UNet jvp test for why edm_timestep_scale 0.25)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    student = build_student("trigflow", cond_teacher(scale=0.25), guidance_input={"hidden": 16})
    with torch.no_grad():  # make the zero-initialised guidance path act
        student.net.guidance_emb.proj[-1].weight.normal_(0, 0.2)
    g = torch.Generator().manual_seed(5)
    x_in = torch.randn(2, 1, 8, 8, generator=g)
    primals = (x_in, torch.tensor([0.3, 1.1]))
    tangents = (torch.randn(x_in.shape, generator=g), torch.tensor([1.0, -0.5]))
    c = Cond(labels=torch.tensor([0, 2]), guidance=torch.tensor([1.5, 4.0]))
    fn = student.raw_fn(c)
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        out, jvp = torch.func.jvp(fn, primals, tangents)
        torch.testing.assert_close(out, fn(*primals), rtol=0, atol=1e-6)  # the hook acts inside jvp too
        other = student.raw_fn(c.replace(guidance=torch.tensor([1.0, 1.0])))(*primals)
        assert (out - other).abs().max() > 1e-4
        h = 3e-3
        fd = (fn(*(p + h * v for p, v in zip(primals, tangents))) - fn(*(p - h * v for p, v in zip(primals, tangents))))
        fd = fd / (2 * h)
    assert (jvp - fd).norm() < 1e-3 * jvp.norm(), ((jvp - fd).norm() / jvp.norm()).item()
    assert not student.net.unet.time_embedding._forward_hooks  # the per-call hook is gone


# ---------------------------------------------------------------------------------------------------------------
# The per-sample scale of every training batch (data.guidance)
# ---------------------------------------------------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def ring_guidance_cfg(tmp, steps: int = 4, name: str = "g", **over: str):
    from distill.config import load_config

    ov = [f"trainer.max_steps={steps}", "eval.every=0", "trainer.grid_every=0", "trainer.progress_bar=false",
          "trainer.ckpt_every=1000", "data.batch_size=32", "student.hidden=16", "student.depth=2",
          "loss.num_levels=6", f"out_dir={tmp / name}", "trainer.log_every=1", "teacher.conditional=true",
          "data.conditional=true", "student.guidance_input=true", "data.guidance=[1.0,4.0]"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(ROOT / "configs" / "ring_cd.yaml", ov)


def test_guidance_draw_is_deterministic_per_seed_and_iteration_and_process_count_invariant(tmp_path):
    from types import SimpleNamespace

    from distill.train import build_module

    module = build_module(ring_guidance_cfg(tmp_path))
    module.prepare()
    b = module.make_batch(3)
    c = b.labels
    assert isinstance(c, Cond) and c.labels is not None and c.guidance.shape == (32,)
    assert c.guidance.min() >= 1.0 and c.guidance.max() <= 4.0 and c.guidance.std() > 0.3
    assert torch.equal(module.make_batch(3).labels.guidance, c.guidance)  # a function of (seed, k): resume is exact
    assert not torch.equal(module.make_batch(4).labels.guidance, c.guidance)
    other = build_module(ring_guidance_cfg(tmp_path, seed="1"))
    other.prepare()
    assert not torch.equal(other.make_batch(3).labels.guidance, c.guidance)
    # Two processes get the two halves of the same global draw (labels and scales alike).
    halves = []
    for rank in (0, 1):
        module._trainer = SimpleNamespace(global_rank=rank, world_size=2)
        halves.append(module.make_batch(3).labels)
    module._trainer = None
    torch.testing.assert_close(torch.cat([h.guidance for h in halves]), c.guidance, rtol=0, atol=0)
    assert torch.equal(torch.cat([h.labels for h in halves]), c.labels)


def test_guidance_range_config_errors(tmp_path):
    from distill.train import build_module

    with pytest.raises(ConfigError, match="student.guidance_input"):
        build_module(ring_guidance_cfg(tmp_path, **{"student.guidance_input": "false"}))
    with pytest.raises(ConfigError, match="drop loss.guidance"):
        build_module(ring_guidance_cfg(tmp_path, **{"loss.guidance": "2.0"}))
    with pytest.raises(ConfigError, match="w_min <= w_max"):
        build_module(ring_guidance_cfg(tmp_path, **{"data.guidance": "[3.0,1.0]"}))
    with pytest.raises(ConfigError, match="no condition"):  # an unconditional batch has nothing to guide
        m = build_module(ring_guidance_cfg(tmp_path, **{"data.conditional": "false"}))
        m.prepare()
        m.make_batch(0)


def test_a_loss_with_its_own_guidance_fails_loudly_on_a_guided_batch():
    """The teacher refuses a scale given twice (cond.guidance and a loss's guidance option)."""
    t = ring(conditional=True)
    c = Cond(labels=torch.tensor([0, 1]), guidance=torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="guidance given twice"):
        t(torch.randn(2, 2), torch.ones(2), c, guidance=2.0)


def test_training_a_guidance_conditioned_student_on_the_conditional_ring_runs(tmp_path):
    """CD on the exact conditional ring with w ~ U[1, 4] in every batch: the teacher target is the guided one, the
    student takes w as input; a few iterations run with finite weights, and the final evaluation samples the student
    at eval.guidance (recorded) and the teacher with CFG at the same scale."""
    from distill.train import run_training

    cfg = ring_guidance_cfg(tmp_path, steps=6, **{"eval.n_samples": "256", "eval.batch_size": "256",
                                                   "eval.nfe": "[1]", "eval.guidance": "2.0"})
    res = run_training(cfg, final_eval=True)
    assert res["iterations"] == 6 and res["skipped_steps"] == 0
    ckpt = torch.load(tmp_path / "g" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if k.startswith("student."))
    rows = res["eval"]["rows"]
    assert [r["record"]["guidance"] for r in rows] == [2.0, 2.0]  # teacher (CFG) and the student (its input)
    assert all(r["score"] == r["score"] for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# Per-class FID and evaluation at a guidance scale
# ---------------------------------------------------------------------------------------------------------------


def test_per_class_fid_of_one_class_is_the_plain_fid_and_identical_sets_score_zero():
    from distill.features import FlattenFeatures
    from distill.fid import ReferenceStats, compute_fid, per_class_fid

    g = torch.Generator().manual_seed(0)
    gen = torch.randn(300, 3, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)
    real = torch.randn(200, 3, generator=g, dtype=torch.float64)
    ext = FlattenFeatures()
    ref = ReferenceStats.from_features(ext(real), "test", ext.describe())
    plain = compute_fid(gen, ref, ext).fid
    one = per_class_fid(ext(gen), torch.zeros(300), ext(real), torch.zeros(200), 1)
    assert one["per_class_fid"] == [pytest.approx(plain, rel=1e-12)] and one["per_class_fid_mean"] == one[
        "per_class_fid"][0] and one["per_class_n"] == [300]
    # two classes: each scored against its own real class only; identical sets score ~0; a class without
    # samples gets None and is left out of the mean
    lab_g, lab_r = torch.arange(300) % 3, torch.arange(200) % 3
    both = per_class_fid(ext(real), lab_r, ext(real), lab_r, 4)
    assert all(abs(v) < 1e-8 for v in both["per_class_fid"][:3]) and both["per_class_fid"][3] is None
    shifted = per_class_fid(ext(gen), lab_g, ext(real), lab_r, 3)
    assert all(v > 0.1 for v in shifted["per_class_fid"])
    assert shifted["per_class_fid_mean"] == pytest.approx(sum(shifted["per_class_fid"]) / 3)


def test_digits_scorer_reports_per_class_fid_and_keeps_the_record_fields():
    from distill.core.data import load_digits_tensor
    from distill.scorers import FIDScorer

    images, labels = load_digits_tensor()
    scorer = FIDScorer("digits")
    plain = scorer(images, nfe=0, model="real")
    rec = scorer(images, labels=labels, nfe=0, model="real")
    assert rec["score"] == plain["score"] and set(plain) == set(rec)  # same record, extra grows
    assert set(plain["extra"]) < set(rec["extra"]) and "class_coverage" in rec["extra"]
    pc = rec["extra"]["per_class_fid"]
    assert len(pc) == 10 and all(abs(v) < 1e-6 for v in pc)  # the real digits of a class vs themselves
    assert rec["extra"]["per_class_n"] == torch.bincount(labels).tolist()
    wrong = scorer(images, labels=(labels + 1) % 10, nfe=0)  # samples scored against another class's digits
    assert min(wrong["extra"]["per_class_fid"]) > 10 * max(1e-3, rec["extra"]["per_class_fid_mean"])


def test_generate_student_at_a_guidance_scale_passes_it_in_cond(teacher):
    from distill.evaluate import eval_labels, generate_student, student_guidance

    student = build_student("consistency", teacher, guidance_input=True)
    plain = build_student("consistency", teacher)
    assert student_guidance(student, 3.0) == 3.0 and student_guidance(plain, 3.0) is None
    seen = []
    net_forward = student.net.forward
    student.net.forward = lambda x, c, to=None, cond=None: seen.append(cond) or net_forward(x, c, to, cond)
    generate_student(student, 1, 6, seed=2, num_classes=3, guidance=2.5)
    assert isinstance(seen[0], Cond) and torch.equal(seen[0].guidance, torch.full((6,), 2.5))
    assert torch.equal(seen[0].labels, eval_labels(6, 2, 3))  # the labels per-class FID is computed with


def test_score_student_scores_the_seeds_samples_with_their_labels_and_the_students_guidance(teacher):
    """score_student is generate_student at the student's scale, then the scorer on the seed's labels with the
    record fields of the FID callback, the final evaluation and ``distill eval --student``."""
    from distill.evaluate import eval_labels, generate_student, score_student
    from students import SamplingPlan

    calls = []

    def scorer(x, labels=None, **protocol):
        calls.append((x, labels, protocol))
        return {"score": 0.0, **protocol}

    plan = SamplingPlan(gamma=0.5)
    guided = build_student("consistency", teacher, guidance_input=True)
    rec = score_student(guided, scorer, 2, 4, plan, n=6, guidance=2.5, batch_size=4, num_classes=3, model="m", step=7)
    x, nfe, sig = generate_student(guided, 2, 6, 4, plan, batch_size=4, num_classes=3, guidance=2.5)
    got, labels, protocol = calls[0]
    assert torch.equal(got, x) and torch.equal(labels, eval_labels(6, 4, 3))
    assert protocol == {"nfe": nfe, "sampler": "student(gamma=0.5)", "grid": str([round(float(s), 4) for s in sig]),
                        "guidance": 2.5, "seed": 4, "model": "m", "step": 7} and rec["score"] == 0.0
    plain = build_student("consistency", teacher)  # sampled as it is, recorded at guidance 1.0
    score_student(plain, scorer, 1, 4, plan, n=6, guidance=2.5, sampler="s", grid="g")
    got, labels, protocol = calls[1]
    assert torch.equal(got, generate_student(plain, 1, 6, 4, plan)[0]) and labels is None
    assert protocol == {"nfe": 1, "sampler": "s", "grid": "g", "guidance": 1.0, "seed": 4}


# ---------------------------------------------------------------------------------------------------------------
# The class-conditional digits teacher
# ---------------------------------------------------------------------------------------------------------------


def test_train_teacher_conditional_saves_a_cfg_teacher(tmp_path):
    import importlib.util
    import math

    from teachers import load_diffusers_teacher

    spec = importlib.util.spec_from_file_location("train_teacher", ROOT / "scripts" / "train_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "teacher"
    mod.main(["--conditional", "--steps", "3", "--batch-size", "8", "--warmup", "1", "--channels", "8", "16",
              "--threads", "1", "--out", str(out)])
    rec = json.loads((out / "training.json").read_text())
    assert rec["conditional"] and rec["null_class"] == 10 and rec["label_dropout"] == 0.1
    assert math.isfinite(rec["final_loss"])
    t = load_diffusers_teacher(out)
    assert t.null_class == 10 and t.num_classes == 10 and t.net.config.num_class_embeds == 11
    x, s, y = torch.randn(4, 1, 8, 8), torch.ones(4), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        d_c, d_u = t(x, s, y), t(x, s, torch.full((4,), 10))
        torch.testing.assert_close(t(x, s, y, guidance=3.0), d_u + 3.0 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match="label-dropout"):
        mod.main(["--conditional", "--label-dropout", "1.5", "--out", str(tmp_path / "x")])


def test_shipped_conditional_digits_teacher_loads_and_uses_its_labels():
    from distill.core.data import load_digits_tensor
    from teachers import TEACHERS

    t = TEACHERS.build("digits_cond")
    assert t.family == "edm" and t.edm_timestep_scale == 250.0 and t.null_class == 10 and t.num_classes == 10
    files = [p for p in (ROOT / "teachers" / "shipped" / "digits_cond").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8e6
    x, y = load_digits_tensor()
    x, y = x[:200], y[:200]
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    s = torch.full((200,), 1.0)  # noisy enough that the label carries information
    with torch.no_grad():
        right = (t(x + n, s, y) - x).pow(2).mean()
        wrong = (t(x + n, s, (y + 5) % 10) - x).pow(2).mean()
        null = (t(x + n, s, torch.full_like(y, 10)) - x).pow(2).mean()
    assert right < null < wrong


def test_distribution_matching_refuses_a_range_of_scales_but_takes_one(tmp_path):
    """DMD2's fake score (a copy of the conditional digits teacher) has no guidance input: with w drawn from a range
    it would model the generator mixed over w, so the critic step refuses it in one line; one scale trains."""
    from distill.config import load_config
    from distill.core.registry import ConfigError
    from distill.train import build_module

    def module(lo_hi: str):
        cfg = load_config(ROOT / "configs" / "digits_dmd2.yaml", [
            "teacher.name=digits_cond", "student.guidance_input=true", f"data.guidance={lo_hi}",
            "data.batch_size=4", "trainer.num_threads=1", "eval.every=0", f"out_dir={tmp_path / lo_hi[1:4]}",
            "loss.critic_updates=1", "loss.regression_steps=0"])
        m = build_module(cfg)
        m.prepare()
        m.configure_optimizers()
        return m

    with pytest.raises(ConfigError, match=r"one scale, data.guidance: \[w, w\]") as e:
        module("[1.0,3.0]").iterate()
    assert "\n" not in str(e.value)
    m = module("[2.0,2.0]")
    for _ in range(2):
        m.iterate()
    assert int(m.skipped_steps) == 0
