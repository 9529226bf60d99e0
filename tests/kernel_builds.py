"""The kernel tiers below this CPU's own, compiled in a child process from the start of the session.

tests/models/test_kernel_tiers.py builds the portable tier (and AVX2 on AVX-512 CPUs): about a minute each on one
core. conftest starts a child process that compiles them into the kernel cache when the session starts, so the
tier tests find them built. A plain module (not conftest): the test file imports it by name.
"""

from __future__ import annotations

import subprocess
import sys

import ligero.kernels as kernels

_build: subprocess.Popen | None = None


def lower_tiers() -> list[str]:
    """The tiers below the one this CPU picks: portable C++ everywhere, AVX2 too on AVX-512 CPUs."""
    if kernels._unavailable_reason() is not None:
        return []
    native = kernels.load_tier("auto").isa()
    return ["generic"] + (["avx2"] if native.startswith("avx512") else [])


def _built(tier: str) -> bool:
    return any(kernels.build_dir(tier).glob("*.so"))


def start_tier_build() -> None:
    global _build
    tiers = [t for t in lower_tiers() if not _built(t)]
    if tiers:
        script = "import sys, ligero.kernels as k; [k.load_tier(t) for t in sys.argv[1:]]"
        _build = subprocess.Popen([sys.executable, "-c", script, *tiers], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)


def wait_for_tier_build() -> None:
    """Let the child finish (a tier it failed to build is then built, or fails, in the test itself)."""
    if _build is not None:
        _build.wait()
