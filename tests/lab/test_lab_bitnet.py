"""`ligero lab bitnet --quick` end to end: every arm trained on the same tokens, a learning rate chosen per arm,
seeds, the doubled-width ternary model, the packed models timed, the document written; a rerun reuses the runs."""

import json

import pytest

from ligero.cli import main


def test_quick_lab_writes_its_document_and_resumes(tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    assert main(["lab", "bitnet", "--quick", "--out", str(runs), "--docs", str(docs), "--threads", "2"]) == 0
    result = json.loads((docs / "lab-bitnet.json").read_text())
    (row,) = result["rows"]
    assert row["seeds"] == 2 and len(row["paired_gaps_pct"]) == 2 and row["fp_loss_sd"] is not None
    assert row["packed_minus_trained"] < 1e-4  # the b158 layers hold the trained ternary values
    assert 0.1 < row["zero_share"] < 0.6 and "b158x2_loss" in row
    assert set(result["best_lr"]) == {"test-fp", "test-b158", "testx2-b158"}
    for label, sweep in result["sweeps"].items():
        assert result["best_lr"][label] == min(sweep, key=lambda s: s["eval_loss"])["lr"]
    tokens = {r["tokens"] for runs_ in result["main"].values() for r in runs_}
    assert tokens == {result["plan"]["tokens_per_run"]}  # every arm saw the same number of tokens
    models = [s["model"] for s in result["speed"]]
    assert models == ["fp32", "int8 (after training)", "int4 (after training)", "b158 (after training)",
                      "b158 (trained ternary)"]
    text = (docs / "lab-bitnet.md").read_text()
    assert "| test | 0.07M | 2 |" in text and "arXiv 2402.17764" in text and "Down to the kernel" in text
    assert (docs / "lab-bitnet" / "curves.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["lab", "bitnet", "--quick", "--out", str(runs), "--no-docs", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "trained in" not in out and "finished earlier" in out  # every run reused, none trained again


def test_a_sweep_extends_its_grid_past_an_edge(monkeypatch, tmp_path):
    """A best rate at the edge of the grid does not bracket the optimum: the grid grows on that side by its own
    ratio (at most max_extensions times) and the main runs take the best of the extended sweep."""
    import dataclasses
    import math

    from ligero.lab import bitnet

    optimum = {False: 1e-4, True: 2e-2}  # full precision: far below its grid; ternary: inside once extended

    def fake_train_run(spec, tc, out, log=print):
        loss = 1 + (math.log10(tc.lr) - math.log10(optimum[spec.ternary])) ** 2
        return {"label": spec.label, "final_eval_loss": loss, "packed_eval_loss": loss, "zero_weight_share": 0.3,
                "non_embedding_params": 1000, "train_seconds": 1.0, "train_config": tc.to_dict(), "data": {},
                "tokens": tc.steps, "curve": []}

    monkeypatch.setattr(bitnet, "train_run", fake_train_run)
    monkeypatch.setattr(bitnet, "_speed", lambda *args: [])
    plan = dataclasses.replace(bitnet.QUICK, lr_grid={"fp": (1e-3, 3e-3), "b158": (1e-2, 3e-2)}, max_extensions=2,
                               doubled=None)
    result = bitnet.run_lab(plan, tmp_path, None, log=lambda message: None)
    fp = [s["lr"] for s in result["sweeps"]["test-fp"]]
    assert fp == pytest.approx([1e-3 / 9, 1e-3 / 3, 1e-3, 3e-3])  # twice downwards, then the limit
    assert result["best_lr"]["test-fp"] == pytest.approx(1e-3 / 9)
    ternary = [s["lr"] for s in result["sweeps"]["test-b158"]]
    assert ternary == pytest.approx([1e-2, 3e-2, 9e-2]) and result["best_lr"]["test-b158"] == pytest.approx(3e-2)
    assert "Still at the edge of its grid (the best rate may lie beyond): test-fp." in bitnet._edges(result)
