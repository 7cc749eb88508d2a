"""Lightning DDP on CPU (gloo, 2 processes): gradients are all-reduced, so both ranks end with the same student even
though each draws different data. DDP re-executes the script for rank 1, so it runs in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, lightning as L
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from distill.config import load_config
        from distill.train import build_module, make_trainer
        out = Path({str(tmp_path)!r})
        cfg = load_config({str(ROOT / "configs" / "ring_cd.yaml")!r}, [
            "trainer.max_steps=8", "eval.every=0", "trainer.grid_every=0", "trainer.ckpt_every=0",
            f"out_dir={{out / 'run'}}", "trainer.progress_bar=false", "trainer.devices=2", "trainer.strategy=ddp",
            "student.hidden=32", "student.depth=2", "trainer.num_threads=null", "data.batch_size=64"])

        class Dump(L.Callback):
            def on_train_end(self, trainer, m):
                torch.save({{k: v.clone() for k, v in m.student.state_dict().items()}},
                           out / f"rank{{trainer.global_rank}}.pt")
                torch.save(m.data.batch(0, trainer.global_rank)["x0"], out / f"data{{trainer.global_rank}}.pt")

        make_trainer(cfg, out / "run", [Dump()]).fit(build_module(cfg))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the ranks really saw different data, so equality comes from the all-reduce, not from identical inputs
    assert not torch.equal(torch.load(tmp_path / "data0.pt"), torch.load(tmp_path / "data1.pt"))
