"""Rows of evaluation records and what is rendered from them: the mean ± sd table over sampling seeds, the
score-vs-NFE plot and the ``<stem>.{json,md,png}`` files that :func:`write_table` writes.

Every table's title line and plot axis carry the records' one-line protocol label (:func:`rows_label`). The rows
come from :mod:`distill.evaluate` (teacher solvers, students) scored by :mod:`distill.scorers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["EvalRow", "summarise", "rows_label", "markdown_table", "plot_rows", "write_table"]


@dataclass
class EvalRow:
    """One measured cell: who generated (model), how (sampler, grid, nfe), the score and its full record."""

    model: str
    sampler: str
    grid: str
    nfe: int
    seed: int
    score: float
    metric: str
    record: dict[str, Any] = field(default_factory=dict)


def summarise(rows: list[EvalRow]) -> dict[tuple[str, str, str], dict[int, tuple[float, float, int]]]:
    """(model, sampler, grid) -> nfe -> (mean, sd, n_seeds)."""
    groups: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for r in rows:
        groups.setdefault((r.model, r.sampler, r.grid), {}).setdefault(r.nfe, []).append(r.score)
    out: dict[tuple[str, str, str], dict[int, tuple[float, float, int]]] = {}
    for key, by_nfe in groups.items():
        out[key] = {}
        for k, vals in by_nfe.items():
            t = torch.tensor(vals, dtype=torch.float64)
            sd = float(t.std()) if len(vals) > 1 else 0.0
            out[key][k] = (float(t.mean()), sd, len(vals))
    return out


def rows_label(rows: list[EvalRow]) -> str:
    """The one-line protocol label of ``rows`` (``record["label"]``, e.g. ``"digits-classifier FID, final (2,000
    samples vs 1,797 real digits)"``); distinct labels are joined with ``"; "``, in order of first appearance."""
    labels = list(dict.fromkeys(str(r.record.get("label") or r.metric) for r in rows))
    return "; ".join(labels)


def markdown_table(rows: list[EvalRow], title: str = "") -> str:
    """A title line ``# <title> — <protocol label>`` (:func:`rows_label`), then the table: rows = (model, sampler,
    grid); columns = every NFE measured; cells = mean ± sd over seeds."""
    if not rows:
        return ""
    label = rows_label(rows)
    summary = summarise(rows)
    nfes = sorted({r.nfe for r in rows})
    metric = rows[0].metric
    head = "| model | sampler | grid | " + " | ".join(f"{metric} @ NFE {k}" for k in nfes) + " |"
    sep = "|" + "---|" * (3 + len(nfes))
    lines = [f"# {title} — {label}" if title else f"# {label}", "", head, sep]
    for (model, sampler, grid), by_nfe in summary.items():
        cells = []
        for k in nfes:
            if k in by_nfe:
                m, sd, n = by_nfe[k]
                cells.append(f"{m:.4g} ± {sd:.2g}" if n > 1 else f"{m:.4g}")
            else:
                cells.append("–")
        lines.append(f"| {model} | {sampler} | {grid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rows(rows: list[EvalRow], path: str | Path, title: str = "") -> None:
    """Score vs NFE (log-log), one line per (model, sampler, grid)."""
    # Lazy on purpose: selecting the Agg backend at import time would force it on every process that imports
    # this module (a notebook, say), and matplotlib is only needed when a plot is written.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, sampler, grid), by_nfe in summary.items():
        ks = sorted(by_nfe)
        ax.errorbar(ks, [by_nfe[k][0] for k in ks], yerr=[by_nfe[k][1] for k in ks], marker="o", capsize=2,
                    label=f"{model}: {sampler}/{grid}" if model != "teacher" else f"{sampler}/{grid}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(rows_label(rows).replace("; ", "\n") if rows else "", fontsize=8)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(rows: list[EvalRow], out_dir: str | Path, stem: str = "eval", title: str = "") -> dict[str, Path]:
    """Write ``<stem>.json`` (every record), ``<stem>.md`` (mean ± sd table under a title line that carries the
    protocol label) and ``<stem>.png`` (plot, the label on its y axis)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    paths["md"].write_text(markdown_table(rows, title) + "\n")
    plot_rows(rows, paths["png"], title)
    return paths
