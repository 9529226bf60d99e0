"""benchmarks/load.py writes docs/serving.{json,md} without absolute machine paths (the load itself is not run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("load_benchmark", ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_name_the_card_relative_to_the_repository(tmp_path):
    load = load_benchmark()
    assert load.repo_path(str(ROOT / "ligero-out" / "run" / "cards" / "int4.json")) == "ligero-out/run/cards/int4.json"
    assert load.repo_path("/home/someone/ligero/ligero-out/run/cards/int4.json") == "ligero-out/run/cards/int4.json"
    assert load.repo_path("cards/int4.json") == "cards/int4.json"

    result = json.loads((ROOT / "docs" / "serving.json").read_text())
    result["monitor"]["card"] = str(ROOT / "ligero-out" / "some-run" / "cards" / "int4.json")  # as a run writes it
    load.write_docs(result, tmp_path)
    for name in ("serving.json", "serving.md"):
        text = (tmp_path / name).read_text()
        assert str(ROOT) not in text and "ligero-out/some-run/cards/int4.json" in text, name
    assert str(ROOT) not in (ROOT / "docs" / "serving.md").read_text()  # the committed docs, too
