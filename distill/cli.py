"""The ``distill`` command: ``train``, ``eval``, ``sample`` and ``export``.

Each takes a YAML config from ``configs/`` (or none, for the built-in defaults) followed by ``key=value`` overrides,
e.g. ``distill train configs/digits_cd.yaml trainer.max_steps=200``. Bad input ends with one line on stderr and exit
status 2.
"""

# The project's own modules and torch are imported inside each command on purpose: `distill --help` and argument
# errors must not wait seconds for torch, Lightning and diffusers, and each command loads only what it uses. Only
# the standard library and the torch-free distill.core.registry are imported at module level.

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from distill.core.registry import ConfigError

__all__ = ["main"]

EPILOG = "Overrides are dotted keys: trainer.max_steps=500 loss.num_levels=40 eval.nfe=[1,2]"


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs="?" if not required else None, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="distill", description="Distil diffusion teachers into few-step students.",
                                 epilog=EPILOG)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a student (Lightning); ends with its FID table next to the teacher's",
                       epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume from OUT_DIR/checkpoints/last.ckpt (or the given checkpoint)")
    p.add_argument("--no-final-eval", action="store_true", help="skip the final fixed-NFE evaluation")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything, print the peak-memory estimate (weights, gradients, optimizer state, "
                        "activations probed at two small batches) and write OUT_DIR/memory_estimate.json; no training")

    p = sub.add_parser("eval", help="FID-vs-NFE table of the teacher's solvers (or of an exported student)",
                       epilog=EPILOG)
    _add_config_args(p, required=False)
    p.add_argument("--student", help="an exported student folder to evaluate instead of the teacher's solvers")
    p.add_argument("--out", default=None, help="output folder (default: OUT_DIR/eval_teacher or the student folder)")

    p = sub.add_parser("sample", help="a grid PNG and a .npy of samples from a teacher solver or a student",
                       epilog=EPILOG)
    _add_config_args(p, required=False)
    p.add_argument("--student", help="an exported student folder (no teacher needed)")
    p.add_argument("--sampler", default="heun", help="teacher solver (euler, heun, dpmpp_2m, unipc, ...)")
    p.add_argument("--grid", default="karras", help="noise grid for teacher solvers (karras, logsnr, uniform)")
    p.add_argument("--nfe", type=int, default=None, help="network evaluations (default 35 teacher / 1 student)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG weight (teacher; input of a guidance-conditioned student)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--images", action="store_true",
                   help="also write every sample as OUT/images/NNNNNN.png (a folder eval.reference accepts)")

    p = sub.add_parser("export", help="export a run's EMA student as a standalone folder")
    p.add_argument("run", help="run directory (with checkpoints/last.ckpt) or a checkpoint file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--merge", action="store_true",
                   help="LoRA students: write the standalone student with the adapters merged into full weights")
    return ap


def _cfg(args: argparse.Namespace) -> Any:
    from distill.config import load_config

    config, overrides = args.config, list(args.overrides or [])
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides  # no config file given, only overrides
    cfg = load_config(config, overrides)
    if cfg.trainer.num_threads:
        import torch

        torch.set_num_threads(int(cfg.trainer.num_threads))
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from distill.config import to_container
    from distill.train import run_training

    cfg = _cfg(args)
    if args.dry_run:
        from distill.memory import estimate_memory, format_estimate

        est = estimate_memory(cfg)
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory_estimate.json").write_text(json.dumps({"config": to_container(cfg), **est}, indent=1))
        print(f"distill train --dry-run: {cfg.name}\n{format_estimate(est)}\nwritten: {out / 'memory_estimate.json'}")
        return 0
    print(f"distill train: {cfg.name} -> {cfg.out_dir}")
    print(json.dumps(to_container(cfg), indent=1))
    res = run_training(cfg, resume=args.resume, final_eval=not args.no_final_eval)
    print(f"run folder: {res['out_dir']}  checkpoint: {res['checkpoint']}  iterations: {res['iterations']}"
          f"  skipped steps: {res['skipped_steps']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distill.eval_tables import markdown_table, write_table
    from distill.evaluate import teacher_table
    from distill.scorers import scorer_from_config

    cfg = _cfg(args)
    ev = cfg.eval
    if args.student:
        return _eval_student(args, cfg)
    from distill.config import to_container
    from teachers import build_teacher

    teacher = build_teacher(to_container(cfg.teacher))
    scorer = scorer_from_config(teacher, ev)
    rows = teacher_table(teacher, scorer, list(ev.samplers), list(ev.grids), list(ev.teacher_nfe), list(ev.seeds),
                         ev.n_samples, ev.reference_nfe, ev.reference_sampler, list(ev.diffusers_samplers),
                         ev.guidance, ev.batch_size)
    out = Path(args.out or Path(cfg.out_dir) / "eval_teacher")
    # The table's title line adds the protocol label (measure, proxy/final, sample count, reference set).
    title = f"{cfg.teacher.get('name')}: {scorer.metric} vs NFE (seeds {list(ev.seeds)})"
    paths = write_table(rows, out, "teacher_solvers", title)
    print(f"\n{markdown_table(rows, title)}\n\nwritten: {', '.join(str(p) for p in paths.values())}")
    return 0


def _eval_student(args: argparse.Namespace, cfg: Any) -> int:
    from distill.eval_tables import EvalRow, markdown_table, write_table
    from distill.evaluate import score_student
    from distill.export import export_plan, load_exported
    from distill.scorers import scorer_from_config
    from teachers import build_teacher

    ev = cfg.eval
    student, sampling = load_exported(args.student)
    plan = export_plan(sampling)
    # The scorer needs the teacher's *data* (reference statistics), not the teacher network, for FID; for analytic
    # teachers it samples the exact distribution.
    from distill.config import to_container

    teacher = build_teacher(to_container(cfg.teacher))
    scorer = scorer_from_config(teacher, ev)
    from distill.export_pipelines import exported_eval_kwargs

    latent_kw = exported_eval_kwargs(args.student, sampling)
    rows = []
    for seed in ev.seeds:
        for k, sig in sampling["sigmas"].items():
            # the records name the sampler and grid as the export's sampling.json does (gamma as saved, all sigmas)
            rec = score_student(student, scorer, int(k), seed, plan, n=ev.n_samples, guidance=ev.guidance,
                                batch_size=ev.batch_size, num_classes=sampling.get("num_classes"), **latent_kw,
                                sampler=f"student(gamma={sampling['gamma']})", grid=str(sig), model=str(args.student))
            rows.append(EvalRow("exported student", "student", "exported", rec["nfe"], seed, rec["score"],
                                scorer.metric, rec))
    out = Path(args.out or args.student)
    title = f"exported student: {scorer.metric} at fixed NFE (seeds {list(ev.seeds)})"
    write_table(rows, out, "eval_exported", title)
    print(markdown_table(rows, title))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from distill.callbacks import save_sample_figure

    out = Path(args.out)
    if args.student:
        from distill.evaluate import generate_student, student_guidance
        from distill.export import export_plan, load_exported

        student, sampling = load_exported(args.student)
        nfe = args.nfe or int(sampling["default_nfe"])
        if str(nfe) not in sampling["sigmas"]:
            raise ValueError(f"the export has sampling levels for NFE {sorted(sampling['sigmas'], key=int)}, "
                             f"not {nfe}")
        from distill.export_pipelines import exported_eval_kwargs

        x, measured, _ = generate_student(student, nfe, args.n, args.seed, export_plan(sampling),
                                          num_classes=sampling.get("num_classes"),
                                          guidance=student_guidance(student, args.guidance),
                                          **exported_eval_kwargs(args.student, sampling))
        what = f"student {args.student}, {measured} NFE"
    else:
        from distill.config import to_container
        from distill.evaluate import generate_teacher
        from teachers import build_teacher

        cfg = _cfg(args)
        teacher = build_teacher(to_container(cfg.teacher))
        nfe = args.nfe or 35
        x, measured = generate_teacher(teacher, args.sampler, nfe, args.grid, args.n, args.seed, args.guidance)
        what = f"teacher {cfg.teacher.get('name')}, {args.sampler}/{args.grid}, {measured} NFE"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", x.numpy())
    save_sample_figure(x, out / "samples.png", what)
    if args.images:
        from torchvision.utils import save_image

        (out / "images").mkdir(exist_ok=True)
        for i, img in enumerate(x):
            save_image((img.float().clamp(-1, 1) + 1) / 2, out / "images" / f"{i:06d}.png")
    print(f"{what}: wrote {out / 'samples.png'} and {out / 'samples.npy'} ({list(x.shape)})"
          + (f" and {len(x)} images in {out / 'images'}" if args.images else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distill.export import export_checkpoint

    out = export_checkpoint(args.run, args.out, overwrite=args.overwrite, merge=args.merge)
    print(f"exported to {out}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched
    parser = _parser()
    # Overrides may come before or after options (`train cfg.yaml --resume a=1 b=2`): argparse cannot intermix
    # positionals with subparsers, so leftovers of the form key=value are taken as overrides.
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"'{args.command}' takes no key=value overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError, NotImplementedError) as exc:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"distill {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
