"""Recipe sweeps: train a config in a bare loop while tracking several evaluation EMAs at once, scoring each of them
at fixed NFE every ``--every`` iterations.

One training run answers "which EMA decay suits this run length" for free, and runs of different recipes
(``key=value`` overrides) can be compared at equal iterations. The loop is the same computation as ``distill train``
(``DistillModule.iterate``, i.e. ``distill.iteration.run_iteration``) without the Lightning trainer, checkpoints or
logging, so the raw weights match ``distill train``'s bit for bit. Scores use 2,000 samples and sampling seed 0 (the
benchmark's proxy protocol).

    python scripts/sweep_emas.py configs/digits_cd.yaml loss.num_levels=12 --steps 2400 --every 600 \\
        --emas 0.998 0.999 --floors 0.8 --json docs/bench/sweeps/cd_n12.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.config import load_config  # noqa: E402
from distill.core.ema import make_ema  # noqa: E402
from distill.evaluate import generate_student  # noqa: E402
from distill.scorers import build_scorer  # noqa: E402
from distill.train import build_module  # noqa: E402
from students import SamplingPlan  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    ap.add_argument("--steps", type=int, default=2400, help="training iterations")
    ap.add_argument("--every", type=int, default=600, help="evaluation period")
    ap.add_argument("--emas", type=float, nargs="+", default=[0.995, 0.998, 0.999])
    ap.add_argument("--floors", type=float, nargs="*", default=[], help="2-NFE re-noising levels to score")
    ap.add_argument("--gamma", type=float, default=1.0, help="gamma of the 2-NFE student sampler")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, list(args.overrides) + [f"seed={args.seed}", f"trainer.max_steps={args.steps}"])
    torch.manual_seed(cfg.seed)
    # The run `distill train` builds, iterated by the same iteration function, without the Lightning trainer.
    module = build_module(cfg)
    module.prepare()
    module.configure_optimizers()
    emas = {d: make_ema(module.student, d) for d in args.emas}
    scorer = build_scorer(module.teacher, cfg.eval.features)
    rows: list[dict] = []
    t0 = time.time()
    for k in range(args.steps):
        module.iterate(tuple(emas.values()))
        if (k + 1) % args.every == 0:
            row: dict = {"iteration": k + 1, "wall_s": round(time.time() - t0, 1)}
            for d, e in emas.items():
                for nfe, floor in [(1, None)] + [(2, f) for f in args.floors]:
                    plan = SamplingPlan(gamma=args.gamma, floor=floor if floor is not None else 0.4)
                    x, _, _ = generate_student(e.module, nfe, args.n, 0, plan)
                    tag = f"ema{d}_nfe{nfe}" + (f"_via{floor}" if floor is not None else "")
                    row[tag] = round(scorer(x)["score"], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "steps": args.steps,
                                         "seed": args.seed, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
