"""Smoke tests of the benchmark scripts' own logic (tiny sizes; the figures themselves live in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_emas_scores_every_ema_and_a_zero_decay_ema_is_the_raw_student(tmp_path):
    mod = _load("sweep_emas")
    rows = mod.main([str(ROOT / "configs" / "ring_cd.yaml"), "student.hidden=32", "student.depth=2",
                     "loss.num_levels=6", "data.batch_size=64", "--steps", "6", "--every", "3", "--emas", "0.0", "0.9",
                     "--floors", "0.5", "--n", "500", "--json", str(tmp_path / "s.json")])
    assert [r["iteration"] for r in rows] == [3, 6]
    keys = {"ema0.0_nfe1", "ema0.0_nfe2_via0.5", "ema0.9_nfe1", "ema0.9_nfe2_via0.5"}
    assert keys <= set(rows[-1]) and all(math.isfinite(rows[-1][k]) for k in keys)
    assert rows[-1]["ema0.0_nfe1"] != rows[-1]["ema0.9_nfe1"]  # two different averages were scored
    assert (tmp_path / "s.json").is_file()


def test_sweep_student_sampling_scores_every_floor_and_gamma(tmp_path):
    from distill.config import load_config
    from distill.export import export_checkpoint
    from distill.train import run_training

    ov = ["trainer.max_steps=4", "eval.every=0", "trainer.grid_every=0", "trainer.progress_bar=false",
          "trainer.ckpt_every=4", "data.batch_size=64", "student.hidden=32", "student.depth=2", "loss.num_levels=6",
          f"out_dir={tmp_path / 'r'}"]
    run_training(load_config(ROOT / "configs" / "ring_cd.yaml", ov), final_eval=False)
    out = export_checkpoint(tmp_path / "r", tmp_path / "export")
    rows = _load("sweep_student_sampling").main([str(out), "--teacher", "ring", "--features", "auto", "--floors",
                                                 "0.3", "2.0", "--gammas", "0.0", "1.0", "--seeds", "0", "1",
                                                 "--n", "400", "--threads", "1", "--json", str(tmp_path / "s.json")])
    assert [(r["floor"], r["gamma"]) for r in rows] == [(0.3, 0.0), (0.3, 1.0), (2.0, 0.0), (2.0, 1.0)]
    assert all(len(r["scores"]) == 2 and math.isfinite(r["mean"]) for r in rows)
    assert len({r["mean"] for r in rows}) == 4  # the settings really change the samples
    assert (tmp_path / "s.json").is_file()


def test_committed_docs_match_their_records():
    """CI's guard: every rendered table in README.md and docs/benchmarks.md equals what its record says."""
    assert _load("report").main(["--check"]) == 0


def _docs_copy(root: Path) -> None:
    """The rendered docs and their records under ``root`` (for report.py --root)."""
    import shutil

    for rel in ("README.md", "docs/benchmarks.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    shutil.copytree(ROOT / "docs" / "bench", root / "docs" / "bench")


def test_report_check_fails_on_a_hand_edited_number(tmp_path):
    report = _load("report")
    _docs_copy(tmp_path)
    assert report.main(["--check", "--root", str(tmp_path)]) == 0
    doc = tmp_path / "docs" / "benchmarks.md"
    text = doc.read_text()
    start = text.index("<!-- report:ring-floor -->")
    edited = text[:start] + text[start:].replace("|", "| 0.001", 1)  # a hand-typed number inside a rendered table
    doc.write_text(edited)
    assert report.main(["--check", "--root", str(tmp_path)]) == 1
    assert report.main(["--root", str(tmp_path)]) == 0 and doc.read_text() == text  # re-rendering restores it


def test_report_refuses_a_block_that_appears_twice(tmp_path):
    """A pasted second copy of a section would otherwise re-render silently and pass --check."""
    report = _load("report")
    _docs_copy(tmp_path)
    doc = tmp_path / "docs" / "benchmarks.md"
    text = doc.read_text()
    start = text.index("<!-- report:ring-floor -->")
    end = text.index("<!-- /report:ring-floor -->") + len("<!-- /report:ring-floor -->")
    doc.write_text(text + "\n" + text[start:end] + "\n")
    with pytest.raises(SystemExit, match="ring-floor"):
        report.main(["--check", "--root", str(tmp_path)])


def test_tiny_benchmark_suite_end_to_end(tmp_path):
    """`scripts/bench.py tiny`: two losses x two training seeds x two sampling seeds, teacher rows, table, plots."""
    rec = _load("bench").main(["tiny", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                               "--jobs", "2"])
    assert set(rec["runs"]) == {"ring_cd", "ring_dmd2"} and all(len(v) == 2 for v in rec["runs"].values())
    for runs in rec["runs"].values():
        assert {r["seed"] for r in runs} == {0, 1}
        assert all({row["seed"] for row in r["eval"]} == {0, 1} for r in runs)
        assert all(r["parts"][0]["peak_rss_mb"] > 0 and r["parts"][0]["iterations_per_s"] > 0 for r in runs)
    assert {r["sampler"] for r in rec["teacher_rows"]} >= {"euler", "heun", "exact samples"}
    for name in ("tiny.json", "tiny.md", "tiny_nfe.png", "tiny_wallclock.png"):
        assert (tmp_path / "out" / name).is_file()
    md = (tmp_path / "out" / "tiny.md").read_text()
    assert "ring_cd (EMA student" in md and "teacher heun/karras" in md and "2 training seeds" in md
    # --merge: re-collect ring_dmd2 alone and keep ring_cd's runs from the record (in the suite's row order)
    (tmp_path / "runs" / "tiny" / "ring_cd").rename(tmp_path / "runs" / "ring_cd_gone")
    merged = _load("bench").main(["tiny", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                                  "--configs", "ring_dmd2", "--collect", "--merge", "--reuse-teacher"])
    assert list(merged["runs"]) == ["ring_cd", "ring_dmd2"] and merged["runs"]["ring_cd"] == rec["runs"]["ring_cd"]
    assert merged["definition"]["configs"] == ["ring_cd", "ring_dmd2"]


def test_bench_cost_reports_every_figure_and_dmd2_updates_the_generator_every_critic_updates(tmp_path):
    """`scripts/bench_cost.py` on cd (one subprocess, 2 timed iterations) and dmd2's schedule from its config."""
    from distill.train import build_module

    mod = _load("bench_cost")
    rec = mod.main(["--methods", "cd", "--iters", "2", "--warmup", "1", "--threads", "1", "--teacher-reps", "1",
                    "--json", str(tmp_path / "cost.json")])
    assert (tmp_path / "cost.json").is_file() and rec["batch_size"] == 128 and rec["threads"] == 1
    assert {"script", "environment", "torch", "methods"} <= set(rec)
    cd = rec["methods"]["cd"]
    for key in ("ms_per_iteration", "ms_per_student_update", "teacher_forward_ms", "teacher_forward_equivalents",
                "teacher_forwards", "student_forwards", "peak_rss_mib", "baseline_rss_mib"):
        assert math.isfinite(cd[key]) and cd[key] > 0, key
    assert cd["iterations_per_student_update"] == 1 and cd["fake_forwards"] == 0 and cd["train_rss_mib"] >= 0
    assert cd["teacher_forwards"] == 2 and cd["student_forwards"] == 2  # one Heun step; online + stop-grad target

    cfg, warm = mod.make_cfg("dmd2", str(tmp_path))
    assert warm == ["loss.regression_steps=0", "loss.fake_warmup=0"]
    sched = mod.schedule(build_module(cfg).loss)
    assert sched["iterations_per_student_update"] == cfg.loss.critic_updates == 5
    assert sched["per_update"] == {"critic": 4.0, "critic+student": 1.0}


def test_every_shipped_config_loads_and_builds_its_loss_and_every_suite_resolves():
    """A config or suite that no longer matches the code fails here, not hours into a benchmark."""
    from distill.config import load_config, to_container
    from losses import build_loss

    bench = _load("bench")
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name == "suites.yaml":
            continue
        cfg = load_config(path, [])
        if cfg.loss is not None and to_container(cfg.loss).get("name"):
            kw = to_container(cfg.loss)
            build_loss(kw.pop("name"), **kw)
    suites = bench.OmegaConf.to_container(bench.OmegaConf.load(bench.SUITES))
    for name in suites:
        suite = bench.load_suite(name)
        rows = bench.rows_of(suite)
        assert rows and all(cfg in suite["configs"] for _, cfg, _ in rows)
    fdiv = bench.rows_of(bench.load_suite("mixture_fdiv"))
    assert [key for key, _, _ in fdiv] == ["mixture_fdistill[reverse_kl]", "mixture_fdistill[forward_kl]",
                                           "mixture_fdistill[js]"]


def test_diag_jumps_isolates_each_jump_on_an_accurate_ode_reference(tmp_path):
    """`scripts/diag_jumps.py` on a 4-step MeanFlow run: one row per level, the ODE reference's own error far below
    any student error, and a one-line refusal of a 2-NFE level that is not among the levels."""
    from distill.config import load_config
    from distill.train import run_training

    ov = ["trainer.max_steps=4", "eval.every=0", "trainer.grid_every=0", "trainer.progress_bar=false",
          "trainer.ckpt_every=4", "data.batch_size=64", "student.hidden=32", "student.depth=2",
          f"out_dir={tmp_path / 'r'}"]
    run_training(load_config(ROOT / "configs" / "ring_meanflow.yaml", ov), final_eval=False)
    mod = _load("diag_jumps")
    rec = mod.main([str(tmp_path / "r"), "--n", "300", "--levels", "3", "1", "0.3", "--steps", "30",
                    "--out", str(tmp_path / "j.json")])
    assert [r["level"] for r in rec["jumps_to_0"]] == [80.0, 3.0, 1.0, 0.3]
    assert rec["reference_error"]["p90"] < 1e-2 < rec["one_nfe"]["mean"]  # an untrained student is far off
    assert all(math.isfinite(r["mean"]) and 0 <= r["off"] <= 1 for r in rec["jumps_to_0"])
    nb = rec["near_boundary"]  # 8 basins meeting at the centre: some noises lie near a boundary, most do not
    assert 0 < nb["share"] < 0.5 and 0 <= nb["share_of_one_nfe_off_near"] <= 1
    assert (tmp_path / "j.json").is_file()
    with pytest.raises(SystemExit, match="--mid 2.0 must be one of"):
        mod.main([str(tmp_path / "r"), "--levels", "1", "--mid", "2.0"])


def test_suite_provenance_says_what_its_wall_clock_measured():
    """A record re-scored with `bench.py --reeval` must not pass its seconds off as the suite's training time."""
    from distill.reporting import provenance

    env = {"environment": {"git_commit": "a" * 40, "machine": "m", "torch": "t"}, "script": "scripts/bench.py"}
    assert provenance({**env, "wall_s": 590.8}, "x.json").endswith("590.8 s wall-clock._")
    assert provenance({**env, "wall_s": 590.8, "pass": "train"}, "x.json").endswith("590.8 s wall-clock._")
    assert "14.1 s wall-clock re-scoring finished runs (--reeval" in provenance({**env, "wall_s": 14.1,
                                                                                "pass": "reeval"}, "x.json")


def _digits_flowmap_export(folder: Path, gamma: float, noise: float = 0.0) -> Path:
    """A flow-map student of the shipped digits teacher (teacher init, weights nudged by ``noise``) as an export."""
    import json

    import torch
    from safetensors.torch import save_file

    from students import build_student
    from teachers import build_teacher

    student = build_student("flowmap", build_teacher({"name": "digits"}), init="teacher")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * torch.randn_like(p))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "student_config.json").write_text(json.dumps(student.config()))
    (folder / "sampling.json").write_text(json.dumps({"plan": {"gamma": gamma, "levels": {"2": [80.0, 1.0]}}}))
    return folder


def test_diag_chain_fid_swaps_jumps_and_keeps_student_free_rows_fixed(tmp_path):
    mod = _load("diag_chain_fid")
    args = ["--n", "64", "--seeds", "0", "--teacher-nfe", "3", "--threads", "1"]
    a = mod.main([str(_digits_flowmap_export(tmp_path / "a", gamma=1.0)), *args, "--json", str(tmp_path / "a.json")])
    b = mod.main([str(_digits_flowmap_export(tmp_path / "b", gamma=0.0, noise=0.01)), *args])
    ra, rb = a["students"][0]["rows"], b["students"][0]["rows"]
    assert set(ra) == set(mod.ROWS) and all(math.isfinite(v["mean"]) for v in ra.values())
    assert ra["chain"] == ra["chain_fresh"]  # the plan's gamma is 1: its chain already re-noises with fresh noise
    assert rb["chain"] != rb["chain_fresh"]
    for key in ("teacher_on_data", "data"):  # rows that never call the student
        assert ra[key] == rb[key]
    assert ra["student_on_data"] != rb["student_on_data"]
    assert (tmp_path / "a.json").is_file()


def test_probe_jump_regression_changes_nothing_at_zero_lr_and_writes_a_loadable_export(tmp_path):
    from distill.export import load_exported

    mod = _load("probe_jump_regression")
    src = _digits_flowmap_export(tmp_path / "src", gamma=0.9)
    args = [str(src), "--steps", "3", "--pool", "32", "--first-pairs", "8", "--mid-nfe", "3", "--n", "64", "--seeds",
            "0", "--threads", "1"]
    still = mod.main([*args, "--lr", "0", "--first", "anchor", "--onpolicy", "0"])
    assert still["after"] == still["before"]
    moved = mod.main([*args, "--lr", "1e-3", "--first", "ode", "--onpolicy", "0.5", "--out", str(tmp_path / "out")])
    assert moved["after"] != moved["before"] and len(moved["before"]["chain"]) == 1
    load_exported(tmp_path / "out")
