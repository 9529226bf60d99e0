"""Shared fixtures: tiny random Hugging Face models (saved as real folders) and the real built-in models."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from hf_oracle import hf_model
from kernel_builds import start_tier_build
from tiny_models import tiny_hf_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_sessionstart(session):
    start_tier_build()  # the lower kernel tiers compile in a child process while the first tests run


@pytest.fixture
def record_progress(monkeypatch):
    """record_progress(module): replaces the module's progress_bar with one that records
    (description, total) and then each advance; returns that list."""

    def install(module) -> list:
        steps = []

        @contextmanager
        def recording_bar(description, total):
            steps.append((description, total))
            yield lambda n=1: steps.append(n)

        monkeypatch.setattr(module, "progress_bar", recording_bar)
        return steps

    return install


@pytest.fixture
def compiled_kernels():
    """Ligero's compiled CPU kernels; the test skips, with the runtime's reason, where they do not run here."""
    from ligero.kernels import cpu_kernels, warm

    ext = cpu_kernels()
    if ext is None:
        pytest.skip(f"the kernels do not run here: decode uses {warm()}")
    return ext


DENSE_FAMILIES = ["llama", "mistral", "gemma3"]
MOE_FAMILIES = ["mixtral", "qwen3_moe"]
_PAIRS: dict[str, tuple] = {}


def _tiny_pair(arch: str, tmp_path_factory):
    """(transformers reference, Ligero model loaded from the saved folder, folder), built once per session."""
    from ligero.io.checkpoint import load_model

    if arch not in _PAIRS:
        ref = tiny_hf_model(arch)
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        ref.save_pretrained(folder)
        _PAIRS[arch] = ref, load_model(str(folder), device="cpu").model, folder
    return _PAIRS[arch]


@pytest.fixture(scope="session", params=DENSE_FAMILIES)
def tiny_pair(request, tmp_path_factory):
    """A dense family's pair (what the quantization, serving and evaluation tests run on)."""
    return _tiny_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="session", params=MOE_FAMILIES)
def tiny_moe_pair(request, tmp_path_factory):
    return _tiny_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="session", params=DENSE_FAMILIES + MOE_FAMILIES)
def any_tiny_pair(request, tmp_path_factory):
    """Every family's pair: parity and KV-cache tests."""
    return _tiny_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2():
    from ligero.io.checkpoint import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def hf_smollm2():
    return hf_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_gguf():
    return hf_model


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """The run folder of one `ligero run --quick` (about 2.5 minutes), shared by every test that needs a real audit:
    report, results.json, variants/ and the cards it wrote."""
    from ligero.cli import main

    out = tmp_path_factory.mktemp("audit")
    assert main(["run", "--quick", "--out", str(out)]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


# --- an audit's outputs without measuring (tests/card) --------------------------------------------------------
# The cached results of a `ligero audit --quick --variants int8` run (tests/card/data), summarized, carded and
# reported into a temporary run folder. Here rather than in tests/card/conftest.py: a second conftest module would
# shadow this one for the tests that import helpers from it.

CARD_DATA = Path(__file__).parent / "card" / "data"


def stored_results() -> dict:
    return {name: json.loads((CARD_DATA / f"{name}.json").read_text()) for name in ("fp32", "int8")}


def publish(out: Path, results: dict) -> Path:
    """results.json, cards/ and the report of `results`, as `ligero audit` writes them; the run folder."""
    from ligero.card.build import build_cards
    from ligero.card.report import write_report
    from ligero.eval.audit import Audit

    audit = Audit(variants=["int8"], quick=True, out=out, run_id="stored")
    report = audit.summarize(results)
    build_cards(report, results, audit.folder / "cards")
    write_report(report, results, audit.folder)
    return audit.folder


@pytest.fixture
def results() -> dict:
    """A fresh copy of the stored results, to change at will."""
    return stored_results()


@pytest.fixture
def publish_results():
    return publish


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory) -> Path:
    return publish(tmp_path_factory.mktemp("published"), stored_results())


@pytest.fixture
def int8_card(run_folder) -> dict:
    from ligero.card import read_card

    return read_card(run_folder / "cards" / "int8.json")
