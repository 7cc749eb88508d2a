"""``distill train``: build teacher, student, loss and data from a config, train with Lightning, evaluate, report.

A run directory holds ``config.yaml`` (the resolved config), ``checkpoints/last.ckpt``, TensorBoard and CSV logs,
sample grids, ``fid_vs_step.{json,md,png}`` and the final ``eval.{json,md,png}`` (student at each NFE next to the
teacher's reference solver).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distill.config import save_config, to_container
from distill.core.registry import ConfigError

__all__ = ["build_components", "build_module", "run_training", "load_training_checkpoint"]


def build_components(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """Teacher, student and loss from a resolved config (shape mismatches fail with one line)."""
    from losses import build_loss
    from students import build_student
    from teachers import build_teacher

    teacher = build_teacher(to_container(cfg.teacher))
    loss_cfg = dict(to_container(cfg.loss))
    if "name" not in loss_cfg:
        from losses import LOSSES

        raise ConfigError(f"loss config needs a 'name'; valid losses: {', '.join(LOSSES.names())}")
    loss = build_loss(loss_cfg.pop("name"), **loss_cfg)
    student_cfg = dict(to_container(cfg.student))
    if "name" not in student_cfg:
        student_cfg["name"] = getattr(loss, "student_kind", "generator")
    warm = student_cfg.pop("from_export", None)
    student = build_student(student_cfg.pop("name"), teacher, **student_cfg)
    if warm is not None:  # fine-tune an exported student (its weights replace the init's)
        from distill.export import warm_start_student

        warm_start_student(student, warm)
    if tuple(student.data_shape) != tuple(teacher.data_shape):
        raise ConfigError(f"student data shape {list(student.data_shape)} does not match the teacher's "
                          f"{list(teacher.data_shape)}")
    from distill.model_options import apply_model_options, check_model_options

    check_model_options(cfg.model, loss, str(cfg.trainer.accelerator))
    apply_model_options(cfg.model, teacher, student)
    return teacher, student, loss


def build_module(cfg: DictConfig) -> Any:
    from distill.module import DistillModule

    teacher, student, loss = build_components(cfg)
    optim = {k: v for k, v in cfg.optim.items()}
    data = {"dataset": cfg.data.name, "batch_size": cfg.data.batch_size, "conditional": cfg.data.conditional,
            "pair_cache_dir": cfg.data.pair_cache_dir, "out_dir": cfg.out_dir,
            "guidance": None if cfg.data.guidance is None else list(cfg.data.guidance)}
    ema = {k: v for k, v in to_container(cfg.ema).items() if v is not None}
    return DistillModule(teacher, student, loss, optim, data=data, ema=ema, max_steps=cfg.trainer.max_steps,
                         seed=cfg.seed, log_every=cfg.trainer.log_every, sampling=sampling_overrides(cfg),
                         nonfinite_rows=cfg.trainer.nonfinite_rows,
                         config=to_container(cfg))


def sampling_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The non-null fields of the config's ``sampling`` section."""
    sc = to_container(cfg.sampling)
    return {k: v for k, v in sc.items() if v is not None and v != {}}


def scorer_for(cfg: DictConfig, teacher: Any) -> Any:
    """The run's metric (``distill.evaluate.build_scorer`` on the ``eval`` section)."""
    from distill.evaluate import scorer_from_config

    return scorer_from_config(teacher, cfg.eval)


def reevaluate(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Score a finished run's checkpoint again with this code's evaluation (``final_evaluation``), and write the new
    rows into its ``record.json`` (with the environment of the re-evaluation). The weights are not touched."""
    from distill.records import run_environment

    run_dir = Path(run_dir)
    module = build_module(cfg)
    module.prepare()
    module.load_state_dict(load_training_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"])
    result = final_evaluation(module, scorer_for(cfg, module.teacher), cfg, run_dir, None)
    path = run_dir / "record.json"
    record = json.loads(path.read_text())
    record["eval"] = result["rows"]
    record["reevaluated"] = run_environment()
    curve_file = run_dir / "fid_vs_step.json"
    if not record.get("curve") and curve_file.is_file():
        record["curve"] = [{"iteration": int(r["model"].split("@")[1]), "nfe": r["nfe"], "score": r["score"],
                            "seed": r["seed"]} for r in json.loads(curve_file.read_text())["student"]]
    path.write_text(json.dumps(record, indent=1, default=str))
    return record


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``: no pickled code), with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled objects refused by weights_only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {str(path)!r} is corrupt, truncated or not a distill checkpoint ({first})") \
            from None
    if not isinstance(ckpt, dict) or "distill" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} was not written by distill train")
    return ckpt


def make_trainer(cfg: DictConfig, out_dir: Path, callbacks: list[Any]) -> Any:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from distill.callbacks import IterationProgressBar

    # CSV: a new version folder per launch (a resumed run must not overwrite the first part's log); TensorBoard
    # appends a new event file to the same folder, so its curves continue across a resume.
    loggers = [CSVLogger(out_dir, name="logs"), TensorBoardLogger(out_dir, name="tb", version="")]
    if cfg.trainer.progress_bar:
        callbacks = callbacks + [IterationProgressBar(refresh_rate=10)]
    strategy: Any = cfg.trainer.strategy
    if strategy == "ddp":
        from distill.strategies import GradSyncDDPStrategy

        strategy = GradSyncDDPStrategy()
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=strategy,
        precision=cfg.trainer.precision,
        max_epochs=-1,  # the stream is endless; DistillModule stops at trainer.max_steps iterations
        max_steps=-1,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic=False,
    )


def run_training(cfg: DictConfig, resume: bool | str = False, final_eval: bool = True) -> dict[str, Any]:
    """Train (or resume) a run; returns paths and the final evaluation rows."""
    import warnings

    import lightning as L

    from distill.callbacks import FIDCallback, IterationCheckpoint, SampleGridCallback

    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out_dir = Path(cfg.out_dir)
    module = build_module(cfg)
    ckpt_path = None
    if resume:
        ckpt_path = Path(resume) if isinstance(resume, str) else out_dir / "checkpoints" / "last.ckpt"
        load_training_checkpoint(ckpt_path)  # one-line errors before Lightning touches it
        module.resume_path = str(ckpt_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    ev = cfg.eval
    scorer = scorer_for(cfg, module.teacher) if (ev.every or final_eval) else None
    callbacks: list[Any] = []
    fid_cb = None
    if ev.every and scorer is not None:
        fid_cb = FIDCallback(scorer, out_dir, ev.every, list(ev.nfe), ev.n_samples, ev.seeds[0], ev.reference_nfe,
                             ev.reference_sampler, ev.batch_size, ev.guidance)
        callbacks.append(fid_cb)
    if cfg.trainer.grid_every:
        callbacks.append(SampleGridCallback(out_dir / "samples", cfg.trainer.grid_every, list(ev.nfe)))
    ckpt_cb = IterationCheckpoint(out_dir / "checkpoints", cfg.trainer.ckpt_every)
    callbacks.append(ckpt_cb)
    trainer = make_trainer(cfg, out_dir, callbacks)
    # The frozen teacher is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    start_iteration, t0 = module.current_iteration, time.perf_counter()
    trainer.fit(module, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True if ckpt_path else None)
    train_s = time.perf_counter() - t0
    result: dict[str, Any] = {"out_dir": str(out_dir), "checkpoint": str(ckpt_cb.last),
                              "iterations": module.current_iteration, "skipped_steps": int(module.skipped_steps),
                              "nonfinite_rows": int(module.nonfinite_rows),
                              "data_cost": {name: prov.cache.cost for name, prov in module.providers.items()
                                            if getattr(getattr(prov, "cache", None), "cost", None)}}
    if final_eval and scorer is not None and trainer.is_global_zero:
        t1 = time.perf_counter()
        result["eval"] = final_evaluation(module, scorer, cfg, out_dir, fid_cb)
        eval_s = time.perf_counter() - t1
    else:
        eval_s = None
    if trainer.is_global_zero:
        curve = [{"iteration": int(r.model.split("@")[1]), "nfe": r.nfe, "score": r.score, "seed": r.seed}
                 for r in fid_cb.rows] if fid_cb is not None else []
        write_run_record(cfg, out_dir, result, module.current_iteration - start_iteration, train_s, eval_s, curve)
    return result


def write_run_record(cfg: DictConfig, out_dir: Path, result: dict[str, Any], iterations: int, train_s: float,
                     eval_s: float | None, curve: list[dict[str, Any]] | None = None) -> Path:
    """``record.json``: the run's protocol and costs next to its numbers (one per launch; a resumed run appends
    its part to ``parts``)."""
    from distill.records import config_hash, peak_rss_mb, run_environment

    path = out_dir / "record.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    container = to_container(cfg)
    part = {"iterations": iterations, "train_s": round(train_s, 2),
            "iterations_per_s": round(iterations / train_s, 3) if train_s > 0 and iterations else None,
            "eval_s": None if eval_s is None else round(eval_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            **run_environment()}
    record = {"kind": "distill train", "name": cfg.name, "config_hash": config_hash(container), "seed": cfg.seed,
              "eval_seeds": list(cfg.eval.seeds), "iterations": result["iterations"],
              "skipped_steps": result["skipped_steps"], "parts": old.get("parts", []) + [part],
              "eval": result.get("eval", {}).get("rows", old.get("eval")), "curve": curve or old.get("curve", []),
              "data_cost": result.get("data_cost") or old.get("data_cost", {}),
              "config": container}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return path


def final_evaluation(module: Any, scorer: Any, cfg: DictConfig, out_dir: Path, fid_cb: Any = None) -> dict[str, Any]:
    """The EMA student at each NFE over every eval seed, next to the teacher's reference solver; written as
    ``eval.{json,md,png}`` and printed."""
    from distill.eval_tables import EvalRow, markdown_table, write_table
    from distill.evaluate import eval_labels, generate_teacher, score_student, student_eval_kwargs

    ev = cfg.eval
    rows: list[EvalRow] = []
    student = module.ema.module
    conditional = module.conditional
    num_classes = module.teacher.num_classes if conditional else None
    step = module.current_iteration

    # The FID callback scores the same samples (same seed, noise, grid and protocol) when its schedule hits the
    # last iteration; its rows are reused rather than generated twice.
    def same(r: EvalRow) -> bool:
        return r.record.get("n_samples") == ev.n_samples

    done_ref = {r.seed: r for r in fid_cb.reference if same(r)} if fid_cb is not None else {}
    done_student = {(r.seed, r.record.get("nfe")): r for r in fid_cb.rows if r.model == f"student@{step}"
                    and same(r)} if fid_cb is not None else {}
    for seed in ev.seeds:
        if seed in done_ref:
            ref = done_ref[seed]
            rows.append(EvalRow("teacher", ref.sampler, ref.grid, ref.nfe, seed, ref.score, ref.metric, ref.record))
        else:
            x, nfe = generate_teacher(module.teacher, ev.reference_sampler, ev.reference_nfe, "karras",
                                      ev.n_samples, seed, ev.guidance, ev.batch_size)
            t = module.teacher
            rec = scorer(x, labels=eval_labels(ev.n_samples, seed, t.num_classes, t.class_probs), nfe=nfe,
                         sampler=ev.reference_sampler, grid="karras", guidance=ev.guidance, seed=seed, model="teacher")
            rows.append(EvalRow("teacher", ev.reference_sampler, "karras", nfe, seed, rec["score"], scorer.metric,
                                rec))
        for k in ev.nfe:
            if (seed, k) in done_student:
                rec = dict(done_student[(seed, k)].record, model=f"{cfg.name}:ema_student")
            else:
                rec = score_student(student, scorer, k, seed, module.sampling, n=ev.n_samples, guidance=ev.guidance,
                                    batch_size=ev.batch_size, num_classes=num_classes,
                                    class_probs=module.teacher.class_probs,
                                    **student_eval_kwargs(module.teacher, conditional),
                                    model=f"{cfg.name}:ema_student", step=step)
            rows.append(EvalRow(f"{cfg.name} (EMA student)", "student", "ema", rec["nfe"], seed, rec["score"],
                                scorer.metric, rec))
    paths = write_table(rows, out_dir, "eval", f"{cfg.name}: {scorer.metric} at fixed NFE "
                        f"({ev.n_samples} samples, seeds {list(ev.seeds)}, iteration {module.current_iteration})")
    table = markdown_table(rows)
    print(f"\n{cfg.name}: {scorer.metric} at fixed NFE after {module.current_iteration} iterations "
          f"({ev.n_samples} samples, seeds {list(ev.seeds)})\n{table}\n")
    (out_dir / "eval_summary.json").write_text(json.dumps({"table": table, "paths": {k: str(v) for k, v in
                                                                                     paths.items()}}, indent=1))
    return {"rows": [r.__dict__ for r in rows], "table": table}
