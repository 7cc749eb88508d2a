"""Consistency distillation on the benchmark ring, in a plain PyTorch loop (no Lightning).

The teacher is exact (``teachers.ring()``: 8 modes of std 0.05 on the radius-2 circle; real data = exact samples), the
student a fresh EDM/CM-preconditioned MLP consistency function trained with the ``cd`` loss (Consistency Models,
arXiv:2303.01469). Evaluated with an EMA of the student, like the paper: 1-NFE samples ``f(sigma_max z, sigma_max)``
and 2-NFE multistep consistency samples (``sample_student`` with gamma = 1, re-noised to ``--renoise``), scored as in
shared/benchmarks.md ("Ring"): sliced W1 of 10k samples against a fixed set of 10k exact samples with 256 fixed
directions, per-mode mass and the "off" fraction (farther than 0.25 from every mean); the teacher's 35-NFE Heun
samples are scored the same way.

    python scripts/toy_ring_cd.py                         # the shipped ring recipe, 3 seeds
    python scripts/toy_ring_cd.py --seeds 0 --steps 1000 --num-levels 40

The defaults are the shipped ring recipe, chosen so that ``distill train`` can reproduce it (constant lr after a
2% linear warm-up, a plain EMA): MLP 128 wide x 3 hidden layers (noise-embedding max_freq 4), batch 512, Adam lr 3e-3,
grad clip 1, 8000 steps; cd with N = 18, Heun, L2, icm weighting (1/(sigma_{n+1} - sigma_n)), EMA target 0.9;
evaluation EMA 0.997; 2-NFE re-noise level 0.3. Measured (2 shared CPU cores, one thread, ~90 s per seed; seeds
0, 1, 2): 1-NFE SW1 0.049 ± 0.005 (off 12%), 2-NFE SW1 0.040 ± 0.008 (off 3%), against the teacher's Heun-35
0.040 and an exact-vs-exact floor of 0.046; every mode 0.12-0.13. What mattered (one seed, 3000-4000 steps): the
icm weighting (1-NFE 0.073 vs 0.085 uniform), a low-frequency noise embedding (max_freq 100 left the student
arbitrary between grid levels and 2-NFE no better than 1-NFE), an EMA target (the sg target was unstable with
uniform weighting), and an evaluation EMA whose initial weights have decayed (0.999 without warm-up: 1-NFE 0.11).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from distill.metrics import ring_report  # noqa: E402
from distill.core.samplers import sample_heun  # noqa: E402
from distill.core.schedules import karras_sigmas  # noqa: E402
from losses import build_loss  # noqa: E402
from students import build_student, sample_student  # noqa: E402
from teachers import ring  # noqa: E402

N_EVAL = 10_000
REFERENCE_SEED = 12345  # the same reference set as scripts/toy_ring_dmd2.py
DIRECTIONS_SEED = 777  # seed of distill.metrics.sliced_wasserstein's directions
OFF_RADIUS = 0.25


def ring_metrics(x: Tensor, teacher, reference: Tensor) -> dict:
    """SW1 to the exact reference (256 fixed directions), per-mode mass and the off-mode fraction of ``x: [N, 2]``."""
    r = ring_report(x.double(), teacher.means, reference.double(), off_radius=OFF_RADIUS, n_dirs=256,
                    seed=DIRECTIONS_SEED)
    return {"sw1": r["sw1"], "mass": [round(float(m), 4) for m in r["mode_mass"]], "off": r["off"]}


def student_samples(student, n: int, seed: int, sigmas: list[float]) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *student.data_shape, generator=g)
    with torch.no_grad():
        return sample_student(student, noise, torch.tensor(sigmas), gamma=1.0, generator=g)


def fit(seed: int, args: argparse.Namespace, teacher, monitor=None) -> tuple:
    """Train one seed; returns ``(ema_student, log, seconds)``. ``monitor(ema, step)`` is called at each log point."""
    torch.manual_seed(seed)
    student = build_student("consistency", teacher, init="fresh", hidden=args.hidden, depth=args.depth,
                            max_freq=args.max_freq)
    loss = build_loss(
        "cd", num_levels=args.num_levels, solver=args.solver, distance=args.distance, weighting=args.weighting,
        target=args.target, target_decay=args.target_decay,
    )
    loss.setup(student, teacher)
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    warm = max(1, int(0.02 * args.steps))

    def lr_at(k: int) -> float:  # short linear warm-up, then cosine decay to lr_final * lr (1.0: constant)
        if k < warm:
            return args.lr * (k + 1) / warm
        p = (k - warm) / max(1, args.steps - warm)
        return args.lr * (args.lr_final + (1 - args.lr_final) * 0.5 * (1 + math.cos(math.pi * p)))

    t0, log = time.perf_counter(), []
    for k in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(k)
        terms = loss("student", student, teacher, {"x0": teacher.sample(args.batch)}, k)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip)
        opt.step()
        loss.after_step("student", student, k)
        with torch.no_grad():
            # Evaluation EMA; with --ema-warmup its decay ramps up so early weights do not linger.
            decay = min(args.ema, (1 + k) / (10 + k)) if args.ema_warmup else args.ema
            for p_e, p in zip(ema.parameters(), student.parameters()):
                p_e.lerp_(p, 1 - decay)
        if (k + 1) % max(1, args.steps // 10) == 0:
            log.append({"step": k + 1, "loss": float(terms["loss"].detach()), "distance": float(terms["distance"])})
            if monitor is not None:
                monitor(ema, k + 1, log[-1])
    return ema, log, time.perf_counter() - t0


def train(seed: int, args: argparse.Namespace, teacher, reference: Tensor) -> dict:
    def monitor(ema, k, entry):
        if args.verbose:
            m1 = ring_metrics(student_samples(ema, 2000, 1, [teacher.sigma_max, 0.0]), teacher, reference[:2000])
            print(f"  seed {seed} step {k}: loss {entry['loss']:.4g} ema 1-NFE sw1 {m1['sw1']:.4f}", flush=True)

    ema, log, train_s = fit(seed, args, teacher, monitor)
    res: dict = {"seed": seed, "train_s": round(train_s, 1), "log": log}
    res["nfe1"] = ring_metrics(student_samples(ema, N_EVAL, 1000 + seed, [teacher.sigma_max, 0.0]), teacher, reference)
    for r in args.renoise:
        x2 = student_samples(ema, N_EVAL, 1000 + seed, [teacher.sigma_max, r, 0.0])
        res[f"nfe2@{r:g}"] = ring_metrics(x2, teacher, reference)
    with torch.no_grad():
        x = reference[:256]
        res["boundary_max_err"] = float((ema.denoise(x, torch.full((256,), teacher.sigma_min)) - x).abs().max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-final", type=float, default=1.0,
                    help="final lr as a fraction of --lr, cosine decay (1.0: constant after warm-up, as distill train)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--ema", type=float, default=0.997, help="evaluation EMA decay of the student")
    ap.add_argument("--ema-warmup", action="store_true", help="ramp the EMA decay up as (1+k)/(10+k)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--max-freq", type=float, default=4.0, help="highest frequency of the noise embedding")
    ap.add_argument("--num-levels", type=int, default=18)
    ap.add_argument("--solver", default="heun")
    ap.add_argument("--distance", default="l2")
    ap.add_argument("--weighting", default="icm")
    ap.add_argument("--target", default="ema")
    ap.add_argument("--target-decay", type=float, default=0.9)
    ap.add_argument("--renoise", type=float, nargs="+", default=[0.3, 0.6], help="2-NFE intermediate level(s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    teacher = ring()
    reference = teacher.sample(N_EVAL, generator=torch.Generator().manual_seed(REFERENCE_SEED))

    g = torch.Generator().manual_seed(4242)
    floor = ring_metrics(teacher.sample(N_EVAL, generator=g), teacher, reference)
    noise = torch.randn(N_EVAL, 2, generator=g, dtype=torch.float64)
    heun = sample_heun(teacher, noise, karras_sigmas(18, teacher.sigma_min, teacher.sigma_max)).float()
    teacher_m = ring_metrics(heun, teacher, reference)
    print(f"exact-vs-exact floor sw1 {floor['sw1']:.4f}; teacher Heun-35 sw1 {teacher_m['sw1']:.4f} "
          f"off {teacher_m['off']:.4f}", flush=True)

    results = []
    for seed in args.seeds:
        r = train(seed, args, teacher, reference)
        results.append(r)
        line = f"seed {seed}: {r['train_s']:.0f}s  1-NFE sw1 {r['nfe1']['sw1']:.4f} off {r['nfe1']['off']:.3f}"
        for key in (k for k in r if k.startswith("nfe2@")):
            line += f" | 2-NFE({key[5:]}) sw1 {r[key]['sw1']:.4f} off {r[key]['off']:.3f}"
        print(line + f" | boundary err {r['boundary_max_err']:.1e}", flush=True)

    def stat(key: str, field: str = "sw1") -> str:
        v = torch.tensor([r[key][field] for r in results], dtype=torch.float64)
        return f"{v.mean():.4f} ± {v.std(unbiased=len(v) > 1) if len(v) > 1 else 0.0:.4f}"

    print(f"\nmean ± sd over seeds {args.seeds}: 1-NFE sw1 {stat('nfe1')} (off {stat('nfe1', 'off')})")
    for key in (k for k in results[0] if k.startswith("nfe2@")):
        print(f"  2-NFE re-noise {key[5:]}: sw1 {stat(key)} (off {stat(key, 'off')})")
    print("  mode mass (1-NFE, seed 0):", results[0]["nfe1"]["mass"])
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "floor": floor, "teacher_heun35": teacher_m, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
