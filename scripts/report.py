"""Render every published table from its record: ``python scripts/report.py`` rewrites the marked blocks of
``README.md`` and ``docs/benchmarks.md``; ``python scripts/report.py --check`` exits 1 (naming the stale blocks)
when a committed block differs from what the records say (CI runs it).

A block is ``<!-- report:NAME -->`` ... ``<!-- /report:NAME -->``; ``NAME`` is a renderer below. Records live in
``docs/bench/`` and are written by ``scripts/bench.py`` (suites), ``distill eval`` (teacher solvers),
``scripts/bench_calibration.py``, ``scripts/bench_overhead.py`` and ``scripts/bench_cost.py``. Prose outside blocks
carries no measured number.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.fid import protocol_label  # noqa: E402
from distill.reporting import (  # noqa: E402
    commit_of,
    curve_markdown,
    fmt,
    modes_markdown,
    solver_markdown,
    student_summary,
    suite_markdown,
    summarise,
    teacher_summary,
)

BENCH = Path("docs") / "bench"
FILES = [Path("README.md"), Path("docs") / "benchmarks.md"]
BLOCK = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)


def _load(rel: Path, root: Path) -> Any | None:
    p = root / rel
    return json.loads(p.read_text()) if p.is_file() else None


def _missing(rel: Path, how: str) -> str:
    return f"_Not measured yet: `{rel}` does not exist (run `{how}`)._"


def _suite_block(name: str, markdown: Callable[[Any, str], str]) -> Callable[[Path], str]:
    """A block rendered by ``markdown(record, path)`` from the suite record ``docs/bench/<name>.json``."""
    def render(root: Path) -> str:
        rel = BENCH / f"{name}.json"
        rec = _load(rel, root)
        return markdown(rec, str(rel)) if rec else _missing(rel, f"python scripts/bench.py {name}")

    return render


def suite(name: str) -> Callable[[Path], str]:
    """The cross-method table of suite ``name``."""
    return _suite_block(name, suite_markdown)


def curve(name: str) -> Callable[[Path], str]:
    """Quality vs iteration of suite ``name``'s runs."""
    return _suite_block(name, curve_markdown)


def modes(name: str) -> Callable[[Path], str]:
    """Per-mode mass of suite ``name``'s rows (exact mixtures)."""
    return _suite_block(name, modes_markdown)


def solvers(name: str, config: str) -> Callable[[Path], str]:
    def render(root: Path) -> str:
        rel = BENCH / name / "teacher_solvers.json"
        rows = _load(rel, root)
        return solver_markdown(rows, str(rel)) if rows else _missing(
            rel, f"distill eval configs/{config}.yaml --out {BENCH / name}")

    return render


def suite_solvers(name: str) -> Callable[[Path], str]:
    """A suite's teacher-solver rows (``scripts/bench.py`` scores them at the suite's NFEs and sampling seeds)."""

    def render(root: Path) -> str:
        rel = BENCH / f"{name}.json"
        rec = _load(rel, root)
        if not rec:
            return _missing(rel, f"python scripts/bench.py {name}")
        return solver_markdown(rec["teacher_rows"], str(rel), f"The teacher rows of suite `{name}`.")

    return render


def calibration(root: Path) -> str:
    rel = BENCH / "calibration.json"
    rec = _load(rel, root)
    if not rec:
        return _missing(rel, "python scripts/bench_calibration.py")
    lines = [f"| case ({rec.get('digits_label') or 'digits FID'}) | FID |", "|---|---|"]
    lines += [f"| {k} | {fmt(v['mean'], v['sd'])} |" for k, v in rec["digits"].items()]
    lines += ["", f"| case ({rec['ring'].get('label') or 'ring sliced W1'}) | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v['mean'], v['sd'])} |" for k, v in rec["ring"].items() if isinstance(v, dict)]
    env = rec["environment"]
    lines += ["", f"_Record `{rel}` (scripts/bench_calibration.py): {rec['seeds']} seeds, commit "
                  f"`{commit_of(env)}`, {env['machine']}._"]
    return "\n".join(lines)


def overhead(root: Path) -> str:
    rel = BENCH / "overhead_cd.json"
    rec = _load(rel, root)
    if not rec:
        return _missing(rel, "python scripts/bench_overhead.py --json docs/bench/overhead_cd.json")
    ms = rec["median_ms"]
    return (f"| side | ms / iteration (median of {rec['repeats']}) |\n|---|---|\n"
            f"| `distill train` (Lightning) | {ms['lightning']:.1f} |\n| bare loop (same iteration function) | "
            f"{ms['bare']:.1f} |\n| overhead | {rec['overhead_pct']:.1f}% |\n\n_Record `{rel}` "
            f"(scripts/bench_overhead.py): loss {rec['loss']}, teacher {rec['teacher']}, {rec['iters']} iterations, "
            f"{rec['threads']} thread(s), commit `{commit_of(rec.get('environment'))}`._")


def cost_block(name: str) -> Callable[[Path], str]:
    """Cost per generator update of each loss on the digits teacher, in teacher-forward equivalents, and peak memory
    (``scripts/bench_cost.py --json docs/bench/<name>``; on CUDA the memory columns are CUDA allocated memory)."""
    return lambda root: _cost(root, BENCH / name)


def _cost(root: Path, rel: Path) -> str:
    rec = _load(rel, root)
    if not rec:
        return _missing(rel, f"python scripts/bench_cost.py --json {rel}")
    cuda = any("peak_cuda_mib" in r for r in rec["methods"].values())
    mem = "CUDA allocated" if cuda else "RSS"
    lines = [f"| method | iterations per generator update | ms / generator update | teacher-forward equivalents | "
             f"teacher / fake / student forwards per update | peak {mem} (MiB) | training {mem} over baseline "
             f"(MiB) |", "|---|---|---|---|---|---|---|"]
    for name, r in rec["methods"].items():
        peak, train = (r["peak_cuda_mib"], r["train_cuda_mib"]) if cuda else (r["peak_rss_mib"], r["train_rss_mib"])
        lines.append(f"| {name} | {r['iterations_per_student_update']:g} | {r['ms_per_student_update']:.0f} | "
                     f"{r['teacher_forward_equivalents']:.1f} | {r['teacher_forwards']:g} / {r['fake_forwards']:g} / "
                     f"{r['student_forwards']:g} | {peak:.0f} | {train:.0f} |")
    env = rec.get("environment") or {}
    tf = statistics.median(r["teacher_forward_ms"] for r in rec["methods"].values())
    lines += ["", f"_Record `{rel}` (scripts/bench_cost.py): {env.get('machine', '?')}, {rec['threads']} thread(s), "
                  f"batch {rec['batch_size']}, one teacher forward {tf:.1f} ms (median over methods), commit "
                  f"`{commit_of(env)}`" + (f", load average {rec['load_average_1min_at_end']:.1f} at the end (other "
                                           "work on the machine inflates the ms, not the forward counts)"
                                           if "load_average_1min_at_end" in rec else "") + "._"]
    return "\n".join(lines)


def _stamp(rec: dict[str, Any], rel: Path) -> str:
    env = rec.get("environment") or {}
    return (f"_Record `{rel}` ({rec.get('script', '?')}): commit `{commit_of(env)}`, "
            f"{env.get('machine', '?')}._")


def ring_floor(root: Path) -> str:
    rel = BENCH / "ring_floor.json"
    rec = _load(rel, root)
    if not rec:
        return _missing(rel, "python scripts/bench_ring_floor.py --seeds 100 --out docs/bench/ring_floor.json")
    p, r = rec["protocol"], rec["ratio_smax80"]
    return "\n".join([
        f"| set ({p['n']} samples, {p['seeds']} seeds, sliced W1 with {p['sw1_directions']} directions) | SW1 |",
        "|---|---|",
        f"| Heun {p['nfe']} NFE (EDM grid, sigma_min {p['sigma_min']}, rho {p['rho']}) | "
        f"{fmt(rec['heun_smax80']['mean'], rec['heun_smax80']['sd'])} |",
        f"| exact set, paired mode counts (floor) | {fmt(rec['paired']['mean'], rec['paired']['sd'])} |",
        f"| exact set, independent (floor) | {fmt(rec['independent']['mean'], rec['independent']['sd'])} |",
        "", f"Heun-35 / floor: {r['paired']:.2f}x paired, {r['independent']:.2f}x independent (bar: 1.2x); "
            f"over the first three seeds (what `tests/test_samplers.py` asserts) {r['first3_paired']:.2f}x.", "",
        _stamp(rec, rel)])


def speedup(root: Path) -> str:
    rel = BENCH / "speedup_digits_cd.json"
    rec = _load(rel, root)
    if not rec:
        return _missing(rel, "python scripts/bench_speedup.py exports/digits_cd --json "
                             "docs/bench/speedup_digits_cd.json")
    lines = ["| student NFE | student FID | first teacher solver at or below it | its FID | images/s student vs "
             "teacher | speed-up | NFE ratio |", "|---|---|---|---|---|---|---|"]
    for row in rec["rows"]:
        m = row["matched"]
        if m is None:
            lines.append(f"| {row['student_nfe']} | {row['student_fid']:.4g} | none in the NFE list | – | – | – | – |")
            continue
        lines.append(f"| {row['student_nfe']} | {row['student_fid']:.4g} | {m['solver']} @ {m['nfe']} NFE | "
                     f"{m['fid']:.4g} | {m['student_images_per_s']:.0f} vs {m['teacher_images_per_s']:.0f} | "
                     f"{m['speedup']:.1f}x | {m['nfe_ratio']:.1f}x |")
    return "\n".join(lines + ["", f"FID over sampling seeds {rec['seeds']}, {rec['n']} samples; the teacher NFE list "
                               "is coarse, so each speed-up is an upper bound.", "", _stamp(rec, rel)])


def _cells(rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({cfg: student_summary(runs) for cfg, runs in rec["runs"].items()}, teacher_summary(rec["teacher_rows"]))


def _teacher_ref(teachers: dict[str, Any]) -> tuple[float, float] | None:
    ref = teachers.get("heun/karras", {}).get(35)
    return None if ref is None else (ref[0], ref[1])


def results(root: Path) -> str:
    """The README's headline table: each suite's students at 1/2/4 NFE next to the teacher's Heun-35."""
    lines = ["| run (metric) | 1 NFE | 2 NFE | 4 NFE | teacher, Heun 35 NFE | ± over |", "|---|---|---|---|---|---|"]
    notes = []
    # suites that re-run a config another suite has (more seeds, longer runs) are labelled with their name
    again = {"digits_cont_long": "3000 it re-run", "ring_scm_seeds": "4 more training seeds",
             "digits_ayf_init": "3000 it, 2 seeds", "digits_ayf_init_more": "training seeds 3 and 4",
             "digits_ayf_dm": "fine-tune of digits_ayf_init",
             "digits_ayf_sim": "fine-tune of digits_ayf_init",
             "digits_ayf_sim_next": "digits_ayf_sim, intermediate outputs matched above mid"}
    for name in ("digits", "digits_score", "digits_sim_long", "digits_dmd2", "digits_traj", "digits_cont",
                 "digits_cont_long", "digits_ayf_init", "digits_ayf_init_more", "digits_ayf_dm", "digits_ayf_sim",
                 "digits_ayf_sim_next", "ring", "ring_score", "ring_traj", "ring_cont", "ring_scm_seeds"):
        rel = BENCH / f"{name}.json"
        rec = _load(rel, root)
        if not rec and name == "digits_dmd2" and _history_dmd2_rows(root):
            for cfg, cells, ref in _history_dmd2_rows(root):
                lines.append(f"| {cfg}, 3000 it (digits-classifier FID; earlier record, commit 7b79030) | "
                             f"{fmt(cells[1][0], cells[1][1])} | – | – | {fmt(ref[0], ref[1])} | "
                             "1 training seed × 3 sampling seeds |")
            continue
        if not rec:
            notes.append(_missing(rel, f"python scripts/bench.py {name}"))
            continue
        students, teachers = _cells(rec)
        ref = _teacher_ref(teachers)
        for cfg, s in students.items():
            c = s["cells"]
            over = next(iter(c.values()))[2] if c else ""
            tag = f" [{name}: {again[name]}]" if name in again else ""
            lines.append(f"| {cfg}{tag}, {s['iterations']} it ({s['label'] or rec['metric']}) | " +
                         " | ".join(fmt(c[k][0], c[k][1]) if k in c else "–" for k in (1, 2, 4)) +
                         f" | {fmt(*ref) if ref else '–'} | {over} |")
        best = {k: min(((d[k][0], n) for n, d in teachers.items() if k in d and n.count("/")), default=None)
                for k in (4, 8)}
        if any(best.values()):
            notes.append(f"Best training-free solver on the {name} suite's teacher: " + "; ".join(
                f"{b[0]:.4g} at {k} NFE ({b[1]})" for k, b in best.items() if b) + f" (`{rel}`).")
    return "\n".join(lines + [""] + notes)


def _one_nfe_rows(name: str, rec: dict[str, Any] | None, metric: str) -> list[tuple[str, list[str], list[dict]]]:
    """Per row of suite ``name``: ``(config, [bar line "1-NFE metric within 1.5x the teacher's Heun-35"], the row's
    1-NFE eval records over training and sampling seeds)``."""
    if not rec:
        return []
    students, teachers = _cells(rec)
    ref = _teacher_ref(teachers)
    out = []
    for cfg, s in students.items():
        one = s["cells"].get(1)
        line = [] if not (one and ref) else [
            f"| {name} {cfg}: 1-NFE {metric} within 1.5x the teacher's Heun-35 ({s['iterations']} it, "
            f"{s['train_s'] / 60:.0f} min) | {one[0]:.4g} vs {ref[0]:.4g} ({one[0] / ref[0]:.2f}x) | "
            f"{'yes' if one[0] <= 1.5 * ref[0] else 'no'} |"]
        evals = [row["record"] for run in rec["runs"][cfg] for row in run["eval"]
                 if row["model"] != "teacher" and row["nfe"] == 1]
        out.append((cfg, line, evals))
    return out


def _exact_bars(name: str, rec: dict[str, Any] | None) -> list[str]:
    """Ring-style bars of an exact-teacher suite: 1-NFE SW1 within 1.5x Heun-35, per-mode mass at the true weights
    (within 0.025: the ring's 0.10-0.15 around 0.125), off-mode below 5%."""
    out: list[str] = []
    for cfg, line, evals in _one_nfe_rows(name, rec, "SW1"):
        out += line
        errs, offs = [], []
        for r in evals:
            if "mass_error" in r:
                errs.append(r["mass_error"])
            elif r.get("mode_mass"):  # records older than per-weight scoring: the modes are equal-weight
                errs.append(max(abs(m - 1 / len(r["mode_mass"])) for m in r["mode_mass"]))
            offs.append(r.get("off", float("nan")))
        if errs:
            out.append(f"| {name} {cfg}: every mode within 0.025 of its true weight (1 NFE, worst seed) | "
                       f"{max(errs):.3f} | {'yes' if max(errs) <= 0.025 else 'no'} |")
        if offs:
            off = sum(offs) / len(offs)
            out.append(f"| {name} {cfg}: off-mode below 5% (1 NFE) | {100 * off:.1f}% | "
                       f"{'yes' if off < 0.05 else 'no'} |")
    return out


def data_cost(name: str) -> Callable[[Path], str]:
    """Per row of suite ``name``: what its cached teacher pairs cost to generate (``data_cost`` of the run records:
    pairs, network evaluations, seconds, device), its training time and its peak memory; mean over training seeds."""
    def render(root: Path) -> str:
        rel = BENCH / f"{name}.json"
        rec = _load(rel, root)
        if not rec:
            return _missing(rel, f"python scripts/bench.py {name}")
        lines = ["| row | teacher pairs | network evaluations | pair generation (s) | training (s) | peak RSS (MiB) |",
                 "|---|---|---|---|---|---|"]
        for cfg, runs in rec["runs"].items():
            pairs = [r.get("data_cost", {}).get("pairs") for r in runs]
            part = [r["parts"][-1] for r in runs]
            mean = statistics.fmean
            cells = ("–", "–", "–") if not all(pairs) else (
                f"{pairs[0]['pairs']}", f"{pairs[0]['network_evals']:,}",
                f"{mean(p['seconds'] for p in pairs):.2f} ({pairs[0]['device']})")
            lines.append(f"| {cfg} | " + " | ".join(cells) + f" | {mean(p['train_s'] for p in part):.0f} | "
                         f"{mean(p['peak_rss_mb'] for p in part):.0f} |")
        env = rec.get("environment") or {}
        lines += ["", f"_Record `{rel}`: {len(next(iter(rec['runs'].values())))} training seed(s) per row, "
                      f"{env.get('machine', '?')}; runs shared the CPU ({rec['definition'].get('threads', 1)} thread "
                      "each), so the seconds are upper bounds. Pairs a loss makes itself (reflow's later rounds) are "
                      "in its logs (`pair_seconds`, `pair_network_evals`), not here._"]
        return "\n".join(lines)
    return render


PEER_REFLOW_SW1 = 0.114  # a public peer's reflow + distill, 1 NFE on this ring (issue 11)


def _within_with_modes(name: str, cfg: str, rec: dict[str, Any], cells: dict[int, Any], ref: tuple[float, float],
                       nfe: int) -> str:
    """The bar line "``nfe``-NFE SW1 within 1.5x the teacher's Heun-35, every mode within 0.025 of its weight (worst
    training and sampling seed)" of row ``cfg``."""
    errs = [row["record"].get("mass_error", float("nan")) for run in rec["runs"][cfg] for row in run["eval"]
            if row["model"] != "teacher" and row["nfe"] == nfe]
    ok = cells[nfe][0] <= 1.5 * ref[0] and errs and max(errs) <= 0.025
    return (f"| {name} {cfg}: {nfe}-NFE SW1 within 1.5x the teacher's Heun-35, every mode within 0.025 (worst seed) | "
            f"{cells[nfe][0]:.4g} vs {ref[0]:.4g} ({cells[nfe][0] / ref[0]:.2f}x), {max(errs):.3f} | "
            f"{'yes' if ok else 'no'} |")


def _traj_bars(name: str, rec: dict[str, Any] | None) -> list[str]:
    """Issue 11's ring bars: every recipe's 1-NFE SW1 below the peer's reflow row; TDM's and PD's 4-NFE students
    within 1.5x the teacher's Heun-35 with every mode within 0.025 of its weight; the 3-RF's 2 NFE not worse than 1."""
    if not rec:
        return []
    students, teachers = _cells(rec)
    ref = _teacher_ref(teachers)
    out = []
    for cfg, s in students.items():
        c = s["cells"]
        if 1 in c:
            out.append(f"| {name} {cfg}: 1-NFE SW1 below the peer's reflow row ({PEER_REFLOW_SW1}) | {c[1][0]:.4g} | "
                       f"{'yes' if c[1][0] < PEER_REFLOW_SW1 else 'no'} |")
        if ("tdm" in cfg or cfg.endswith("pd4")) and 4 in c and ref:
            out.append(_within_with_modes(name, cfg, rec, c, ref, 4))
        if cfg.endswith("reflow3") and 1 in c and 2 in c:  # the k-RF flow itself (ring_reflow is its 1-step student)
            out.append(f"| {name} {cfg}: 2-NFE not worse than 1-NFE | {c[2][0]:.4g} vs {c[1][0]:.4g} | "
                       f"{'yes' if c[2][0] <= c[1][0] else 'no'} |")
    return out


def _digits_traj_bars(name: str, rec: dict[str, Any] | None) -> list[str]:
    """Issue 11's digits bar: TDM's 4-NFE FID within 1.5x the teacher's Heun-35."""
    if not rec:
        return []
    students, teachers = _cells(rec)
    ref = _teacher_ref(teachers)
    out = []
    for cfg, s in students.items():
        c = s["cells"]
        if "tdm" in cfg and 4 in c and ref:
            out.append(f"| {name} {cfg}: 4-NFE FID within 1.5x the teacher's Heun-35 ({s['iterations']} it, "
                       f"{s['label'] or 'FID'}) | {c[4][0]:.4g} vs {ref[0]:.4g} ({c[4][0] / ref[0]:.2f}x) | "
                       f"{'yes' if c[4][0] <= 1.5 * ref[0] else 'no'} |")
    return out


#: a public peer's rows on this ring (issue 12): sliced W1 at (1, 2) NFE
PEER_CONSISTENCY = {"sCT": (0.164, 0.068), "ECT": (0.251, 0.155)}
#: which peer row each issue-12 family is held to
PEER_OF = {"ct": "ECT", "scm": "sCT", "meanflow": "sCT", "ayf": "sCT"}


def _cont_bars(name: str, rec: dict[str, Any] | None) -> list[str]:
    """Issue 12's ring bars: each family below the peer's row for its family at 1 and 2 NFE; sCD's and MeanFlow's
    1-NFE SW1 within 1.5x the teacher's Heun-35 with every mode within 0.025 of its weight; 2 NFE better than 1."""
    if not rec:
        return []
    students, teachers = _cells(rec)
    ref = _teacher_ref(teachers)
    out = []
    for cfg, s in students.items():
        c = s["cells"]
        family = next((f for f in PEER_OF if cfg.endswith(f"_{f}")), None)
        if family is None or 1 not in c or 2 not in c:
            continue
        peer = PEER_CONSISTENCY[PEER_OF[family]]
        ok = c[1][0] < peer[0] and c[2][0] < peer[1]
        out.append(f"| {name} {cfg}: below the peer's {PEER_OF[family]} row at 1 / 2 NFE ({peer[0]} / {peer[1]}) | "
                   f"{c[1][0]:.4g} / {c[2][0]:.4g} | {'yes' if ok else 'no'} |")
        if family in ("scm", "meanflow") and ref:
            out.append(_within_with_modes(name, cfg, rec, c, ref, 1))
            gain, spread = c[1][0] - c[2][0], max(c[1][1], c[2][1])
            verdict = "yes" if gain > spread else ("no (a tie within the seed spread)" if gain > 0 else "no")
            out.append(f"| {name} {cfg}: 2-NFE better than 1-NFE (by more than the seed spread) | "
                       f"{fmt(c[2][0], c[2][1])} vs {fmt(c[1][0], c[1][1])} | {verdict} |")
    return out


def _no_nan_bar(name: str, rec: dict[str, Any] | None) -> list[str]:
    """Issue 12's "no NaN in any shipped config's run": the NaN guard's skipped steps, summed over the suite's runs."""
    if not rec:
        return []
    per = {cfg: sum(int(r.get("skipped_steps", 0)) for r in runs) for cfg, runs in rec["runs"].items()}
    total = sum(per.values())
    detail = ", ".join(f"{cfg} {n}" for cfg, n in per.items())
    return [f"| {name}: no step skipped by the NaN guard in any run | {total} ({detail}) | "
            f"{'yes' if total == 0 else 'no'} |"]


def _digits_cont_bars(name: str, rec: dict[str, Any] | None) -> list[str]:
    """Issue 12's digits bar: at least one row's 2-NFE FID at the teacher's Heun-35 within its seed spread."""
    if not rec:
        return []
    students, teachers = _cells(rec)
    ref = _teacher_ref(teachers)
    rows = [(cfg, s["cells"][2]) for cfg, s in students.items() if 2 in s["cells"]]
    if not rows or not ref:
        return []
    cfg, (m, sd, *_) = min(rows, key=lambda r: r[1][0])
    ok = m - sd <= ref[0] + ref[1]
    return [f"| {name}: best 2-NFE FID at the teacher's Heun-35 within the seed spread ({cfg}) | "
            f"{fmt(m, sd)} vs {fmt(*ref)} | {'yes' if ok else 'no'} |"]


#: issue 12's longer digits suites: each gets the 2-NFE bar row, the NaN-guard row and, where it has a held-out
#: re-score record (``docs/bench/sweeps/<suite>_heldout.json``), the held-out bar row
DIGITS_CONT_SUITES = ("digits_cont_long", "digits_ayf_init", "digits_ayf_dm", "digits_ayf_sim", "digits_ayf_sim_next")


def bars(root: Path) -> str:
    """The bars of docs/benchmarks.md checked against the records (met / not met, with the numbers)."""
    out = ["| bar | measured | met |", "|---|---|---|"]
    for suite_name in ("ring", "ring_score", "mixture"):
        out += _exact_bars(suite_name, _load(BENCH / f"{suite_name}.json", root))
    digits = _load(BENCH / "digits.json", root)
    if digits:
        students, teachers = _cells(digits)
        ref = _teacher_ref(teachers)
        best4 = min((d[4][0] for n, d in teachers.items() if 4 in d and n.count("/")), default=None)
        for cfg, s in students.items():
            c = s["cells"]
            if 1 in c and best4 is not None:
                out.append(f"| digits {cfg}: 1-NFE below the best 4-NFE solver | {c[1][0]:.4g} vs {best4:.4g} | "
                           f"{'yes' if c[1][0] < best4 else 'no'} |")
            if 2 in c and ref:
                out.append(f"| digits {cfg}: 2-NFE within 1.5x the teacher's Heun-35 | {c[2][0]:.4g} vs {ref[0]:.4g} "
                           f"({c[2][0] / ref[0]:.2f}x) | {'yes' if c[2][0] <= 1.5 * ref[0] else 'no'} |")
            if 1 in c and ref:
                out.append(f"| digits {cfg}: 1-NFE within 1.5x the teacher (next bar) | {c[1][0] / ref[0]:.2f}x | "
                           f"{'yes' if c[1][0] <= 1.5 * ref[0] else 'no'} |")
    out += _traj_bars("ring_traj", _load(BENCH / "ring_traj.json", root))
    out += _digits_traj_bars("digits_traj", _load(BENCH / "digits_traj.json", root))
    out += _cont_bars("ring_cont", _load(BENCH / "ring_cont.json", root))
    out += _all_seeds_bar(root, "ring_scm", ("ring_cont", "ring_scm_seeds"))
    out += _digits_cont_bars("digits_cont", _load(BENCH / "digits_cont.json", root))
    for suite_name in DIGITS_CONT_SUITES:
        out += _digits_cont_bars(suite_name, _load(BENCH / f"{suite_name}.json", root))
    for suite_name in ("ring_cont", "ring_jvp", "digits_cont", *DIGITS_CONT_SUITES, "ring_scm_seeds"):
        out += _no_nan_bar(suite_name, _load(BENCH / f"{suite_name}.json", root))
    for suite_name in DIGITS_CONT_SUITES:  # those re-scored on held-out sampling seeds
        rec = _load(Path(f"docs/bench/sweeps/{suite_name}_heldout.json"), root)
        if rec:
            (m, sd, _), (ref, ref_sd, _) = _heldout_cells(rec, 0.9)
            out.append(f"| {suite_name} re-scored on fresh sampling seeds 20-25: 2-NFE at the teacher's Heun-35 "
                       f"within the seed spread (same statistic) | {fmt(m, sd)} vs {fmt(ref, ref_sd)} | "
                       f"{'yes' if m - sd <= ref + ref_sd else 'no'} |")
    out += _issue13_bars(root)
    for suite_name in ("digits_score", "digits_long", "digits_sim_long"):
        out += _one_step_digits_bars(suite_name, _load(BENCH / f"{suite_name}.json", root))
    return "\n".join(out) if len(out) > 2 else "_No suite record yet._"


def _run_mean(run: dict[str, Any], nfe: int) -> float | None:
    """A training run's student score at ``nfe`` steps, the mean over its sampling seeds (``None`` if not measured)."""
    xs = [e["score"] for e in run["eval"] if e["nfe"] == nfe and not e["model"].startswith("teacher")]
    return statistics.mean(xs) if xs else None


def _per_seed(xs: list[float]) -> str:
    """Per-seed scores as ``a / b / c`` (3 significant digits)."""
    return " / ".join(f"{x:.3g}" for x in xs)


def _fmt_spread(xs: list[float], missing: str = "–") -> str:
    """``fmt`` of the mean +- sd of ``xs`` (the value alone for one: a single seed has no spread); ``missing`` for
    none."""
    if not xs:
        return missing
    return fmt(statistics.mean(xs), statistics.stdev(xs)) if len(xs) > 1 else fmt(xs[0])


def _all_seeds_bar(root: Path, cfg: str, suites: tuple[str, ...]) -> list[str]:
    """Issue 12's 1-NFE bar for ``cfg`` over every training seed any of ``suites`` trained (a two-seed suite can be a
    favourable draw): each seed's mean 1-NFE SW1 (over its sampling seeds) within 1.5x the teacher's Heun-35; and
    its "2 NFE better than 1" over the same seeds (the mean over seeds, and how many seeds improve)."""
    per_seed: dict[int, dict[int, float]] = {}
    ref = None
    for name in suites:
        rec = _load(BENCH / f"{name}.json", root)
        if not rec:
            continue
        for r in rec["runs"].get(cfg, []):
            for k in sorted({e["nfe"] for e in r["eval"]}):
                m = _run_mean(r, k)
                if m is not None:
                    per_seed.setdefault(int(r["seed"]), {})[k] = m
        if ref is None:
            ref = _teacher_ref(_cells(rec)[1])
    one = {s: v[1] for s, v in per_seed.items() if 1 in v}
    if not one or not ref:
        return []
    worst = max(one, key=one.get)
    ok = all(v <= 1.5 * ref[0] for v in one.values())
    n_ok = sum(v <= 1.5 * ref[0] for v in one.values())
    out = [f"| {cfg}: 1-NFE SW1 within 1.5x the teacher's Heun-35 for every training seed ({len(one)} seeds: "
           f"{', '.join(suites)}) | {n_ok} of {len(one)} seeds; worst seed {worst}: {one[worst]:.3g} vs "
           f"{ref[0]:.3g} ({one[worst] / ref[0]:.2f}x); mean {statistics.mean(one.values()):.3g} | "
           f"{'yes' if ok else 'no'} |"]
    both = {s: v for s, v in per_seed.items() if 1 in v and 2 in v}
    if both:
        m1 = statistics.mean(v[1] for v in both.values())
        m2 = statistics.mean(v[2] for v in both.values())
        better = sum(v[2] < v[1] for v in both.values())
        out.append(f"| {cfg}: 2-NFE better than 1-NFE over every training seed ({len(both)} seeds) | mean {m2:.3g} vs "
                   f"{m1:.3g}; better in {better} of {len(both)} seeds | "
                   f"{'yes' if m2 < m1 and better == len(both) else 'no'} |")
    # a multistep sampler that runs off (a few samples far from the data) shows as SW1 above 1 at some NFE
    off = {s: [k for k, v in per_seed[s].items() if v > 1.0] for s in per_seed}
    bad = {s: ks for s, ks in off.items() if ks}
    detail = "; ".join(f"seed {s} at {'/'.join(map(str, ks))} NFE" for s, ks in sorted(bad.items())) or "none"
    out.append(f"| {cfg}: no training seed's sampler diverges at any NFE (SW1 above 1; {len(per_seed)} seeds) | "
               f"{len(bad)} of {len(per_seed)} seeds diverge: {detail} | {'yes' if not bad else 'no'} |")
    return out


def _issue13_bars(root: Path) -> list[str]:
    """Issue 13's measured bars: the --dry-run estimate within 25% of the measured peak (every case of
    ``memory.json``), and guidance distillation's per-class FID within 1.5x the guided teacher at two values of w
    (the ``guidance`` block's check)."""
    out = []
    mem = _load(BENCH / "memory.json", root)
    if mem:
        ratios = [r["ratio"] for r in mem["rows"]]
        ok = all(r["within_25pct"] for r in mem["rows"])
        out.append(f"| --dry-run memory estimate within 25% of the measured peak ({len(ratios)} cases: CD, DMD2, SiD "
                   f"on digits and a tiny latent teacher) | estimate / measured {min(ratios):.2f}-{max(ratios):.2f} | "
                   f"{'yes' if ok else 'no'} |")
    block = guidance(root)
    verdict = next((line for line in block.splitlines() if line.startswith("Bar (per-class")), None)
    if verdict:
        met = "**met**" in verdict
        within = verdict.split(" - ", 1)[1].split(". Mean")[0] if " - " in verdict else verdict
        out.append(f"| guidance distillation: per-class FID within 1.5x the guided teacher's Heun-35 at two w "
                   f"(digits_cond; see the guidance section for what FID cannot tell) | {within} | "
                   f"{'yes' if met else 'no'} |")
    return out


def _one_step_digits_bars(name: str, rec: dict[str, Any] | None) -> list[str]:
    """Issue 10's digits bars for each row of suite ``name``: 1-NFE FID within 1.5x the teacher's Heun-35, and every
    class at 5-15% of the 1-NFE samples (worst sampling and training seed)."""
    out: list[str] = []
    for cfg, line, evals in _one_nfe_rows(name, rec, "FID"):
        out += line
        cover = [c for r in evals for c in (r.get("extra") or {}).get("class_coverage", [])]
        if cover:
            lo, hi = min(cover), max(cover)
            out.append(f"| {name} {cfg}: every class at 5-15% (1 NFE, worst seed) | {100 * lo:.1f}%-{100 * hi:.1f}% "
                       f"| {'yes' if lo >= 0.05 and hi <= 0.15 else 'no'} |")
    return out


HISTORY_DMD2 = BENCH / "history" / "dmd2_digits_7b79030"


def _history_dmd2_rows(root: Path) -> list[tuple[str, dict[int, tuple[float, float, str]], tuple[float, float]]]:
    """(config, NFE -> cell, teacher Heun-35 cell) from the earlier DMD2 digits eval records."""
    out = []
    for cfg in ("digits_dmd2", "digits_dmd2_gan"):
        rows = _load(HISTORY_DMD2 / f"{cfg}.json", root)
        if not rows:
            continue
        student = teacher_summary([dict(r, model="teacher", sampler="student", grid="ema")
                                   for r in rows if r["model"] != "teacher"])
        ref = teacher_summary([r for r in rows if r["model"] == "teacher"])
        out.append((cfg, student["student/ema"], next(iter(ref.values()))[35]))
    return out


def history_dmd2(root: Path) -> str:
    """The earlier DMD2 digits runs (commit 7b79030), rendered from their eval records with their protocol."""
    rows = _history_dmd2_rows(root)
    if not rows:
        return _missing(HISTORY_DMD2, "git show 7b79030:docs/bench/digits_dmd2.json")
    label = protocol_label("digits-classifier FID", 2000, 1797, "1,797 real digits")
    lines = [f"{label}; training seed 0, sampling seeds 0/1/2, 3,000 iterations.", "",
             "| config | 1 NFE | teacher, Heun 35 NFE |", "|---|---|---|"]
    for cfg, cells, ref in rows:
        lines.append(f"| {cfg} (EMA student) | {fmt(cells[1][0], cells[1][1])} | {fmt(ref[0], ref[1])} |")
    return "\n".join(lines + ["", f"_Records `{HISTORY_DMD2}/` (`distill train configs/digits_dmd2{{,_gan}}.yaml` at "
                               "commit `7b79030`, before the plug-in contract refactor; one-step samples use no "
                               "re-noising draw, so the evaluation-stream overlap fixed since does not touch them)._"])


def main_job(root: Path) -> str:
    """The README's main-job cost, from the ``record.json`` of the README command run alone
    (``docs/bench/main_job.json``: ``distill train configs/digits_sim_15min.yaml``, copied from
    ``runs/digits_sim_15min``)."""
    rel = BENCH / "main_job.json"
    run = _load(rel, root)
    if not run:
        return _missing(rel, "distill train configs/digits_sim_15min.yaml && cp runs/digits_sim_15min/record.json "
                             "docs/bench/main_job.json")
    part = run["parts"][-1]
    total = part["train_s"] + (part["eval_s"] or 0.0)
    cells = {}
    for row in run["eval"]:
        cells.setdefault((row["model"] == "teacher", row["nfe"]), []).append(row["score"])
    fids = ", ".join(f"{k} NFE {sum(v) / len(v):.3g}" for (t, k), v in sorted(cells.items()) if not t)
    return (f"{run['iterations']} iterations in {part['train_s'] / 60:.1f} minutes ({part['iterations_per_s']:.2f} "
            f"it/s on {part['threads']} threads), then {(part['eval_s'] or 0.0) / 60:.1f} minutes of evaluation: "
            f"{total / 60:.1f} minutes after start-up, peak memory {part['peak_rss_mb'] / 1024:.1f} GiB, "
            f"{part['machine']}; mean FID over sampling seeds {run['eval_seeds']}: {fids} (`{rel}`, trained at commit "
            f"`{commit_of(part)}`" + (f", scored at `{commit_of(run['reevaluated'])}`" if run.get("reevaluated")
                                      else "") + ").")


#: (suite, config, bench_cost method) rows of the budget table
BUDGET_ROWS = [("digits", "digits_cd", "cd"), ("digits_score", "digits_sid", "sid"),
               ("digits_score", "digits_sim", "sim"), ("digits_sim_long", "digits_sim", "sim"),
               ("digits_score", "digits_fdistill", "fdistill"), ("digits_dmd2", "digits_dmd2", "dmd2"),
               ("digits_dmd2", "digits_dmd2_gan", "dmd2_gan"), ("digits_traj", "digits_kd", "kd"),
               ("digits_cont", "digits_ct", "ct"), ("digits_cont", "digits_scm", "scm"),
               ("digits_cont", "digits_meanflow", "meanflow"), ("digits_cont", "digits_ayf", "ayf")]
BUDGETS_MIN = (15, 60, 120)


def budgets(root: Path) -> str:
    """Best 1-NFE FID reached within 15 min, 1 h and 2 h of training on one core, per recipe: each run's in-training
    FID curve (training seed 0, sampling seed 0) with its iterations converted to minutes by the method's cost per
    iteration measured alone (``docs/bench/cost.json``), so runs that shared the CPU are not penalised."""
    cost = _load(BENCH / "cost.json", root)
    if not cost:
        return _missing(BENCH / "cost.json", "python scripts/bench_cost.py --json docs/bench/cost.json")
    later = _load(BENCH / "cost_cont.json", root)  # the later losses' costs (same script, same protocol)
    if later:
        cost = {**cost, "methods": {**later["methods"], **cost["methods"]}}
    lines = ["| recipe | ms / iteration (1 thread) | "
             + " | ".join(f"best 1-NFE FID within {b} min" for b in BUDGETS_MIN)
             + " |", "|" + "---|" * (2 + len(BUDGETS_MIN))]
    best: dict[int, tuple[float, str]] = {}
    sources = []
    for suite_name, cfg, method in BUDGET_ROWS:
        rec = _load(BENCH / f"{suite_name}.json", root)
        runs = (rec or {}).get("runs", {}).get(cfg)
        if not runs or method not in cost["methods"]:
            continue
        run = next((r for r in runs if r["seed"] == 0), runs[0])
        ms = cost["methods"][method]["ms_per_iteration"]
        # cached teacher pairs are generated before the first iteration: their time counts against the budget
        pair_min = ((run.get("data_cost") or {}).get("pairs") or {}).get("seconds", 0.0) / 60
        curve = sorted((c["iteration"], c["score"]) for c in run.get("curve") or [] if c["nfe"] == 1)
        if not curve:
            continue
        sources.append(f"`{BENCH / suite_name}.json`")
        cells = []
        for b in BUDGETS_MIN:
            within = [(f, it) for it, f in curve if pair_min + it * ms / 60000 <= b]
            if not within:
                cells.append("–")
                continue
            f, it = min(within)
            ended = pair_min + curve[-1][0] * ms / 60000 < b
            cells.append(f"{f:.3g} (it {it}" + (", run ended" if ended else "") + ")")
            if f < best.get(b, (float("inf"), ""))[0]:
                best[b] = (f, cfg)  # a recipe, whichever suite ran it
        label = cfg if sum(c == cfg for _, c, _ in BUDGET_ROWS) == 1 else f"{cfg} ({suite_name})"
        lines.append(f"| {label} | {ms:.0f} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return "_No FID curves yet._"
    lines += ["", "Best per budget: " + "; ".join(f"{b} min: {best[b][1]} ({best[b][0]:.3g})" for b in BUDGETS_MIN
                                                  if b in best) + ".",
              "", f"_Curves from {', '.join(sorted(set(sources)))} (training seed 0, sampling seed 0 of the "
                  "in-training evaluation); cost per iteration from `docs/bench/cost.json` (commit "
                  f"`{commit_of(cost.get('environment'))}`)"
                  " and, for the later losses, `docs/bench/cost_cont.json`. Time to generate a run's cached teacher "
                  "pairs (kd; measured in the run, on a shared CPU) is added before its first iteration."
                  " A run's budget cell shows its best point within the budget; \"run ended\" marks a run shorter than "
                  "the budget._"]
    return "\n".join(lines)


def _rows(rec: Any) -> list[dict[str, Any]]:
    return rec["rows"] if isinstance(rec, dict) else rec


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3g} ± {sd:.2g}"


GUIDANCE = BENCH / "guidance"


def guidance(root: Path) -> str:
    """Issue 13's guidance distillation on the class-conditional digits teacher: the teacher's guided Heun-35 FID and
    per-class FID at each w, the guidance-conditioned student's at 1/2 NFE, and the bar (per-class FID within 1.5x the
    teacher's at the same w, for two values of w)."""
    out = ["| w | teacher FID | teacher per-class FID | student 1 NFE: FID / per-class (x teacher) | "
           "student 2 NFE: FID / per-class (x teacher) | records |", "|---|---|---|---|---|---|"]
    met = []
    for w in (1, 2, 3):
        t_rel = GUIDANCE / f"teacher_w{w}" / "teacher_solvers.json"
        s_rel = next((r for r in (GUIDANCE / f"cd_w{w}" / "eval.json", GUIDANCE / f"cd_w{w}" / "eval_exported.json")
                      if (root / r).is_file()), None)
        t_rec, s_rec = _load(t_rel, root), (_load(s_rel, root) if s_rel else None)
        if not t_rec or not s_rec:
            out.append(f"| {w} | " + _missing(t_rel if not t_rec else GUIDANCE / f"cd_w{w}",
                                               "see docs/bench/guidance/README.md") + " | | | | |")
            continue
        t_rows = [r for r in _rows(t_rec) if r["model"] == "teacher" and r["sampler"] == "heun"]
        t_fid = [r["score"] for r in t_rows]
        t_pc = [r["record"]["extra"]["per_class_fid_mean"] for r in t_rows]
        cells = []
        for k in (1, 2):
            rs = [r for r in _rows(s_rec) if r["sampler"] == "student" and r["nfe"] == k]
            fid = [r["score"] for r in rs]
            pc = [r["record"]["extra"]["per_class_fid_mean"] for r in rs]
            ratio = statistics.mean(pc) / statistics.mean(t_pc) if pc and t_pc else float("nan")
            cells.append(f"{_mean_sd(fid)} / {_mean_sd(pc)} ({ratio:.2f}x)")
            if ratio <= 1.5:
                met.append((w, k))
        out.append(f"| {w} | {_mean_sd(t_fid)} | {_mean_sd(t_pc)} | {cells[0]} | {cells[1]} | `{t_rel}`, `{s_rel}` |")
    ws = sorted({w for w, _ in met})
    out += ["", f"Bar (per-class FID within 1.5x the teacher's guided Heun-35 at the same w, for two values of w): "
                f"{'**met**' if len(ws) >= 2 else '**not met**'} - within 1.5x at w = {ws or 'none'} "
                f"(NFE: {', '.join(f'w={w}: {k}' for w, k in met) or 'none'}). Mean ± sd over the records' sampling "
                f"seeds; one training seed."]
    svt = _load(GUIDANCE / "student_vs_teacher.json", root)
    if svt:
        out += ["", "Student vs the guided teacher directly (Fréchet distance between the two sample sets, digits "
                    "features, seed 0; the teacher's own seed 0 vs seed 1 distance is the floor):", "",
                "| w | teacher seed 0 vs 1: FD / per-class | student 1 NFE vs teacher | student 2 NFE vs teacher |",
                "|---|---|---|---|"]
        for r in svt:
            floor = r.get("teacher_seed0_vs_seed1")

            def cell(d: dict[str, Any] | None) -> str:
                return "–" if not d else f"{d['fd']:.3g} / {d['per_class_fd_mean']:.3g}"
            out.append(f"| {r['guidance']:g} | {cell(floor)} | {cell(r.get('student_1nfe_vs_teacher'))} | "
                       f"{cell(r.get('student_2nfe_vs_teacher'))} |")
        out += ["", f"_Record `{GUIDANCE / 'student_vs_teacher.json'}` (docs/bench/guidance/student_vs_teacher.py)._"]
    return "\n".join(out)


def memory(root: Path) -> str:
    """Issue 13's memory bar: ``distill train --dry-run``'s estimate vs the measured peak
    (``scripts/bench_memory.py``)."""
    rel = BENCH / "memory.json"
    rec = _load(rel, root)
    if not rec:
        return _missing(rel, f"python scripts/bench_memory.py --json {rel}")
    mb = 2 ** 20
    out = ["| case | batch | weights | optimizer | step memory | runtime | estimate | measured | estimate / measured |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        e, m = r["estimate"], r["measured"]
        out.append(f"| {r['case']} | {r['batch_size']} | {sum(e['weights'].values()) / mb:.1f} | "
                   f"{e['optimizer'] / mb:.1f} | {e['step']['total'] / mb:.1f} | "
                   f"{e.get('runtime_overhead', 0) / mb:.1f} | "
                   f"{e['total'] / mb:.1f} | {m['measured'] / mb:.1f} | {r['ratio']:.2f} |")
    ok = sum(r["within_25pct"] for r in rec["rows"])
    env = rec.get("environment") or {}
    out += ["", f"MB = MiB. Within 25%: {ok} of {len(rec['rows'])} cases. Measured = the weights + the process's "
                f"resident-memory growth from after the build to its peak over {rec['iters']} iterations (CPU; "
                f"`distill.memory.measure_peak`). _Record `{rel}` (scripts/bench_memory.py): "
                f"{env.get('machine', '?')}, commit `{commit_of(env)}`._"]
    return "\n".join(out)


def per_seed(name: str) -> Callable[[Path], str]:
    """Each training seed's score at each NFE (mean over its sampling seeds) of suite ``name``: for recipes whose
    seeds split into separate outcomes, which a mean +- sd hides."""
    def render(root: Path) -> str:
        rel = BENCH / f"{name}.json"
        rec = _load(rel, root)
        if not rec:
            return _missing(rel, f"python scripts/bench.py {name}")
        nfes = rec["definition"]["nfe"]
        out = ["| config | training seed | " + " | ".join(f"@ {k} NFE" for k in nfes) + " | skipped steps |",
               "|---|---|" + "---|" * (len(nfes) + 1)]
        for cfg, runs in rec["runs"].items():
            for r in runs:
                cells = [f"{m:.3g}" if (m := _run_mean(r, k)) is not None else "–" for k in nfes]
                out.append(f"| {cfg} | {r['seed']} | " + " | ".join(cells) + f" | {r.get('skipped_steps', 0)} |")
        return "\n".join(out + ["", f"_Record `{rel}` (scripts/bench.py); mean over sampling seeds "
                                     f"{rec['definition']['sample_seeds']}._"])

    return render


def sweep(prefix: str) -> Callable[[Path], str]:
    """One row per variant of a recipe sweep: every suite record ``docs/bench/sweeps/<prefix>*.json`` (each written by
    ``scripts/bench.py ... --set KEY=VALUE``, the variant), with the mean +- sd over its training seeds at each NFE and
    each seed's 1-NFE score, so a variant that helps one seed and hurts another shows it."""
    def render(root: Path) -> str:
        paths = sorted((root / BENCH / "sweeps").glob(f"{prefix}*.json"))
        recs = [(p, json.loads(p.read_text())) for p in paths]
        recs = [(p, r) for p, r in recs if isinstance(r, dict) and "definition" in r]
        if not recs:
            return _missing(BENCH / "sweeps" / f"{prefix}*.json", "python scripts/bench.py SUITE --set KEY=VALUE")
        nfes = recs[0][1]["definition"]["nfe"]
        out = ["| variant (overrides of the config at the commit) | commit | training seeds | "
               + " | ".join(f"@ {k} NFE" for k in nfes) + " | 1 NFE per seed | skipped steps |",
               "|---|---|---|" + "---|" * (len(nfes) + 2)]
        for _, rec in recs:
            runs = [r for rs in rec["runs"].values() for r in rs]
            per = {k: [_run_mean(r, k) for r in runs] for k in nfes}
            cells = [_fmt_spread(v) for v in per.values()]
            variant = ", ".join(rec.get("extra_overrides") or []) or "none"
            seeds = ", ".join(f"{r['seed']}: {x:.3g}" for r, x in zip(runs, per[nfes[0]]))
            skipped = sum(int(r.get("skipped_steps", 0)) for r in runs)
            out.append(f"| `{variant}` | `{commit_of(rec.get('environment'))}` | {len(runs)} | " + " | ".join(cells)
                       + f" | {seeds} | {skipped} |")
        files = ", ".join(f"`{p.relative_to(root)}`" for p, _ in recs)
        machines = ", ".join(sorted({(r.get("environment") or {}).get("machine", "?") for _, r in recs}))
        return "\n".join(out + ["", f"_Records {files} (scripts/bench.py; {machines}); each cell the mean +- sd over "
                                     "training seeds of the mean over sampling seeds "
                                     f"{recs[0][1]['definition']['sample_seeds']}._"])

    return render


def probes(prefix: str, nfes: tuple[int, ...] = (1, 2, 4)) -> Callable[[Path], str]:
    """Single-run probes of a recipe: every folder ``docs/bench/sweeps/<prefix>*/`` holding a run's ``eval.json`` (its
    final evaluation), ``record.json`` (the run record), ``command.txt`` (how and where it was run) and, when the run
    evaluated during training, ``fid_vs_step.json`` (the in-training curve, sampling seed 0). One row per probe: the
    final scores at ``nfes`` (mean +- sd over sampling seeds), the curve and the NaN guard's skipped steps."""
    def render(root: Path) -> str:
        dirs = sorted(d for d in (root / BENCH / "sweeps").glob(f"{prefix}*") if (d / "eval.json").is_file())
        if not dirs:
            return _missing(BENCH / "sweeps" / f"{prefix}*/eval.json", "distill train CONFIG KEY=VALUE ...")
        rows, teacher, curve_nfes = [], [], set()
        for d in dirs:
            evals = json.loads((d / "eval.json").read_text())
            teacher += [r["score"] for r in evals if r["model"] == "teacher"]
            cells = [_fmt_spread([r["score"] for r in evals if r["model"] != "teacher" and r["nfe"] == k])
                     for k in nfes]
            curve: dict[int, dict[int, float]] = {}
            if (d / "fid_vs_step.json").is_file():
                for r in json.loads((d / "fid_vs_step.json").read_text())["student"]:
                    curve.setdefault(int(r["model"].split("@")[1]), {})[r["nfe"]] = r["score"]
                    curve_nfes.add(r["nfe"])
            pts = "; ".join(f"{it}: " + " / ".join(f"{v[k]:.3g}" for k in sorted(v)) for it, v in sorted(curve.items()))
            cmd = (d / "command.txt").read_text().strip() if (d / "command.txt").is_file() else d.name
            run = json.loads((d / "record.json").read_text()) if (d / "record.json").is_file() else {}
            skipped = run.get("skipped_steps", "?")
            rows.append(f"| `{d.name}`: {cmd} | " + " | ".join(cells) + f" | {pts or '–'} | {skipped} |")
        curve_head = ("curve (iteration: " + " / ".join(map(str, sorted(curve_nfes))) + " NFE, sampling seed 0)"
                      if curve_nfes else "curve (not evaluated during training)")
        out = ["| probe (command) | " + " | ".join(f"final @ {k} NFE" for k in nfes) + f" | {curve_head} | "
               "steps skipped by the NaN guard |", "|---" * (len(nfes) + 3) + "|", *rows]
        ref = _fmt_spread(teacher, missing="?")
        return "\n".join(out + ["", f"_Records `docs/bench/sweeps/{prefix}*/` (`eval.json`, `record.json` and, where "
                                     f"the run evaluated during training, `fid_vs_step.json` of `distill train`; the "
                                     f"machine in each command); the runs' own teacher Heun-35 rows: {ref}._"])

    return render


CHAIN_ROWS = (("one_step", "1-NFE (first jump)"), ("chain", "2-NFE chain (its plan)"),
              ("chain_fresh", "2-NFE chain, fresh noise at mid"),
              ("teacher_second", "first jump, then the teacher's ODE from mid"),
              ("student_on_data", "second jump on real data noised to mid"),
              ("teacher_on_data", "teacher's ODE on real data noised to mid"), ("data", "real data resampled"))


def chain_fid(prefix: str) -> Callable[[Path], str]:
    """Where a 2-NFE flow map's FID is lost (``scripts/diag_chain_fid.py``): one column per student in the records
    ``docs/bench/sweeps/<prefix>*.json``, one row per swap (mean over sampling seeds, with the per-seed scores)."""
    def render(root: Path) -> str:
        files = sorted((root / BENCH / "sweeps").glob(f"{prefix}*.json"))
        if not files:
            return _missing(BENCH / "sweeps" / f"{prefix}*.json", "python scripts/diag_chain_fid.py EXPORT --json F")
        recs = [json.loads(f.read_text()) for f in files]
        students = [s for r in recs for s in r["students"]]
        names = [f"`{Path(s['export']).parent.name}/{Path(s['export']).name}`" for s in students]
        out = ["| FID of | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for key, label in CHAIN_ROWS:
            cells = [f"{s['rows'][key]['mean']:.3g} ({_per_seed(s['rows'][key]['scores'])})"
                     for s in students]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        r0 = recs[0]
        out += ["", f"_Records `docs/bench/sweeps/{prefix}*.json` (scripts/diag_chain_fid.py: {r0['n']} samples per "
                f"sampling seed, seeds {r0['seeds']}, teacher Heun {r0['teacher_nfe']} NFE from mid; commit "
                f"`{r0['environment'].get('git_commit', '?')[:12]}`, {r0['environment'].get('machine', '?')}). Each "
                "cell: the mean, then the per-seed scores._"]
        return "\n".join(out)

    return render


def jump_regression(prefix: str) -> Callable[[Path], str]:
    """Jump-regression probes (``scripts/probe_jump_regression.py``): per record ``docs/bench/sweeps/<prefix>*.json``,
    the FID rows before and after the fine-tune (mean over sampling seeds, then the per-seed scores)."""
    def render(root: Path) -> str:
        files = sorted((root / BENCH / "sweeps").glob(f"{prefix}*.json"))
        if not files:
            return _missing(BENCH / "sweeps" / f"{prefix}*.json", "python scripts/probe_jump_regression.py EXPORT")
        keys = (("one_step", "1-NFE"), ("chain", "2-NFE chain (its plan)"), ("chain_fresh", "2-NFE, fresh noise"),
                ("jump_on_data", "second jump on noised real data"))
        out = ["| probe | when | " + " | ".join(label for _, label in keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for f in files:
            r = json.loads(f.read_text())
            what = (f"`{f.name}`: {Path(r['export']).parent.name}/{Path(r['export']).name}, first jump {r['first']}, "
                    f"on-policy {r['onpolicy']}, {r['steps']} steps at lr {r['lr']:g} (commit "
                    f"`{r['environment'].get('git_commit', '?')[:7]}`, {r['wall_s']:.0f} s wall-clock sharing the CPU)")
            for when in ("before", "after"):
                cells = [f"{statistics.mean(r[when][k]):.3g} ({_per_seed(r[when][k])})"
                         for k, _ in keys]
                out.append(f"| {what} | {when} | " + " | ".join(cells) + " |")
        r0 = json.loads(files[0].read_text())
        return "\n".join(out + ["", f"_Records `docs/bench/sweeps/{prefix}*.json` (scripts/probe_jump_regression.py; "
                                     f"{r0['n']} samples per sampling seed, seeds {r0['seeds']}; "
                                     f"{r0['environment'].get('machine', '?')}). Single-seed probes._"])

    return render


def jumps(prefix: str) -> Callable[[Path], str]:
    """Where a flow-map student's error comes from: one row per record ``docs/bench/sweeps/<prefix>*_jumps.json``
    (``scripts/diag_jumps.py``): the mean distance to the teacher's PF-ODE endpoint of the student's 1- and 2-NFE
    chains and of each single jump ``J(x_s, s, 0)`` started on the teacher's trajectory, with the share of points off
    every mode."""
    def render(root: Path) -> str:
        paths = sorted((root / BENCH / "sweeps").glob(f"{prefix}*_jumps.json"))
        if not paths:
            return _missing(BENCH / "sweeps" / f"{prefix}*_jumps.json", "python scripts/diag_jumps.py RUN --out ...")
        recs = [json.loads(p.read_text()) for p in paths]
        # the first level is sigma_max: its jump IS the 1-NFE chain, shown once
        levels = sorted({r["level"] for rec in recs for r in rec["jumps_to_0"][1:]}, reverse=True)
        eps = recs[0]["near_boundary"]["eps"]
        head = ["run", "1 NFE", f"1 NFE off: near a boundary / inside a basin (share near, eps {eps:g})",
                "2 NFE", f"2 NFE's first jump (to {recs[0]['mid']:g})", *(f"J({s:g} -> 0)" for s in levels)]
        out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for p, rec in zip(paths, recs):
            by = {r["level"]: r for r in rec["jumps_to_0"]}
            nb = rec["near_boundary"]
            cells = [f"{rec['one_nfe']['mean']:.3g} (off {rec['one_nfe']['off']:.2f})",
                     f"{nb['one_nfe_off_near']:.2f} / {nb['one_nfe_off_rest']:.2f} ({nb['share']:.2f})",
                     f"{rec['two_nfe']['mean']:.3g} (off {rec['two_nfe']['off']:.2f})",
                     f"{rec['two_nfe_first_jump']['mean']:.3g}",
                     *(f"{by[s]['mean']:.3g} (off {by[s]['off']:.2f})" if s in by else "–" for s in levels)]
            out.append(f"| `{p.name}`: {rec.get('run_command') or rec['run']} | " + " | ".join(cells) + " |")
        ref = max(rec["reference_error"]["p90"] for rec in recs)
        env = recs[0]["environment"]
        return "\n".join(out + ["", f"_Records `docs/bench/sweeps/{prefix}*_jumps.json` (scripts/diag_jumps.py, "
                                     f"{recs[0]['n']:,} noises, seed {recs[0]['seed']}; commit "
                                     f"`{env['git_commit'][:12]}`): mean distance to the teacher's PF-ODE endpoint "
                                     f"(off: share farther than {recs[0]['off_radius']:g} from every mode; the "
                                     f"teacher's own endpoints: {recs[0]['teacher_off']:.2f}); the ODE reference's "
                                     f"own error below {ref:.1g} (90th percentile)._"])

    return render


SWEEP_HEAD = ["| student | 2-NFE mid level | gamma | FID mean | per sampling seed |", "|---|---|---|---|---|"]


def _sweep_rows(model: str, rows: list[dict[str, Any]]) -> list[str]:
    """Table rows of one export's ``scripts/sweep_student_sampling.py`` rows, by mid level (descending) then gamma."""
    return [f"| {model} | {r['floor']:.3g} | {r['gamma']:g} | {r['mean']:.3g} | "
            f"{_per_seed(r['scores'])} |"
            for r in sorted(rows, key=lambda r: (-r["floor"], r["gamma"]))]


def gamma_sweeps(rel: str) -> Callable[[Path], str]:
    """A merged record of ``scripts/sweep_student_sampling.py`` runs on several exports: one row per export and
    (2-NFE mid level, gamma), mean and per-seed FIDs on the held-out seeds."""

    def render(root: Path) -> str:
        rec = _load(rel, root)
        if not rec:
            return f"_No record yet (`{rel}`)._"
        out, seeds = list(SWEEP_HEAD), set()
        for e in rec["exports"]:
            seeds.update(x for r in e["rows"] for x in r["seeds"])
            out += _sweep_rows(e["model"], e["rows"])
        out.append(f"\n_Record `{rel}` ({rec['script']}; {rec['note']}): 2-NFE digits-classifier FID, sampling seeds "
                   f"{sorted(seeds)}._")
        return "\n".join(out)

    return render


def _heldout_cells(rec: dict[str, Any], gamma: float) -> tuple[Any, Any]:
    """(student cell at ``gamma``, teacher cell) of a held-out re-check record, with the suites' statistics
    (:func:`distill.reporting.summarise`: sd over training-seed means, or over sampling seeds for one run)."""
    per_seed = {i: r["scores"] for i, e in enumerate(rec["students"]) for r in e["rows"] if r["gamma"] == gamma}
    return summarise(per_seed), summarise({0: [r["score"] for r in rec["teacher"]["rows"]]})


def heldout(rel: str, gamma: float) -> Callable[[Path], str]:
    """A suite's final students re-scored on sampling seeds nothing else used, next to the teacher on those seeds."""

    def render(root: Path) -> str:
        rec = _load(rel, root)
        if not rec:
            return f"_No record yet (`{rel}`)._"
        t = rec["teacher"]
        out = [SWEEP_HEAD[0].replace("student", "model", 1), SWEEP_HEAD[1]]
        for e in rec["students"]:
            out += _sweep_rows(e["model"], e["rows"])
        scores = [r["score"] for r in t["rows"]]
        out.append(f"| teacher {t['sampler']}/{t['grid']} @ {t['nfe']} NFE | – | – | {statistics.mean(scores):.3g} | "
                   f"{_per_seed(scores)} |")
        st, te = _heldout_cells(rec, gamma)
        out.append(f"\nAt gamma {gamma:g} (the config's): students {fmt(st[0], st[1])} ({st[2]}) vs teacher "
                   f"{fmt(te[0], te[1])} ({te[2]}).")
        out.append(f"\n_Record `{rel}` ({rec['script']}; {rec['note']}): 2-NFE digits-classifier FID, seeds "
                   f"{[r['seed'] for r in t['rows']]}._")
        return "\n".join(out)

    return render


RENDERERS: dict[str, Callable[[Path], str]] = {
    "heldout-digits_ayf_sim": heldout("docs/bench/sweeps/digits_ayf_sim_heldout.json", 0.9),
    "heldout-digits_ayf_sim_next": heldout("docs/bench/sweeps/digits_ayf_sim_next_heldout.json", 0.9),
    "gamma-ayf_dm": gamma_sweeps("docs/bench/sweeps/ayf_dm_probe_gamma_sweeps.json"),
    "main-job": main_job,
    "sweep-ring_scm": sweep("ring_scm_seeds_"),
    "sweep-ring_meanflow": sweep("ring_cont_meanflow_"),
    "probes-digits_cont": probes("digits_"),
    "probes-ayf_dm": probes("ayf_dm_probe_"),
    "probes-ayf_gan": probes("ayf_gan_probe_", nfes=(2,)),
    "probes-ayf_first_jump": probes("ayf_first_jump_probe_"),
    "chain-ayf_first_jump": chain_fid("chain_ayf_first_jump"),
    "jumpreg-ayf": jump_regression("jumpreg_"),
    "chain-digits_ayf": chain_fid("chain_digits_ayf"),
    "chain-next": chain_fid("chain_next"),
    "probes-ring_scm": probes("ring_scm_probe_", (1, 2, 4, 8)),
    "probes-ring_flowmaps": probes("ring_flowmap_probe_", (1, 2, 4, 8)),
    "probes-grid_cont": probes("grid_probe_", (1, 2, 4, 8)),
    "jumps-ring_meanflow": jumps("ring_meanflow_"),
    "history-dmd2": history_dmd2,
    "results": results,
    "bars": bars,
    "calibration": calibration,
    "overhead": overhead,
    "cost": cost_block("cost.json"),
    "cost-gpu": cost_block("cost_gpu.json"),
    "cost-lora": cost_block("cost_lora.json"),
    "guidance": guidance,
    "memory": memory,
    "budgets": budgets,
    "ring-floor": ring_floor,
    "speedup": speedup,
    "teacher-ring": solvers("ring_teacher", "ring_teacher"),
    "teacher-digits": suite_solvers("digits"),
    "suite-ring": suite("ring"),
    "suite-digits": suite("digits"),
    "suite-digits_dmd2": suite("digits_dmd2"),
    "suite-mixture": suite("mixture"),
    "curve-digits": curve("digits"),
    "curve-digits_dmd2": curve("digits_dmd2"),
    "suite-ring_score": suite("ring_score"),
    "curve-ring_score": curve("ring_score"),
    "suite-grid_score": suite("grid_score"),
    "suite-mixture_fdiv": suite("mixture_fdiv"),
    "modes-mixture_fdiv": modes("mixture_fdiv"),
    "suite-digits_score": suite("digits_score"),
    "curve-digits_score": curve("digits_score"),
    "suite-digits_long": suite("digits_long"),
    "suite-digits_sim_long": suite("digits_sim_long"),
    "curve-digits_sim_long": curve("digits_sim_long"),
    "suite-ring_traj": suite("ring_traj"),
    "modes-ring_traj": modes("ring_traj"),
    "cost-ring_traj": data_cost("ring_traj"),
    "suite-grid_traj": suite("grid_traj"),
    "suite-digits_traj": suite("digits_traj"),
    "cost-digits_traj": data_cost("digits_traj"),
    "curve-digits_long": curve("digits_long"),
    "suite-digits_ayf_init": suite("digits_ayf_init"),
    "suite-digits_ayf_dm": suite("digits_ayf_dm"),
    "curve-digits_ayf_dm": curve("digits_ayf_dm"),
    "suite-digits_ayf_sim": suite("digits_ayf_sim"),
    "curve-digits_ayf_sim": curve("digits_ayf_sim"),
    "suite-digits_ayf_sim_next": suite("digits_ayf_sim_next"),
    "curve-digits_ayf_sim_next": curve("digits_ayf_sim_next"),
    "curve-digits_traj": curve("digits_traj"),
    "suite-ring_cont": suite("ring_cont"),
    "modes-ring_cont": modes("ring_cont"),
    "suite-ring_jvp": suite("ring_jvp"),
    "suite-grid_cont": suite("grid_cont"),
    "suite-digits_cont": suite("digits_cont"),
    "curve-digits_cont": curve("digits_cont"),
    "suite-digits_cont_long": suite("digits_cont_long"),
    "suite-ring_scm_seeds": suite("ring_scm_seeds"),
    "seeds-ring_scm_seeds": per_seed("ring_scm_seeds"),
    "seeds-ring_cont": per_seed("ring_cont"),
    "seeds-ring_jvp": per_seed("ring_jvp"),
    "curve-digits_cont_long": curve("digits_cont_long"),
    "cost-cont": cost_block("cost_cont.json"),
}


def render(text: str, root: Path) -> tuple[str, list[str]]:
    """``text`` with every block re-rendered; and the names of blocks whose content changed."""
    changed: list[str] = []
    names = [m["name"] for m in BLOCK.finditer(text)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"report blocks appear more than once: {', '.join(twice)}; each may appear once per file")

    def sub(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise SystemExit(f"unknown report block {name!r}; valid blocks: {', '.join(sorted(RENDERERS))}")
        body = "\n" + RENDERERS[name](root).strip("\n") + "\n"
        if body != m["body"]:
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed block differs from its records")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args(argv)
    stale = []
    for rel in FILES:
        path = args.root / rel
        new, changed = render(path.read_text(), args.root)
        if args.check:
            stale += [f"{rel}: {n}" for n in changed]
        elif changed:
            path.write_text(new)
            print(f"{rel}: re-rendered {', '.join(changed)}")
    if args.check and stale:
        print("stale report blocks (run python scripts/report.py): " + "; ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
