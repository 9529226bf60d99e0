"""Ligero's own CPU kernels, compiled once per machine and cached under LIGERO_CACHE/kernels.

The cache key names the source, torch, the compiler's version and the CPU's instruction-set flags: the code is
built with -march=native, so a cache shared between machines never hands one CPU another's instructions.
Only a missing compiler (or ninja) or a CPU without AVX-512 makes `cpu_kernels()` return None (said once on
stderr); callers then use torch's own ops: same results, slower decode. A compiler that fails on the kernels
is an error, not a fallback. LIGERO_NO_KERNELS=1 turns the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils import cpp_extension

from ligero.errors import LigeroError
from ligero.paths import cache_root

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")

MAX_KERNEL_ROWS = 8  # decode batches up to this many activation rows go to the kernels; more rows use torch's GEMM

# Instruction sets the kernels cannot be compiled without (VNNI is optional: it only speeds int4 and ternary up).
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "f16c")
_VNNI_FLAG = "avx512_vnni"


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux reports them (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _compiler() -> str | None:
    """Path of the C++ compiler torch's extension builder runs ($CXX, else c++), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _compiler_version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0] if result.stdout else compiler


def _unavailable_reason(flags: frozenset[str]) -> str | None:
    """Why the kernels cannot run here (disabled, no compiler, unsupported CPU), or None when they can."""
    if os.environ.get("LIGERO_NO_KERNELS") == "1":
        return "LIGERO_NO_KERNELS=1"
    missing = [f for f in _REQUIRED_FLAGS if f not in flags]
    if missing:
        return f"CPU without {', '.join(missing)}"
    if _compiler() is None:
        return "no C++ compiler found"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return None


def build_key(flags: frozenset[str], compiler_version: str) -> str:
    """Digest of everything the compiled module depends on: source, torch, compiler and CPU flags."""
    parts = [_SOURCE.read_bytes(), torch.__version__.encode(), compiler_version.encode(),
             " ".join(sorted(flags)).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


@lru_cache(maxsize=1)
def cpu_kernels():
    """The compiled extension module, or None where the kernels cannot run here (`warm()` says why)."""
    flags = cpu_flags()
    reason = _unavailable_reason(flags)
    if reason is not None:
        if reason != "LIGERO_NO_KERNELS=1":  # asked for: nothing to report
            print(f"ligero: CPU kernels unavailable ({reason}); using torch ops (slower decode)", file=sys.stderr,
                  flush=True)
        return None
    digest = build_key(flags, _compiler_version(_compiler()))
    build = cache_root() / "kernels" / f"cpu-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print("ligero: compiling CPU kernels once (about 30 s)", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name=f"ligero_cpu_{digest}", sources=[str(_SOURCE)], build_directory=str(build),
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # a compiler is here and the CPU fits: this is a bug
        raise LigeroError(f"Ligero's CPU kernels failed to build in {build} ({str(exc).splitlines()[0][:160]}); "
                          "report it, and set LIGERO_NO_KERNELS=1 to run with torch ops meanwhile") from None


def warm() -> str:
    """Load (compiling on first use) the kernels now, so no request or measurement pays the build; returns a
    short description of the code path decode runs here, e.g. 'AVX-512 VNNI kernels'."""
    if cpu_kernels() is None:
        return f"torch ops ({_unavailable_reason(cpu_flags())})"
    return "AVX-512 VNNI kernels" if _VNNI_FLAG in cpu_flags() else "AVX-512 kernels"
