"""Sampling speed-up at matched quality (docs/benchmarks.md §4, "Cost and overhead").

For an exported student: its FID at each of its NFEs, then, for every teacher solver (ours on Karras and log-SNR
grids, diffusers' through the bridge), the smallest NFE at which that solver is at least as good; the speed-up is
images/s of the student over images/s of the fastest such teacher configuration, both timed side by side in this
process (alternating, median of ``--repeats``), on the same batch size and threads. The NFE ratio is the limit the
speed-up approaches when the network dominates the cost.

    python scripts/bench_speedup.py exports/digits_cd --json docs/bench/speedup_digits_cd.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.evaluate import generate_student, generate_teacher  # noqa: E402
from distill.export import export_plan, load_exported  # noqa: E402
from distill.records import run_environment  # noqa: E402
from distill.scorers import build_scorer  # noqa: E402
from teachers import build_teacher  # noqa: E402


def fid_over_seeds(make, scorer, seeds: list[int]) -> float:
    return statistics.mean(scorer(make(s))["score"] for s in seeds)


def images_per_second(make, n: int) -> float:
    t0 = time.perf_counter()
    make(0)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("student", help="an exported student folder (distill export)")
    ap.add_argument("--teacher", default="digits")
    ap.add_argument("--nfe", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--teacher-nfe", type=int, nargs="+", default=[4, 6, 8, 10, 12, 16, 20, 35])
    ap.add_argument("--solvers", nargs="+", default=["dpmpp_2m:karras", "dpmpp_2m:logsnr", "unipc:logsnr",
                                                      "heun:karras", "diffusers:unipc:vp-default",
                                                      "diffusers:dpmpp_2m:vp-default"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=2000, help="samples per FID (the benchmark's 2,000)")
    ap.add_argument("--time-n", type=int, default=1000, help="batch timed for images/s")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = build_teacher({"name": args.teacher})
    scorer = build_scorer(teacher, "auto")
    student, sampling = load_exported(args.student)
    plan = export_plan(sampling)

    def student_fn(nfe: int, n: int):
        return lambda s: generate_student(student, nfe, n, s, plan, batch_size=n)[0]

    def teacher_fn(solver: str, nfe: int, n: int):
        parts = solver.split(":")
        diffusers = parts[0] == "diffusers"
        name, grid = (parts[1], parts[2]) if diffusers else (parts[0], parts[1])
        grid = {"vp-default": "default"}.get(grid, grid)  # diffusers' own spacing is called "default" there
        return lambda s: generate_teacher(teacher, name, nfe, grid, n, s, batch_size=n, diffusers=diffusers)[0]

    report: dict = {"script": "scripts/bench_speedup.py", "environment": run_environment(),
                    "student": str(args.student), "seeds": args.seeds, "n": args.n, "threads": args.threads,
                    "rows": []}
    teacher_fid: dict[tuple[str, int], float] = {}
    for nfe in args.nfe:
        s_fid = fid_over_seeds(student_fn(nfe, args.n), scorer, args.seeds)
        best = None
        for solver in args.solvers:
            for t_nfe in args.teacher_nfe:
                if solver.startswith("heun") and t_nfe % 2 == 0:
                    continue  # Heun reaches only odd NFE (2N - 1)
                key = (solver, t_nfe)
                if key not in teacher_fid:
                    teacher_fid[key] = fid_over_seeds(teacher_fn(solver, t_nfe, args.n), scorer, args.seeds)
                if teacher_fid[key] <= s_fid:
                    if best is None or t_nfe < best[1]:
                        best = (solver, t_nfe, teacher_fid[key])
                    break
        row = {"student_nfe": nfe, "student_fid": s_fid, "matched": None}
        if best is not None:
            solver, t_nfe, t_fid = best
            fs, ft = student_fn(nfe, args.time_n), teacher_fn(solver, t_nfe, args.time_n)
            fs(0), ft(0)  # warm-up
            ips_s, ips_t = [], []
            for _ in range(args.repeats):  # alternate the two sides so machine noise hits both
                ips_s.append(images_per_second(fs, args.time_n))
                ips_t.append(images_per_second(ft, args.time_n))
            s_ips, t_ips = statistics.median(ips_s), statistics.median(ips_t)
            row["matched"] = {"solver": solver, "nfe": t_nfe, "fid": t_fid, "student_images_per_s": s_ips,
                              "teacher_images_per_s": t_ips, "speedup": s_ips / t_ips, "nfe_ratio": t_nfe / nfe}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    report["teacher_fid"] = {f"{k[0]}@{k[1]}": v for k, v in sorted(teacher_fid.items())}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
