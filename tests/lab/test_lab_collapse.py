"""`ligero lab collapse --quick` end to end: generation 0 on human text, every regime's generations on the same
number of tokens, the filters' effect on the pool, the metrics and the document; a rerun reuses every run. And the
Gaussian fit-sample-refit model against its theory."""

import json
import math

import pytest

from ligero.cli import main
from ligero.lab.collapse import REGIMES, gaussian_collapse, text_metrics


def test_quick_collapse_lab_writes_its_document_and_resumes(tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    assert main(["lab", "collapse", "--quick", "--out", str(runs), "--docs", str(docs), "--threads", "2"]) == 0
    result = json.loads((docs / "lab-collapse.json").read_text())
    rows = result["chains"]["0"]["rows"]
    assert set(rows) == set(REGIMES)
    generations = result["plan"]["generations"]
    for regime, chain in rows.items():
        assert [r["generation"] for r in chain] == list(range(generations + 1))
        assert chain[0] == rows["replace"][0]  # one generation 0 for every regime
        for r in chain:
            assert math.isfinite(r["eval_ppl"]) and 1 < r["eval_ppl"] < result["plan"]["vocab_size"]
            assert 0 < r["rare_mass"] < 1 and 0 < r["distinct3"] <= 1 and 0 < r["vocab_coverage"] <= 1
            assert r["ppl_under_gen0"]["p25"] <= r["ppl_under_gen0"]["median"] <= r["ppl_under_gen0"]["p75"]
    pool = result["plan"]["pool_tokens"]
    for r in rows["replace"][1:]:
        assert r["pool_human_docs"] == 0 and pool <= r["pool_train_tokens"] < pool + result["plan"]["doc_tokens"]
    acc = [r["pool_train_tokens"] for r in rows["accumulate"]]
    assert acc[0] < acc[1] < acc[2]  # accumulating: every generation's pool holds the earlier ones
    for r in rows["watermark_filter"][1:]:  # the generators watermark; the detector finds their texts, not people's
        assert r["dropped_synthetic_share"] > 0.4 and r["dropped_human_share"] < 0.05
        assert r["pool_train_tokens"] < rows["human10"][r["generation"]]["pool_train_tokens"]
    for r in rows["likelihood_filter"][1:]:
        dropped = (r["dropped_synthetic_share"] * r["pool_synthetic_docs"] + r["dropped_human_share"]
                   * r["pool_human_docs"]) / (r["pool_synthetic_docs"] + r["pool_human_docs"])
        assert dropped == pytest.approx(result["plan"]["likelihood_drop"], abs=0.02)
    text = (docs / "lab-collapse.md").read_text()
    assert "| replace |" in text and "Gerstgrasser" in text and "## The Gaussian model" in text
    for figure in ("generations", "gen0-perplexity", "gaussian"):
        assert (docs / "lab-collapse" / f"{figure}.png").stat().st_size > 1000
    trained = sorted(p.stat().st_mtime for p in runs.rglob("model.pt"))
    capsys.readouterr()
    assert main(["lab", "collapse", "--quick", "--out", str(runs), "--no-docs", "--threads", "2"]) == 0
    assert sorted(p.stat().st_mtime for p in runs.rglob("model.pt")) == trained  # nothing trained again
    assert "Held-out perplexity from generation 0" in capsys.readouterr().out


def test_a_folder_of_another_plan_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "plan.json").write_text(json.dumps({"size": "xl"}))
    assert main(["lab", "collapse", "--quick", "--out", str(runs), "--no-docs"]) == 2
    assert "holds collapse-lab runs of another plan" in capsys.readouterr().err


def test_the_gaussian_model_follows_theory():
    g = gaussian_collapse(n=50, chains=3000, generations=100, seed=1)
    last = g["points"][-1]
    # the median of the unbiased fit decays as predicted; MLE's mean as ((n-1)/n)^k; accumulating holds
    assert last["unbiased_median"] == pytest.approx(last["unbiased_median_theory"], rel=0.15)
    assert last["mle_mean"] == pytest.approx(last["mle_theory"], rel=0.25)
    assert last["unbiased_median"] < 0.2 and last["accumulate_median"] > 0.85
    assert 0.8 < last["unbiased_mean"] < 1.2  # unbiased in expectation, collapsing in its typical value


def test_text_metrics_on_made_up_documents():
    docs = [[1, 2, 3, 1, 2, 3], [4, 5, 6]]
    m = text_metrics(docs, rare={5, 6}, vocab=10)
    assert m["tokens"] == 9 and m["docs"] == 2
    assert m["distinct2"] == pytest.approx(5 / 7)  # bigrams 12 23 31 12 23 | 45 56: five distinct of seven
    assert m["vocab_coverage"] == 0.6 and m["rare_mass"] == pytest.approx(2 / 9)
