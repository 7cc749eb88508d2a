"""Heun at 35 NFE on the exact ring against the sliced-W1 noise floor (docs/methods.md §4.4 "Ring"; issue 2's bar,
docs/benchmarks.md §2).

For each seed: a fixed-size exact reference set; Heun-35 (EDM grid: 18 Karras steps, sigma 0.002-80, rho 7, the last
step Euler) from noise ``z``; two floor estimates at the same size — an independent exact set, and a *paired* exact
set whose mode labels are the angular sectors of ``z`` (still exact, by the ring's symmetry, but sharing the mode
counts with the Heun set, which removes most of the multinomial noise from the ratio). Optionally a second grid
(``--sigma-max``) to show how much of the excess is the discretisation on the EDM grid.

    python scripts/bench_ring_floor.py --seeds 100 --out docs/bench/ring_floor.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.core.samplers import sample_heun  # noqa: E402
from distill.core.schedules import karras_sigmas  # noqa: E402
from distill.distances import sliced_wasserstein  # noqa: E402
from distill.records import run_environment  # noqa: E402
from teachers import ring  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=100, help="number of seeds (100, 101, ...)")
    ap.add_argument("--n", type=int, default=10_000, help="samples per set (the benchmark's 10,000)")
    ap.add_argument("--steps", type=int, default=18, help="Heun steps (18 -> 35 NFE)")
    ap.add_argument("--sigma-max", type=float, nargs="+", default=[80.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t, f64 = ring(), torch.float64
    res: dict[str, list[float]] = {"paired": [], "independent": []}
    for smax in args.sigma_max:
        res[f"heun_smax{smax:g}"] = []
    for s in range(args.seeds):
        g = torch.Generator().manual_seed(100 + s)
        ref = t.sample(args.n, generator=g).double()
        z = torch.randn(args.n, 2, generator=g, dtype=f64)
        sector = torch.round(torch.atan2(z[:, 1], z[:, 0]) / (2 * math.pi / 8)).long() % 8
        paired = t.means[sector].double() + 0.05 * torch.randn(args.n, 2, generator=g, dtype=f64)
        res["paired"].append(sliced_wasserstein(paired, ref))
        res["independent"].append(sliced_wasserstein(t.sample(args.n, generator=g).double(), ref))
        for smax in args.sigma_max:
            x = sample_heun(t, z, karras_sigmas(args.steps, t.sigma_min, smax))
            res[f"heun_smax{smax:g}"].append(sliced_wasserstein(x, ref))
    summary = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "per_seed": v} for k, v in res.items()}
    for smax in args.sigma_max:
        h = np.mean(res[f"heun_smax{smax:g}"])
        summary[f"ratio_smax{smax:g}"] = {"paired": float(h / np.mean(res["paired"])),
                                          "independent": float(h / np.mean(res["independent"])),
                                          "first3_paired": float(np.mean(res[f"heun_smax{smax:g}"][:3])
                                                                 / np.mean(res["paired"][:3]))}
    summary["protocol"] = {"n": args.n, "seeds": args.seeds, "steps": args.steps, "nfe": 2 * args.steps - 1,
                           "sigma_min": t.sigma_min, "rho": 7, "sw1_directions": 256}
    for k, v in summary.items():
        if k != "protocol":
            print(k, {a: round(b, 5) for a, b in v.items() if a != "per_seed"})
    summary["script"] = "scripts/bench_ring_floor.py"
    summary["environment"] = run_environment()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
