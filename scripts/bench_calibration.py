"""Metric calibration: what the two embedded metrics say about sample sets whose quality is known.

* Digits FID (the shipped classifier's features, 2,000 samples against all real digits): resampled real digits (the
  floor at this sample count), Gaussian noise, blurred digits (3x3 Gaussian kernel, sigma = 1 px), digits 0-4 only.
* Ring sliced W1 (10,000 samples against the fixed exact reference set the exact scorer uses): fresh exact sample
  sets (the noise floor), and the off-mode fraction of exact samples (0 up to 5-sigma tails).

Each case over ``--seeds`` independent draws (``distill.core.streams``). Writes one JSON record
(``docs/bench/calibration.json``) that ``scripts/report.py`` renders.

    python scripts/bench_calibration.py --json docs/bench/calibration.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.core.data import load_digits_tensor  # noqa: E402
from distill.core.streams import generator  # noqa: E402
from distill.records import run_environment  # noqa: E402
from distill.scorers import build_scorer  # noqa: E402
from teachers import build_teacher  # noqa: E402


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([0.2741, 0.4519, 0.2741])  # 3-tap Gaussian, sigma = 1 px, normalised
    kernel = (k[:, None] * k[None, :])[None, None]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--n-digits", type=int, default=2000)
    ap.add_argument("--n-ring", type=int, default=10_000)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "calibration.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    images, labels = load_digits_tensor()
    digits = build_scorer(build_teacher({"name": "digits"}), "digits")
    cases = {
        "resampled real digits": lambda g: images[torch.randint(len(images), (args.n_digits,), generator=g)],
        "Gaussian noise (std 0.5, clipped to [-1, 1])":
            lambda g: (0.5 * torch.randn((args.n_digits, *images.shape[1:]), generator=g)).clamp(-1, 1),
        "blurred digits (3x3 Gaussian, sigma 1 px)":
            lambda g: blur(images[torch.randint(len(images), (args.n_digits,), generator=g)]),
        "digits 0-4 only": lambda g: images[labels < 5][torch.randint(int((labels < 5).sum()), (args.n_digits,),
                                                                       generator=g)],
    }
    out: dict = {"script": "scripts/bench_calibration.py", "environment": run_environment(), "seeds": args.seeds,
                 "digits": {}, "ring": {}}
    label = None
    for name, make in cases.items():
        scores = []
        for s in range(args.seeds):
            rec = digits(make(generator(s, "calibration", name)))
            scores.append(rec["score"])
            label = rec.get("label", label)
        out["digits"][name] = {"mean": statistics.mean(scores), "sd": statistics.stdev(scores), "scores": scores}
        print(f"digits FID, {name}: {statistics.mean(scores):.4g} ± {statistics.stdev(scores):.2g}", flush=True)
    out["digits_label"] = label
    teacher = build_teacher({"name": "ring"})
    ring = build_scorer(teacher, "auto")
    sw, off = [], []
    for s in range(args.seeds):
        rec = ring(teacher.sample(args.n_ring, generator=generator(s, "calibration", "ring")))
        sw.append(rec["score"])
        off.append(rec["off"])
    out["ring"] = {"exact vs reference sw1": {"mean": statistics.mean(sw), "sd": statistics.stdev(sw), "scores": sw},
                   "exact off-mode fraction": {"mean": statistics.mean(off), "sd": statistics.stdev(off),
                                               "scores": off},
                   "label": rec.get("label")}
    print(f"ring: exact vs reference SW1 {statistics.mean(sw):.4g} ± {statistics.stdev(sw):.2g}", flush=True)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
