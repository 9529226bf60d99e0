"""Ligero's own CPU kernels, compiled once per machine and cached under LIGERO_CACHE/kernels.

The code is built with -march=native and picks its instruction-set tier when compiled: AVX-512 (with VNNI where
the CPU has it), AVX2 + FMA + F16C, or portable C++ for any other CPU (ARM included). The cache key names the
source, torch, the compiler's version, the CPU's flags and the tier asked for, so a cache shared between
machines never hands one CPU another's instructions. LIGERO_KERNELS=avx2 or =generic builds a lower tier than
the CPU allows (to test or measure it); LIGERO_NO_KERNELS=1 turns the kernels off. Only a missing compiler (or
ninja) makes `cpu_kernels()` return None without being asked to (said once on stderr); callers then use torch's
own ops: same results, much slower decode. A compiler that fails on the kernels is an error, not a fallback.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils import cpp_extension

from ligero.errors import LigeroError
from ligero.paths import cache_root

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")

class NativeOp(NamedTuple):
    """One projection as the native decode step runs it: a kernel (`kind`: f32, int8, int8x8, int4, lut4, lut8,
    ternary, ggml, half) with its tensors in the kernel's argument order, plus what that kernel needs besides."""

    kind: str
    tensors: list
    group: int = 0  # int4: group size; lut4: block size; ggml: the GGML type id
    act8: bool = False  # int8, int4: int8 activations per 32 inputs
    tensor_scale: float = 1.0  # lut4: one tensor scale (a row-scale tensor follows the tensors otherwise)
    act_fp8: int = 0  # activations rounded to FP8 per token first: 0 no, 1 E4M3, 2 E5M2
    out_features: int = 0  # int4, int8x8: output rows (their kernel layouts pad them to bundles of 8)


# = LinearKind in the C++
NATIVE_KINDS = {"f32": 1, "int8": 2, "int4": 3, "lut4": 4, "lut8": 5, "ternary": 6, "ggml": 7, "half": 8,
                "int8x8": 9}

# Decode batches up to this many activation rows go to the kernels (a server's continuous batch: 16 rows took 0.85x
# the time per row of 8 on SmolLM2); more rows use torch's GEMM (or the kernels' prefill path where it is faster).
MAX_KERNEL_ROWS = 16

# LIGERO_KERNELS value -> extra compiler flags. "auto" takes the best tier the CPU has; the others cap it.
TIERS = {"auto": [], "avx2": ["-mno-avx512f", "-DLIGERO_FORCE_AVX2"], "generic": ["-DLIGERO_FORCE_GENERIC"]}
_ISA_NAMES = {"avx512-vnni": "AVX-512 VNNI kernels", "avx512": "AVX-512 kernels", "avx2": "AVX2 kernels",
              "generic": "portable C++ kernels"}


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


def requested_tier() -> str:
    """The tier LIGERO_KERNELS asks for (default "auto"); an unknown value is an error naming the choices."""
    tier = os.environ.get("LIGERO_KERNELS", "auto").strip().lower() or "auto"
    if tier not in TIERS:
        raise LigeroError(f"LIGERO_KERNELS={tier!r} is not a kernel tier; use one of {', '.join(TIERS)} "
                          "(or LIGERO_NO_KERNELS=1 for torch ops)")
    return tier


def _unavailable_reason() -> str | None:
    """Why the kernels cannot run here (switched off, no compiler, no ninja), or None when they can."""
    if os.environ.get("LIGERO_NO_KERNELS") == "1":
        return "LIGERO_NO_KERNELS=1"
    if _compiler() is None:
        return "no C++ compiler found"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return None


def build_key(flags: frozenset[str], compiler_version: str, tier: str = "auto") -> str:
    """Digest of everything the compiled module depends on: source, torch, compiler, CPU flags and tier."""
    parts = [_SOURCE.read_bytes(), torch.__version__.encode(), compiler_version.encode(),
             " ".join(sorted(flags)).encode(), tier.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


@lru_cache(maxsize=1)
def cpu_kernels():
    """The compiled extension module for the tier LIGERO_KERNELS asks for, or None where the kernels cannot run
    here (`warm()` says why)."""
    reason = _unavailable_reason()
    if reason is None:
        return load_tier(requested_tier())
    if reason != "LIGERO_NO_KERNELS=1":  # asked for: nothing to report
        print(f"ligero: CPU kernels unavailable ({reason}); using torch ops (much slower decode)", file=sys.stderr,
              flush=True)
    return None


def build_dir(tier: str) -> Path:
    """The cache folder of this machine's build of `tier` (named by build_key)."""
    digest = build_key(cpu_flags(), _compiler_version(_compiler()), tier)
    return cache_root() / "kernels" / f"cpu-{tier}-{digest}"


@contextmanager
def build_lock(build: Path):
    """Hold the exclusive right to build (or check) `build`, waiting while another process holds it.

    torch's own lock (a `lock` file it deletes when its build ends) stays behind when a build is killed, and every
    later process would then wait on it forever. This lock is an flock the kernel drops when its holder exits, however
    it exits; whoever holds it knows a `lock` file there was left by a dead build and removes it."""
    with open(build.parent / f"{build.name}.flock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"ligero: waiting for another process to finish building {build.name}", file=sys.stderr,
                  flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            print(f"ligero: removing {stale}, left by a kernel build that did not finish", file=sys.stderr,
                  flush=True)
            stale.unlink(missing_ok=True)
        yield  # the flock ends with the file


@lru_cache(maxsize=None)
def load_tier(tier: str):
    """Compile (once; cached on disk) and load the kernels capped at `tier` ("auto", "avx2", "generic")."""
    build = build_dir(tier)
    build.mkdir(parents=True, exist_ok=True)
    try:
        with build_lock(build):
            if not any(build.glob("*.so")):
                print(f"ligero: compiling CPU kernels ({tier}) once (about a minute)", file=sys.stderr, flush=True)
            return cpp_extension.load(name=f"ligero_cpu_{tier}_{build.name.rsplit('-', 1)[1]}", sources=[str(_SOURCE)],
                                      build_directory=str(build),
                                      extra_cflags=["-O3", "-march=native", "-fopenmp", *TIERS[tier]],
                                      verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # a compiler is here: this is a bug
        raise LigeroError(f"Ligero's CPU kernels failed to build in {build} ({str(exc).splitlines()[0][:160]}); "
                          "report it, and set LIGERO_NO_KERNELS=1 to run with torch ops meanwhile") from None


def cache_clear() -> None:
    """Forget what was decided and loaded (tests change the environment between calls)."""
    cpu_kernels.cache_clear()
    load_tier.cache_clear()


def warm() -> str:
    """Load (compiling on first use) the kernels now, so no request or measurement pays the build; returns a
    short description of the code path decode runs here, e.g. 'AVX2 kernels'."""
    ext = cpu_kernels()
    if ext is None:
        return f"torch ops ({_unavailable_reason()})"
    return _ISA_NAMES.get(ext.isa(), ext.isa())
