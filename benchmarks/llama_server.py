"""llama.cpp's own OpenAI-compatible server (`llama-server`: slots, continuous batching), the anchor of
benchmarks/load.py.

Found as $LLAMA_SERVER or `llama-server` on PATH; otherwise built once from the llama.cpp sources that the
llama-cpp-python package vendors (its source distribution from PyPI, the version the bench extra installs, or the
newest 0.3.x), into LIGERO_CACHE/llama-server/<version>/ (~10 min on 2 cores; no web UI, no HTTPS, no downloads).

    python benchmarks/llama_server.py          # build (or find) it and print its path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ligero.paths import cache_root  # noqa: E402

PACKAGE = "llama-cpp-python"
RANGE = ">=0.3,<0.4"  # as the bench extra in pyproject.toml
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]


def _wanted_version() -> str:
    """The installed llama-cpp-python's version (server and bindings then share one llama.cpp), else a range."""
    try:
        return f"=={version(PACKAGE)}"
    except PackageNotFoundError:
        return RANGE


def find_llama_server(build: bool = True) -> Path:
    """The llama-server binary (see the module docstring); SystemExit with the reason when there is none."""
    given = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if given:
        return Path(given)
    spec = _wanted_version()
    cached = sorted((cache_root() / "llama-server").glob("*/llama-server"))
    if spec.startswith("=="):
        cached = [c for c in cached if c.parent.name == spec[2:]]
    if cached:
        return cached[-1]
    if not build:
        raise SystemExit("load: llama-server not found; run `python benchmarks/llama_server.py` (builds it, ~10 min)")
    return _build(spec)


def _build(spec: str) -> Path:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"load: building llama-server needs {tool}; install it (Debian: cmake, g++)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"llama-server: downloading the {PACKAGE}{spec} source distribution from PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"{PACKAGE}{spec}", "--no-deps", "--no-binary",
                        ":all:", "-d", str(tmp), "-q"], check=True)
        archive = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        release = archive.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        source = tmp / f"llama_cpp_python-{release}" / "vendor" / "llama.cpp"
        build = tmp / "build"
        print(f"llama-server: building llama.cpp {release}'s server (about 10 minutes on 2 cores)", flush=True)
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
        target = cache_root() / "llama-server" / release / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", target)
    print(f"llama-server: {target}", flush=True)
    return target


if __name__ == "__main__":
    print(find_llama_server())
