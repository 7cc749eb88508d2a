"""Train shipped configs over several seeds through ``distill train`` and collect their fixed-NFE tables.

Each (config, seed) run writes its own run folder; this script gathers every ``eval.json`` into one JSON and one
Markdown table (mean ± sd over seeds, teacher reference row first), e.g.::

    python scripts/bench_students.py configs/ring_cd.yaml configs/ring_dmd2.yaml --seeds 0 1 2 \\
        --out docs/bench/ring_students
    python scripts/bench_students.py configs/digits_cd.yaml --seeds 0 1 2 --out docs/bench/digits_cd

Extra ``key=value`` overrides after ``--`` apply to every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distill.config import load_config
from distill.eval_tables import EvalRow, markdown_table, write_table
from distill.train import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="runs/bench", help="where the run folders go")
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    rows: list[EvalRow] = []
    timings = {}
    for path in args.configs:
        for seed in args.seeds:
            base = load_config(path, args.overrides)
            name = f"{base.name}_s{seed}"
            cfg = load_config(path, args.overrides + [f"seed={seed}", f"out_dir={args.runs}/{name}",
                                                      f"eval.seeds=[{seed}]"])
            t0 = time.time()
            res = run_training(cfg)
            timings[name] = {"wall_s": round(time.time() - t0, 1), "iterations": res["iterations"],
                             "skipped_steps": res["skipped_steps"]}
            for r in res["eval"]["rows"]:
                row = EvalRow(**r)
                if row.model != "teacher":
                    row.model = base.name
                rows.append(row)
            print(f"{name}: done in {timings[name]['wall_s']} s", flush=True)
    paths = write_table(rows, out.parent, out.name, f"students at fixed NFE, seeds {args.seeds}")
    Path(out.parent / f"{out.name}_timings.json").write_text(json.dumps(timings, indent=1))
    print(markdown_table(rows))
    print(f"written: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
