"""What every published number carries: where and how it was measured (docs/design.md §3.6; issue "evaluation
you can trust"). ``run_environment()`` is stamped into every record a ``distill`` command or benchmark script writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_environment", "config_hash", "peak_rss_mb", "git_commit"]

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when tracked files differ), or ``None`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def config_hash(cfg: Any) -> str:
    """sha256 (16 hex digits) of a config's canonical JSON."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_environment() -> dict[str, Any]:
    """Machine, library versions, threads and commit."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "git_commit": git_commit(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cpus" + (f", {cuda}" if cuda else ""),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
