"""`ligero lab bitnet --quick` end to end: every arm trained on the same tokens, a learning rate chosen per arm,
seeds, the doubled-width ternary model, the packed models timed, the document written; a rerun reuses the runs."""

import json

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
