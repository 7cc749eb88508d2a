"""Probe: fine-tune an exported 2-NFE flow map's sampling jumps by L2 regression onto the teacher's ODE endpoints
(Luhman & Luhman's knowledge distillation, arXiv:2101.02388, applied per jump), outside the training loop.

The second jump ``J(x, mid, 0)`` is regressed on a fixed pool of ``--pool`` inputs at the chain's mid level: real data
noised to ``mid`` and, for ``--onpolicy`` of them, the start student's own first-jump outputs re-noised to ``mid``
(fresh noise); targets are the teacher's Heun solutions from those inputs (``--mid-nfe``). The first jump
``J(sigma_max z, sigma_max, 0)`` is, by ``--first``: left free (``none``), anchored to the start student's output
(``anchor``), or regressed onto cached teacher ODE pairs from ``sigma_max`` (``ode``, ``--first-pairs`` of them,
Heun 35 NFE). Adam (betas 0, 0.999), batch 128, ``--steps`` steps, one process, CPU.

Scores before and after (FID, ``--seeds``): the 1-NFE student, the 2-NFE chain under the export's plan and with
fresh noise (gamma 1), and the second jump alone on real data noised to ``mid``. The fine-tuned weights are written
as an export folder (``--out``), so ``student.from_export`` can start a run from them.

    python scripts/probe_jump_regression.py EXPORT --first ode --json docs/bench/sweeps/NAME.json --out exports/NAME
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.core.data import DATASETS  # noqa: E402
from distill.evaluate import generate_student  # noqa: E402
from distill.export import load_exported  # noqa: E402
from distill.records import run_environment  # noqa: E402
from distill.scorers import build_scorer  # noqa: E402
from scripts.diag_chain_fid import jump, teacher_ode, write_record  # noqa: E402
from students import SamplingPlan  # noqa: E402
from teachers import build_teacher  # noqa: E402

FIRST = ("none", "anchor", "ode")


def scores(student, scorer, data, levels, gamma, seeds, n) -> dict:
    """1-NFE, 2-NFE (the plan's gamma and gamma 1) and the second jump on noised real data, per sampling seed."""
    student.eval()
    mid, out = levels[1], {"one_step": [], "chain": [], "chain_fresh": [], "jump_on_data": []}
    plan = SamplingPlan(gamma=gamma, levels={1: (levels[0],), 2: tuple(levels)})
    fresh = SamplingPlan(gamma=1.0, levels={2: tuple(levels)})
    for seed in seeds:
        out["one_step"].append(scorer(generate_student(student, 1, n, seed, plan)[0])["score"])
        out["chain"].append(scorer(generate_student(student, 2, n, seed, plan)[0])["score"])
        out["chain_fresh"].append(scorer(generate_student(student, 2, n, seed, fresh)[0])["score"])
        g = torch.Generator().manual_seed(1000 + seed)
        real = data[torch.randint(0, data.shape[0], (n,), generator=g)]
        out["jump_on_data"].append(scorer(jump(student, real + mid * torch.randn(real.shape, generator=g), mid))
                                   ["score"])
    return {k: [round(x, 4) for x in v] for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--teacher", default="digits")
    ap.add_argument("--features", default="digits")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--first", choices=FIRST, default="ode")
    ap.add_argument("--onpolicy", type=float, default=0.0, help="fraction of the mid pool from the start's first jump")
    ap.add_argument("--pool", type=int, default=8192)
    ap.add_argument("--first-pairs", type=int, default=2048)
    ap.add_argument("--mid-nfe", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the fine-tuned student here as an export folder")
    args = ap.parse_args(argv)
    if not 0.0 <= args.onpolicy <= 1.0:
        ap.error(f"--onpolicy must lie in [0, 1], got {args.onpolicy}")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    teacher = build_teacher({"name": args.teacher})
    scorer = build_scorer(teacher, args.features)
    data = DATASETS.get(args.dataset)()[0]
    student, sampling = load_exported(args.export)
    levels = [float(s) for s in sampling["plan"]["levels"]["2"]]
    gamma, (smax, mid) = float(sampling["plan"]["gamma"]), levels
    before = scores(student, scorer, data, levels, gamma, args.seeds, args.n)
    start = copy.deepcopy(student).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(args.seed)
    shape = tuple(data.shape[1:])
    n_on = int(round(args.pool * args.onpolicy))
    real = data[torch.randint(0, data.shape[0], (args.pool - n_on,), generator=g)]
    with torch.no_grad():
        x1 = jump(start, smax * torch.randn((n_on, *shape), generator=g), smax)
    x_mid = torch.cat([real, x1]) + mid * torch.randn((args.pool, *shape), generator=g)
    y_mid = teacher_ode(teacher, x_mid, mid, args.mid_nfe)
    if args.first == "ode":
        z1 = torch.randn((args.first_pairs, *shape), generator=g)
        y1 = teacher_ode(teacher, smax * z1, smax, 35)
    pool_s = time.time() - t0
    student.train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr, betas=(0.0, 0.999))
    B, losses = args.batch, []
    a_mid, a_max, zero = torch.full((B,), mid), torch.full((B,), smax), torch.zeros(B)
    for it in tqdm(range(args.steps), desc="jump regression"):
        i = torch.randint(0, args.pool, (B,), generator=g)
        loss = (student(x_mid[i], a_mid, zero, None) - y_mid[i]).pow(2).mean()
        if args.first == "anchor":
            z = smax * torch.randn((B, *shape), generator=g)
            with torch.no_grad():
                target = start(z, a_max, zero, None)
            loss = loss + (student(z, a_max, zero, None) - target).pow(2).mean()
        elif args.first == "ode":
            j = torch.randint(0, args.first_pairs, (B,), generator=g)
            loss = loss + (student(smax * z1[j], a_max, zero, None) - y1[j]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % 250 == 0:
            losses.append({"step": it + 1, "loss": round(loss.item(), 6)})
    student.eval().requires_grad_(False)
    after = scores(student, scorer, data, levels, gamma, args.seeds, args.n)
    out = {"script": "scripts/probe_jump_regression.py", "argv": sys.argv[1:] if argv is None else argv,
           "export": str(args.export), "levels": levels, "gamma": gamma, "first": args.first,
           "onpolicy": args.onpolicy, "steps": args.steps, "lr": args.lr, "seeds": args.seeds, "n": args.n,
           "before": before, "after": after, "loss_curve": losses, "pool_s": round(pool_s, 1),
           "wall_s": round(time.time() - t0, 1), "environment": run_environment()}
    print(json.dumps({"before": before, "after": after}), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(args.out / "model.safetensors"))
        for name in ("student_config.json", "sampling.json"):
            shutil.copy(args.export / name, args.out / name)
    write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
