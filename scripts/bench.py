"""The cross-method benchmark: ``python scripts/bench.py SUITE`` (suites in ``configs/suites.yaml``).

Every config of the suite is trained by ``distill train`` (a subprocess each, ``--jobs`` at a time) once per
training seed; each run's final evaluation scores its EMA student at the suite's NFEs over independent sampling
seeds and writes ``record.json`` (protocol, wall-clock, iterations/s, peak memory, commit). The teacher's
training-free solvers are scored at the same NFEs and seeds, with the 35-NFE Heun reference (and, for exact
teachers, the exact-vs-exact noise floor). The script then writes

* ``<out>/<suite>.json`` - one record: the suite, every run's record, the teacher rows, the environment;
* ``<out>/<suite>.md``  - the cross-method table (rows: students and teacher solvers; columns: NFE; cells: mean ± sd
  over training seeds of the per-seed mean over sampling seeds, or over sampling seeds when one training seed ran),
  with wall-clock per 1k iterations, iterations/s and peak memory per student;
* ``<out>/<suite>_nfe.png`` (quality vs NFE) and ``<out>/<suite>_wallclock.png`` (quality vs training wall-clock).

    python scripts/bench.py ring --jobs 2                  # docs/bench/ring.{json,md,png}
    python scripts/bench.py tiny --out /tmp/bench --jobs 2  # CI-sized
    python scripts/bench.py digits_long --jobs 5 --set trainer.accelerator=gpu   # extra overrides for every run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.config import load_config, to_container  # noqa: E402
from distill.evaluate import teacher_table  # noqa: E402
from distill.records import run_environment  # noqa: E402
from distill.reporting import student_summary, suite_markdown, teacher_summary  # noqa: E402
from distill.train import reevaluate, scorer_for  # noqa: E402
from teachers import build_teacher  # noqa: E402

SUITES = ROOT / "configs" / "suites.yaml"


def load_suite(name: str) -> dict[str, Any]:
    suites = OmegaConf.to_container(OmegaConf.load(SUITES))
    if name not in suites:
        raise SystemExit(f"unknown suite {name!r}; valid suites: {', '.join(sorted(suites))}")
    suite = {"overrides": [], "config_overrides": {}, "variants": {}, "config_seeds": {}, "nfe": [1, 2, 4, 8],
             "teacher_samplers": ["heun"], "teacher_grids": ["karras"], "diffusers_samplers": [], "threads": 1,
             **suites[name]}
    for cfg in suite["configs"]:
        if not (ROOT / "configs" / f"{cfg}.yaml").is_file():
            raise SystemExit(f"suite {name!r} names config {cfg!r}, but configs/{cfg}.yaml does not exist")
    return suite


def rows_of(suite: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """The suite's table rows ``(key, config, overrides)``: each config once, or once per variant as
    ``config[variant]`` (``variants: {label: [overrides]}``, e.g. one row per f-divergence)."""
    if not suite["variants"]:
        return [(cfg, cfg, []) for cfg in suite["configs"]]
    return [(f"{cfg}[{label}]", cfg, list(ov)) for cfg in suite["configs"] for label, ov in suite["variants"].items()]


def run_overrides(suite: dict[str, Any], cfg: str, seed: int, run_dir: Path, variant: list[str] | None = None
                  ) -> list[str]:
    return [*suite["overrides"], *suite["config_overrides"].get(cfg, []), *(variant or []), f"seed={seed}",
            f"out_dir={run_dir}",
            f"eval.seeds={list(suite['sample_seeds'])}", f"eval.nfe={list(suite['nfe'])}",
            f"eval.n_samples={suite['n_samples']}", f"eval.batch_size={suite['n_samples']}",
            "trainer.progress_bar=false", f"trainer.num_threads={suite['threads']}"]


def run_dir_of(overrides: list[str]) -> Path:
    return Path(next(o for o in overrides if o.startswith("out_dir="))[len("out_dir="):])


def finished(overrides: list[str]) -> dict[str, Any] | None:
    """The ``record.json`` of a run that finished (``None`` if it has none)."""
    path = run_dir_of(overrides) / "record.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_one(cfg: str, overrides: list[str], log: Path) -> dict[str, Any]:
    """``distill train`` in a subprocess; returns its ``record.json``."""
    run_dir = run_dir_of(overrides)
    cmd = [sys.executable, "-m", "distill.cli", "train", str(ROOT / "configs" / f"{cfg}.yaml"), *overrides]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{cfg} ({run_dir}) failed with exit code {r.returncode}; see {log}")
    rec = json.loads((run_dir / "record.json").read_text())
    rec["process_s"] = round(time.perf_counter() - t0, 1)
    return rec


def plots(out: Path, suite_name: str, metric: str, students: dict[str, Any], teachers: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in list(students.items()) + [(f"teacher {k}", v) for k, v in teachers.items()]:
        cells = d["cells"] if "cells" in d else d
        ks = [k for k in sorted(cells) if k > 0]
        if ks:
            ax.errorbar(ks, [cells[k][0] for k in ks], yerr=[cells[k][1] for k in ks], marker="o", capsize=2,
                        label=name, ls="-" if name in students else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(f"{suite_name}: quality vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{suite_name}_nfe.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in students.items():
        for k, c in s["cells"].items():
            ax.scatter([s["train_s"] / 60], [c[0]], label=f"{name} @ {k} NFE")
    ax.set_xlabel("training wall-clock (minutes, mean over training seeds)")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    ax.set_title(f"{suite_name}: quality vs training wall-clock")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{suite_name}_wallclock.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench", help="where the runs' folders go")
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one thread each)")
    ap.add_argument("--reuse-teacher", action="store_true",
                    help="take the teacher rows from the existing <out>/<suite>.json (deterministic solvers only)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override appended to every run's (repeatable; recorded), e.g. trainer.accelerator=gpu")
    ap.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                    help="run only these configs of the suite (the record lists the rows it has)")
    ap.add_argument("--merge", action="store_true",
                    help="with --configs: keep the existing <out>/<suite>.json's runs of the suite's other configs "
                         "(the record then lists them all)")
    ap.add_argument("--skip-done", action="store_true",
                    help="train only the runs without a record.json in --runs (e.g. a config added to the suite)")
    ap.add_argument("--collect", action="store_true",
                    help="do not train: build the suite record from the finished runs' record.json files in --runs")
    ap.add_argument("--reeval", action="store_true",
                    help="do not train: score the suite's finished runs in --runs again with this code's evaluation")
    args = ap.parse_args(argv)
    suite = load_suite(args.suite)
    all_configs = list(suite["configs"])
    if args.merge and not args.configs:
        raise SystemExit("--merge needs --configs (the configs to run; the others are kept from the record)")
    if args.configs:
        unknown = sorted(set(args.configs) - set(suite["configs"]))
        if unknown:
            raise SystemExit(f"--configs: {', '.join(unknown)} not in suite {args.suite!r}; its configs: "
                             f"{', '.join(suite['configs'])}")
        suite["configs"] = [c for c in suite["configs"] if c in args.configs]
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for key, cfg, variant in rows_of(suite):
        for seed in suite["config_seeds"].get(cfg, suite["train_seeds"]):
            run_dir = args.runs / args.suite / key.replace("[", "_").rstrip("]") / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            jobs.append((key, cfg, [*run_overrides(suite, cfg, seed, run_dir, variant), *args.extra],
                         run_dir / "bench.log"))
    t0 = time.perf_counter()
    if args.collect:
        done = [(key, finished(ov)) for key, _, ov, _ in jobs]
        missing = [str(run_dir_of(ov)) for (_, rec), (_, _, ov, _) in zip(done, jobs) if rec is None]
        if missing:
            raise SystemExit(f"--collect: {len(missing)} run(s) have no record.json: {', '.join(missing)}")
    elif args.reeval:
        torch.set_num_threads(2)
        done = [(key, reevaluate(load_config(ROOT / "configs" / f"{cfg}.yaml", ov), run_dir_of(ov)))
                for key, cfg, ov, _ in jobs]
    else:
        def run(job: tuple[str, str, list[str], Path]) -> tuple[str, dict[str, Any]]:
            rec = finished(job[2]) if args.skip_done else None
            return job[0], rec if rec is not None else train_one(*job[1:])

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = list(pool.map(run, jobs))
    records: dict[str, list[dict[str, Any]]] = {}
    old = args.out / f"{args.suite}.json"
    if args.merge and old.is_file():
        kept = json.loads(old.read_text())["runs"]
        ran = {key for key, _ in done}
        rows = [(key, cfg) for key, cfg, _ in rows_of({**suite, "configs": all_configs}) if key in kept
                and key not in ran]
        records = {key: kept[key] for key, _ in rows}
        suite["configs"] = [c for c in all_configs if c in suite["configs"] or c in {cfg for _, cfg in rows}]
    for cfg, rec in done:
        records.setdefault(cfg, []).append(rec)
    records = {key: records[key] for key, _, _ in rows_of(suite) if key in records}
    # Teacher rows at the same NFEs and sampling seeds, with the protocol of the first config.
    first = load_config(ROOT / "configs" / f"{suite['configs'][0]}.yaml",
                        run_overrides(suite, suite["configs"][0], 0, args.runs / args.suite / "teacher"))
    torch.set_num_threads(max(1, args.jobs))
    teacher = build_teacher(to_container(first.teacher))
    scorer = scorer_for(first, teacher)
    if args.reuse_teacher and old.is_file():
        t_rows = [SimpleNamespace(**r) for r in json.loads(old.read_text())["teacher_rows"]]
    else:
        t_rows = teacher_table(teacher, scorer, list(suite["teacher_samplers"]), list(suite["teacher_grids"]),
                               list(suite["nfe"]), list(suite["sample_seeds"]), suite["n_samples"],
                               diffusers_samplers=list(suite["diffusers_samplers"]), batch_size=suite["n_samples"],
                               progress=False)
    t_rows = [r.__dict__ for r in t_rows]
    metric = scorer.metric
    record = {"script": "scripts/bench.py", "suite": args.suite, "definition": suite, "extra_overrides": args.extra,
              "metric": metric,
              "wall_s": round(time.perf_counter() - t0, 1),
              "pass": "reeval" if args.reeval else "collect" if args.collect else "train",
              "environment": run_environment(),
              "runs": records, "teacher_rows": t_rows}
    path = args.out / f"{args.suite}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    table = suite_markdown(record, rel)
    (args.out / f"{args.suite}.md").write_text(table + "\n")
    students = {cfg: student_summary(runs) for cfg, runs in records.items()}
    plots(args.out, args.suite, metric, students, teacher_summary(t_rows))
    print(table)
    return record


if __name__ == "__main__":
    main()
