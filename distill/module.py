"""``DistillModule``: the Lightning system that holds a frozen teacher, a student, its EMA and a loss (design.md §4).

It composes, never specialises: the loss declares its phases, their update ratio and the parameters each trains; the
module builds one optimizer per phase, runs the phases of each iteration in order with manual optimisation, and adds
what every method needs — gradient clipping, a NaN/Inf guard that skips the step and says so, an EMA of the student
(``torch.optim.swa_utils.AveragedModel``), logging of every named term, per-network gradient norms and sample
statistics (mean/std: DMD2's collapse signal).

Exact resumption: the data batch and every random draw of iteration ``k`` are functions of ``(seed, rank, k)`` only —
the global RNG is re-seeded from them at the start of each iteration — so training 2k steps straight and 1k + resume
+ 1k give the same weights. The iteration counter is a buffer saved in the checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import IterableDataset

from losses.base import DistillLoss

__all__ = ["DistillModule", "DataSource", "IterationStream", "build_optimizer", "lr_factor"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}


LR_DECAYS = ("none", "cosine", "linear")


def lr_factor(i: int, total: int, warmup: int = 0, decay: str = "none", final_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step ``i`` of ``total``: linear warm-up over ``warmup`` steps, then
    constant (``"none"``) or annealed to ``final_ratio`` at step ``total - 1`` by a half cosine or a straight line.
    """
    if warmup and i < warmup:
        return (i + 1) / warmup
    if decay == "none":
        return 1.0
    p = min(1.0, max(0.0, (i - warmup) / max(1, total - 1 - warmup)))
    shape = 0.5 * (1.0 + math.cos(math.pi * p)) if decay == "cosine" else 1.0 - p
    return final_ratio + (1.0 - final_ratio) * shape


def build_optimizer(params: list[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    name = str(cfg.name).lower()
    if name not in _OPTIMIZERS:
        from distill.registry import ConfigError

        raise ConfigError(f"unknown optimizer {cfg.name!r}; valid optimizers: {', '.join(sorted(_OPTIMIZERS))}")
    return _OPTIMIZERS[name](params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


class DataSource:
    """Real data for a run, drawn deterministically: ``batch(k)`` depends only on ``(seed, rank, k)``.

    ``images``/``labels`` come from a registered dataset; for an analytic teacher, ``sampler`` draws exact samples;
    with neither, batches carry only ``batch_size`` (data-free losses draw their own noise at that size).
    """

    def __init__(self, batch_size: int, seed: int, images: Tensor | None = None, labels: Tensor | None = None,
                 sampler: Any = None, conditional: bool = False) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.images = images
        self.labels = labels
        self.sampler = sampler
        self.conditional = conditional

    @property
    def has_real_data(self) -> bool:
        """Whether batches carry ``x0`` (a dataset or an exact sampler), not just their size."""
        return self.images is not None or self.sampler is not None

    def batch(self, k: int, rank: int = 0, device: torch.device | str = "cpu") -> dict[str, Any]:
        g = torch.Generator().manual_seed(_seed_for(self.seed, rank, k, "data"))
        out: dict[str, Any] = {"batch_size": self.batch_size}
        if self.images is not None:
            idx = torch.randint(0, self.images.shape[0], (self.batch_size,), generator=g)
            out["x0"] = self.images[idx].to(device)
            if self.conditional and self.labels is not None:
                out["cond"] = self.labels[idx].to(device)
        elif self.sampler is not None:
            x, lab = self.sampler.sample(self.batch_size, generator=g, return_labels=True)
            out["x0"] = x.to(device)
            if self.conditional:
                out["cond"] = lab.to(device)
        return out


class IterationStream(IterableDataset):
    """An endless stream of placeholders: the module draws its own batch from the iteration counter, so the data
    order survives a resume without a stateful dataloader."""

    def __iter__(self) -> Iterator[int]:
        while True:
            yield 0


def _seed_for(seed: int, rank: int, k: int, stream: str = "iteration") -> int:
    """A deterministic 63-bit seed for (seed, rank, iteration, stream) (Python's ``hash`` of a str is salted)."""
    digest = hashlib.sha256(f"{seed}/{rank}/{k}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DistillModule(L.LightningModule):
    """Frozen teacher + student + EMA + loss, trained with manual optimisation (one optimizer per loss phase).

    Args:
        teacher: a frozen :class:`teachers.Teacher`.
        student: a :class:`students.base.FlowMapStudent`.
        loss: a :class:`losses.base.DistillLoss`.
        optim: mapping phase -> optimizer config (``name, lr, betas, eps, weight_decay, warmup, decay,
            final_lr_ratio, grad_clip``).
        data: a :class:`DataSource`; for data-free losses one without images or sampler, which still sets the
            batch size.
        ema_decay: decay of the student's evaluation EMA.
        max_steps: number of training iterations.
        seed: base seed of the per-iteration RNG.
        log_every: logging period in iterations.
        config: the resolved run config (saved in checkpoints as plain data).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: DistillLoss, optim: dict[str, Any],
                 data: DataSource, ema_decay: float = 0.999, max_steps: int = 1000, seed: int = 0,
                 log_every: int = 50, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.loss = loss
        self.loss.setup(student, teacher)
        missing = [p for p in loss.phases if p not in optim]
        if missing:
            from distill.registry import ConfigError

            raise ConfigError(f"loss {type(loss).__name__} has phases {list(loss.phases)} but optim has no section "
                              f"for {missing}; add optim.{missing[0]}")
        if not isinstance(data, DataSource):
            raise TypeError(f"data must be a DataSource (DataSource(batch_size, seed) for data-free losses), got "
                            f"{type(data).__name__}")
        if loss.needs_data and not data.has_real_data:
            from distill.registry import ConfigError

            raise ConfigError(f"loss {type(loss).__name__} needs real data: set data.name (digits, mnist, teacher)")
        self.optim_cfg = optim
        self.data = data
        self.ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.max_steps = max_steps
        self.seed = seed
        self.log_every = log_every
        self.run_config = config or {}
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    # -- optimisation ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        opts, scheds = [], []
        for phase in self.loss.phases:
            params = self.loss.phase_parameters(phase, self.student)
            if not params:
                raise RuntimeError(f"phase {phase!r} of {type(self.loss).__name__} has no trainable parameters")
            cfg = self.optim_cfg[phase]
            opt = build_optimizer(params, cfg)
            decay = str(cfg.decay)
            if decay not in LR_DECAYS:
                from distill.registry import ConfigError

                raise ConfigError(f"unknown optim.{phase}.decay {decay!r}; valid: {', '.join(LR_DECAYS)}")
            # This phase's number of optimizer steps (DMD2's generator steps once per critic_updates iterations).
            total = sum(phase in self.loss.phases_for_step(k) for k in range(self.max_steps)) if decay != "none" \
                else 0
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, functools.partial(lr_factor, total=total, warmup=int(cfg.warmup), decay=decay,
                                       final_ratio=float(cfg.final_lr_ratio)))
            opts.append(opt)
            scheds.append(sched)
        return opts, scheds

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(IterationStream(), batch_size=None)

    def _networks(self, phase: str) -> dict[str, list[nn.Parameter]]:
        """Parameters of ``phase`` grouped by network, for per-network gradient norms."""
        if phase == "student":
            return {"student": [p for p in self.student.parameters() if p.requires_grad]}
        groups: dict[str, list[nn.Parameter]] = {}
        wanted = {id(p) for p in self.loss.phase_parameters(phase, self.student)}
        for name, p in self.loss.named_parameters():
            if id(p) in wanted:
                groups.setdefault(name.split(".")[0], []).append(p)
        return groups

    def training_step(self, batch: Any, batch_idx: int) -> None:
        k = int(self.iteration)
        if k >= self.max_steps:
            self.trainer.should_stop = True
            return
        torch.manual_seed(_seed_for(self.seed, self.global_rank, k))
        data = self.data.batch(k, self.global_rank, self.device)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else [scheds]
        logs: dict[str, float] = {}
        for phase in self.loss.phases_for_step(k):
            i = self.loss.phases.index(phase)
            opt, sched, cfg = opts[i], scheds[i], self.optim_cfg[phase]
            opt.zero_grad(set_to_none=True)
            terms = self.loss(phase, self.student, self.teacher, data, k)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                self._skip(phase, k, "loss is not finite")
                logs[f"{phase}/skipped"] = 1.0
                continue
            self.manual_backward(loss)
            nets = self._networks(phase)
            norms = {}
            for net, params in nets.items():
                grads = [p.grad for p in params if p.grad is not None]
                norms[net] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
                    if grads else torch.zeros(())
            total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
            if not torch.isfinite(total):
                opt.zero_grad(set_to_none=True)
                self._skip(phase, k, "gradient is not finite")
                logs[f"{phase}/skipped"] = 1.0
                continue
            if cfg.grad_clip is not None:
                params = [p for ps in nets.values() for p in ps]
                torch.nn.utils.clip_grad_norm_(params, float(cfg.grad_clip))
            opt.step()
            sched.step()
            self.loss.after_step(phase, self.student, k)
            for name, v in terms.items():
                logs[f"{phase}/{name}"] = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
            for net, n in norms.items():
                logs[f"grad_norm/{net}"] = float(n)
            logs[f"lr/{phase}"] = sched.get_last_lr()[0]
            if phase == "student":
                self.ema.update_parameters(self.student)
        self.iteration += 1
        if "student/loss" in logs:
            self.log("loss", logs["student/loss"], prog_bar=True, logger=False)
        if k % self.log_every == 0 or k + 1 == self.max_steps:
            logs.update(self.sample_statistics())
            logs["iteration"] = k
            logs["skipped_steps"] = float(self.skipped_steps)
            if self.logger is not None:
                self.logger.log_metrics(logs, step=k)
        if k + 1 >= self.max_steps:
            self.trainer.should_stop = True

    def _skip(self, phase: str, k: int, why: str) -> None:
        self.skipped_steps += 1
        warnings.warn(f"iteration {k}: {phase} step skipped because the {why} (skipped so far: "
                      f"{int(self.skipped_steps)})", RuntimeWarning, stacklevel=2)

    @torch.no_grad()
    def sample_statistics(self, n: int = 256) -> dict[str, float]:
        """Mean/std of one-step EMA-student samples on fixed noise: a drifting mean or collapsing std is the first
        sign of a broken distribution-matching run (DMD2's brightness diagnostic)."""
        x = self.ema_samples(n, nfe=1)
        return {"samples/mean": float(x.mean()), "samples/std": float(x.std()),
                "samples/abs_mean": float(x.abs().mean())}

    @torch.no_grad()
    def ema_samples(self, n: int, nfe: int = 1, seed: int = 0, gamma: float = 1.0,
                    sigmas: Tensor | None = None) -> Tensor:
        from distill.evaluate import student_sigmas
        from students import sample_student

        student = self.ema.module
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *student.data_shape), generator=g).to(self.device)
        cond = None
        if getattr(self.teacher, "num_classes", None) and self.data.conditional:
            cond = torch.randint(0, self.teacher.num_classes, (n,), generator=g).to(self.device)
        if sigmas is None:
            sigmas = student_sigmas(nfe, student.sigma_max)
        was = student.training
        student.eval()
        x = sample_student(student, noise, sigmas.to(self.device), gamma=gamma, cond=cond, generator=g)
        student.train(was)
        return x

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # The frozen teacher is rebuilt from the config on load, never saved into student checkpoints.
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        full = dict(state_dict)
        for k, v in self.teacher.state_dict().items():
            full.setdefault(f"teacher.{k}", v)
        return super().load_state_dict(full, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["distill"] = {
            "config": self.run_config,
            "student_config": self.student.config(),
            "teacher_info": self.teacher.info.to_dict(),
            "iteration": int(self.iteration),
            "rng": {"torch": torch.get_rng_state()},
            "format": 1,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("distill")
        if meta is None:
            raise ValueError("checkpoint was not written by distill train (no 'distill' section)")
        torch.set_rng_state(meta["rng"]["torch"])

    @property
    def progress(self) -> float:
        return float(self.iteration) / max(1, self.max_steps)

    def on_train_start(self) -> None:
        if math.isfinite(self.max_steps) and int(self.iteration) >= self.max_steps:
            self.trainer.should_stop = True
