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
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.config import load_config, to_container  # noqa: E402
from distill.evaluate import build_scorer, teacher_table  # noqa: E402
from distill.records import run_environment  # noqa: E402
from teachers import build_teacher  # noqa: E402

SUITES = ROOT / "configs" / "suites.yaml"


def load_suite(name: str) -> dict[str, Any]:
    suites = OmegaConf.to_container(OmegaConf.load(SUITES))
    if name not in suites:
        raise SystemExit(f"unknown suite {name!r}; valid suites: {', '.join(sorted(suites))}")
    suite = {"overrides": [], "config_overrides": {}, "nfe": [1, 2, 4, 8], "teacher_samplers": ["heun"], **suites[name]}
    for cfg in suite["configs"]:
        if not (ROOT / "configs" / f"{cfg}.yaml").is_file():
            raise SystemExit(f"suite {name!r} names config {cfg!r}, but configs/{cfg}.yaml does not exist")
    return suite


def run_overrides(suite: dict[str, Any], cfg: str, seed: int, run_dir: Path) -> list[str]:
    return [*suite["overrides"], *suite["config_overrides"].get(cfg, []), f"seed={seed}", f"out_dir={run_dir}",
            f"eval.seeds={list(suite['sample_seeds'])}", f"eval.nfe={list(suite['nfe'])}",
            f"eval.n_samples={suite['n_samples']}", f"eval.batch_size={suite['n_samples']}",
            "trainer.progress_bar=false", "trainer.num_threads=1"]


def train_one(cfg: str, overrides: list[str], log: Path) -> dict[str, Any]:
    """``distill train`` in a subprocess; returns its ``record.json``."""
    run_dir = Path(next(o for o in overrides if o.startswith("out_dir="))[len("out_dir="):])
    cmd = [sys.executable, "-m", "distill.cli", "train", str(ROOT / "configs" / f"{cfg}.yaml"), *overrides]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{cfg} ({run_dir}) failed with exit code {r.returncode}; see {log}")
    rec = json.loads((run_dir / "record.json").read_text())
    rec["process_s"] = round(time.perf_counter() - t0, 1)
    return rec


def summarise(values: dict[int, list[float]]) -> tuple[float, float, str]:
    """(mean, sd, what the sd is over) from training seed -> sampling-seed scores."""
    per_train = [statistics.mean(v) for v in values.values()]
    if len(per_train) > 1:
        return statistics.mean(per_train), statistics.stdev(per_train), f"{len(per_train)} training seeds"
    only = next(iter(values.values()))
    sd = statistics.stdev(only) if len(only) > 1 else 0.0
    return statistics.mean(only), sd, f"1 training seed, {len(only)} sampling seeds"


def student_rows(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for cfg, recs in records.items():
        by_nfe: dict[int, dict[int, list[float]]] = {}
        for rec in recs:
            for row in rec["eval"]:
                if row["model"] != "teacher":
                    by_nfe.setdefault(int(row["nfe"]), {}).setdefault(rec["seed"], []).append(float(row["score"]))
        train_s = [sum(p["train_s"] for p in r["parts"]) for r in recs]
        iters = [r["iterations"] for r in recs]
        out[cfg] = {
            "cells": {k: summarise(v) for k, v in sorted(by_nfe.items())},
            "train_s": statistics.mean(train_s),
            "s_per_1k": statistics.mean(1000 * t / i for t, i in zip(train_s, iters)),
            "iterations_per_s": statistics.mean(r["parts"][-1]["iterations_per_s"] for r in recs),
            "peak_rss_mb": max(r["parts"][-1]["peak_rss_mb"] for r in recs),
            "iterations": iters[0],
        }
    return out


def teacher_cells(rows: list[dict[str, Any]]) -> dict[str, dict[int, tuple[float, float, str]]]:
    out: dict[str, dict[int, dict[int, list[float]]]] = {}
    for r in rows:
        key = f"{r['sampler']}/{r['grid']}" if r["model"] == "teacher" else r["model"]
        out.setdefault(key, {}).setdefault(int(r["nfe"]), {0: []})[0].append(float(r["score"]))
    return {k: {n: summarise(v) for n, v in sorted(d.items())} for k, d in out.items()}


def markdown(suite_name: str, suite: dict[str, Any], metric: str, students: dict[str, Any],
             teachers: dict[str, Any]) -> str:
    nfes = sorted({*suite["nfe"]})
    ref_nfes = sorted({n for d in teachers.values() for n in d} - set(nfes))
    cols = nfes + ref_nfes
    head = "| model | " + " | ".join(f"{metric} @ {k} NFE" if k else f"{metric} (exact)" for k in cols) + \
        " | s / 1k it | it/s | peak MB | sd over |"
    lines = [f"Suite `{suite_name}`: {suite['n_samples']} samples per score, sampling seeds {suite['sample_seeds']}, "
             f"training seeds {suite['train_seeds']}.", "", head, "|" + "---|" * (len(cols) + 5)]

    def cell(c: tuple[float, float, str] | None) -> str:
        return "–" if c is None else f"{c[0]:.4g} ± {c[1]:.2g}"

    for cfg, s in students.items():
        over = next(iter(s["cells"].values()))[2] if s["cells"] else ""
        lines.append(f"| {cfg} (EMA student, {s['iterations']} it) | " + " | ".join(cell(s["cells"].get(k))
                     for k in cols) + f" | {s['s_per_1k']:.1f} | {s['iterations_per_s']:.1f} | "
                     f"{s['peak_rss_mb']:.0f} | {over} |")
    for name, d in teachers.items():
        lines.append(f"| teacher {name} | " + " | ".join(cell(d.get(k)) for k in cols) +
                     f" | – | – | – | {len(suite['sample_seeds'])} sampling seeds |")
    return "\n".join(lines) + "\n"


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
    args = ap.parse_args(argv)
    suite = load_suite(args.suite)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for cfg in suite["configs"]:
        for seed in suite["train_seeds"]:
            run_dir = args.runs / args.suite / cfg / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            jobs.append((cfg, run_overrides(suite, cfg, seed, run_dir), run_dir / "bench.log"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = list(pool.map(lambda j: (j[0], train_one(*j)), jobs))
    records: dict[str, list[dict[str, Any]]] = {}
    for cfg, rec in done:
        records.setdefault(cfg, []).append(rec)
    # Teacher rows at the same NFEs and sampling seeds, with the protocol of the first config.
    first = load_config(ROOT / "configs" / f"{suite['configs'][0]}.yaml",
                        run_overrides(suite, suite["configs"][0], 0, args.runs / args.suite / "teacher"))
    torch.set_num_threads(max(1, args.jobs))
    teacher = build_teacher(to_container(first.teacher))
    scorer = build_scorer(teacher, first.eval.features, first.eval.inception_path, first.eval.kind)
    t_rows = teacher_table(teacher, scorer, list(suite["teacher_samplers"]), ["karras"], list(suite["nfe"]),
                           list(suite["sample_seeds"]), suite["n_samples"], batch_size=suite["n_samples"],
                           progress=False)
    t_rows = [r.__dict__ for r in t_rows]
    students, teachers = student_rows(records), teacher_cells(t_rows)
    metric = scorer.metric
    record = {"script": "scripts/bench.py", "suite": args.suite, "definition": suite, "metric": metric,
              "wall_s": round(time.perf_counter() - t0, 1), "environment": run_environment(),
              "runs": records, "teacher_rows": t_rows}
    (args.out / f"{args.suite}.json").write_text(json.dumps(record, indent=1, default=str))
    table = markdown(args.suite, suite, metric, students, teachers)
    (args.out / f"{args.suite}.md").write_text(table)
    plots(args.out, args.suite, metric, students, teachers)
    print(table)
    return record


if __name__ == "__main__":
    main()
