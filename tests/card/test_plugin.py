"""A new audit metric is one class appended to METRICS: it reaches the budget, comparisons, summary rows, the
recommendation, the card (fields, schema, Markdown) and both reports without any other change."""

import json

import pytest

from ligero.card import card_errors, read_card
from ligero.eval.audit import audit_budget
from ligero.eval.metrics import METRICS, Metric, ReportSection


class AnswerLength(Metric):
    name = "answer_length"
    title = "answer length"
    budget_full = {"answer_prompts": 100}
    budget_quick = {"answer_prompts": 5}

    def measure(self, ctx):
        raise AssertionError("not called: the stored results already hold this metric")

    def compare(self, base, variant, n_resamples):
        return {"answer_length": {"delta": variant["answer_length"]["mean"] - base["answer_length"]["mean"]}}

    def row(self, result, comparison):
        row = {"answer_length": result["answer_length"]["mean"]}
        if comparison is not None:
            row["delta_answer_length"] = comparison["answer_length"]["delta"]
        return row

    def failures(self, row, thresholds, base_row):
        return ["answers grew by more than 10 tokens"] if row["delta_answer_length"] > 10 else []

    def card_fields(self, result, row, comparison):
        return {"metrics": {"answer_length": {"mean": result["answer_length"]["mean"]}}}

    def card_schema(self):
        return {"metrics": {"required": ["answer_length"],
                            "properties": {"answer_length": {"type": "object", "required": ["mean"]}}}}

    def card_markdown(self, card):
        return {"metrics": [f"| mean answer length | {card['metrics']['answer_length']['mean']:.1f} tokens |"]}

    def report_columns(self):
        return [("answer len", lambda r: f"{r['answer_length']:.1f}")]

    def report_sections(self, report):
        return [ReportSection("Answer lengths", items=[f"{n}: {r['answer_length']:.1f} tokens"
                                                       for n, r in report["rows"].items()])]


@pytest.fixture
def plugged_in():
    metric = AnswerLength()
    METRICS.append(metric)
    try:
        yield metric
    finally:
        METRICS.remove(metric)


def test_a_new_metric_reaches_every_output(plugged_in, results, publish_results, tmp_path):
    assert audit_budget("quick")["answer_prompts"] == 5
    results["fp32"]["answer_length"] = {"mean": 20.0}
    results["int8"]["answer_length"] = {"mean": 35.0}
    folder = publish_results(tmp_path, results)
    report = json.loads((folder / "results.json").read_text())
    assert report["rows"]["int8"]["delta_answer_length"] == 15.0
    assert report["recommendation"]["verdicts"]["int8"]["reasons"][-1] == "answers grew by more than 10 tokens"
    card = read_card(folder / "cards" / "int8.json")
    assert card["metrics"]["answer_length"] == {"mean": 35.0} and card_errors(card) == []
    del card["metrics"]["answer_length"]
    assert any("answer_length" in e for e in card_errors(card))  # the plug-in's schema is enforced
    assert "| mean answer length | 35.0 tokens |" in (folder / "cards" / "int8.md").read_text()
    for name in ("report.md", "report.html"):
        text = (folder / name).read_text()
        assert "answer len" in text and "Answer lengths" in text and "int8: 35.0 tokens" in text, name
