"""Train the digits classifier whose 64-d penultimate features define the project's digits FID.

A small CNN (:class:`distill.features.DigitsClassifier`) on scikit-learn's 1,797 8x8 digits in ``[-1, 1]``: a fixed
stratified hold-out split, light augmentation (random +-1 px shifts, small Gaussian pixel noise) so the features
generalise to generated digits, a fixed seed, about a minute on 2 CPU cores. The model trained on the training split
is the one kept (its held-out accuracy is the honest number); weights go to
``distill/assets/digits_classifier.safetensors``, the architecture, split, accuracy and command to the JSON beside it,
and the statistics of all real digits under it to ``distill/assets/digits_reference_stats.npz``.

    python scripts/train_classifier.py            # writes the assets
    python scripts/train_classifier.py --dry-run  # trains and reports only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split
from torch import Tensor

from distill.core.data import load_digits_tensor
from distill.features import DIGITS_CLASSIFIER_WEIGHTS, DigitsClassifier, DigitsFeatures, file_sha256
from distill.fid import DIGITS_REFERENCE_FILE, compute_digits_reference_stats


def augment(x: Tensor, generator: torch.Generator, max_shift: int = 1, noise_std: float = 0.05) -> Tensor:
    """Random integer shifts in ``[-max_shift, max_shift]`` per axis (background -1 fills in) plus pixel noise.

    Args:
        x: ``[B, 1, H, W]`` in ``[-1, 1]``.
    """
    b, c, h, w = x.shape
    p = max_shift
    padded = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)  # -1 is the digits' background
    dy = torch.randint(0, 2 * p + 1, (b, 1, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (b, 1, 1, 1), generator=generator)
    # Crop an H x W window at offset (dy, dx) of each padded image: gather rows, then columns.
    rows = (dy + torch.arange(h).reshape(1, 1, h, 1)).expand(b, c, h, w + 2 * p)
    cols = (dx + torch.arange(w).reshape(1, 1, 1, w)).expand(b, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    return out + noise_std * torch.randn(out.shape, generator=generator)


def accuracy(model: DigitsClassifier, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DIGITS_CLASSIFIER_WEIGHTS, help="safetensors path (JSON beside it)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-size", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--noise-std", type=float, default=0.05)
    ap.add_argument("--max-shift", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="train and report, write nothing")
    ap.add_argument("--reference-only", action="store_true", help="only rewrite the shipped reference statistics")
    args = ap.parse_args(argv)
    if args.reference_only:
        write_reference_stats()
        return 0

    torch.manual_seed(args.seed)
    images, labels = load_digits_tensor()
    idx = torch.arange(len(labels))
    tr, te = train_test_split(
        idx.numpy(), test_size=args.test_size, stratify=labels.numpy(), random_state=args.split_seed
    )
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    x_tr, y_tr, x_te, y_te = images[tr], labels[tr], images[te], labels[te]

    arch = {"channels": [32, 64], "hidden": 64, "num_classes": 10, "dropout": 0.25, "image_size": 8}
    model = DigitsClassifier(tuple(arch["channels"]), arch["hidden"], arch["num_classes"], arch["dropout"], 8)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(tr) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=gen)
        for s in range(0, len(tr), args.batch_size):
            b = perm[s : s + args.batch_size]
            xb = augment(x_tr[b], gen, args.max_shift, args.noise_std)
            loss = torch.nn.functional.cross_entropy(model(xb), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out acc {accuracy(model, x_te, y_te):.4f}")
    train_s = time.perf_counter() - t0

    held_out = accuracy(model, x_te, y_te)
    train_acc = accuracy(model, x_tr, y_tr)
    all_acc = accuracy(model, images, labels)
    print(
        f"held-out accuracy {held_out:.4f} ({int(round(held_out * len(te)))}/{len(te)}), "
        f"train {train_acc:.4f}, all digits {all_acc:.4f}, {train_s:.1f} s"
    )
    if args.dry_run:
        return 0

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    record = {
        "architecture": arch,
        "input": "[B, 1, 8, 8] float in [-1, 1] (sklearn digits x / 8 - 1); features = penultimate ReLU layer",
        "held_out_accuracy": held_out,
        "held_out_n": len(te),
        "train_accuracy": train_acc,
        "all_digits_accuracy": all_acc,
        "split": {
            "kind": "stratified",
            "test_size": args.test_size,
            "split_seed": args.split_seed,
            "n_train": len(tr),
            "n_test": len(te),
        },
        "training": {
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": "OneCycleLR",
            "augmentation": {"max_shift_px": args.max_shift, "noise_std": args.noise_std},
            "seconds": round(train_s, 1),
            "torch": torch.__version__,
        },
        "command": "python " + " ".join(shlex.quote(a) for a in ["scripts/train_classifier.py", *sys.argv[1:]]),
        "weights_sha256": file_sha256(out),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    if out == DIGITS_CLASSIFIER_WEIGHTS:
        write_reference_stats()
    return 0


def write_reference_stats() -> None:
    """Ship the real-digits reference statistics of the shipped classifier (fixed bytes, so a fixed hash)."""
    ref = compute_digits_reference_stats(DigitsFeatures())
    ref.save(DIGITS_REFERENCE_FILE)
    print(f"wrote {DIGITS_REFERENCE_FILE} (features {ref.features}, sha256 {ref.sha256[:12]})")


if __name__ == "__main__":
    raise SystemExit(main())
