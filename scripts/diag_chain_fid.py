"""Where a flow-map student's 2-NFE FID is lost, on an image teacher: each jump of the 2-step chain swapped for the
teacher's probability-flow ODE, or fed real data.

For an exported flow map (``distill export``) and each sampling seed, FID (the teacher's scorer, ``n`` samples) of:

* ``one_step``: the first jump alone, ``J(sigma_max z, sigma_max, 0)`` (the 1-NFE student);
* ``chain``: the student's own 2-NFE chain under its exported plan (levels ``[sigma_max, mid]``, its gamma);
* ``chain_fresh``: the same chain with fresh noise at ``mid`` (gamma 1);
* ``teacher_second``: the first jump, re-noised to ``mid`` with fresh noise, then the teacher's ODE to 0 (Heun on a
  Karras grid, ``--teacher-nfe``): the chain a perfect second jump would give;
* ``student_on_data`` / ``teacher_on_data``: real data (resampled with replacement to ``n``) noised to ``mid``, then
  the student's jump ``J(x, mid, 0)`` / the teacher's ODE: the second jump on the distribution it should see;
* ``data``: the resampled real data itself (the metric's floor at ``n`` samples).

    python scripts/diag_chain_fid.py EXPORT [EXPORT ...] --seeds 0 1 2 --json docs/bench/sweeps/NAME_chain.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.core.data import DATASETS  # noqa: E402
from distill.core.pairs import teacher_ode_pairs  # noqa: E402
from distill.evaluate import generate_student  # noqa: E402
from distill.export import load_exported  # noqa: E402
from distill.records import run_environment  # noqa: E402
from distill.scorers import build_scorer  # noqa: E402
from students import SamplingPlan  # noqa: E402
from teachers import build_teacher  # noqa: E402

ROWS = ("one_step", "chain", "chain_fresh", "teacher_second", "student_on_data", "teacher_on_data", "data")


@torch.no_grad()
def teacher_ode(teacher, x: torch.Tensor, sigma: float, nfe: int, chunk: int = 1000) -> torch.Tensor:
    """The teacher's Heun ODE solution at 0 from ``x`` at level ``sigma`` (``nfe`` evaluations, Karras grid)."""
    return torch.cat([teacher_ode_pairs(teacher, x[i:i + chunk] / sigma, float(teacher.sigma_min), sigma, None, nfe)
                      for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def jump(student, x: torch.Tensor, sigma: float, chunk: int = 1000) -> torch.Tensor:
    """The student's jump ``J(x, sigma, 0)`` (an empty batch gives an empty result)."""
    outs = [x[:0]]
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk]
        a = torch.full((xs.shape[0],), sigma, dtype=xs.dtype)
        outs.append(student(xs, a, torch.zeros_like(a), None))
    return torch.cat(outs)


def write_record(path: Path | None, record: dict) -> None:
    """Write ``record`` as indented JSON to ``path`` (parents created; nothing when ``path`` is ``None``)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))


def diagnose(export: Path, teacher, scorer, data: torch.Tensor, seeds: list[int], n: int, teacher_nfe: int
             ) -> dict:
    student, sampling = load_exported(export)
    plan_cfg = sampling["plan"]
    levels = [float(s) for s in plan_cfg["levels"]["2"]]
    mid, gamma = levels[1], float(plan_cfg["gamma"])
    scores: dict[str, list[float]] = {k: [] for k in ROWS}
    plan = SamplingPlan(gamma=gamma, levels={2: tuple(levels), 1: (levels[0],)})
    fresh = SamplingPlan(gamma=1.0, levels={2: tuple(levels)})
    for seed in tqdm(seeds, desc=export.name):
        g = torch.Generator().manual_seed(1000 + seed)  # this script's own stream for re-noising and data draws
        x1 = generate_student(student, 1, n, seed, plan)[0]
        scores["one_step"].append(scorer(x1)["score"])
        scores["chain"].append(scorer(generate_student(student, 2, n, seed, plan)[0])["score"])
        scores["chain_fresh"].append(scorer(generate_student(student, 2, n, seed, fresh)[0])["score"])
        x_mid = x1 + mid * torch.randn(x1.shape, generator=g)
        scores["teacher_second"].append(scorer(teacher_ode(teacher, x_mid, mid, teacher_nfe))["score"])
        real = data[torch.randint(0, data.shape[0], (n,), generator=g)]
        x_mid = real + mid * torch.randn(real.shape, generator=g)
        scores["student_on_data"].append(scorer(jump(student, x_mid, mid))["score"])
        scores["teacher_on_data"].append(scorer(teacher_ode(teacher, x_mid, mid, teacher_nfe))["score"])
        scores["data"].append(scorer(real)["score"])
    return {"export": str(export), "levels": levels, "gamma": gamma,
            "rows": {k: {"mean": round(statistics.mean(v), 4), "scores": [round(x, 4) for x in v]}
                     for k, v in scores.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exports", type=Path, nargs="+", help="folders written by `distill export` (2-NFE flow maps)")
    ap.add_argument("--teacher", default="digits")
    ap.add_argument("--features", default="digits")
    ap.add_argument("--dataset", default="digits", help="the real data (a distill.core.data DATASETS name)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--teacher-nfe", type=int, default=15, help="Heun evaluations of the teacher's solve from mid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = build_teacher({"name": args.teacher})
    scorer = build_scorer(teacher, args.features)
    data = DATASETS.get(args.dataset)()[0]
    out = {"script": "scripts/diag_chain_fid.py", "argv": sys.argv[1:] if argv is None else argv,
           "n": args.n, "seeds": args.seeds, "teacher_nfe": args.teacher_nfe, "environment": run_environment(),
           "students": [diagnose(e, teacher, scorer, data, args.seeds, args.n, args.teacher_nfe)
                        for e in args.exports]}
    for s in out["students"]:
        print(s["export"], json.dumps({k: v["mean"] for k, v in s["rows"].items()}), flush=True)
    write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
