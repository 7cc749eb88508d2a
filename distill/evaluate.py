"""Evaluation at fixed NFE: generate with a teacher solver or a student, then score with the run's metric.

Generation lives here; the metrics are :mod:`distill.scorers` (FID for images, the exact ring metrics for Gaussian
mixtures) and the rows, tables and plots :mod:`distill.eval_tables`. Every evaluation seed draws its initial noise,
class labels and re-noising from its own streams (:func:`eval_generator`), so teacher and student rows of one seed
share their noise and labels (paired comparisons). :func:`score_student` is the one path by which the FID callback,
the final evaluation and ``distill eval --student`` generate and score a student.

Guidance: teacher rows sample with classifier-free guidance at ``eval.guidance``; a guidance-conditioned student
(``student.guidance_input``) is sampled at that scale through ``Cond(labels, guidance=w)`` (:func:`student_guidance`)
and its records carry it; other students are sampled as they are (``guidance: 1.0`` in their records).

NFE is *measured* by wrapping the network (:func:`distill.core.nfe.count_nfe`), and the measured value is what is
recorded.

The scorers and the table helpers are re-exported here, so ``from distill.evaluate import FIDScorer, write_table``
keeps working.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill.core.cond import Cond, as_cond, cond_index, cond_to
from distill.core.nfe import count_nfe
from distill.core.samplers import get_sampler, steps_for_nfe
from distill.core.schedules import make_grid
from distill.core.streams import generator
from distill.diffusers_bridge import make_scheduler, sample_diffusers
from distill.eval_tables import EvalRow, markdown_table, plot_rows, rows_label, summarise, write_table
from distill.scorers import FIDScorer, RingScorer, Scorer, build_scorer, scorer_from_config
from students import SamplingPlan, sample_student

__all__ = ["generate_teacher", "generate_student", "eval_labels", "student_guidance", "student_eval_kwargs",
           "score_student", "teacher_table",
           # re-exported from distill.scorers and distill.eval_tables, where they live
           "Scorer", "FIDScorer", "RingScorer", "build_scorer", "scorer_from_config", "EvalRow", "rows_label",
           "markdown_table", "write_table", "summarise", "plot_rows"]


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


def score_student(student: Any, scorer: Scorer, nfe: int, seed: int, plan: SamplingPlan, *, n: int,
                  guidance: float = 1.0, batch_size: int = 1000, num_classes: int | None = None,
                  class_probs: Tensor | None = None, cond_sampler: CondSampler | None = None,
                  decode: Callable[[Tensor], Tensor] | None = None, sampler: str | None = None,
                  grid: str | None = None, **fields: Any) -> dict[str, Any]:
    """Generate ``n`` samples of ``student`` at ``nfe`` steps for evaluation seed ``seed`` and score them: the one
    path of the FID callback, the final evaluation and ``distill eval --student``.

    The student is sampled at ``guidance`` if it takes a guidance scale (:func:`student_guidance`), and the record's
    ``guidance`` is that scale (``1.0`` for other students). Per-class scores get the seed's evaluation labels
    (:func:`eval_labels` of ``num_classes`` and ``class_probs``), those the student is conditioned on.

    Args:
        student: the student (an EMA copy or an exported one).
        scorer: the metric (:mod:`distill.scorers`).
        nfe: the steps asked for; the record carries the measured NFE.
        seed: the evaluation seed (its noise, labels and re-noising streams, :func:`eval_generator`).
        plan: how the student is sampled at ``nfe`` (its levels and gamma).
        n: the number of samples.
        guidance: the evaluation's guidance scale (``eval.guidance``).
        batch_size: samples per generation batch.
        num_classes: classes of the evaluation's labels (``None``: unconditional): drawn for per-class scores, and
            the student's conditions when there is no ``cond_sampler``.
        class_probs: ``[num_classes]`` class frequencies the labels are drawn from (``None``: uniform).
        cond_sampler: the conditions to sample the student with, as in :func:`generate_student`.
        decode: maps the samples to pixels, as in :func:`generate_student`.
        sampler: the record's ``sampler``; default ``"student(gamma=<plan.gamma>)"``.
        grid: the record's ``grid``; default the sigmas sampled at, rounded to 4 decimals.
        **fields: further record fields for the scorer (``model``, ``step``).

    Returns:
        The scorer's record: ``score``, the measured ``nfe``, ``sampler``, ``grid``, ``guidance``, ``seed`` and
        ``fields`` among the rest.
    """
    w = student_guidance(student, guidance)
    x, measured, sigmas = generate_student(student, nfe, n, seed, plan, batch_size=batch_size,
                                           num_classes=num_classes, class_probs=class_probs,
                                           cond_sampler=cond_sampler, decode=decode, guidance=w)
    if sampler is None:
        sampler = f"student(gamma={plan.gamma})"
    if grid is None:
        grid = str([round(float(s), 4) for s in sigmas.tolist()])
    return scorer(x, labels=eval_labels(n, seed, num_classes, class_probs), nfe=measured, sampler=sampler, grid=grid,
                  guidance=1.0 if w is None else w, seed=seed, **fields)


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
