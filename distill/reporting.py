"""Tables from records: every number the docs publish is rendered here from a JSON record written by a script or a
``distill`` command (``scripts/report.py`` puts them into ``README.md`` and ``docs/benchmarks.md``; ``--check``
fails when the committed docs differ from what the records say).

A suite record (``scripts/bench.py``) holds every run's ``record.json`` (eval rows per sampling seed, wall-clock,
iterations/s, peak memory, commit) and the teacher's rows at the same NFEs and seeds. Cells are mean ± sd: over
training seeds of the per-seed mean over sampling seeds when several training seeds ran, else over sampling seeds
(and then labelled "1 training seed").
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["commit_of", "summarise", "student_summary", "teacher_summary", "suite_markdown", "provenance", "fmt",
           "curve_markdown", "solver_markdown", "modes_markdown"]

Cell = tuple[float, float, str]


def fmt(x: float, sd: float | None = None) -> str:
    """4 significant digits, ``± sd`` at 2."""
    return f"{x:.4g}" if sd is None else f"{x:.4g} ± {sd:.2g}"


def summarise(values: Mapping[Any, Sequence[float]]) -> Cell:
    """(mean, sd, what the sd is over) from training seed -> sampling-seed scores."""
    per_train = [statistics.mean(v) for v in values.values()]
    if len(per_train) > 1:
        return statistics.mean(per_train), statistics.stdev(per_train), f"{len(per_train)} training seeds"
    only = list(next(iter(values.values())))
    sd = statistics.stdev(only) if len(only) > 1 else 0.0
    return statistics.mean(only), sd, f"1 training seed × {len(only)} sampling seeds"


def student_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One config's runs (``record.json`` of each training seed) -> cells per NFE and costs."""
    by_nfe: dict[int, dict[int, list[float]]] = {}
    for rec in runs:
        for row in rec["eval"]:
            if row["model"] != "teacher":
                by_nfe.setdefault(int(row["nfe"]), {}).setdefault(rec["seed"], []).append(float(row["score"]))
    train_s = [sum(p["train_s"] for p in r["parts"]) for r in runs]
    iters = [r["iterations"] for r in runs]
    label = next((row.get("record", {}).get("label") for r in runs for row in r["eval"]), None)
    return {
        "cells": {k: summarise(v) for k, v in sorted(by_nfe.items())},
        "train_s": statistics.mean(train_s),
        "s_per_1k": statistics.mean(1000 * t / max(1, i) for t, i in zip(train_s, iters)),
        "iterations_per_s": statistics.mean(r["parts"][-1]["iterations_per_s"] or 0.0 for r in runs),
        "peak_rss_mb": max(r["parts"][-1]["peak_rss_mb"] for r in runs),
        "iterations": iters[0],
        "train_seeds": sorted(r["seed"] for r in runs),
        "label": label,
    }


def teacher_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, Cell]]:
    """Teacher-solver rows (one per sampling seed) -> solver -> NFE -> cell (sd over sampling seeds)."""
    out: dict[str, dict[int, dict[int, list[float]]]] = {}
    for r in rows:
        key = f"{r['sampler']}/{r['grid']}" if r["model"] == "teacher" else r["model"]
        out.setdefault(key, {}).setdefault(int(r["nfe"]), {0: []})[0].append(float(r["score"]))
    return {k: {n: summarise(v) for n, v in sorted(d.items())} for k, d in out.items()}


def commit_of(env: Mapping[str, Any] | None) -> str:
    """A record's commit, short (``+dirty`` kept: the tree had uncommitted changes when it was measured)."""
    full = (env or {}).get("git_commit") or "?"
    return full[:12] + ("+dirty" if full.endswith("+dirty") else "")


#: what a suite record's ``wall_s`` measured, by the pass of ``scripts/bench.py`` that wrote it
WALL_OF = {"reeval": "s wall-clock re-scoring finished runs (--reeval; training is per row)",
           "collect": "s wall-clock collecting finished runs (--collect; training is per row)"}


def provenance(record: Mapping[str, Any], path: str) -> str:
    env = record.get("environment", {})
    commit = commit_of(env)
    wall = WALL_OF.get(record.get("pass", "train"), "s wall-clock")
    return (f"_Record `{path}` ({record.get('script', '?')}): commit `{commit}`, {env.get('machine', '?')}, torch "
            f"{env.get('torch', '?')}, {record.get('wall_s', '?')} {wall}._")


def suite_markdown(record: Mapping[str, Any], path: str) -> str:
    """The cross-method table of a ``scripts/bench.py`` record."""
    suite = record["definition"]
    students = {cfg: student_summary(runs) for cfg, runs in record["runs"].items()}
    teachers = teacher_summary(record["teacher_rows"])
    metric = record["metric"]
    nfes = sorted({*suite["nfe"]})
    extra = sorted({n for d in teachers.values() for n in d} - set(nfes))
    cols = nfes + extra
    label = next((s["label"] for s in students.values() if s["label"]), None) or metric
    head = "| model | " + " | ".join(f"@ {k} NFE" if k else "exact" for k in cols) + \
        " | s / 1k it | it/s | peak MB | ± over |"
    lines = [f"{label}; sampling seeds {suite['sample_seeds']}, training seeds {suite['train_seeds']} "
             f"(suite `{record['suite']}`"
             + (f"; own seeds: {suite['config_seeds']}" if suite.get("config_seeds") else "")
             + ").", "", head, "|" + "---|" * (len(cols) + 5)]

    def cell(c: Cell | None) -> str:
        return "–" if c is None else fmt(c[0], c[1])

    for cfg, s in students.items():
        over = next(iter(s["cells"].values()))[2] if s["cells"] else ""
        lines.append(f"| {cfg} (EMA student, {s['iterations']} it) | " + " | ".join(cell(s["cells"].get(k))
                     for k in cols) + f" | {s['s_per_1k']:.1f} | {s['iterations_per_s']:.2f} | "
                     f"{s['peak_rss_mb']:.0f} | {over} |")
    for name, d in teachers.items():
        n = len(suite["sample_seeds"])
        lines.append(f"| teacher {name} | " + " | ".join(cell(d.get(k)) for k in cols) +
                     f" | – | – | – | {n} sampling seeds |")
    return "\n".join(lines + ["", provenance(record, path)])


def modes_markdown(record: Mapping[str, Any], path: str, nfe: int = 1) -> str:
    """Per-mode mass at ``nfe`` of every row of an exact-mixture suite (eval rows carrying ``mode_mass``) next to the
    true weights, and the off-mode fraction: mean ± sd over training seeds of the per-seed mean over sampling seeds
    (over sampling seeds when one training seed ran). The teacher's 35-NFE Heun reference closes the table."""
    rows: dict[str, dict[int, list[dict[str, Any]]]] = {}
    weights: list[float] | None = None
    for key, runs in record["runs"].items():
        for rec in runs:
            for row in rec["eval"]:
                r = row.get("record", {})
                if "mode_mass" not in r:
                    continue
                weights = weights or r.get("weights")
                if row["model"] == "teacher":
                    rows.setdefault(f"teacher {row['sampler']} @ {row['nfe']} NFE", {}).setdefault(0, []).append(r)
                elif int(row["nfe"]) == nfe:
                    rows.setdefault(key, {}).setdefault(rec["seed"], []).append(r)
    if not rows or weights is None:
        return f"_No per-mode masses in `{path}`._"
    k = len(weights)

    def cell(per_seed: Mapping[int, list[dict[str, Any]]], get) -> str:
        c = summarise({s: [get(r) for r in rs] for s, rs in per_seed.items()})
        return fmt(c[0], c[1])

    lines = [f"Per-mode mass at {nfe} NFE (true weight in the header), off-mode fraction and SW1; mean ± sd over "
             f"training seeds {record['definition']['train_seeds']} × sampling seeds "
             f"{record['definition']['sample_seeds']} (suite `{record['suite']}`).", "",
             "| row | " + " | ".join(f"mode {i} (w={w:g})" for i, w in enumerate(weights)) + " | off | SW1 |",
             "|" + "---|" * (k + 3)]
    teacher = {n: v for n, v in rows.items() if n.startswith("teacher")}
    for name, per_seed in [*((n, v) for n, v in rows.items() if n not in teacher), *teacher.items()]:
        lines.append(f"| {name} | " + " | ".join(cell(per_seed, lambda r, i=i: r["mode_mass"][i]) for i in range(k))
                     + f" | {cell(per_seed, lambda r: r['off'])} | {cell(per_seed, lambda r: r['score'])} |")
    return "\n".join(lines + ["", provenance(record, path)])


def curve_markdown(record: Mapping[str, Any], path: str) -> str:
    """Quality vs iteration (the in-training FID callback's rows, sampling seed 0) for each run of a suite."""
    lines = []
    for cfg, runs in record["runs"].items():
        for rec in runs:
            curve = rec.get("curve") or []
            if not curve:
                continue
            nfes = sorted({c["nfe"] for c in curve})
            steps = sorted({c["iteration"] for c in curve})
            lines += [f"{cfg}, training seed {rec['seed']}:", "",
                      "| iteration | " + " | ".join(f"@ {k} NFE" for k in nfes) + " |", "|" + "---|" * (1 + len(nfes))]
            for s in steps:
                vals = {c["nfe"]: c["score"] for c in curve if c["iteration"] == s}
                lines.append(f"| {s} | " + " | ".join(fmt(vals[k]) if k in vals else "–" for k in nfes) + " |")
            lines.append("")
    return "\n".join(lines + [provenance(record, path)]) if lines else f"_No curve in `{path}`._"


def solver_markdown(rows: Sequence[Mapping[str, Any]], path: str, note: str = "") -> str:
    """A ``distill eval`` teacher-solver record (``teacher_solvers.json``): solver/grid rows, NFE columns."""
    summ = teacher_summary(rows)
    cols = sorted({n for d in summ.values() for n in d})
    lines = ["| solver / grid | " + " | ".join(f"@ {k} NFE" if k else "exact" for k in cols) + " |",
             "|" + "---|" * (1 + len(cols))]
    for name, d in summ.items():
        lines.append(f"| {name} | " + " | ".join(fmt(d[k][0], d[k][1] if d[k][1] else None) if k in d else "–"
                                                 for k in cols) + " |")
    seeds = sorted({r["seed"] for r in rows})
    return "\n".join(lines + ["", f"_Record `{path}` (`distill eval`): sampling seeds {seeds}. {note}_".rstrip()])
