"""Choose a few-step student's sampling settings on held-out seeds: FID of an exported student at ``--nfe`` steps for
every intermediate level (``--floors``: a Karras grid from sigma_max down to the floor, so a 2-step grid is
``[sigma_max, floor]``) and every ``--gammas`` (0 = deterministic jumps, 1 = multistep consistency sampling), averaged
over ``--seeds``. Pick on seeds you will not report (the benchmark reports seeds 0-2; the default here is 10-12).

    python scripts/sweep_student_sampling.py exports/digits_cd --nfe 2 --floors 0.5 0.8 1.2 2.0 \\
        --gammas 0.5 0.9 1.0 --json docs/bench/sweeps/cd_sampling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.evaluate import generate_student  # noqa: E402
from distill.export import load_exported  # noqa: E402
from distill.scorers import build_scorer  # noqa: E402
from students import SamplingPlan  # noqa: E402
from teachers import build_teacher  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", type=Path, help="folder written by `distill export`")
    ap.add_argument("--teacher", default="digits", help="teacher name (for the FID features and reference)")
    ap.add_argument("--features", default="digits")
    ap.add_argument("--nfe", type=int, default=2)
    ap.add_argument("--floors", type=float, nargs="+", default=[0.5, 0.8, 1.2, 2.0])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.9, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    student, _ = load_exported(args.export)
    scorer = build_scorer(build_teacher({"name": args.teacher}), args.features)
    rows = []
    for floor in args.floors:
        for gamma in args.gammas:
            plan = SamplingPlan(gamma=gamma, floor=floor)
            scores = [scorer(generate_student(student, args.nfe, args.n, s, plan)[0])["score"]
                      for s in args.seeds]
            row = {"nfe": args.nfe, "floor": floor, "gamma": gamma, "seeds": args.seeds,
                   "mean": round(statistics.mean(scores), 4), "scores": [round(x, 4) for x in scores]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"export": str(args.export), "n": args.n, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
