"""Per-class FID noise floor: 2,000 real digits resampled (with replacement) per evaluation label vs the real digits."""
import json
import sys

import torch

torch.set_num_threads(1)
from distill.core.data import load_digits_tensor  # noqa: E402
from distill.evaluate import eval_labels  # noqa: E402
from distill.scorers import FIDScorer  # noqa: E402

images, labels = load_digits_tensor()
sc = FIDScorer("digits")
recs = []
for seed in (0, 1, 2):
    lab = eval_labels(2000, seed, 10)  # the labels evaluation seed `seed` conditions on
    g = torch.Generator().manual_seed(100 + seed)
    idx = torch.empty(2000, dtype=torch.long)
    for c in range(10):
        pool, sel = (labels == c).nonzero().flatten(), (lab == c).nonzero().flatten()
        idx[sel] = pool[torch.randint(len(pool), (len(sel),), generator=g)]
    recs.append(sc(images[idx], labels=lab, nfe=0, sampler="resampled real digits", model="real", seed=seed))
json.dump(recs, open(sys.argv[1], "w"), indent=1)
print([(r["seed"], round(r["score"], 3), round(r["extra"]["per_class_fid_mean"], 3)) for r in recs])
