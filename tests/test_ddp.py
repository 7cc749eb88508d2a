"""Lightning DDP on CPU (gloo, 2 processes) against 1 process at the same global batch, for a one-phase loss (CD)
and a two-optimizer loss (DMD2, whose critic-only iterations leave the generator unused: the classic
unused-parameter failure of GAN-style modules under DDP).

Per-sample draws and data are functions of ``(seed, iteration, global sample index)`` (``losses.base.Batch``), and
each phase's gradients are averaged over processes (``distill.strategies``), so both runs must end with the same
weights up to float summation order. DDP re-executes the script for rank 1, so it runs in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "cd": ("ring_cd.yaml", ["student.hidden=32", "student.depth=2", "loss.num_levels=10"]),
    # every DMD2 stage within 10 iterations: regression (0-1), fake warm-up (2), then TTUR 2 with the pair term kept
    "dmd2": ("ring_dmd2.yaml", ["student.hidden=32", "student.depth=2", "loss.fake_hidden=32", "loss.fake_depth=2",
                                "loss.critic_updates=2", "loss.regression_steps=2", "loss.regression_pairs=64",
                                "loss.regression_nfe=5", "loss.fake_warmup=1"]),
}


def run(tmp: Path, case: str, devices: int) -> dict[str, torch.Tensor]:
    config, extra = CASES[case]
    out = tmp / f"{case}_{devices}"
    script = tmp / f"ddp_{case}_{devices}.py"
    strategy = "ddp" if devices > 1 else "auto"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, lightning as L
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from distill.config import load_config
        from distill.train import build_module, make_trainer
        out = Path({str(out)!r})
        cfg = load_config({str(ROOT / "configs" / config)!r}, [
            "trainer.max_steps=10", "eval.every=0", "trainer.grid_every=0", "trainer.ckpt_every=0",
            f"out_dir={{out}}", "trainer.progress_bar=false", "trainer.devices={devices}",
            "trainer.strategy={strategy}", "trainer.num_threads=1", "data.batch_size=64",
            "data.pair_cache_dir={tmp / 'pairs'}"] + {extra!r})

        class Dump(L.Callback):
            def on_train_end(self, trainer, m):
                torch.save({{k: v.clone() for k, v in m.state_dict().items()}}, out / f"rank{{trainer.global_rank}}.pt")

        L.seed_everything(cfg.seed, verbose=False)
        make_trainer(cfg, out, [Dump()]).fit(build_module(cfg))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    states = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(devices)]
    for other in states[1:]:  # every rank holds the same weights
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
    return states[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, case):
    one, two = run(tmp_path, case, 1), run(tmp_path, case, 2)
    assert one.keys() == two.keys()
    trained = [k for k in one if k.startswith(("student.", "ema.", "loss.")) and one[k].is_floating_point()]
    assert trained
    init = run_init(case)
    moved = 0
    for k in trained:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5, msg=f"{case}: {k} differs")
        moved += int(k in init and not torch.allclose(one[k], init[k]))
    assert moved > 0, f"{case}: training did not move the weights, so the comparison proves nothing"


def run_init(case: str) -> dict[str, torch.Tensor]:
    """The module's weights before training (same seed), to check that the runs above really trained."""
    import lightning as L

    from distill.config import load_config
    from distill.train import build_module

    config, extra = CASES[case]
    cfg = load_config(ROOT / "configs" / config, ["out_dir=/tmp/unused"] + extra)
    L.seed_everything(cfg.seed, verbose=False)
    return {k: v.clone() for k, v in build_module(cfg).state_dict().items() if k.startswith("student.")}
