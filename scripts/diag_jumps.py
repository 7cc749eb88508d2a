"""Where a flow-map student's few-step error comes from, on an analytic teacher: each jump ``J(x_s, s, 0)`` against the
teacher's own PF-ODE endpoint from the same noise.

For ``n`` noises ``z`` the teacher's probability-flow ODE is integrated from ``sigma_max`` (Heun on Karras segments,
``--steps`` per segment, float64) through the ``--levels`` down to 0, giving the exact-ODE point ``x_s`` at each level
and the endpoint ``x_0``. Reported per level ``s``: the distance ``|J(x_s, s, 0) - x_0|`` (mean, median, 90th
percentile) of the run's EMA student started ON the teacher's trajectory, so each row isolates the one jump ``s -> 0``;
plus the student's own 1- and 2-NFE chains from ``sigma_max`` (2 NFE through ``--mid``) and its first 2-NFE jump
``sigma_max -> mid`` against ``x_mid``. ``reference_error`` is the ODE solve's own error (the same solve with half the
steps), so distances far above it are the student's. ``off`` is the fraction of points farther than ``--off-radius``
from every mode centre (ring/grid teachers: the mixture's means). ``near_boundary`` splits the 1-NFE chain's points by
whether their noise lies near a basin boundary of the teacher's map: the noise moved by ``+- --boundary-eps`` along a
random direction ends (by the same ODE) at another mode than the noise itself.

    python scripts/diag_jumps.py RUN_DIR --out docs/bench/sweeps/NAME_jumps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.config import load_config  # noqa: E402
from distill.core.samplers import sample_heun  # noqa: E402
from distill.core.schedules import karras_sigmas  # noqa: E402
from distill.records import run_environment  # noqa: E402
from distill.train import build_module, load_training_checkpoint  # noqa: E402


def ode_points(teacher, noise: torch.Tensor, levels: list[float], steps: int) -> list[torch.Tensor]:
    """The teacher's PF-ODE from ``levels[0] * noise`` through every level (the last 0): ``[x at each level]``."""
    x, out = levels[0] * noise, [levels[0] * noise]
    for a, b in zip(levels[:-1], levels[1:]):
        if b == 0:  # the EDM grid's last step to 0 is Euler from the smallest level: keep that level tiny
            grid = torch.cat([karras_sigmas(steps, sigma_min=2e-3 * min(1.0, a), sigma_max=a, append_zero=False),
                              torch.zeros(1, dtype=torch.float64)])
        else:
            grid = karras_sigmas(steps, sigma_min=b, sigma_max=a, append_zero=False)
        x = sample_heun(lambda y, s, c=None: teacher(y, s), x / a, grid)
        out.append(x)
    return out


def stats(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean, median and 90th percentile of the per-sample distance ``|y - ref|``."""
    d = (y - ref).flatten(1).norm(dim=1)
    return {"mean": float(d.mean()), "median": float(d.median()), "p90": float(d.quantile(0.9))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a finished run folder (config.yaml, checkpoints/last.ckpt)")
    ap.add_argument("--n", type=int, default=5000, help="noises")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", type=float, nargs="+", default=[10.0, 3.0, 1.0, 0.5, 0.3, 0.1],
                    help="intermediate levels below sigma_max (descending)")
    ap.add_argument("--mid", type=float, default=1.0, help="the 2-NFE chain's intermediate level (one of --levels)")
    ap.add_argument("--steps", type=int, default=60, help="Heun steps per ODE segment")
    ap.add_argument("--off-radius", type=float, default=0.25)
    ap.add_argument("--boundary-eps", type=float, default=0.05,
                    help="noise perturbation that decides 'near a basin boundary' (relative to the unit noise)")
    ap.add_argument("--out", default=None, help="JSON record (default RUN/jumps.json)")
    args = ap.parse_args(argv)
    if args.mid not in args.levels:
        sys.exit(f"diag_jumps: --mid {args.mid} must be one of --levels {args.levels}")
    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    module = build_module(cfg)
    module.prepare("cpu")
    module.load_state_dict(load_training_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"])
    student, teacher = module.ema.module.eval(), module.teacher
    if not hasattr(teacher, "means"):
        sys.exit("diag_jumps: needs an analytic mixture teacher (ring, grid): its mode centres define 'off'")
    smax = float(teacher.sigma_max)
    levels = [smax, *sorted({float(s) for s in args.levels if 0 < s < smax}, reverse=True), 0.0]
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.n, *student.data_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        pts = ode_points(teacher, noise, levels, args.steps)
        coarse = ode_points(teacher, noise, levels, max(2, args.steps // 2))[-1]
        x0 = pts[-1]
        means = teacher.means.to(torch.float64)

        def off_mask(y: torch.Tensor) -> torch.Tensor:
            return torch.cdist(y.flatten(1), means.flatten(1)).min(1).values > args.off_radius

        def off(y: torch.Tensor) -> float:
            return float(off_mask(y).double().mean())

        def mode(y: torch.Tensor) -> torch.Tensor:
            return torch.cdist(y.flatten(1), means.flatten(1)).argmin(1)

        direction = torch.randn(noise.shape, generator=g, dtype=torch.float64)
        direction = direction / direction.flatten(1).norm(dim=1).view(-1, *[1] * (noise.ndim - 1))
        near = torch.zeros(args.n, dtype=torch.bool)
        for sign in (1.0, -1.0):
            moved = ode_points(teacher, noise + sign * args.boundary_eps * direction, [levels[0], 0.0], args.steps)[-1]
            near |= mode(moved) != mode(x0)

        def jump(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
            n = x.shape[0]
            xs = x.to(torch.float32)
            return student(xs, torch.full((n,), a), torch.full((n,), b)).to(torch.float64)

        landed = [jump(xs, s, 0.0) for s, xs in zip(levels[:-1], pts[:-1])]
        rows = [{"level": s, **stats(y, x0), "off": off(y)} for s, y in zip(levels, landed)]
        one, one_off = landed[0], off_mask(landed[0])  # the first level is sigma_max: that jump IS the 1-NFE chain
        first = jump(pts[0], smax, args.mid)
        two = jump(first, args.mid, 0.0)
        record = {
            "kind": "diag_jumps",
            "run": str(run),
            "run_command": (run / "command.txt").read_text().strip() if (run / "command.txt").is_file() else None,
            "config_name": cfg.name,
            "n": args.n, "seed": args.seed, "steps": args.steps, "off_radius": args.off_radius, "mid": args.mid,
            "reference_error": stats(coarse, x0),
            "teacher_off": off(x0),
            "jumps_to_0": rows,
            "one_nfe": {**stats(one, x0), "off": float(one_off.double().mean())},
            "near_boundary": {"eps": args.boundary_eps, "share": float(near.double().mean()),
                              "one_nfe_off_near": float(one_off[near].double().mean()) if near.any() else None,
                              "one_nfe_off_rest": float(one_off[~near].double().mean()) if (~near).any() else None,
                              "share_of_one_nfe_off_near": float((one_off & near).double().sum()
                                                                 / one_off.double().sum().clamp(min=1))},
            "two_nfe_first_jump": stats(first, pts[levels.index(args.mid)]),
            "two_nfe": {**stats(two, x0), "off": off(two)},
            "environment": run_environment(),
        }
    out = Path(args.out) if args.out else run / "jumps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    print(json.dumps({k: record[k] for k in ("reference_error", "one_nfe", "near_boundary", "two_nfe_first_jump",
                                             "two_nfe")}))
    for r in rows:
        print(f"  J({r['level']:g} -> 0): mean {r['mean']:.4f} median {r['median']:.4f} p90 {r['p90']:.4f} "
              f"off {r['off']:.3f}")
    return record


if __name__ == "__main__":
    main()
