"""The memory estimate (distill.memory, ``distill train --dry-run``): the live-tensor probe counts what it should,
the per-operator extrapolation is exact for affine timelines, and on a real config it predicts the probed peak at the
configured batch and counts weights and optimizer state exactly."""

import json

import torch

from distill.config import load_config
from distill.memory import LiveTensorProbe, _probe, estimate_memory, extrapolate_peak, storage_bytes

RING_CD = ["student.hidden=32", "student.depth=2", "trainer.num_threads=1", "eval.every=0"]


def test_probe_counts_live_storages_once_and_releases_them():
    keep = torch.zeros(1000)
    with LiveTensorProbe(exclude={("cpu", keep.untyped_storage().data_ptr())}) as probe:
        a = torch.ones(256)  # 1 KiB
        b = a.view(16, 16)  # a view: no new storage
        keep.add_(1.0)  # in place on an excluded storage: free
        c = torch.ones(512)  # 2 KiB
        del a, b
        d = c * 2  # the sweep runs at this operator: a's storage is gone
        del c, d
        torch.ones(1)  # the sweep at this operator releases c and d; its own 4-byte output is counted
    assert probe.peak == 2048 + 2048  # c and d (a was released at d's operator)
    assert probe.timeline == [1024, 1024, 1024, 3072, 4096, 4]
    assert storage_bytes([torch.zeros(10), torch.zeros(10)]) == 80


def test_extrapolation_is_per_operator():
    """At a small batch the peak is the gradients after backward, at a large one the activations before it: the
    per-operator extrapolation follows the switch, a peak-of-peaks line would not."""
    act_small, act_big = [5, 8], [9, 8]  # live bytes after [forward, backward] at batches 2 and 4
    peak, slope, fixed = extrapolate_peak(act_small, act_big, 2, 4, 16)
    assert peak == 5 + 2 * 14 and slope == 2 and fixed == 1
    assert extrapolate_peak(act_small, act_big, 2, 4, 2)[0] == 8
    peak_of_peaks = 8 + (9 - 8) / 2 * 14
    assert peak != peak_of_peaks


def test_estimate_matches_the_probe_at_the_configured_batch_and_counts_state_exactly(tmp_path):
    cfg = load_config("configs/ring_cd.yaml", [*RING_CD, f"out_dir={tmp_path}", "data.batch_size=64"])
    est = estimate_memory(cfg)
    module, timeline, _ = _probe(cfg, 64)  # the real thing at the configured batch
    assert abs(est["step"]["total"] - max(timeline)) <= 0.05 * max(timeline)
    params = sum(p.numel() * p.element_size() for p in module.student.parameters())
    assert est["weights"]["student"] == params + sum(b.numel() * b.element_size() for b in module.student.buffers())
    n_tensors = len(list(module.student.parameters()))
    assert 2 * params <= est["optimizer"] <= 2 * params + 8 * n_tensors  # Adam's two moments + one step scalar each
    assert est["gradients"] == params and est["trainable_parameters"] == sum(p.numel() for p in
                                                                             module.student.parameters())
    assert est["total"] == sum(est["weights"].values()) + est["optimizer"] + est["step"]["total"] + \
        est["runtime_overhead"]


def test_dry_run_writes_the_estimate_and_trains_nothing(tmp_path, capsys):
    from distill.cli import main

    assert main(["train", "configs/ring_cd.yaml", *RING_CD, f"out_dir={tmp_path}", "data.batch_size=32",
                 "--dry-run"]) == 0
    est = json.loads((tmp_path / "memory_estimate.json").read_text())
    assert est["batch_size"] == 32 and est["total"] > 0 and est["config"]["name"] == "ring_cd"
    assert not (tmp_path / "checkpoints").exists()
    assert "memory estimate at batch 32" in capsys.readouterr().out
