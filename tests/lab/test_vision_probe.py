"""The diagnosis of "which bar is highest": chart values read back from a chart, linear probes that find a planted
position and not a shuffled one, and the document's section saying where the answer is lost only when the numbers
say so."""

import random

import pytest
import torch

from ligero.lab.vision import PROBE_KEY, _highest_section
from ligero.lab.vision_data import chart, chart_values
from ligero.lab.vision_probe import highest_position, highest_probes, probe
from ligero.vision.model import TOKENS_PER_VIEW, EncodedImage


def test_chart_values_agree_with_the_charts_questions():
    rng = random.Random(7)
    for _ in range(20):
        s = chart(rng)
        values = chart_values(s)
        assert 3 <= len(values) <= 6
        qa = {q.kind: q for q in s.qa}
        assert qa["chart_highest"].answer == values[highest_position(s)][0]
        label = qa["chart_value"].question.removeprefix("What is the value of ").removesuffix("?")
        assert str(dict(values)[label]) == qa["chart_value"].answer


def _images(samples, planted: bool, seed: int) -> list[EncodedImage]:
    """Fake encoder features: noise, plus (planted) a mark in the highest bar's token of the global view."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        features = torch.randn(2, TOKENS_PER_VIEW, 64, generator=g).half()  # the probe takes any width
        if planted:
            features[0, highest_position(s)] += 1.0
        out.append(EncodedImage(features, torch.tensor([0, 1]), (1, 1)))
    return out


def test_the_probes_read_a_planted_position_and_not_noise():
    rng = random.Random(3)
    train, held = [chart(rng) for _ in range(120)], [chart(rng) for _ in range(40)]
    weights = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) / 8

    def project(image):  # a fixed linear map, as a projector that keeps the information
        return (image.features.float() @ weights).reshape(-1, 32)

    planted = highest_probes(train, _images(train, True, 0), held, _images(held, True, 1), project)
    assert planted["train_charts"] == 120 and planted["heldout_charts"] == 40 and len(planted["kinds"]) == 40
    assert planted["encoder"]["accuracy"] >= 0.9 and planted["projected"]["accuracy"] >= 0.9
    noise = highest_probes(train, _images(train, False, 0), held, _images(held, False, 1), project)
    assert noise["encoder"]["accuracy"] <= 0.5  # chance is ~0.23: nothing to read, nothing read
    assert 0.15 < noise["chance"] < 0.35


def test_a_probe_chooses_its_strength_on_training_rows_only():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (100,), generator=g)
    x = torch.randn(100, 20, generator=g)
    x_test = torch.randn(30, 20, generator=g)
    y_test = torch.randint(0, 6, (30,), generator=g)
    a = probe(x, y, x_test, y_test)
    b = probe(x, y, x_test, (y_test + 1) % 6)  # other held-out labels: same strength, other score
    assert a["decay"] == b["decay"] and len(a["right"]) == 30
    assert a["accuracy"] + b["accuracy"] <= 1


def _results(projected: float, fitted: float) -> dict:
    n = 10
    right = [True] * round(projected * n) + [False] * (n - round(projected * n))
    row = {"right": right, "accuracy": projected, "ci95": (projected - 0.05, min(1.0, projected + 0.05))}
    examples = [{"kind": "chart_highest", "question": f"Which {'bar' if i % 2 else 'point'} is highest?",
                 "answer": "figs", "with_image": "figs" if i < 3 else "plums"} for i in range(n)]
    return {"examples": examples, PROBE_KEY: {
        "train_charts": 100, "heldout_charts": n, "chance": 0.23, "kinds": ["bar", "line"] * 5, "seconds": 12.0,
        "encoder": row, "projected": row,
        "train_answers": {"n": 10, "accuracy": fitted, "ci95": (fitted - 0.1, fitted + 0.1)}}}


@pytest.mark.parametrize("projected, fitted, lost", [(0.9, 0.3, True), (0.9, 0.85, False)])
def test_the_document_says_the_answer_is_lost_only_when_the_numbers_say_so(projected, fitted, lost):
    text = "\n".join(_highest_section(_results(projected, fitted)))
    assert "## Where \"which bar is highest\" is lost" in text
    assert f"| probe: the projector's output (what the language model receives) | {100 * projected:.1f} %" in text
    assert "| the model's answer (the label) | 30.0 % | 2/5 | 1/5 |" in text
    assert f"names the highest one {100 * fitted:.1f} %" in text
    assert ("is lost there" in text) == lost
    assert _highest_section({"examples": []}) == []
