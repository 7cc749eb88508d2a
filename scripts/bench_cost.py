"""Training cost of each distillation loss on the shipped digits teacher: wall-clock per generator (student) update in
teacher-forward equivalents, network forward calls per update, and the peak memory of training.

For each method (``configs/digits_<method>.yaml``: cd, dmd2, dmd2_gan, sid, sim, fdistill, kd, reflow, pd, tdm, ct,
scm, meanflow, ayf, cd_lora; ``<method>_fd``: the JVP losses with ``loss.jvp=finite_difference``; ``dmd2_lora``:
DMD2 with a rank-8 LoRA student and LoRA critic) a fresh subprocess
(``--one METHOD``) builds the module as ``distill train`` does (``distill.train.build_module``, ``prepare``,
``configure_optimizers``; batch size from the config, 128), with any warm start switched off
(``loss.regression_steps=0 loss.fake_warmup=0`` where the loss takes them) so the steady-state schedule is timed, and
then runs ``module.iterate()`` (every phase of one iteration: losses, backward, clipping, optimizer steps, EMA):

* **schedule**: ``loss.phases_for_step`` over the first 1,200 iterations gives ``iterations_per_student_update``
  (DMD2's ``critic_updates: 5`` -> 5) and how many iterations of each phase set (``critic``, ``critic+student``)
  one generator update takes;
* **time**: after ``--warmup`` iterations (moved on to the next generator update), ``--iters`` iterations (rounded up
  to whole generator updates) are timed one by one; the median time of each phase set, weighted by its count per
  update, gives ``ms_per_student_update`` (a per-iteration median alone would see only the cheap critic iterations
  of a TTUR loss), and ``ms_per_iteration = ms_per_student_update / iterations_per_student_update``;
* **teacher forward**: after every timed iteration, ``--teacher-reps`` no-grad teacher forwards ``teacher(x, sigma)``
  at the same batch size are timed in the same process (so load on a shared machine hits both alike);
  ``teacher_forward_equivalents = ms_per_student_update / teacher_forward_ms`` (median);
* **forward calls**: forward pre-hooks on the networks themselves (the teacher's UNet, the student's UNet, the fake
  score's UNet ``module.loss.fake``; registered after ``prepare`` so no copy inherits them) count calls during the
  timed iterations, per generator update; ``*_truncated`` counts the passes a GAN feature tap stopped at the
  bottleneck (included in the totals);
* **memory**: ``baseline_rss_mib`` is the resident set after building the module (before the first iteration),
  ``peak_rss_mib`` the process's peak (``ru_maxrss``) after the timed iterations, ``train_rss_mib`` their difference
  (what training itself adds: activations, gradients, optimizer state); ``build_peak_rss_mib`` is the peak before the
  first iteration (loading). On CUDA the same figures come from ``torch.cuda`` (``*_cuda_mib``, allocated memory).

Usage::

    python scripts/bench_cost.py --json docs/bench/cost.json            # all six, 1 thread
    python scripts/bench_cost.py --methods cd dmd2 --iters 6 --warmup 2
    python scripts/bench_cost.py --one cd                                # one method, this process (prints JSON)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from distill.records import peak_rss_mb  # noqa: E402

#: variants: ``name -> (config method, extra overrides)`` (the JVP losses with the finite-difference fallback)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "scm_fd": ("scm", ["loss.jvp=finite_difference"]),
    "meanflow_fd": ("meanflow", ["loss.jvp=finite_difference"]),
    "ayf_fd": ("ayf", ["loss.jvp=finite_difference"]),
    # LoRA student and LoRA critic (rank 8) against the full networks
    "dmd2_lora": ("dmd2", ["student.lora.rank=8", "student.lora.alpha=8", "loss.fake_lora.rank=8",
                           "loss.fake_lora.alpha=8"]),
}
METHODS = ("cd", "dmd2", "dmd2_gan", "sid", "sim", "fdistill", "kd", "reflow", "pd", "tdm", "ct", "scm", "meanflow",
           "ayf", "cd_lora", *VARIANTS)
WARM_START_KEYS = ("regression_steps", "fake_warmup")
SCHEDULE_SPAN = 1200  # iterations over which the schedule is counted (a multiple of every TTUR ratio up to 6, 8, 10)


def variant(method: str) -> tuple[str, list[str]]:
    """``(config method, extra overrides)`` of a method name (itself, none, unless it is a :data:`VARIANTS` name)."""
    return VARIANTS.get(method, (method, []))


def config_path(method: str) -> Path:
    return ROOT / "configs" / f"digits_{variant(method)[0]}.yaml"


def make_cfg(method: str, out: str):
    """The method's config, with evaluation, grids and checkpoints off and the warm start (where the loss has one)
    switched off."""
    from distill.config import load_config
    from losses import LOSSES

    path = config_path(method)
    ov = ["eval.every=0", "trainer.grid_every=0", "trainer.ckpt_every=0", f"out_dir={out}/run",
          "trainer.progress_bar=false", *variant(method)[1]]
    cfg = load_config(path, ov)
    params = inspect.signature(LOSSES.get(cfg.loss.name)).parameters
    warm = [f"loss.{k}=0" for k in WARM_START_KEYS if k in params]
    return (load_config(path, ov + warm) if warm else cfg), warm


def student_phase(loss: Any) -> str:
    """The phase that updates the generator: ``"student"`` by convention, else the first EMA phase."""
    return "student" if "student" in loss.phases else loss.ema_phases[0]


def schedule(loss: Any, span: int = SCHEDULE_SPAN) -> dict[str, Any]:
    """Iterations per generator update and iterations of each phase set per update, from ``phases_for_step``."""
    sp = student_phase(loss)
    sets = Counter("+".join(loss.phases_for_step(k)) for k in range(span))
    updates = sum(n for key, n in sets.items() if sp in key.split("+"))
    if updates == 0:
        raise RuntimeError(f"no {sp!r} phase in the first {span} iterations of {type(loss).__name__}'s schedule")
    return {"iterations_per_student_update": span / updates,
            "per_update": {key: n / updates for key, n in sorted(sets.items())}}


def network_of(m: nn.Module) -> nn.Module:
    """The innermost network a wrapper calls (teacher/fake ``.net``, student ``.net.unet``, residual fake
    ``.correction``), so that forward hooks see every evaluation whichever entry point (``forward``, ``denoise``,
    ``raw_fn``) the loss uses."""
    for attr in ("net", "unet", "correction"):
        sub = getattr(m, attr, None)
        if isinstance(sub, nn.Module):
            return network_of(sub)
    return m


class CallCounter:
    """Counts forward calls started (pre-hook) and completed (hook) of one module while :attr:`active`."""

    def __init__(self, module: nn.Module) -> None:
        self.active, self.started, self.completed = False, 0, 0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module: nn.Module, args: Any) -> None:
        self.started += self.active

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        self.completed += self.active


def rss_now_mib() -> float:
    """The current resident set size (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def measure(method: str, iters: int = 12, warmup: int = 3, threads: int = 1, teacher_reps: int = 2,
            device: str | None = None) -> dict[str, Any]:
    """One method's figures (module docstring), in this process."""
    from distill.train import build_module

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    t_start = time.perf_counter()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    with tempfile.TemporaryDirectory() as tmp:
        cfg, warm = make_cfg(method, tmp)
        torch.manual_seed(cfg.seed)
        module = build_module(cfg)
        module.prepare(dev)
        module.configure_optimizers()
        loss, teacher, student = module.loss, module.teacher, module.student
        sched = schedule(loss)
        sp = student_phase(loss)
        nets = {"teacher": network_of(teacher), "student": network_of(student)}
        fake = getattr(loss, "fake", None)
        if isinstance(fake, nn.Module):
            nets["fake"] = network_of(fake)
        if len({id(n) for n in nets.values()}) != len(nets):
            raise RuntimeError(f"{method}: two roles share one network object; forward counts would mix")
        counters = {name: CallCounter(net) for name, net in nets.items()}

        # the teacher forward: a fixed batch at log-uniform noise levels over the teacher's range
        g = torch.Generator().manual_seed(0)
        b = int(cfg.data.batch_size)
        lo, hi = float(teacher.sigma_min), float(teacher.sigma_max)
        sigma = (math.log(lo) + torch.rand(b, generator=g) * math.log(hi / lo)).exp().to(dev)
        x = torch.randn((b, *teacher.data_shape), generator=g).to(dev) * sigma.view(-1, *[1] * len(teacher.data_shape))

        def teacher_forward() -> float:
            with torch.no_grad():
                sync()
                t0 = time.perf_counter()
                teacher(x, sigma)
                sync()
            return 1000 * (time.perf_counter() - t0)

        teacher_forward()  # first-call allocations out of the timing
        if cuda:
            baseline, baseline_cuda = rss_now_mib(), torch.cuda.memory_allocated(dev) / 2**20
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            baseline = rss_now_mib()
        build_peak = peak_rss_mb()

        def run_one() -> tuple[str, float]:
            key = "+".join(loss.phases_for_step(module.current_iteration))
            sync()
            t0 = time.perf_counter()
            module.iterate()
            sync()
            return key, 1000 * (time.perf_counter() - t0)

        def is_update(k: int) -> bool:
            return sp in loss.phases_for_step(k)

        # warm-up: at least `warmup` iterations, then on to the next generator update
        while module.current_iteration < warmup or not is_update(module.current_iteration):
            run_one()
        # timed: at least `iters` iterations, ending just before a generator update (whole updates)
        times: dict[str, list[float]] = {}
        tf: list[float] = []
        n_timed = updates = 0
        for c in counters.values():
            c.active = True
        while n_timed < iters or not is_update(module.current_iteration):
            updates += is_update(module.current_iteration)
            key, ms = run_one()
            times.setdefault(key, []).append(ms)
            n_timed += 1
            for c in counters.values():
                c.active = False
            tf += [teacher_forward() for _ in range(teacher_reps)]
            for c in counters.values():
                c.active = True
        for c in counters.values():
            c.active = False
        peak = peak_rss_mb()

        med = {key: statistics.median(v) for key, v in times.items()}
        missing = sorted(set(sched["per_update"]) - set(med))
        if missing:
            raise RuntimeError(f"{method}: phase set(s) {missing} of the schedule never ran in the timed iterations")
        ms_update = sum(n * med[key] for key, n in sched["per_update"].items())
        t_ms = statistics.median(tf)
        rec: dict[str, Any] = {
            "config": str(config_path(method).relative_to(ROOT)),
            "loss": str(cfg.loss.name),
            "overrides": warm,
            "batch_size": b,
            "device": str(dev),
            "iterations_per_student_update": sched["iterations_per_student_update"],
            "phase_sets_per_student_update": sched["per_update"],
            "ms_by_phase_set": med,
            "ms_per_iteration": ms_update / sched["iterations_per_student_update"],
            "ms_per_student_update": ms_update,
            "teacher_forward_ms": t_ms,
            "teacher_forward_equivalents": ms_update / t_ms,
            "warmup_iterations": module.current_iteration - n_timed,
            "timed_iterations": n_timed,
            "timed_student_updates": updates,
            "teacher_forward_samples": len(tf),
        }
        for name in ("teacher", "fake", "student"):
            c = counters.get(name)
            rec[f"{name}_forwards"] = c.started / updates if c else 0.0
            rec[f"{name}_forwards_truncated"] = (c.started - c.completed) / updates if c else 0.0
        rec.update({"baseline_rss_mib": baseline, "build_peak_rss_mib": build_peak, "peak_rss_mib": peak,
                    "train_rss_mib": peak - baseline})
        if cuda:
            peak_cuda = torch.cuda.max_memory_allocated(dev) / 2**20
            rec.update({"baseline_cuda_mib": baseline_cuda, "peak_cuda_mib": peak_cuda,
                        "train_cuda_mib": peak_cuda - baseline_cuda})
        rec["wall_s"] = time.perf_counter() - t_start
        return rec


def measure_subprocess(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (so the peak RSS is this method's alone)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--teacher-reps",
               str(args.teacher_reps), "--record", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench_cost --one {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--iters", type=int, default=12, help="timed iterations (rounded up to whole generator updates)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first (then on to a generator update)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-reps", type=int, default=2, help="timed teacher forwards after each timed iteration")
    ap.add_argument("--json", default=None, help="write the record here (e.g. docs/bench/cost.json)")
    ap.add_argument("--one", default=None, choices=METHODS, help="measure one method in this process")
    ap.add_argument("--record", default=None, help="with --one: write its figures here (default: print them)")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.teacher_reps < 1:
        ap.error("need --iters >= 1, --warmup >= 0, --teacher-reps >= 1")
    if args.one:
        rec = measure(args.one, args.iters, args.warmup, args.threads, args.teacher_reps)
        text = json.dumps(rec, indent=1)
        if args.record:
            Path(args.record).write_text(text)
        else:
            print(text)
        return rec

    from distill.records import run_environment

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    methods: dict[str, Any] = {}
    for m in args.methods:
        r = measure_subprocess(m, args)
        methods[m] = r
        print(f"{m:9s} {r['iterations_per_student_update']:g} it/update, {r['ms_per_student_update']:8.1f} ms/update "
              f"= {r['teacher_forward_equivalents']:6.1f} teacher forwards ({r['teacher_forward_ms']:.1f} ms each); "
              f"forwards/update teacher {r['teacher_forwards']:g}, fake {r['fake_forwards']:g}, student "
              f"{r['student_forwards']:g}; peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['train_rss_mib']:.0f} training) "
              f"[{r['wall_s']:.0f} s]", flush=True)
    batch = sorted({r["batch_size"] for r in methods.values()})
    out = {
        "script": "scripts/bench_cost.py",
        "environment": run_environment(),
        "torch": torch.__version__,
        "threads": args.threads,
        "batch_size": batch[0] if len(batch) == 1 else batch,
        "iters": args.iters,
        "warmup": args.warmup,
        "teacher_reps": args.teacher_reps,
        "wall_s": time.perf_counter() - t0,
        "load_average_1min_at_end": os.getloadavg()[0],  # other work on the machine inflates the ms figures
        "methods": methods,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
