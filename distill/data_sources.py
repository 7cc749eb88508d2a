"""Data as specs: the providers behind :class:`losses.base.DataSpec`, and the teacher-pair cache.

A loss names what it needs (``data_specs()``); :func:`build_providers` turns each spec into a provider whose
``draw(k, size, world_size, device)`` returns the *global* batch of iteration ``k`` (a function of ``(seed, k)``
only), which the module slices per process. So the data order survives a resume and does not depend on the number
of processes.

Sources (``DATA_SOURCES`` registry): ``real`` (the run's data set, or exact samples when ``data.name: teacher``),
``exact`` (exact samples of an analytic teacher), ``noise`` (nothing but labels for a class-conditional teacher),
``teacher_pairs`` (noise -> teacher ODE endpoint, from :class:`TeacherPairCache`).

**Guidance distillation** (``data.guidance: [w_min, w_max]``): every training batch's condition also carries a
per-sample classifier-free-guidance scale ``w ~ U[w_min, w_max]`` (:func:`guidance_scales`, its own stream of
``(seed, k)``, drawn for the global batch and sliced per process like the data), as ``Cond(labels=..., guidance=w)``
in ``batch.labels`` (:func:`with_guidance`). The teacher applies it (``Teacher.forward``) and a guidance-conditioned
student takes it as input (``student.guidance_input``), so every loss distils the guided teacher without a guidance
option of its own (LCM arXiv:2310.04378 §4.2 samples ``w`` the same way). A loss's own ``guidance`` option must stay 1
(``distill.core.cond.split_guidance`` raises otherwise). Limitation: the fake scores of the distribution-matching
losses (DMD2, SiD, SIM, f-distill, TDM) have no guidance input, so those losses refuse a *range* of ``w``
(:func:`losses.parts.check_single_guidance`); a fixed scale (``[w, w]``) has no such mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from distill.core.cond import Cond, CondLike, cond_to
from distill.core.data import build_dataset
from distill.core.pairs import teacher_ode_pairs
from distill.core.registry import ConfigError, Registry, check_kwargs
from distill.core.streams import stream_seed
from losses.base import DataSpec

__all__ = ["DATA_SOURCES", "build_providers", "TeacherPairCache", "Provider", "check_guidance_range",
           "guidance_scales", "with_guidance"]

DATA_SOURCES: Registry = Registry("data source")


def _generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, *parts))


def check_guidance_range(value: Any) -> tuple[float, float] | None:
    """``data.guidance`` as ``(w_min, w_max)`` (``None``: no per-sample scale). A number means a fixed scale."""
    if value is None:
        return None
    vals = [value] * 2 if isinstance(value, (int, float)) else list(value)
    try:
        lo, hi = (float(v) for v in vals)
    except (TypeError, ValueError):
        raise ConfigError(f"data.guidance must be [w_min, w_max] (or one number), got {value!r}") from None
    if not (0.0 <= lo <= hi):
        raise ConfigError(f"data.guidance needs 0 <= w_min <= w_max, got [{lo}, {hi}]")
    return lo, hi


def guidance_scales(seed: int, k: int, n: int, low: float, high: float) -> Tensor:
    """The global batch's guidance scales of iteration ``k``: ``[n]`` float64, uniform in ``[low, high]``, from the
    stream ``(seed, k, "guidance")`` (so resume is exact, and a process's rows do not depend on the process count)."""
    u = torch.rand(n, generator=_generator(seed, k, "guidance"), dtype=torch.float64)
    return low + (high - low) * u


def with_guidance(cond: CondLike, w: Tensor) -> Cond:
    """``cond`` (labels tensor or :class:`~distill.core.cond.Cond`) with the per-sample scale ``w: [B]`` added."""
    if cond is None:
        raise ConfigError("data.guidance draws a classifier-free-guidance scale per sample, but this batch carries "
                          "no condition (an unconditional teacher, or data.conditional false with real data)")
    if isinstance(cond, Tensor):
        return Cond(labels=cond, guidance=w)
    return cond.replace(guidance=w)


class Provider:
    """One spec's data: ``draw(k, n)`` -> the global batch of iteration ``k`` as named CPU tensors ``[n, ...]``."""

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed

    def prepare(self, device: torch.device, rank: int = 0) -> None:
        """Heavy one-off work (the pair cache) on the run's device, after placement."""

    def draw(self, k: int, n: int) -> dict[str, Tensor]:
        raise NotImplementedError


class _Labels(Provider):
    """The conditioning of a conditional teacher for data-free losses: ``teacher.sample_cond`` (class labels from its
    class frequencies or uniform, prompt embeddings of a text-to-image teacher: :meth:`teachers.Teacher.sample_cond`)
    under the stream ``(seed, k, name, "labels")``; nothing for an unconditional teacher. Delivered as ``labels``
    (a ``[n]`` tensor or a :class:`distill.core.cond.Cond`)."""

    def __init__(self, name: str, seed: int, teacher: Any) -> None:
        super().__init__(name, seed)
        self.teacher = teacher

    def draw(self, k: int, n: int) -> dict[str, Any]:
        if not getattr(self.teacher, "conditional", False):
            return {}
        cond = self.teacher.sample_cond(n, generator=_generator(self.seed, k, self.name, "labels"))
        return {} if cond is None else {"labels": cond_to(cond, "cpu")}


class _Dataset(Provider):
    def __init__(self, name: str, seed: int, images: Tensor, labels: Tensor | None, conditional: bool) -> None:
        super().__init__(name, seed)
        self.images, self.labels, self.conditional = images, labels, conditional

    def draw(self, k: int, n: int) -> dict[str, Tensor]:
        idx = torch.randint(0, self.images.shape[0], (n,), generator=_generator(self.seed, k, self.name))
        out = {"data": self.images[idx]}
        if self.conditional and self.labels is not None:
            out["labels"] = self.labels[idx]
        return out


class _Exact(Provider):
    def __init__(self, name: str, seed: int, teacher: Any, conditional: bool) -> None:
        super().__init__(name, seed)
        if not hasattr(teacher, "sample"):
            raise ConfigError(f"data source {name!r}: exact samples need an analytic teacher (ring, grid, mixture); "
                              f"{type(teacher).__name__} has none: use data.name digits or mnist")
        self.teacher, self.conditional = teacher, conditional

    def draw(self, k: int, n: int) -> dict[str, Tensor]:
        x, lab = self.teacher.sample(n, generator=_generator(self.seed, k, self.name), return_labels=True)
        out = {"data": x.cpu()}
        if self.conditional:
            out["labels"] = lab.cpu()
        return out


@DATA_SOURCES.register("noise")
def _noise(name: str, spec: DataSpec, teacher: Any, run: Mapping[str, Any]) -> Provider:
    check_kwargs(lambda: None, spec.options, "data source 'noise'")
    return _Labels(name, run["seed"], teacher)


@DATA_SOURCES.register("exact")
def _exact(name: str, spec: DataSpec, teacher: Any, run: Mapping[str, Any]) -> Provider:
    check_kwargs(lambda: None, spec.options, "data source 'exact'")
    return _Exact(name, run["seed"], teacher, bool(run.get("conditional")))


@DATA_SOURCES.register("real")
def _real(name: str, spec: DataSpec, teacher: Any, run: Mapping[str, Any]) -> Provider:
    check_kwargs(lambda: None, spec.options, "data source 'real'")
    dataset = run.get("dataset")
    if dataset is None:
        raise ConfigError(f"this loss needs real data ({name!r}): set data.name (digits, mnist, or teacher for an "
                          "analytic teacher's exact samples)")
    if dataset == "teacher":
        return _Exact(name, run["seed"], teacher, bool(run.get("conditional")))
    images, labels = build_dataset(dataset).tensors
    if tuple(images.shape[1:]) != tuple(teacher.data_shape):
        raise ConfigError(f"dataset {dataset!r} has shape {list(images.shape[1:])} but the teacher expects "
                          f"{list(teacher.data_shape)}")
    return _Dataset(name, run["seed"], images, labels, bool(run.get("conditional")))


@DATA_SOURCES.register("teacher_pairs")
def _pairs(name: str, spec: DataSpec, teacher: Any, run: Mapping[str, Any]) -> Provider:
    opts = dict(spec.options)
    check_kwargs(TeacherPairCache.__init__, {**opts, "teacher": None, "folder": None, "seed": None},
                 "data source 'teacher_pairs'")
    if getattr(teacher, "conditional", False) and not teacher.num_classes:
        raise ConfigError(f"data source {name!r}: teacher pairs store class labels only; this "
                          f"{type(teacher).__name__} is text-conditional (use a data-free loss without teacher pairs)")
    folder = run.get("pair_cache_dir") or os.path.join(run.get("out_dir") or ".", "teacher_pairs")
    cache = TeacherPairCache(teacher, folder, seed=run["seed"], **opts)
    return _PairProvider(name, run["seed"], cache)


class _PairProvider(Provider):
    def __init__(self, name: str, seed: int, cache: TeacherPairCache) -> None:
        super().__init__(name, seed)
        self.cache = cache

    def prepare(self, device: torch.device, rank: int = 0) -> None:
        self.cache.load(device, rank)

    def draw(self, k: int, n: int) -> dict[str, Tensor]:
        z, x0, lab = self.cache.tensors
        idx = torch.randint(0, z.shape[0], (n,), generator=_generator(self.seed, k, self.name)).to(z.device)
        out = {"z": z[idx], "x0": x0[idx]}
        if lab is not None:
            out["labels"] = lab[idx]
        return out


def _teacher_fingerprint(teacher: Any) -> str:
    """sha256 over the teacher's metadata and every tensor of its state (weights and buffers)."""
    h = hashlib.sha256(json.dumps(teacher.info.to_dict(), sort_keys=True, default=str).encode())
    for key, t in sorted(teacher.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TeacherPairCache:
    """``n`` (noise, teacher ODE endpoint[, label]) triples, generated once on the run's device in shards.

    Stored as ``<folder>/<key>/shard_XXXXX.safetensors`` (each written to a temporary file and renamed, so an
    interrupted generation leaves only whole shards and resumes from the first missing one) plus ``meta.json``.
    ``key`` hashes the teacher (metadata and weights), solver, NFE, guidance, ``n``, shard size and seed, so runs
    that agree on all of them reuse one cache (point ``data.pair_cache_dir`` at a shared folder). The noise of shard
    ``i`` comes from a CPU generator seeded by ``(seed, i)``: the pairs do not depend on the device.

    Args:
        teacher: the frozen teacher ``D(x, sigma, cond, guidance)``.
        folder: cache root.
        seed: run seed.
        n: number of pairs.
        nfe: teacher network evaluations per solve.
        solver: ``distill.core.samplers`` name.
        guidance: classifier-free guidance weight.
        shard_size: pairs per shard.
    """

    def __init__(self, teacher: Any, folder: str | Path, seed: int = 0, n: int = 10_000, nfe: int = 35,
                 solver: str = "heun", guidance: float = 1.0, shard_size: int = 1000) -> None:
        if int(n) < 1 or int(shard_size) < 1:
            raise ConfigError(f"teacher_pairs needs n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
        self.teacher, self.seed, self.n, self.nfe = teacher, int(seed), int(n), int(nfe)
        self.solver, self.guidance, self.shard_size = solver, float(guidance), int(shard_size)
        ident = {"teacher": _teacher_fingerprint(teacher), "solver": solver, "nfe": self.nfe,
                 "guidance": self.guidance, "n": self.n, "shard_size": self.shard_size, "seed": self.seed}
        self.key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        self.meta = {**ident, "key": self.key, "data_shape": list(teacher.data_shape)}
        self.folder = Path(folder) / self.key
        self.tensors: tuple[Tensor, Tensor, Tensor | None] | None = None
        self.generated_shards = 0  # shards this process generated (0 when everything came from disk)
        #: what generating the pairs cost: pairs, seconds and teacher network evaluations (this launch's shards
        #: plus any earlier launch's, from meta.json), and how many pairs this launch read from disk
        self.cost: dict[str, Any] = {}

    def _shard(self, i: int) -> Path:
        return self.folder / f"shard_{i:05d}.safetensors"

    def _write_meta(self, **fields: Any) -> None:
        """``meta.json`` (the cache's identity plus ``fields``), written to a temporary file and renamed, so a kill
        while it is written leaves the previous one."""
        path = self.folder / "meta.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.meta, **fields}, indent=1))
        os.replace(tmp, path)

    def _bounds(self, i: int) -> tuple[int, int]:
        """The pair indices ``[lo, hi)`` of shard ``i``."""
        return i * self.shard_size, min(self.n, (i + 1) * self.shard_size)

    @torch.no_grad()
    def _generate(self, i: int, device: torch.device) -> None:
        lo, hi = self._bounds(i)
        g = _generator(self.seed, "teacher_pairs", i)
        z = torch.randn((hi - lo, *self.teacher.data_shape), generator=g)
        k = self.teacher.num_classes
        lab = torch.randint(k, (hi - lo,), generator=g) if k else None

        def den(x: Tensor, s: Tensor, c: Tensor | None) -> Tensor:
            return self.teacher(x, s, c, guidance=self.guidance)

        x0 = teacher_ode_pairs(den, z.to(device), self.teacher.sigma_min, self.teacher.sigma_max,
                               None if lab is None else lab.to(device), self.nfe, self.solver)
        out = {"z": z.contiguous(), "x0": x0.float().cpu().contiguous()}
        if lab is not None:
            out["labels"] = lab
        tmp = self._shard(i).with_suffix(".tmp")
        save_file(out, str(tmp))
        os.replace(tmp, self._shard(i))

    def load(self, device: torch.device | str = "cpu", rank: int = 0) -> None:
        """Generate missing shards (rank 0; other ranks wait), then load all of them onto ``device``."""
        device = torch.device(device)
        shards = -(-self.n // self.shard_size)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            missing = [i for i in range(shards) if not self._shard(i).is_file()]
            meta_path = self.folder / "meta.json"
            before = json.loads(meta_path.read_text()).get("generation", {}) if meta_path.is_file() else {}
            spent = {"pairs": int(before.get("pairs", 0)), "seconds": float(before.get("seconds", 0.0)),
                     "network_evals": int(before.get("network_evals", 0))}
            generated = 0
            if missing:
                from tqdm.auto import tqdm

                for i in tqdm(missing, desc=f"teacher pairs ({self.n}, {self.solver} {self.nfe} NFE)", leave=False):
                    t0 = time.perf_counter()
                    self._generate(i, device)
                    lo, hi = self._bounds(i)
                    rows = hi - lo
                    generated += rows
                    spent["pairs"] += rows
                    spent["seconds"] = round(spent["seconds"] + time.perf_counter() - t0, 3)
                    spent["network_evals"] += rows * self.nfe
                    self._write_meta(complete=False, generation=spent)
                self.generated_shards = len(missing)
            self._write_meta(complete=True, generation=spent)
            self.cost = {**spent, "device": str(device), "generated_this_launch": generated}
        if dist:
            torch.distributed.barrier()
        parts = []
        for i in range(shards):
            try:
                parts.append(load_file(str(self._shard(i))))
            except Exception as exc:
                raise ValueError(f"teacher-pair shard {str(self._shard(i))!r} is corrupt ({type(exc).__name__}); "
                                 "delete it and rerun to regenerate it") from None
        z = torch.cat([p["z"] for p in parts]).to(device)
        x0 = torch.cat([p["x0"] for p in parts]).to(device)
        lab = torch.cat([p["labels"] for p in parts]).to(device) if "labels" in parts[0] else None
        self.tensors = (z, x0, lab)


def build_providers(specs: Mapping[str, DataSpec], teacher: Any, run: Mapping[str, Any]) -> dict[str, Provider]:
    """One provider per spec. ``run``: ``seed``, ``dataset`` (``data.name``), ``conditional``, ``out_dir``,
    ``pair_cache_dir``."""
    if "data" not in specs:
        raise ConfigError(f"a loss's data_specs() must name a 'data' entry (it sets the batch); got {sorted(specs)}")
    out = {}
    for name, spec in specs.items():
        if not isinstance(spec, DataSpec):
            raise TypeError(f"data spec {name!r} must be a losses.base.DataSpec, got {type(spec).__name__}")
        out[name] = DATA_SOURCES.get(spec.source)(name, spec, teacher, run)
    return out
