"""Shared by the benchmark scripts: machine description and a check that the machine was otherwise idle."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def own_cpu_jiffies() -> int:
    """CPU time of this process and of the children it has waited for (a benchmark's own measurement children)."""
    t = os.times()
    return int((t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


class ForeignLoad:
    """Share of the machine's CPU time used by other processes between start() and share()."""

    def start(self) -> "ForeignLoad":
        self.busy, self.total = cpu_jiffies()
        self.own = own_cpu_jiffies()
        return self

    def share(self) -> float:
        busy, total = cpu_jiffies()
        foreign = (busy - self.busy) - (own_cpu_jiffies() - self.own)
        return max(0, foreign) / max(1, total - self.total)


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
