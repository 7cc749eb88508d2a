"""docs/distil-your-model.md runs as written: every ```bash and ```python block, in order, in one fresh folder, on the
tiny random SD-style pipeline the guide itself creates (``distill`` is this checkout's CLI, ``python`` this
interpreter). Then the artefacts the guide promises exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "distil-your-model.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_has_every_step():
    text = "\n".join(code for _, code in blocks())
    for step in ("make_tiny_teacher.py", "--dry-run", "distill train my_run.yaml", "distill export",
                 "distill eval", "from_pretrained"):
        assert step in text, step


def test_every_command_of_the_guide_runs(tmp_path):
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    prelude = f'set -euo pipefail\ndistill() {{ "{sys.executable}" -m distill.cli "$@"; }}\n' \
              f'python() {{ "{sys.executable}" "$@"; }}\n'
    for lang, code in blocks():
        if lang == "bash":
            cmd = ["bash", "-c", prelude + code]
        else:
            cmd = [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"guide block failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
    run = tmp_path / "runs" / "my_run"
    est = json.loads((run / "memory_estimate.json").read_text())
    assert est["batch_size"] == 4 and est["total"] > 0
    rows = json.loads((run / "eval.json").read_text())
    assert rows  # the final evaluation: student at 1 and 2 NFE next to the teacher
    export = tmp_path / "exports" / "my_student"
    for part in ("model.safetensors", "sampling.json", "README.md", "diffusers/model_index.json"):
        assert (export / part).exists(), part
    assert len(list((tmp_path / "teacher_samples" / "images").glob("*.png"))) == 64
