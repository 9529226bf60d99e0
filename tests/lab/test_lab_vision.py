"""`ligero lab vision --quick` end to end (render, encode, both stages, held-out evaluation with the text-only
baseline, the document), then `ligero generate --image` on the adapter that run wrote; plus the data's promises:
disjoint splits, closed answer sets, AnyRes-sized images."""

import json
import random

import pytest

from ligero.cli import main
from ligero.lab.vision import PROBE_KEY, QUICK, wordy
from ligero.lab.vision_data import (
    FAMILIES,
    QUESTION_TYPES,
    emoji_available,
    emoji_split,
    make_split,
    normalise,
    scene,
)


def test_quick_vision_lab_then_generate_with_its_adapter(tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    assert main(["lab", "vision", "--quick", "--out", str(runs), "--docs", str(docs), "--threads", "2"]) == 0
    result = json.loads((docs / "lab-vision.json").read_text())
    families = set(FAMILIES) if emoji_available() else set(FAMILIES) - {"emoji"}
    kinds = {k for k, f in QUESTION_TYPES.items() if f in families}
    assert set(result["accuracy"]) == kinds
    for row in result["accuracy"].values():
        assert row["n"] >= QUICK.heldout_images and 0 <= row["accuracy"] <= 1 and 0 <= row["text_only"] <= 1
        assert 0 < row["chance"] < 1 and 0 <= row["p_holm"] <= 1
    int8 = result["quantized"]["int8"]  # the language model and the projector quantized, evaluated the same way
    assert int8["projector_format"] == "int8_weight" and set(int8) - {"projector_format", "adapters"} == kinds
    assert int8["adapters"] == "beside"  # the LoRA adapters kept in full precision beside the int8 weights
    for kind, row in int8.items():
        if kind in kinds:
            assert row["n"] == result["accuracy"][kind]["n"] and 0 <= row["p_holm"] <= 1
            assert row["change"] == pytest.approx(row["accuracy"] - result["accuracy"][kind]["accuracy"])
            assert 0 <= row["wordy"] <= 1
    assert len(result["training"]["stage1"]) == QUICK.stage1_steps
    assert len(result["training"]["stage2"]) == QUICK.stage2_steps
    text = (docs / "lab-vision.md").read_text()
    assert "text only" in text and "| audio | no |" in text and "## Caption retrieval" in text
    assert "## What the numbers say" in text and "against a target of 80%" in text
    probe = result[PROBE_KEY]  # where "which bar is highest" is lost: probes of the image tokens, answers on training
    assert probe["heldout_charts"] == QUICK.heldout_images and probe["train_charts"] == QUICK.train_images
    assert len(probe["projected"]["right"]) == QUICK.heldout_images and probe["train_answers"]["n"] == 3
    assert '## Where "which bar is highest" is lost' in text
    assert (docs / "lab-vision" / "training.png").stat().st_size > 0
    assert (docs / "lab-vision" / "examples.png").stat().st_size > 0
    meta = json.loads((runs / "adapter" / "adapter.json").read_text())
    assert meta["base_model"]["id"] == "smollm2-135m" and meta["lora"]["rank"] == QUICK.lora_rank
    assert meta["data"]["train_sha256"] == result["data"]["train_sha256"]
    assert meta["heldout_accuracy"] == {k: round(v["accuracy"], 4) for k, v in result["accuracy"].items()}
    # Run again: everything is on disk, so only the document is written (held-out images rendered, nothing encoded)
    (docs / "lab-vision.md").unlink()
    capsys.readouterr()
    assert main(["lab", "vision", "--quick", "--out", str(runs), "--docs", str(docs), "--threads", "2"]) == 0
    assert "both stages and the evaluation reused" in capsys.readouterr().out
    again = json.loads((docs / "lab-vision.json").read_text())
    assert again["accuracy"] == result["accuracy"] and (docs / "lab-vision.md").read_text() == text
    # An evaluation whose quantized variants were built another way (adapters merged, before session 29): only
    # those are measured again, against the saved full-precision answers
    saved = json.loads((runs / "evaluation.json").read_text())
    saved["quantized"]["int8"] = {**saved["quantized"]["int8"], "adapters": "merged", "bogus": 1}
    (runs / "evaluation.json").write_text(json.dumps(saved))
    assert main(["lab", "vision", "--quick", "--out", str(runs), "--docs", str(docs), "--threads", "2"]) == 0
    assert "quantized variants are measured again" in capsys.readouterr().out
    again = json.loads((docs / "lab-vision.json").read_text())
    assert again["quantized"] == result["quantized"] and again["accuracy"] == result["accuracy"]
    # A run evaluated before the diagnosis existed: only the diagnosis is made (training charts encoded again)
    for name in ("evaluation.json", "results.json"):
        saved = json.loads((runs / name).read_text())
        del saved[PROBE_KEY]
        (runs / name).write_text(json.dumps(saved))
    assert main(["lab", "vision", "--quick", "--out", str(runs), "--docs", str(docs), "--threads", "2"]) == 0
    log = capsys.readouterr().out
    assert "where 'which bar is highest' is lost" in log and "quantized variants are measured again" not in log
    again = json.loads((docs / "lab-vision.json").read_text())
    assert {k: v for k, v in again[PROBE_KEY].items() if k != "seconds"} == \
        {k: v for k, v in probe.items() if k != "seconds"}
    assert PROBE_KEY in json.loads((runs / "evaluation.json").read_text())

    image = tmp_path / "scene.png"
    scene(random.Random(5)).image.save(image)
    capsys.readouterr()
    assert main(["generate", "--image", str(image), "--adapter", str(runs / "adapter"), "--max-new-tokens", "4",
                 "How many shapes are there?"]) == 0
    assert capsys.readouterr().out.strip()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    assert main(["generate", "--image", str(bad), "--adapter", str(runs / "adapter"), "What?"]) == 2
    assert "not an image" in capsys.readouterr().err
    assert main(["generate", "--image", str(image), "--adapter", str(tmp_path), "What?"]) == 2
    assert "is not a vision adapter" in capsys.readouterr().err


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "emoji" or emoji_available()])
def test_splits_are_disjoint_and_answers_closed(family):
    held = make_split(family, "heldout", 30, seed=3)
    train = make_split(family, "train", 60, seed=3, exclude={s.key for s in held})
    assert not {s.key for s in held} & {s.key for s in train}
    assert make_split(family, "heldout", 30, seed=3)[7].caption == held[7].caption  # reproducible
    for s in held + train:
        assert s.image.mode == "RGB" and min(s.image.size) >= 100 and max(s.image.size) <= 448
        for qa in s.qa:
            assert QUESTION_TYPES[qa.kind] == family and qa.choices >= 3
            assert normalise(qa.answer) and normalise(qa.answer) == normalise(qa.answer + ".")


@pytest.mark.skipif(not emoji_available(), reason="Debian's fonts-noto-color-emoji is not installed")
def test_held_out_emoji_are_never_seen_in_training():
    train, held = emoji_split(0)
    assert len(held) > 200 and not {c for c, _ in train} & {c for c, _ in held}
    chars = {s.key for s in make_split("emoji", "heldout", 50, seed=0)}
    assert chars <= {f"emoji|{c}" for c, _ in held}


def test_answers_are_compared_as_vqa_does():
    assert normalise("A triangle.") == normalise("triangle") == "triangle"
    assert normalise(" The Sales  ") == "sales" and normalise("Apples!") == "apples"
    assert normalise("They are triangles.") != normalise("triangle")
    assert wordy("They are all triangles.", "triangle") and not wordy("A triangle.", "triangle")


def test_a_chart_caption_names_its_highest_bar():
    """Stage 1 learns captions with the language model frozen: the caption names the highest bar, so the projector
    has to carry it, and it is the answer the highest-bar question expects."""
    for s in make_split("charts", "train", 12, seed=4):
        highest = next(q.answer for q in s.qa if q.kind == "chart_highest")
        pairs = dict(p.rsplit(" ", 1) for p in s.caption.split(": ", 1)[1].split(". Highest")[0].split(", "))
        assert s.caption.endswith(f"Highest: {highest}.") and max(pairs, key=lambda k: int(pairs[k])) == highest


def test_an_unknown_training_precision_is_refused_before_training(tmp_path):
    import dataclasses

    from ligero.errors import LigeroError
    from ligero.lab.vision import lab_vision

    with pytest.raises(LigeroError, match="bf16 or fp32, not 'fp8'"):
        lab_vision(True, tmp_path / "runs", plan=dataclasses.replace(QUICK, precision="fp8"))
    assert not (tmp_path / "runs" / "stage1.pt").exists()


def test_the_findings_name_questions_not_clearly_above_chance():
    """A question the prior always gets wrong (0 % text only) beats it significantly at chance level: the findings
    also name what the interval does not lift above chance."""
    from ligero.lab.vision import _findings

    def row(acc, ci, chance, text_only=0.0, p=1e-3):
        return {"accuracy": acc, "ci95": ci, "chance": chance, "text_only": text_only, "p_holm": p, "n": 100}

    acc = {"doc_field": row(0.12, [0.07, 0.198], 0.113), "chart_value": row(0.19, [0.125, 0.278], 0.111),
           "scene_shape": row(1.0, [0.963, 1.0], 1 / 3)}
    text = "\n".join(_findings({"accuracy": acc}))
    assert "Not clearly above chance (the 95 % interval reaches down to chance or below): a field's value on a form " \
           "(12.0 % [7.0, 19.8], chance 11.3 %)." in text
    assert "value of a labelled bar" not in text.split("Not clearly")[1]
    assert "interval reaches down to chance or below): none." in "\n".join(_findings({"accuracy": {
        "scene_shape": acc["scene_shape"]}}))
