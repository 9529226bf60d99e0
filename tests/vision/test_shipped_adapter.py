"""The adapter Ligero ships (src/ligero/vision/weights/): it loads on a fresh install, its record says how it was
made, and on freshly rendered held-out images it answers far better than the same model without the image."""

import json

import pytest

from ligero.cli import main
from ligero.lab.vision_data import emoji_available, make_split, normalise, samples_digest
from ligero.vision.pretrained import DEFAULT_ADAPTER, META, load_vision_model


@pytest.fixture(scope="module")
def shipped():
    return load_vision_model()


def test_the_record_matches_the_data_it_names():
    meta = json.loads((DEFAULT_ADAPTER / META).read_text())
    recipe = meta["recipe"]
    assert meta["base_model"]["id"] == "smollm2-135m" and len(meta["base_model"]["sha256"]) == 64
    assert meta["lora"]["rank"] == recipe["lora_rank"]
    if "emoji" in recipe["families"] and not emoji_available():
        pytest.skip("Debian's fonts-noto-color-emoji is not installed: the emoji images cannot be re-rendered")
    held = [s for f in recipe["families"] for s in make_split(f, "heldout", recipe["heldout_images"], recipe["seed"])]
    assert samples_digest(held) == meta["data"]["heldout_sha256"]  # re-rendered here, the same content


@pytest.mark.parametrize("family, kind, floor", [("scenes", "scene_colour", 0.7), ("scenes", "scene_count", 0.45),
                                                 ("scenes", "scene_shape", 0.75)])
def test_it_reads_held_out_images(shipped, family, kind, floor):
    samples = make_split(family, "heldout", 40, seed=0)  # 40: the blind answers follow priors too
    qa = [(s, q) for s in samples for q in s.qa if q.kind == kind]
    with_image = shipped.answer([q.question for _, q in qa], [[s.image] for s, _ in qa], max_new_tokens=8)
    text_only = shipped.answer([q.question for _, q in qa], [[] for _ in qa], max_new_tokens=8)
    right = sum(normalise(a) == normalise(q.answer) for a, (_, q) in zip(with_image, qa))
    blind = sum(normalise(a) == normalise(q.answer) for a, (_, q) in zip(text_only, qa))
    assert right >= floor * len(qa) and right > blind + len(qa) // 4, (with_image, [q.answer for _, q in qa])


def test_generate_with_an_image_uses_the_shipped_adapter(tmp_path, capsys):
    sample = make_split("scenes", "heldout", 1, seed=0)[0]
    path = tmp_path / "scene.png"
    sample.image.save(path)
    capsys.readouterr()
    assert main(["generate", "--image", str(path), "--max-new-tokens", "6", "What colour are the shapes?"]) == 0
    assert normalise(capsys.readouterr().out) == sample.qa[1].answer


def test_an_int4_variant_keeps_the_adapters_in_full_precision_and_still_reads_images():
    """Merged into the weights before int4, the adapters' small updates were rounded away (the model answered in
    sentences); kept beside the quantized base weights (QLoRA's setting) they still steer it."""
    import torch

    from ligero.eval.variants import build_vision_variant
    from ligero.models.lora import LoRALinear
    from ligero.quant.modules import QuantizedLinear
    from ligero.vision.pretrained import read_adapter

    vlm = build_vision_variant(None, "int4")
    tensors, _ = read_adapter(DEFAULT_ADAPTER)
    adapters = {name: m for name, m in vlm.lm.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapters) == sum(k.endswith(".lora_a") for k in tensors) > 0
    assert all(isinstance(m.base, QuantizedLinear) for m in adapters.values())
    for name, m in adapters.items():
        assert m.lora_a.dtype == torch.float32 and torch.equal(m.lora_a, tensors[f"lora.{name}.lora_a"].float())
    samples = make_split("scenes", "heldout", 20, seed=0)
    qa = [(s, q) for s in samples for q in s.qa if q.kind == "scene_shape"]
    answers = vlm.answer([q.question for _, q in qa], [[s.image] for s, _ in qa], max_new_tokens=8)
    right = sum(normalise(a) == normalise(q.answer) for a, (_, q) in zip(answers, qa))
    assert right >= 0.75 * len(qa), (answers, [q.answer for _, q in qa])
