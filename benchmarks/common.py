"""Shared by the benchmark scripts: machine description and a check that the machine was otherwise idle."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from ligero.eval.speed import ForeignLoad, cpu_jiffies, own_cpu_jiffies  # noqa: F401 (the scripts' names)

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    # Changes to the code measured (not to docs/, which the benchmarks themselves rewrite).
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "commit": (commit.stdout.strip() or "uncommitted") + ("+changes" if dirty else "")}
