"""`ligero lab moe --quick` end to end: every arm on the same tokens with its own learning rate, seeds for the dense
and top-2 arms, expert load logged during training, capacity drops counted, the trained MoE routed and timed in the
runtime, the document written from the results; a rerun reuses the runs. And the lab's measures on made-up data."""

import json
import math

import pytest

from ligero.cli import main
from ligero.io.checkpoint import load_model
from ligero.lab.moe import load_entropy, loss_spikes, tokens_to_reach


def test_quick_lab_writes_its_document_and_resumes(tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    assert main(["lab", "moe", "--quick", "--out", str(runs), "--docs", str(docs), "--threads", "2"]) == 0
    result = json.loads((docs / "lab-moe.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "moe-top2", "moe-top1", "moe-top2-no-balance", "moe-top2-no-z-loss",
                         "moe-top2-capacity", "dense-total"}
    assert rows["dense"]["seeds"] == rows["moe-top2"]["seeds"] == 2 and rows["moe-top1"]["seeds"] == 1
    # equal active parameters; the dense-total model holds the top-2 MoE's total
    assert rows["moe-top2"]["active_non_embedding_params"] == pytest.approx(
        rows["dense"]["active_non_embedding_params"], rel=0.02)
    assert rows["dense-total"]["non_embedding_params"] == pytest.approx(
        rows["moe-top2"]["non_embedding_params"], rel=0.02)
    tokens = {r["tokens"] for runs_ in result["main"].values() for r in runs_}
    assert tokens == {result["plan"]["tokens_per_run"]}  # every arm saw the same number of tokens
    for name, sweep in result["sweeps"].items():
        assert result["best_lr"][name] == min(sweep, key=lambda s: s["eval_loss"])["lr"]
    assert rows["moe-top2-capacity"]["dropped_share"] > 0 and rows["moe-top2"]["dropped_share"] == 0
    assert 0 < rows["moe-top2"]["load_entropy_end"] <= 1 and rows["dense"]["load_entropy_end"] is None
    util = result["utilisation"]["moe-top2"]
    assert len(util) >= 3 and all(len(p["load"]) == 2 for p in util)  # every evaluation, both layers
    assert [s["arm"] for s in result["speed"]] == ["dense", "moe-top2", "moe-top1", "dense-total"]
    prefs = result["preferences"]
    assert len(prefs["experts"]) == 4 and sum(e["share"] for e in prefs["experts"]) == pytest.approx(1.0)
    text = (docs / "lab-moe.md").read_text()
    assert "| moe-top2 |" in text and "arXiv 2101.03961" in text and "Which tokens each expert prefers" in text
    for figure in ("curves", "utilisation", "histograms", "load"):
        assert (docs / "lab-moe" / f"{figure}.png").stat().st_size > 1000
    # the trained MoE is a runtime model: it loads and routes
    folder = runs / result["main"]["moe-top2"][0]["folder"] / "model"
    assert load_model(str(folder), device="cpu").model.cfg.n_experts == 4
    capsys.readouterr()
    assert main(["lab", "moe", "--quick", "--out", str(runs), "--no-docs", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "trained in" not in out and "finished earlier" in out  # every run reused, none trained again


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [{"tokens": 100, "eval_loss": 5.0}, {"tokens": 150, "loss": 4.0},
             {"tokens": 200, "eval_loss": 4.0}, {"tokens": 300, "eval_loss": 3.0}]
    assert tokens_to_reach(curve, 4.5) == pytest.approx(150)
    assert tokens_to_reach(curve, 5.5) == 100 and tokens_to_reach(curve, 3.0) == 300
    assert tokens_to_reach(curve, 2.9) is None


def test_load_entropy_and_spikes():
    assert load_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert load_entropy([20, 0, 0, 0]) == 0
    assert 0 < load_entropy([17, 1, 1, 1]) < 0.5
    flat = [{"loss": 3.0}] * 12
    assert loss_spikes(flat) == 0 and loss_spikes(flat + [{"loss": 3.3}]) == 1
    assert math.isclose(load_entropy([1, 1]), 1.0)
