"""Diagnostic for guidance distillation: how close is a guidance-conditioned student to the *guided teacher* at w?

FID against the real digits (the issue's bar) cannot tell a student that reproduces the guided teacher from one that
ignores the guidance: a less-guided student is closer to the data and scores *lower*. So this script also measures the
Fréchet distance (digits-classifier features) between the student's and the teacher's samples at the same w (same
evaluation seed: same labels, same initial noise), overall and per class, next to the teacher's own seed-to-seed
distance (teacher seed 0 vs seed 1) as the floor.

    PYTHONPATH=. python docs/bench/guidance/student_vs_teacher.py <export folder> <out.json>
"""
import json
import sys

import torch

torch.set_num_threads(1)
from distill.evaluate import eval_labels, generate_student, generate_teacher  # noqa: E402
from distill.export import export_plan, load_exported  # noqa: E402
from distill.features import DigitsFeatures  # noqa: E402
from distill.fid import frechet_distance, gaussian_stats, per_class_fid  # noqa: E402
from teachers import TEACHERS  # noqa: E402

N = 2000


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


student, sampling = load_exported(sys.argv[1])
plan = export_plan(sampling)
teacher = TEACHERS.build("digits_cond")
ext = DigitsFeatures()
out = []
for w in (1.0, 2.0, 3.0):
    lab0 = eval_labels(N, 0, 10)
    t0 = ext(generate_teacher(teacher, "heun", 35, "karras", N, 0, w)[0])
    row = {"guidance": w, "n": N, "features": ext.describe(), "teacher": "heun 35 steps-equivalent, karras, seed 0"}
    if w != 1.0:
        t1 = ext(generate_teacher(teacher, "heun", 35, "karras", N, 1, w)[0])
        row["teacher_seed0_vs_seed1"] = {"fd": fd(t0, t1), "per_class_fd_mean": per_class_fid(
            t1, eval_labels(N, 1, 10), t0, lab0, 10)["per_class_fid_mean"]}
    for k in (1, 2):
        s = ext(generate_student(student, k, N, 0, plan, num_classes=10, guidance=w)[0])
        pc = per_class_fid(s, lab0, t0, lab0, 10)
        row[f"student_{k}nfe_vs_teacher"] = {"fd": fd(s, t0), "per_class_fd_mean": pc["per_class_fid_mean"],
                                             "per_class_fd": pc["per_class_fid"]}
    out.append(row)
    print(json.dumps({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "per_class_fd"})
                      for k, v in row.items()}), flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
