"""Evaluation at fixed NFE: generate with a teacher solver or a student, then score with the right metric.

* Image teachers: FID on a feature extractor (the shipped digits classifier for 8x8 digits, Inception from a local
  file otherwise), every number a :class:`distill.fid.FIDRecord` carrying its protocol; for class-conditional digits
  samples also the per-class FID (:func:`distill.fid.per_class_fid`) in the record's ``extra``.

Guidance: teacher rows sample with classifier-free guidance at ``eval.guidance``; a guidance-conditioned student
(``student.guidance_input``) is sampled at that scale through ``Cond(labels, guidance=w)`` (:func:`student_guidance`)
and its records carry it; other students are sampled as they are (``guidance: 1.0`` in their records).
* Analytic (Gaussian-mixture) teachers: sliced Wasserstein-1 to a fixed exact sample set, per-mode mass and the
  off-mode fraction (docs/methods.md §4.4 "Ring", :mod:`distill.distances`), in a record of the same shape.

NFE is *measured* by wrapping the network (:func:`distill.core.nfe.count_nfe`), and the measured value is what is
recorded.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill.core.cond import Cond, as_cond, cond_index, cond_to
from distill.core.data import load_digits_tensor
from distill.core.nfe import count_nfe
from distill.core.samplers import get_sampler, steps_for_nfe
from distill.core.schedules import make_grid
from distill.core.streams import generator
from distill.diffusers_bridge import make_scheduler, sample_diffusers
from distill.distances import ring_report
from distill.features import build_features
from distill.fid import class_coverage, compute_fid, load_reference, per_class_fid, protocol_kind, protocol_label
from students import SamplingPlan, sample_student
from teachers.analytic import GaussianMixtureTeacher

__all__ = ["Scorer", "FIDScorer", "RingScorer", "build_scorer", "scorer_from_config", "generate_teacher",
           "generate_student", "eval_labels", "student_guidance", "EvalRow", "teacher_table", "rows_label",
           "markdown_table", "write_table"]


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


class Scorer:
    """Scores a batch of samples against the teacher's data; ``metric`` names the number (``fid`` or ``sw1``).

    Every record it returns carries ``kind`` (:func:`distill.fid.protocol_kind` of its sample count and reference
    size) and a one-line ``label`` naming the measure, the sample count and the reference set.
    """

    metric: str = "fid"

    def __call__(self, samples: Tensor, labels: Tensor | None = None, **protocol: Any) -> dict[str, Any]:
        """Score ``samples``; ``labels: [N]`` are the class labels they were generated for (``None``: unconditional),
        for per-class numbers where the scorer has them."""
        raise NotImplementedError


class FIDScorer(Scorer):
    """FID on ``features`` against the reference statistics ``reference`` (see :func:`distill.fid.load_reference`).

    Args:
        features: ``digits``, ``inception`` or ``flatten``.
        inception_path: the local ``inception-2015-12-05.pt`` (or its folder); else ``$DISTILL_INCEPTION_WEIGHTS``.
        reference: a clean-fid ``.npz`` (``mu``, ``sigma``), a :class:`~distill.fid.ReferenceStats` ``.npz`` or a
            folder of images; ``None`` means the shipped digits statistics (digits features only).
    """

    metric = "fid"

    def __init__(self, features: str = "digits", inception_path: str | None = None,
                 reference: str | None = None) -> None:
        kw = {"weights_path": inception_path} if features == "inception" else {}
        self.extractor = build_features(features, **kw)
        self.reference = load_reference(reference, self.extractor)
        self._class_reference: tuple[Tensor, Tensor] | None = None

    def class_reference(self) -> tuple[Tensor, Tensor] | None:
        """``(features [M, D], labels [M])`` of the real data per-class FID compares with: the 1,797 real digits
        under the digits classifier's features (computed once); ``None`` for other features (no labelled real set)."""
        if self._class_reference is None and getattr(self.extractor, "name", None) == "digits":
            images, labels = load_digits_tensor()
            self._class_reference = (self.extractor(images), labels)
        return self._class_reference

    def __call__(self, samples: Tensor, labels: Tensor | None = None, **protocol: Any) -> dict[str, Any]:
        """The FID record of ``samples`` (with class coverage for the digits classifier) plus, when ``labels: [N]``
        (the classes the samples were generated for) are given and the features are the digits classifier's,
        ``extra.per_class_fid`` / ``per_class_fid_mean`` / ``per_class_n`` (:func:`distill.fid.per_class_fid`)."""
        rec = compute_fid(samples, self.reference, self.extractor, **protocol)
        out = rec.to_dict()
        if hasattr(self.extractor, "predict"):
            predicted = self.extractor.predict(samples)
            shares = class_coverage(predicted, 10)
            out.setdefault("extra", {})["class_coverage"] = [round(float(c), 4) for c in shares]
        ref = self.class_reference() if labels is not None else None
        if ref is not None:
            if labels.shape != (samples.shape[0],):
                raise ValueError(f"labels must be [N] = [{samples.shape[0]}], got {list(labels.shape)}")
            pc = per_class_fid(self.extractor(samples), labels, ref[0], ref[1], int(ref[1].max()) + 1)
            out.setdefault("extra", {}).update(pc)
        out["score"] = float(rec.fid)
        return out


class RingScorer(Scorer):
    """Exact-teacher scorer for Gaussian mixtures (sliced W1 to a fixed exact set, mode mass, off-mode fraction).

    Its reference is a fixed set of ``n_reference`` exact samples, so a number is ``final`` from that many samples
    on (:func:`distill.fid.protocol_kind`), e.g. ``"sliced W1, final (10,000 samples vs 10,000 exact)"``.
    """

    metric = "sw1"

    def __init__(self, teacher: Any, n_reference: int = 10_000, reference_seed: int = 12345) -> None:
        g = torch.Generator().manual_seed(reference_seed)
        self.reference = teacher.sample(n_reference, generator=g)
        self.means = teacher.means.reshape(teacher.means.shape[0], -1).float()
        # the true mixture: per-mode mass is scored against the weights, "off" against each mode's own width
        self.weights = teacher.weights.detach().double().cpu()
        self.stds = teacher.stds.detach().double().cpu()
        self.reference_seed = reference_seed

    def __call__(self, samples: Tensor, labels: Tensor | None = None, **protocol: Any) -> dict[str, Any]:
        rep = ring_report(samples.reshape(samples.shape[0], -1).float(), self.means, self.reference,
                          weights=self.weights, stds=self.stds)
        rep = {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in rep.items()}
        n, n_ref = int(samples.shape[0]), int(self.reference.shape[0])
        name = f"{n_ref:,} exact"
        return {"score": float(rep["sw1"]), "metric": "sw1", "n_samples": n,
                "reference": {"source": "exact teacher samples", "n": n_ref, "seed": self.reference_seed,
                              "name": name},
                "kind": protocol_kind(n, n_ref), "label": protocol_label("sliced W1", n, n_ref, name),
                **rep, **protocol}


def build_scorer(teacher: Any, features: str = "auto", inception_path: str | None = None,
                 reference: str | None = None) -> Scorer:
    """Pick the metric for a teacher: exact ring metrics for mixtures, digits FID for 8x8 digits, else Inception.

    ``inception_path`` and ``reference`` are those of :class:`FIDScorer` (``eval.inception_path``,
    ``eval.reference``); the ring metrics ignore them.
    """
    if features == "auto":
        if isinstance(teacher, GaussianMixtureTeacher) and len(teacher.data_shape) == 1:
            return RingScorer(teacher)
        shape = tuple(getattr(teacher, "pixel_shape", teacher.data_shape))  # a latent teacher is scored on pixels
        features = "digits" if shape == (1, 8, 8) else "inception"
    if features in ("sw1", "ring"):
        return RingScorer(teacher)
    return FIDScorer(features, inception_path, reference)


def scorer_from_config(teacher: Any, ev: Any) -> Scorer:
    """:func:`build_scorer` from an ``eval`` config section (``features``, ``inception_path``, ``reference``)."""
    return build_scorer(teacher, ev.features, ev.inception_path, ev.reference)


def device_of(model: Any) -> torch.device:
    """Where ``model`` runs: the device of its first parameter or buffer (the CPU for one that has neither)."""
    for t in (*model.parameters(), *model.buffers()) if isinstance(model, torch.nn.Module) else ():
        return t.device
    return torch.device("cpu")


def _batched(fn: Callable[[Tensor, Tensor | None], Tensor], noise: Tensor, cond: Tensor | None,
             batch_size: int, device: torch.device | None = None) -> Tensor:
    """``fn`` over ``noise`` (and ``cond``) in batches of ``batch_size``, each moved to ``device``; the samples come
    back on the CPU. The draws themselves are made on the CPU, so they do not depend on the device."""
    outs = []
    for i in range(0, noise.shape[0], batch_size):
        c = cond_to(cond_index(cond, slice(i, i + batch_size)), device)
        outs.append(fn(noise[i: i + batch_size].to(device), c).cpu())
    return torch.cat(outs)


EVAL_STREAMS = ("noise", "labels", "renoise")


def eval_generator(seed: int, purpose: str) -> torch.Generator:
    """The evaluation stream of sampling seed ``seed`` for ``purpose`` (``noise``: initial noise, ``labels``: class
    labels, ``renoise``: a sampler's fresh noise). Independent for every (seed, purpose) (``distill.core.streams``);
    teacher and student rows of one seed share their initial noise and labels (paired comparisons)."""
    if purpose not in EVAL_STREAMS:
        raise ValueError(f"unknown evaluation stream {purpose!r}; valid: {', '.join(EVAL_STREAMS)}")
    return generator(int(seed), "eval", purpose)


def draw_labels(n: int, num_classes: int | None, probs: Tensor | None, g: torch.Generator) -> Tensor | None:
    """``[n]`` class labels: from ``probs`` (a teacher's class frequencies) or uniform; ``None`` if unconditional."""
    if not num_classes:
        return None
    if probs is not None:
        return torch.multinomial(probs.detach().double().cpu(), n, replacement=True, generator=g)
    return torch.randint(0, num_classes, (n,), generator=g)


#: ``sampler(n, generator) -> cond``: a teacher's :meth:`~teachers.Teacher.sample_cond` (or :func:`draw_labels`)
CondSampler = Callable[[int, torch.Generator], Any]


def eval_labels(n: int, seed: int, num_classes: int | None, probs: Tensor | None = None) -> Tensor | None:
    """The ``[n]`` class labels evaluation seed ``seed`` draws (``None`` if unconditional): exactly those
    :func:`generate_teacher` / :func:`generate_student` condition on, for per-class scores."""
    return draw_labels(n, num_classes, probs, eval_generator(seed, "labels"))


def student_guidance(student: Any, guidance: float) -> float | None:
    """``guidance`` if ``student`` takes a guidance scale as input (a backbone ``guidance`` spec), else ``None``."""
    return float(guidance) if getattr(student, "takes_guidance", False) else None


def _noise(shape: tuple[int, ...], n: int, seed: int, num_classes: int | None,
           probs: Tensor | None = None, cond_sampler: CondSampler | None = None) -> tuple[Tensor, Any]:
    """``(noise [n, *shape], cond)`` of evaluation seed ``seed``: ``cond`` from ``cond_sampler`` (a teacher's
    ``sample_cond``) when given, else class labels (:func:`draw_labels`), both on the seed's ``labels`` stream."""
    noise = torch.randn((n, *shape), generator=eval_generator(seed, "noise"))
    g = eval_generator(seed, "labels")
    if cond_sampler is not None:
        return noise, cond_sampler(n, g)
    return noise, draw_labels(n, num_classes, probs, g)


def _teacher_cond_sampler(teacher: Any) -> CondSampler | None:
    """The teacher's ``sample_cond`` (``None`` for objects without one, such as bare denoisers)."""
    fn = getattr(teacher, "sample_cond", None)
    return None if fn is None else (lambda n, g: fn(n, generator=g))


def _decode_fn(decode: Callable[[Tensor], Tensor] | None, fn: Callable[[Tensor, Any], Tensor]
               ) -> Callable[[Tensor, Any], Tensor]:
    """``fn`` followed by ``decode`` (a latent teacher's VAE decoder), batch by batch on the sampling device."""
    if decode is None:
        return fn
    return lambda z, c: decode(fn(z, c))


@torch.no_grad()
def generate_teacher(teacher: Any, sampler: str, nfe: int, grid: str = "karras", n: int = 2000, seed: int = 0,
                     guidance: float = 1.0, batch_size: int = 1000, diffusers: bool = False) -> tuple[Tensor, int]:
    """Samples from the teacher with one of our solvers (or diffusers' through the bridge) at ``nfe``; conditions
    from ``teacher.sample_cond``; a latent teacher's samples are decoded to pixels (``teacher.decode``), so the
    result is ``[n, *teacher.pixel_shape]``.

    Returns ``(samples, measured_nfe)``.
    """
    noise, cond = _noise(teacher.data_shape, n, seed, teacher.num_classes, teacher.class_probs,
                         _teacher_cond_sampler(teacher))
    renoise = eval_generator(seed, "renoise")
    den = functools.partial(teacher, guidance=guidance) if guidance != 1.0 else teacher
    if diffusers:
        def run(z: Tensor, c: Tensor | None) -> Tensor:
            sched = make_scheduler(sampler, karras=(grid == "karras"))
            return sample_diffusers(den, z, sched, nfe, cond=c, generator=renoise)
    else:
        fn = get_sampler(sampler)
        steps = steps_for_nfe(sampler, nfe)
        sigmas = make_grid(grid, steps, teacher.sigma_min, teacher.sigma_max)

        def run(z: Tensor, c: Tensor | None) -> Tensor:
            return fn(den, z, sigmas, c, generator=renoise)  # stochastic solvers draw from the seed's own stream

    decode = teacher.decode if getattr(teacher, "latent", False) else None
    with count_nfe(teacher) as counter:
        x = _batched(_decode_fn(decode, run), noise, cond, batch_size, device_of(teacher))
    n_batches = math.ceil(n / batch_size)
    return x.float(), counter.calls // n_batches


@torch.no_grad()
def generate_student(student: Any, nfe: int, n: int = 2000, seed: int = 0, plan: SamplingPlan | None = None,
                     batch_size: int = 1000, num_classes: int | None = None,
                     class_probs: Tensor | None = None, cond_sampler: CondSampler | None = None,
                     decode: Callable[[Tensor], Tensor] | None = None, guidance: float | None = None
                     ) -> tuple[Tensor, int, Tensor]:
    """Samples from a student at ``nfe`` steps under ``plan`` (default :class:`students.SamplingPlan`).

    Conditions: ``cond_sampler(n, generator)`` (the teacher's ``sample_cond``, so the student is evaluated on the
    teacher's conditioning) when given, else labels of ``num_classes`` classes (from ``class_probs`` or uniform:
    exported students, where no teacher is loaded), else none. ``decode`` (a latent teacher's ``decode``) maps the
    samples to pixels batch by batch. ``guidance``: the scale a guidance-conditioned student is sampled at (added to
    the condition as ``Cond(..., guidance=w)``; see :func:`student_guidance`); ``None`` passes the condition alone.

    Returns ``(samples, measured_nfe, sigmas)``.
    """
    plan = plan or SamplingPlan()
    sigmas = plan.sigmas(nfe, student.sigma_max)
    noise, cond = _noise(student.data_shape, n, seed, num_classes, class_probs, cond_sampler)
    if guidance is not None:
        c = as_cond(cond)
        w = torch.full((n,), float(guidance))
        cond = Cond(guidance=w) if c is None else c.replace(guidance=w)
    # Every sample's re-noising draws are fixed up front ([steps, n, ...]), so a sample does not depend on batching.
    renoise = torch.randn((max(0, len(sigmas) - 2), n, *student.data_shape), generator=eval_generator(seed, "renoise"))
    was_training = student.training
    student.eval()
    start = [0]

    def run(z: Tensor, c: Tensor | None) -> Tensor:
        a = start[0]
        start[0] += z.shape[0]
        return sample_student(student, z, sigmas, gamma=plan.gamma, cond=c, renoise=renoise[:, a:a + z.shape[0]])

    with count_nfe(student, "x0_estimate") as counter:
        x = _batched(_decode_fn(decode, run), noise, cond, batch_size, device_of(student))
    student.train(was_training)
    return x.float(), counter.calls // math.ceil(n / batch_size), sigmas


def student_eval_kwargs(teacher: Any, conditional: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`generate_student` that evaluate a student on ``teacher``'s terms: the
    teacher's conditioning (``sample_cond``, when the run is ``conditional``) and its decoder (latent teachers)."""
    return {"cond_sampler": _teacher_cond_sampler(teacher) if conditional else None,
            "decode": teacher.decode if getattr(teacher, "latent", False) else None}


def teacher_table(teacher: Any, scorer: Scorer, samplers: list[str], grids: list[str], nfes: list[int],
                  seeds: list[int], n: int, reference_nfe: int = 35, reference_sampler: str = "heun",
                  diffusers_samplers: list[str] | None = None, guidance: float = 1.0, batch_size: int = 1000,
                  progress: bool = True, model: str = "teacher") -> list[EvalRow]:
    """The FID-vs-NFE table of the teacher's training-free solvers (ours and diffusers'), plus the reference row."""
    jobs: list[tuple[str, str, int, bool]] = []
    for s in samplers:
        for g in grids:
            seen: set[int] = set()
            for k in nfes:
                steps = steps_for_nfe(s, k)  # Heun reaches only odd NFE (2N - 1): 2 and 1 are the same run
                if steps not in seen:
                    seen.add(steps)
                    jobs.append((s, g, k, False))
    for s in diffusers_samplers or []:
        for g in grids:
            for k in nfes:
                jobs.append((s, g, k, True))
    jobs.append((reference_sampler, "karras", reference_nfe, False))
    rows: list[EvalRow] = []
    bar = tqdm(total=len(jobs) * len(seeds), desc="teacher solvers", disable=not progress)
    for s, g, k, is_diffusers in jobs:
        for seed in seeds:
            x, measured = generate_teacher(teacher, s, k, g, n, seed, guidance, batch_size, is_diffusers)
            name = f"diffusers:{s}" if is_diffusers else s
            if is_diffusers and g != "karras":
                g = "vp-default"  # diffusers' own timestep spacing on its VP table, not our log-SNR grid
            rec = scorer(x, labels=eval_labels(n, seed, teacher.num_classes, teacher.class_probs), nfe=measured,
                         sampler=name, grid=g, guidance=guidance, seed=seed, model=model)
            rows.append(EvalRow(model, name, g, measured, seed, rec["score"], scorer.metric, rec))
            bar.update(1)
            bar.set_postfix_str(f"{name}/{g}@{measured}: {rec['score']:.3g}")
    bar.close()
    if isinstance(scorer, RingScorer):
        # The noise floor: fresh exact sample sets scored against the same fixed reference set.
        for seed in seeds:
            x = teacher.sample(n, generator=generator(int(seed), "eval", "exact-floor"))
            rec = scorer(x, nfe=0, sampler="exact samples", grid="-", guidance=1.0, seed=seed, model="exact")
            rows.append(EvalRow("exact (noise floor)", "exact samples", "-", 0, seed, rec["score"], scorer.metric, rec))
    return rows


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
