"""The kernel tiers below this CPU's own, compiled in a child process from the start of the session.

tests/models/test_kernel_tiers.py builds the portable tier (and AVX2 on AVX-512 CPUs): about a minute each on one
core. conftest starts a child process (at the lowest CPU priority) that compiles them into the kernel cache when the
session starts, so the tier tests find them built. A plain module (not conftest): the test file imports it by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import ligero.kernels as kernels

_build: subprocess.Popen | None = None
_log = None  # the child's stderr, read when it failed
_started = 0.0
WAIT_S = 600  # two tiers take ~1-3 min each once the tests leave the CPU to the child


def lower_tiers() -> list[str]:
    """The tiers below the one this CPU picks: portable C++ everywhere, AVX2 too on AVX-512 CPUs."""
    if kernels._unavailable_reason() is not None:
        return []
    native = kernels.load_tier("auto").isa()
    return ["generic"] + (["avx2"] if native.startswith("avx512") else [])


def start_tier_build() -> None:
    global _build, _log, _started
    # Always: a build made from another checkout (another source path) is rebuilt, and an up-to-date one only
    # checked (~1 s).
    tiers = lower_tiers()
    if tiers:
        # At the lowest priority: the compiler then runs on the cycles the (mostly single-threaded) tests leave
        # idle instead of slowing the ones that use both cores (the first test's audit, ~1 min slower otherwise).
        script = "import os; os.nice(19); import sys, ligero.kernels as k; [k.load_tier(t) for t in sys.argv[1:]]"
        _log = tempfile.TemporaryFile()
        _started = time.monotonic()
        # In a session of its own, so a stuck build is killed with its compiler (see wait_for_tier_build).
        _build = subprocess.Popen([sys.executable, "-c", script, *tiers], stdout=subprocess.DEVNULL, stderr=_log,
                                  start_new_session=True)


def wait_for_tier_build() -> None:
    """Let the child finish (a tier it failed to build is then built, or fails, in the test itself); a failed child
    is reported as a warning with its stderr, since the test then pays the build. A child still running after
    WAIT_S is killed with its compiler, and the warning shows what held the CPU meanwhile."""
    global _build, _log
    if _build is None:
        return
    try:
        code = _build.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        top = subprocess.run(["ps", "-eo", "pid,ni,pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                             text=True).stdout.splitlines()[:10]
        os.killpg(_build.pid, signal.SIGKILL)  # its build lock is an flock: it goes with the process
        code = _build.wait()
        busiest = "\n".join(line[:150] for line in top)
        _log.write(f"\nstill building after {WAIT_S} s; the busiest processes:\n{busiest}".encode())
    _log.seek(0)
    tail = _log.read().decode(errors="replace")[-2000:]
    _log.close()
    _build = _log = None
    if code != 0:
        warnings.warn(f"the background kernel build exited {code} after {time.monotonic() - _started:.0f} s: {tail}",
                      stacklevel=2)
