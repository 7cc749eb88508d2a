"""Lightning callbacks of a distillation run: FID on a schedule, sample grids, periodic atomic checkpoints.

All three count training *iterations* (``DistillModule.iteration``), not Lightning's ``global_step``, which under
manual optimisation counts optimizer steps (DMD2 takes 1 + 1/5 of them per iteration).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from distill.core.data import save_grid
from distill.eval_tables import EvalRow, rows_label
from distill.evaluate import eval_labels, generate_teacher, score_student, student_eval_kwargs
from distill.scorers import Scorer

__all__ = ["FIDCallback", "SampleGridCallback", "IterationCheckpoint", "IterationProgressBar", "save_sample_figure"]


def save_sample_figure(x: torch.Tensor, path: str | Path, title: str = "") -> None:
    """A grid PNG for images ``[B, C, H, W]`` in [-1, 1], a scatter plot for 2-D points ``[B, 2]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        save_grid(x[:64].cpu(), path)
        return
    # matplotlib stays lazy: choosing the Agg backend at import time would impose it on whoever imports this module.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    pts = x.reshape(x.shape[0], -1).cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
    ax.set_aspect("equal")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class FIDCallback(L.Callback):
    """Every ``every`` iterations, score the EMA student at each NFE with the same protocol as ``distill eval``.

    The teacher's reference row (``reference_sampler`` at ``reference_nfe``) is computed once, at the first
    evaluation. Writes ``fid_vs_step.{json,md,png}`` in ``out_dir``; the table's title line and the plot's y axis
    carry the records' protocol label (proxy or final follows from the sample count and the reference size).
    """

    def __init__(self, scorer: Scorer, out_dir: str | Path, every: int, nfes: list[int], n_samples: int,
                 seed: int = 0, reference_nfe: int = 35, reference_sampler: str = "heun", batch_size: int = 1000,
                 guidance: float = 1.0) -> None:
        self.scorer = scorer
        self.out_dir = Path(out_dir)
        self.every = every
        self.nfes = list(nfes)
        self.n = n_samples
        self.seed = seed
        self.reference_nfe = reference_nfe
        self.reference_sampler = reference_sampler
        self.batch_size = batch_size
        self.guidance = guidance
        self.rows: list[EvalRow] = []
        self.reference: list[EvalRow] = []

    def evaluate(self, pl_module: Any, step: int) -> list[EvalRow]:
        if not self.reference:
            x, nfe = generate_teacher(pl_module.teacher, self.reference_sampler, self.reference_nfe, "karras",
                                      self.n, self.seed, self.guidance, self.batch_size)
            t = pl_module.teacher
            rec = self.scorer(x, labels=eval_labels(self.n, self.seed, t.num_classes, t.class_probs), nfe=nfe,
                              sampler=self.reference_sampler, grid="karras", guidance=self.guidance,
                              seed=self.seed, model="teacher")
            self.reference.append(EvalRow("teacher", self.reference_sampler, "karras", nfe, self.seed, rec["score"],
                                          self.scorer.metric, rec))
        new = []
        student = pl_module.ema.module
        teacher = pl_module.teacher
        num_classes = teacher.num_classes if pl_module.conditional else None
        for k in self.nfes:
            rec = score_student(student, self.scorer, k, self.seed, pl_module.sampling, n=self.n,
                                guidance=self.guidance, batch_size=self.batch_size, num_classes=num_classes,
                                class_probs=teacher.class_probs, **student_eval_kwargs(teacher, pl_module.conditional),
                                model="ema_student", step=step)
            nfe = rec["nfe"]
            row = EvalRow(f"student@{step}", "student", "ema", nfe, self.seed, rec["score"], self.scorer.metric, rec)
            new.append(row)
            pl_module.print(f"[eval] iteration {step}: {self.scorer.metric} @ {nfe} NFE = {rec['score']:.4g}")
            if pl_module.logger is not None:
                pl_module.logger.log_metrics({f"eval/{self.scorer.metric}_nfe{nfe}": rec["score"]}, step=step)
        self.rows.extend(new)
        self.write()
        return new

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "fid_vs_step.json").write_text(json.dumps(
            {"reference": [r.__dict__ for r in self.reference], "student": [r.__dict__ for r in self.rows]},
            indent=1, default=str))
        lines = ["| iteration | " + " | ".join(f"{self.scorer.metric} @ {k} NFE" for k in self.nfes) + " |",
                 "|" + "---|" * (1 + len(self.nfes))]
        steps = sorted({int(r.model.split("@")[1]) for r in self.rows})
        for s in steps:
            cells = {r.nfe: r.score for r in self.rows if r.model == f"student@{s}"}
            lines.append(f"| {s} | " + " | ".join(f"{cells[k]:.4g}" if k in cells else "–" for k in self.nfes) + " |")
        ref = self.reference[0] if self.reference else None
        title = f"# {self.scorer.metric} vs iteration — {rows_label(self.rows or self.reference)}\n\n"
        head = (f"Teacher reference: {ref.sampler} @ {ref.nfe} NFE = {ref.score:.4g} ({ref.record.get('label')}, "
                f"seed {self.seed}).\n\n") if ref else ""
        (self.out_dir / "fid_vs_step.md").write_text(title + head + "\n".join(lines) + "\n")
        self._plot(steps)

    def _plot(self, steps: list[int]) -> None:
        import matplotlib  # lazy, as in save_sample_figure

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for k in self.nfes:
            pts = sorted((int(r.model.split("@")[1]), r.score) for r in self.rows if r.nfe == k)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"student, {k} NFE")
        if self.reference:
            ax.axhline(self.reference[0].score, color="k", ls="--",
                       label=f"teacher {self.reference[0].sampler} @ {self.reference[0].nfe} NFE")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(rows_label(self.rows or self.reference).replace("; ", "\n"), fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out_dir / "fid_vs_step.png", dpi=110)
        plt.close(fig)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        k = pl_module.current_iteration
        if self.every and k % self.every == 0 and k > 0 and trainer.is_global_zero:
            self.evaluate(pl_module, k)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": json.dumps([r.__dict__ for r in self.rows], default=str),
                "reference": json.dumps([r.__dict__ for r in self.reference], default=str)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [EvalRow(**d) for d in json.loads(state_dict.get("rows", "[]"))]
        self.reference = [EvalRow(**d) for d in json.loads(state_dict.get("reference", "[]"))]


class SampleGridCallback(L.Callback):
    """Every ``every`` iterations, save a grid (or 2-D scatter) of EMA-student samples at each NFE, and log the grid
    image to TensorBoard when that logger is attached."""

    def __init__(self, out_dir: str | Path, every: int, nfes: list[int]) -> None:
        self.out_dir = Path(out_dir)
        self.every = every
        self.nfes = nfes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        k = pl_module.current_iteration
        if not (self.every and (k % self.every == 0 or k == pl_module.max_steps)) or not trainer.is_global_zero:
            return
        for nfe in self.nfes:
            n = 64 if len(pl_module.ema.module.data_shape) > 1 else 2000
            x = pl_module.ema_samples(n, nfe=nfe)
            if getattr(pl_module.teacher, "latent", False):
                with torch.no_grad():
                    x = pl_module.teacher.decode(x).cpu()  # grids show pixels
            path = self.out_dir / f"step{k:06d}_nfe{nfe}.png"
            save_sample_figure(x, path, f"iteration {k}, {nfe} NFE")
            for lg in trainer.loggers:
                exp = getattr(lg, "experiment", None)
                if x.ndim == 4 and hasattr(exp, "add_images"):
                    exp.add_images(f"samples/nfe{nfe}", (x[:64].clamp(-1, 1) + 1) / 2, global_step=k)


class IterationCheckpoint(L.Callback):
    """Save ``last.ckpt`` every ``every`` iterations and at the end, through Lightning's checkpoint IO (which writes
    to a temporary file and moves it into place, so an interrupted write leaves the previous checkpoint intact)."""

    def __init__(self, dirpath: str | Path, every: int) -> None:
        self.dirpath = Path(dirpath)
        self.every = every

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        k = pl_module.current_iteration
        if self.every and k % self.every == 0 and k > 0 and k < pl_module.max_steps:
            trainer.save_checkpoint(self.last, weights_only=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        trainer.save_checkpoint(self.last, weights_only=False)


class IterationProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting training iterations out of ``trainer.max_steps`` (the stream is endless, so the
    stock bar would show ``0/?``), continuing from the restored count on resume."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=pl_module.max_steps)
        bar.initial = pl_module.current_iteration
        bar.n = pl_module.current_iteration
        bar.set_description("distill train")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = pl_module.current_iteration
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and (n % self.refresh_rate == 0 or n >= pl_module.max_steps):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
