"""build_variant: the one way every caller turns (model, scheme) into a model, and its calibration windows."""

import pytest
import torch

from ligero.errors import LigeroError
from ligero.eval.variants import BASELINE, build_variant, calibration_windows
from ligero.io.checkpoint import save_checkpoint
from ligero.quant.config import IntGroupConfig, Recipe
from ligero.quant.modules import IntGroupLinear, W8A8Linear


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_models import tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)  # weights only: no tokenizer
    return str(folder)


def test_the_baseline_is_the_full_precision_model(tiny_folder):
    for scheme in (None, BASELINE):
        loaded = build_variant(tiny_folder, scheme)
        assert getattr(loaded.model, "quant_recipe", None) is None and loaded.info["quantize_seconds"] == 0
    with pytest.raises(LigeroError, match="--group-size needs a group-wise --scheme"):
        build_variant(tiny_folder, BASELINE, group_size=64)


def test_schemes_are_checked_before_the_model_loads():
    with pytest.raises(LigeroError, match="unknown scheme 'int5'; valid schemes"):
        build_variant("no-such-model", "int5")
    with pytest.raises(LigeroError, match="the scheme is empty"):
        build_variant("no-such-model", "")


def test_calibration_windows_are_built_only_when_the_recipe_needs_them(tiny_folder):
    # The tiny model has no tokenizer: building windows would fail, so int4 proves none were built.
    assert isinstance(build_variant(tiny_folder, "int4").model.layers[0].mlp.down_proj, IntGroupLinear)
    with pytest.raises(LigeroError, match="calibration needs the model's tokenizer"):
        build_variant(tiny_folder, "w8a8")
    windows = [list(range(1, 33)), list(range(40, 72))]
    model = build_variant(tiny_folder, "w8a8", calibration=windows).model
    assert isinstance(model.layers[0].attn.qkv_proj, W8A8Linear)
    assert not torch.equal(model.layers[0].attn.qkv_proj.smooth, torch.ones(model.cfg.dim))  # calibrated


def test_a_given_recipe_wins_and_saved_folders_load_as_saved(tiny_folder, tmp_path):
    loaded = build_variant(tiny_folder, recipe=Recipe(IntGroupConfig(64), name="custom"))
    assert loaded.model.quant_recipe.weights == IntGroupConfig(64)
    save_checkpoint(loaded.model, None, tmp_path, {"base": tiny_folder})
    assert build_variant(str(tmp_path)).model.quant_recipe.name == "custom"
    for scheme in ("int8", BASELINE):
        with pytest.raises(LigeroError, match="already quantized"):
            build_variant(str(tmp_path), scheme)


def test_calibration_windows_come_from_the_calibration_split(smollm2):
    tok = smollm2.tokenizer
    windows = calibration_windows(tok, 3, tokens_per_window=64)
    assert len(windows) == 3 and all(len(w) == len(windows[0]) >= 64 for w in windows)
    assert windows != calibration_windows(tok, 3, tokens_per_window=64, text="Some other text. " * 200)
    with pytest.raises(LigeroError, match="fewer than 64 tokens"):
        calibration_windows(tok, 1, tokens_per_window=64, text="too short")
    with pytest.raises(LigeroError, match="at least one window"):
        calibration_windows(tok, 0)
