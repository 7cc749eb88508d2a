"""Train the project's shipped digits teacher: a small diffusers ``UNet2DModel`` with EDM preconditioning.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (arXiv:2206.00364):
log-normal noise levels ``ln sigma ~ N(P_mean, P_std^2)`` (Table 1, P_mean = -1.2, P_std = 1.2) and the loss
``lambda(sigma) ||D(y + sigma n, sigma) - y||^2`` with ``lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`` (eq. 8).

The network is wrapped in :class:`teachers.diffusers_teacher.DiffusersTeacher` *before* training, so the loss goes
through exactly the ``denoise`` code (preconditioning, ``c_noise = 250 log sigma``) that the toolkit uses at inference.
An EMA of the weights is what gets saved, as a local diffusers folder (``unet/`` safetensors + ``scheduler/`` +
``distill_teacher.json``) plus ``training.json`` with the command line, wall time and loss curve.

``--conditional`` trains a class-conditional teacher for classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598): the UNet gets ``num_class_embeds = num_classes + 1`` label embeddings, the last one the null class
(``null_class`` in ``distill_teacher.json``), and each training label is replaced by the null class with probability
``--label-dropout`` (0.1), so one network learns both ``D(x, sigma, y)`` and ``D(x, sigma, null)``.

    python scripts/train_teacher.py --steps 5000 --out teachers/shipped/digits
    python scripts/train_teacher.py --conditional --steps 5000 --out teachers/shipped/digits_cond
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from diffusers import EDMEulerScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from distill.core.data import DATASETS, save_grid  # noqa: E402
from distill.core.nfe import count_nfe  # noqa: E402
from distill.core.samplers import sample_heun  # noqa: E402
from distill.core.schedules import karras_sigmas, sample_lognormal_sigma  # noqa: E402
from teachers.diffusers_teacher import DiffusersTeacher, load_diffusers_teacher  # noqa: E402
from teachers.nets import small_unet  # noqa: E402

SIGMA_DATA = 0.5
EDM_TIMESTEP_SCALE = 250.0


def edm_scheduler_config(sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = SIGMA_DATA) -> dict:
    """The ``EDMEulerScheduler`` config saved with the teacher (diffusers' own defaults filled in)."""
    sched = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
    cfg = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
    cfg["_class_name"] = "EDMEulerScheduler"
    return cfg


def edm_loss(teacher: DiffusersTeacher, y: torch.Tensor, p_mean: float, p_std: float,
             generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """EDM training loss (Karras et al. 2022, eq. 8 with Table 1's log-normal sigma density).

    Args:
        teacher: the preconditioned denoiser being trained.
        y: ``[B, C, H, W]`` clean data.
        labels: ``[B]`` class labels (null class included) of a class-conditional teacher, else ``None``.
    Returns the scalar mean over batch and pixels of ``lambda(sigma) (D(y + sigma n, sigma, labels) - y)^2``.
    """
    sigma = sample_lognormal_sigma(y.shape[0], p_mean, p_std, generator=generator, dtype=y.dtype)  # [B]
    n = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    s = sigma.view(-1, 1, 1, 1)
    weight = (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2  # makes the effective F-target unit-variance
    d = teacher.denoise(y + s * n, sigma, labels)
    return (weight * (d - y) ** 2).mean()


def lr_at(step: int, base_lr: float, warmup: int, total: int, final_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base_lr`` to ``final_frac * base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def sample_grid(teacher: DiffusersTeacher, path: str | Path, n: int = 64, seed: int = 0, steps: int = 18,
                guidance: float = 1.0) -> int:
    """Write a grid of ``n`` samples from EDM's Heun sampler on the Karras grid (``steps`` levels, ``2 steps - 1``
    NFE: 35 for 18; twice that with classifier-free guidance): 8 columns, or for a class-conditional teacher one
    column per class (labels ``i mod num_classes``, at CFG scale ``guidance``). Returns the measured NFE."""
    noise = torch.randn((n, *teacher.data_shape), generator=torch.Generator().manual_seed(seed))
    sigmas = karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max, dtype=torch.float32)
    cond = None if not teacher.num_classes else torch.arange(n) % teacher.num_classes
    with torch.no_grad(), count_nfe(teacher) as counter:
        x = sample_heun(lambda x, s, c: teacher(x, s, c, guidance=guidance), noise, sigmas, cond)
    save_grid(x, path, nrow=teacher.num_classes or 8)
    return counter.nfe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", choices=DATASETS.names())
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--final-lr-frac", type=float, default=0.2, help="cosine-decay the lr to this fraction")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--p-mean", type=float, default=-1.2)
    p.add_argument("--p-std", type=float, default=1.2)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="UNet block_out_channels")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional with a null class (label num_classes) for classifier-free guidance")
    p.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability of training a label as the null class (--conditional only)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale of the --samples grid (--conditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "teachers" / "shipped" / "digits"))
    p.add_argument("--samples", default=None, help="also write a 64-sample 35-NFE Heun grid PNG here")
    p.add_argument("--grid-only", action="store_true", help="skip training: load --out and write --samples")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit(f"--steps and --batch-size must be positive, got {args.steps} and {args.batch_size}")
    torch.set_num_threads(args.threads)
    if args.grid_only:
        path = args.samples or str(ROOT / "docs" / "teacher_digits_samples.png")
        nfe = sample_grid(load_diffusers_teacher(args.out), path, seed=args.seed, guidance=args.guidance)
        print(f"wrote {path} ({nfe} NFE Heun)")
        return
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    if not 0.0 <= args.label_dropout < 1.0:
        raise SystemExit(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    images, labels = DATASETS.get(args.dataset)()
    n_data, size = images.shape[0], images.shape[-1]
    # Conditional: labels 0..K-1 are the classes, label K the null class ("no label") of classifier-free guidance.
    null_class = int(labels.max()) + 1 if args.conditional else None
    net = small_unet(sample_size=size, in_channels=images.shape[1], block_out_channels=tuple(args.channels),
                     num_class_embeds=None if null_class is None else null_class + 1)
    teacher = DiffusersTeacher(net, edm_scheduler_config(), null_class=null_class, sigma_data=SIGMA_DATA,
                               edm_timestep_scale=EDM_TIMESTEP_SCALE)
    # DiffusersTeacher freezes itself; training needs the net's gradients and train-mode back.
    teacher.train()
    net.requires_grad_(True)
    n_params = sum(p.numel() for p in net.parameters())
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    curve: list[dict] = []
    window: list[float] = []
    perm, pos = torch.randperm(n_data, generator=gen), 0
    t0 = time.time()
    bar = tqdm(range(args.steps), desc=f"teacher/{args.dataset}", dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        # Epoch-wise shuffling without a DataLoader: the whole set is a tensor in memory.
        if pos + args.batch_size > n_data:
            perm, pos = torch.randperm(n_data, generator=gen), 0
        idx = perm[pos:pos + args.batch_size]
        y = images[idx]
        pos += args.batch_size
        y_labels = None
        if null_class is not None:  # CFG label dropout: replace a label by the null class with p = label_dropout
            drop = torch.rand(idx.shape[0], generator=gen) < args.label_dropout
            y_labels = torch.where(drop, torch.full_like(idx, null_class), labels[idx])

        lr = lr_at(step, args.lr, args.warmup, args.steps, args.final_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = edm_loss(teacher, y, args.p_mean, args.p_std, generator=gen, labels=y_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.step()
        ema.update_parameters(net)

        window.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            mean = sum(window) / len(window)
            curve.append({"step": step + 1, "loss": mean, "lr": lr, "time_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.1e}")
            window = []
    wall = time.time() - t0

    out = Path(args.out)
    ema_teacher = DiffusersTeacher(ema.module, edm_scheduler_config(), null_class=null_class, sigma_data=SIGMA_DATA,
                                   edm_timestep_scale=EDM_TIMESTEP_SCALE)
    ema_teacher.save_pretrained(out)
    meta = json.loads((out / "distill_teacher.json").read_text())
    assert meta.get("edm_timestep_scale") == EDM_TIMESTEP_SCALE, meta  # the inference timestep must round-trip
    assert meta.get("null_class") == null_class, meta  # CFG's null label must round-trip
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv else sys.argv[1:]))),
        "args": vars(args),
        "dataset": args.dataset,
        "n_data": n_data,
        "params": n_params,
        "conditional": bool(args.conditional),
        "null_class": null_class,
        "label_dropout": args.label_dropout if args.conditional else None,
        "steps": args.steps,
        "seed": args.seed,
        "wall_time_s": round(wall, 1),
        "s_per_step": round(wall / args.steps, 4),
        "final_loss": curve[-1]["loss"],
        "loss_curve": curve,
        "saved_weights": "ema",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    if args.samples:
        sample_grid(ema_teacher, args.samples, seed=args.seed, guidance=args.guidance)
    print(f"saved EMA teacher ({n_params / 1e6:.2f} M params) to {out}; {args.steps} steps in {wall:.0f} s, "
          f"final loss {curve[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
