"""Ligero's own CPU kernels, compiled once per machine and cached under LIGERO_CACHE/kernels.

If the compiler or the CPU features (AVX-512) are missing, `cpu_kernels()` returns None and callers fall
back to torch's own ops: results are the same, only slower.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def _cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f " in flags or " avx512f\n" in flags


@lru_cache(maxsize=1)
def cpu_kernels():
    """The compiled extension module, or None when it cannot be built here (LIGERO_NO_KERNELS=1 disables)."""
    if os.environ.get("LIGERO_NO_KERNELS") == "1" or not _cpu_has_avx512():
        return None
    from torch.utils.cpp_extension import load

    from ligero.models.registry import cache_root

    digest = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    build = cache_root() / "kernels" / f"cpu-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        if not any(build.glob("*.so")):
            print("ligero: compiling CPU kernels once (about 30 s)", file=sys.stderr, flush=True)
        return load(name=f"ligero_cpu_{digest}", sources=[str(_SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, unsupported flags: stay correct with torch's ops
        warnings.warn(f"Ligero CPU kernels unavailable ({type(exc).__name__}); using torch ops (slower decode)")
        return None
