"""Toolkit overhead: one training iteration through ``distill train``'s Lightning module vs the same computation in a
bare PyTorch loop, on the same tensors (docs/benchmarks.md §4: within 5%).

Both sides run the same iteration function (``distill.iteration.run_iteration``: phases, NaN guard, per-group
gradient norms, clipping, optimizer, EMA) on the same teacher (the digits teacher's architecture, 1.1 M parameters,
8x8, batch 128); the Lightning side adds what a run adds (the trainer loop, manual optimisation's backward hook,
logging every ``log_every`` iterations, the progress bar).
Timing is wall-clock between iteration ``warmup`` and the last one, repeated ``--repeats`` times alternating the two
sides; the median ratio is reported. Usage::

    python scripts/bench_overhead.py --loss cd --iters 60 --repeats 5 --json docs/bench_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from distill.config import load_config
from distill.records import run_environment
from distill.train import build_module, make_trainer
from teachers import DiffusersTeacher
from teachers.nets import small_unet


def random_teacher(folder: Path) -> Path:
    """A randomly initialised teacher with the shipped digits teacher's architecture (timing does not depend on the
    weights), so the benchmark runs before/without the trained teacher."""
    torch.manual_seed(0)
    net = small_unet(8, 1, (32, 64, 64))
    DiffusersTeacher(net, {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
                           "sigma_data": 0.5, "prediction_type": "epsilon"},
                     edm_timestep_scale=250.0).save_pretrained(folder)
    return folder


def make_cfg(loss: str, iters: int, out: str, teacher: str = "digits"):
    root = Path(__file__).resolve().parents[1]
    cfg = "digits_cd.yaml" if loss == "cd" else "digits_dmd2.yaml"
    ov = [f"trainer.max_steps={iters}", "eval.every=0", "trainer.grid_every=0", "trainer.ckpt_every=0",
          f"out_dir={out}/run", "trainer.log_every=50", "trainer.progress_bar=true"]
    if teacher == "random":
        ov += ["teacher.name=diffusers", f"teacher.path={random_teacher(Path(out) / 'teacher')}"]
    return load_config(root / "configs" / cfg, ov)


def lightning_run(cfg, warmup: int) -> float:
    module = build_module(cfg)
    marks: dict[str, float] = {}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if int(pl_module.iteration) == warmup:
                marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if int(pl_module.iteration) == pl_module.max_steps:
                marks["end"] = time.perf_counter()

    trainer = make_trainer(cfg, Path(cfg.out_dir), [Clock()])
    trainer.fit(module)
    return (marks["end"] - marks["start"]) / (cfg.trainer.max_steps - warmup)


def bare_run(cfg, warmup: int) -> float:
    """The same iterations without Lightning: the module's own iteration function (``distill.iteration``) called in
    a plain loop, so both sides run identical per-iteration code and the difference is Lightning's."""
    torch.manual_seed(cfg.seed)
    module = build_module(cfg)
    module.prepare()
    module.configure_optimizers()
    t0 = 0.0
    for k in range(cfg.trainer.max_steps):
        if k == warmup:
            t0 = time.perf_counter()
        module.iterate()
    return (time.perf_counter() - t0) / (cfg.trainer.max_steps - warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loss", default="cd", choices=["cd", "dmd2"])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--teacher", default="digits", choices=["digits", "random"],
                    help="the shipped digits teacher, or a random one of the same architecture")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    res = {"lightning": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_cfg(args.loss, args.iters, tmp, args.teacher)
        for r in range(args.repeats):
            # alternate the order so drift on a shared machine hits both sides alike
            sides = ("bare", "lightning") if r % 2 == 0 else ("lightning", "bare")
            for side in sides:
                t = bare_run(cfg, args.warmup) if side == "bare" else lightning_run(cfg, args.warmup)
                res[side].append(t)
                print(f"repeat {r} {side:9s}: {1000 * t:.1f} ms / iteration", flush=True)
    ratios = [a / b for a, b in zip(res["lightning"], res["bare"])]
    out = {
        "loss": args.loss, "teacher": args.teacher, "iters": args.iters, "warmup": args.warmup, "repeats": args.repeats,
        "threads": args.threads, "script": "scripts/bench_overhead.py", "environment": run_environment(),
        "torch": torch.__version__,
        "median_ms": {k: 1000 * statistics.median(v) for k, v in res.items()},
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
