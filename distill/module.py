"""``DistillModule``: the Lightning system holding a frozen teacher, a student, its EMA and a loss (docs/design.md §4).

It composes, never specialises: the loss declares its phases, their schedule, each phase's parameter groups, the
phases that move the EMA, its data, its sampling plan and its rounds (``losses/base.py``); the module places
everything on the run's device, builds one optimizer per phase, and runs :func:`distill.iteration.run_iteration`
each iteration with manual optimisation. No phase or loss name appears here.

Exact resumption: every random draw of iteration ``k`` is a function of ``(seed, k)`` (data, the loss's per-sample
draws through the :class:`~losses.base.Batch`) or of ``(seed, rank, k)`` (torch's global RNG, re-seeded per
iteration, for anything else such as dropout), so training 2k iterations straight and 1k + resume + 1k give the
same weights; the iteration counter, skip counter, optimizer states, LR schedules (with round starts) and EMA are in
the checkpoint. Large derived tensors (teacher pairs) are not: they are rebuilt from the pair cache.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from distill.core.cond import Cond, cond_index, cond_to
from distill.core.ema import make_ema
from distill.core.registry import ConfigError
from distill.core.streams import stream_seed
from distill.data_sources import build_providers, check_guidance_range, guidance_scales, with_guidance
from distill.iteration import PhaseOptim, build_phase_optim, run_iteration
from losses.base import Batch, DistillLoss, StepContext
from students.sampling import SamplingPlan

__all__ = ["DistillModule", "IterationStream", "resolve_sampling"]


class IterationStream(IterableDataset):
    """An endless stream of placeholders: the module draws its own batch from the iteration counter, so the data
    order survives a resume without a stateful dataloader."""

    def __iter__(self) -> Iterator[int]:
        while True:
            yield 0


def resolve_sampling(loss: DistillLoss, override: Mapping[str, Any] | None = None) -> SamplingPlan:
    """The loss's sampling plan (or the default) with every non-null field of the config's ``sampling`` applied."""
    plan = loss.sampling() or SamplingPlan()
    return plan.override(**dict(override or {}))


class DistillModule(L.LightningModule):
    """Frozen teacher + student + EMA + loss, trained with manual optimisation (one optimizer per loss phase).

    Args:
        teacher: a frozen :class:`teachers.Teacher`.
        student: a :class:`students.base.FlowMapStudent`.
        loss: a :class:`losses.base.DistillLoss`.
        optim: phase -> optimizer config (``name, lr, betas, eps, weight_decay, warmup, decay, final_lr_ratio,
            grad_clip``).
        data: ``dataset`` (``data.name``), ``batch_size``, ``conditional``, ``pair_cache_dir``, ``out_dir``,
            ``guidance`` (``[w_min, w_max]``: a per-sample CFG scale in each batch cond; :mod:`distill.data_sources`).
        ema: the student EMA's policy (a decay, or ``{"kind": "power", "sigma_rel": ...}``; ``distill.core.ema``).
        max_steps: number of training iterations.
        seed: base seed.
        log_every: logging period in iterations.
        sampling: config overrides of the sampling plan (``gamma``, ``floor``, ``levels``).
        nonfinite_rows: guard policy for losses that report NaN/Inf rows (``"skip"`` the step or ``"drop"`` them).
        config: the resolved run config (saved in checkpoints as plain data).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: DistillLoss, optim: Mapping[str, Any],
                 data: Mapping[str, Any] | None = None, ema: Any = 0.999, max_steps: int = 1000, seed: int = 0,
                 log_every: int = 50, sampling: Mapping[str, Any] | None = None, nonfinite_rows: str = "skip",
                 config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.loss = loss
        missing = [p for p in loss.phases if p not in optim]
        if missing:
            raise ConfigError(f"loss {type(loss).__name__} has phases {list(loss.phases)} but optim has no section "
                              f"for {missing}; add optim.{missing[0]}")
        unknown = sorted(set(optim) - set(loss.phases))
        if unknown:
            raise ConfigError(f"optim has section(s) {unknown} but loss {type(loss).__name__} has phases "
                              f"{list(loss.phases)}")
        self.optim_cfg = dict(optim)
        self.data_cfg = {"dataset": None, "batch_size": 128, "conditional": False, **dict(data or {})}
        self.data_cfg["seed"] = seed
        self.specs = loss.data_specs()
        # Fail on bad data specs now (one line), before any device work.
        self.providers = build_providers(self.specs, teacher, self.data_cfg)
        self.guidance_range = check_guidance_range(self.data_cfg.get("guidance"))
        if self.guidance_range is not None:
            if not getattr(student, "takes_guidance", False):
                raise ConfigError("data.guidance draws a guidance scale per sample, which the student must take as an "
                                  "input: set student.guidance_input: true")
            own = getattr(loss, "guidance", 1.0)
            if isinstance(own, (int, float)) and float(own) != 1.0:
                raise ConfigError(f"data.guidance gives every sample its guidance scale; the loss's own guidance="
                                  f"{own} would apply it twice: drop loss.guidance")
        self._sampling_override = sampling
        self.sampling = resolve_sampling(loss, sampling)  # again after the loss's setup (prepare)
        self.ema = make_ema(student, ema)
        self.max_steps = max_steps
        self.seed = seed
        self.log_every = log_every
        self.run_config = config or {}
        self._optims: dict[str, PhaseOptim] = {}
        self._prepared = False
        self._k = 0  # host mirror of the ``iteration`` buffer: reading a GPU buffer every iteration would synchronise
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("nonfinite_rows", torch.zeros((), dtype=torch.long))
        self.row_policy = nonfinite_rows

    # -- placement and setup -----------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        """Whether the student is trained (and sampled) with class labels: the data's labels
        (``data.conditional``), or the conditions of a conditional teacher (``teacher.sample_cond``: class labels or
        prompts) for data-free losses."""
        if self.data_cfg.get("conditional"):
            return True
        teacher_cond = getattr(self.teacher, "conditional", bool(getattr(self.teacher, "num_classes", None)))
        return bool(teacher_cond) and self.specs["data"].source == "noise"

    def context(self, k: int) -> StepContext:
        p = next(self.student.parameters())
        return StepContext(k, self.max_steps, p.device, p.dtype, self.loss.round_of(k))

    def prepare(self, device: torch.device | str | None = None) -> None:
        """Place the module (teacher, student, EMA, counters) on ``device``, run the loss's ``setup`` there and
        prepare the data (the pair cache). Idempotent; Lightning calls it from :meth:`setup`, scripts call it
        directly."""
        if self._prepared:
            return
        if device is not None:
            self.to(device)  # teacher, student, EMA and the module's own counters (skipped steps, non-finite rows)
        # Networks the loss builds are initialised from a seed of their own, so the setup is the same whatever ran
        # before it (Lightning's DDP launcher re-seeds the global RNG; a resumed run must rebuild the same modules).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, "loss-setup"))
            self.loss.setup(self.student, self.teacher, self.context(0))
        # A loss may build its plan from the teacher it saw in setup (its levels, sigma range): resolve it again.
        self.sampling = resolve_sampling(self.loss, self._sampling_override)
        self.loss.to(next(self.student.parameters()).device)
        for prov in self.providers.values():
            prov.prepare(next(self.student.parameters()).device, self.global_rank)
        if (self.run_config.get("model") or {}).get("teacher_offload") == "cpu":  # after the loss copied the teacher
            from distill.model_options import offload_teacher

            offload_teacher(self.teacher, next(self.student.parameters()).device)
        self._prepared = True

    def setup(self, stage: str) -> None:
        self.prepare(self.trainer.strategy.root_device)

    # -- optimisation ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        self.prepare()
        self._optims = {ph: build_phase_optim(self.loss, ph, self.student, self.optim_cfg[ph], self.max_steps)
                        for ph in self.loss.phases}
        return [po.optimizer for po in self._optims.values()], [po.scheduler for po in self._optims.values()]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(IterationStream(), batch_size=None)

    def make_batch(self, k: int) -> Batch:
        """This process's :class:`Batch` of iteration ``k``: the rank's rows of the global batch of every spec (batch
        sizes are global: ``data.batch_size`` or the spec's own, split evenly over the processes)."""
        p = next(self.student.parameters())
        rank, world = self.global_rank, (self.trainer.world_size if self._trainer is not None else 1)
        fields: dict[str, Tensor] = {}
        size = 0
        for name, prov in self.providers.items():
            total = int(self.specs[name].batch_size or self.data_cfg["batch_size"])
            if total % world:
                raise ConfigError(f"batch size {total} of data spec {name!r} does not split over {world} processes")
            n = total // world
            size = n if name == "data" else size
            for key, t in prov.draw(k, total).items():
                t = cond_to(cond_index(t, slice(rank * n, (rank + 1) * n)), p.device)  # a tensor or a Cond
                t = t.map(lambda v: v.to(p.dtype) if v.is_floating_point() else v) if isinstance(t, Cond) else (
                    t.to(p.dtype) if t.is_floating_point() else t)
                fields[key if name == "data" else f"{name}.{key}"] = t
        data, labels = fields.pop("data", None), fields.pop("labels", None)
        if self.guidance_range is not None:  # guidance distillation: a CFG scale per sample rides in the cond
            total = size * world
            w = guidance_scales(self.seed, k, total, *self.guidance_range)[rank * size:(rank + 1) * size]
            labels = with_guidance(labels, w.to(p.device, p.dtype))
        return Batch(size, data, labels, fields, seed=self.seed, iteration=k, rank=rank, world_size=world,
                     device=p.device, dtype=p.dtype)

    def iterate(self, extra_emas: tuple[Any, ...] = ()) -> dict[str, Tensor | float]:
        """Run training iteration ``self.iteration`` (:func:`distill.iteration.run_iteration`) and advance the
        counter. Outside a Lightning trainer (scripts, benchmarks) call :meth:`prepare` and
        :meth:`configure_optimizers` first; ``extra_emas`` are further ``AveragedModel`` s of the student to move."""
        k = self._k
        torch.manual_seed(stream_seed(self.seed, self.global_rank, k, "iteration"))
        backward = self.manual_backward if self._trainer is not None else None
        logs = run_iteration(k, self.loss, self.student, self.teacher, self.make_batch(k), self.context(k),
                             self._optims, (self.ema, *extra_emas), backward=backward, skipped=self.skipped_steps,
                             nonfinite=self.nonfinite_rows, row_policy=self.row_policy)
        self._k = k + 1
        self.iteration.fill_(self._k)
        return logs

    @property
    def current_iteration(self) -> int:
        """Iterations done so far (a host integer: callbacks read it every iteration without a device sync)."""
        return self._k

    def training_step(self, batch: Any, batch_idx: int) -> None:
        k = self._k
        if k >= self.max_steps:
            self.trainer.should_stop = True
            return
        logs = self.iterate()
        if k % self.log_every == 0 or k + 1 == self.max_steps:
            self._log(k, logs)
        if k + 1 >= self.max_steps:
            self.trainer.should_stop = True

    def _log(self, k: int, logs: Mapping[str, Tensor | float]) -> None:
        """Fetch the logged values (the only host reads of an iteration) and hand them to the loggers."""
        values = {name: float(v) for name, v in logs.items()}
        skipped, rows = int(self.skipped_steps), int(self.nonfinite_rows)
        if (skipped, rows) > getattr(self, "_warned", (0, 0)):
            warnings.warn(f"iteration {k}: {skipped} phase step(s) skipped so far because a loss, a gradient or "
                          f"{rows} sample row(s) were not finite (trainer.nonfinite_rows: {self.row_policy})",
                          RuntimeWarning, stacklevel=2)
            self._warned = (skipped, rows)
        main = next((f"{ph}/loss" for ph in self.loss.ema_phases if f"{ph}/loss" in values), None)
        if main is not None and self._trainer is not None:
            self.log("loss", values[main], prog_bar=True, logger=False)
        values.update(self.sample_statistics())
        values["iteration"] = k
        values["skipped_steps"] = float(skipped)
        values["nonfinite_rows"] = float(rows)
        if self.logger is not None:
            self.logger.log_metrics(values, step=k)

    @torch.no_grad()
    def sample_statistics(self, n: int = 256) -> dict[str, float]:
        """Mean/std of one-step EMA-student samples on fixed noise: a drifting mean or collapsing std is the first
        sign of a broken distribution-matching run (DMD2's brightness diagnostic)."""
        x = self.ema_samples(n, nfe=1)
        return {"samples/mean": float(x.mean()), "samples/std": float(x.std()),
                "samples/abs_mean": float(x.abs().mean())}

    @torch.no_grad()
    def ema_samples(self, n: int, nfe: int = 1, seed: int = 0) -> Tensor:
        """``n`` samples of the EMA student at ``nfe`` steps under the run's sampling plan."""
        student = self.ema.module
        g = torch.Generator().manual_seed(stream_seed(seed, "grid-noise"))
        noise = torch.randn((n, *student.data_shape), generator=g).to(self.device)
        cond = self.teacher.sample_cond(n, generator=g, device=self.device) if self.conditional else None
        was = student.training
        student.eval()
        x = self.sampling.sample(student, noise, nfe, cond, generator=torch.Generator(self.device).manual_seed(
            stream_seed(seed, "grid-renoise")))
        student.train(was)
        return x

    # -- checkpoints -------------------------------------------------------------------------------------------
    def rebuilt_keys(self) -> set[str]:
        """State keys rebuilt from the teacher when the run is built, hence never checkpointed: the teacher's, and
        the frozen base weights a LoRA network copied from it (every module's ``rebuilt_state_keys``: the student,
        its EMA copies, a LoRA fake score; ``students.lora``)."""
        keys = {k for k in super().state_dict() if k.startswith("teacher.")}
        for name, mod in self.named_modules(remove_duplicate=False):
            own = getattr(mod, "rebuilt_state_keys", None)
            if own and not name.startswith("teacher"):
                keys.update(f"{name}.{k}" for k in own)
        return keys

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # The frozen teacher (and LoRA bases copied from it) are rebuilt from the config on load, never saved into
        # student checkpoints.
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        drop = {prefix + k for k in self.rebuilt_keys()}
        return {k: v for k, v in sd.items() if k not in drop}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        full = dict(state_dict)
        if "iteration" in full:
            self._k = int(full["iteration"])
        full.setdefault("nonfinite_rows", torch.zeros_like(self.nonfinite_rows))  # a counter older runs lack
        own = super().state_dict()
        for k in self.rebuilt_keys():
            full.setdefault(k, own[k])
        return super().load_state_dict(full, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["distill"] = {
            "config": self.run_config,
            "student_config": self.student.config(),
            "teacher_info": self.teacher.info.to_dict(),
            "sampling": self.sampling.to_dict(),
            "iteration": self._k,
            "rng": {"torch": torch.get_rng_state()},
            "format": 2,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("distill")
        if meta is None:
            raise ValueError("checkpoint was not written by distill train (no 'distill' section)")
        check_state_compatible(checkpoint["state_dict"], self.state_dict(), getattr(self, "resume_path", "checkpoint"))
        self._k = int(checkpoint["state_dict"]["iteration"])
        torch.set_rng_state(meta["rng"]["torch"])

    @property
    def progress(self) -> float:
        return self._k / max(1, self.max_steps)

    def on_train_start(self) -> None:
        if math.isfinite(self.max_steps) and self._k >= self.max_steps:
            self.trainer.should_stop = True


def check_state_compatible(saved: Mapping[str, Tensor], own: Mapping[str, Tensor], path: Any) -> None:
    """Fail with one line if a checkpoint's networks do not match the configured ones."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    bad_shape = sorted(k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} with another shape (e.g. {k}: {list(saved[k].shape)} vs "
                         f"{list(own[k].shape)})")
        raise ValueError(f"checkpoint {str(path)!r} does not match this config's networks: " + "; ".join(parts))
