"""The scheme registry: a toy scheme registered from this file alone quantizes, saves, loads and decodes; the
registry's pre-pass, calibration, shape and grouping declarations drive quantize() and recipe_for()."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from ligero.cli import main
from ligero.errors import LigeroError
from ligero.eval.variants import build_variant
from ligero.io.checkpoint import load_model
from ligero.models.generate import generate_tokens
from ligero.quant.api import quantize
from ligero.quant.config import (
    NAMED_SCHEMES,
    IntGroupConfig,
    QuantConfig,
    Recipe,
    recipe_for,
    register_named_scheme,
    register_scheme,
)
from ligero.quant.modules import QuantizedLinear


@dataclass(frozen=True)
class ToyHalfConfig(QuantConfig):
    """Weights stored as fp16: the smallest format that is still a real one."""

    kind: ClassVar[str] = "test_toy_fp16"


class ToyHalfLinear(QuantizedLinear):
    def __init__(self, in_features, out_features, config, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.register_buffer("values", torch.empty(out_features, in_features, dtype=torch.float16))

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        layer.values = weight.half()
        return layer

    def dequantize(self, rows=None):
        return (self.values if rows is None else self.values[rows]).float()


register_scheme(ToyHalfConfig, layer=ToyHalfLinear)
register_named_scheme("toy-fp16", ToyHalfConfig)


def test_a_toy_scheme_registered_here_quantizes_saves_loads_and_decodes(tiny_pair, tmp_path, capsys):
    folder, out = str(tiny_pair[2]), tmp_path / "toy"
    assert main(["quantize", "--model", folder, "--scheme", "toy-fp16", "--out", str(out), "--device", "cpu"]) == 0
    assert "scheme toy-fp16" in capsys.readouterr().out
    saved = load_model(str(out), device="cpu").model
    assert isinstance(saved.layers[0].attn.qkv_proj, ToyHalfLinear)
    assert saved.quant_recipe.weights == ToyHalfConfig()
    fresh = build_variant(folder, "toy-fp16").model
    tokens = torch.arange(20)[None] % fresh.cfg.vocab_size
    with torch.inference_mode():
        torch.testing.assert_close(saved(tokens), fresh(tokens), atol=0, rtol=0)
    decoded, _ = generate_tokens(saved, [[1, 2, 3]], 6, eos_ids=[])
    assert decoded == generate_tokens(fresh, [[1, 2, 3]], 6, eos_ids=[])[0] and len(decoded[0]) == 6


@dataclass(frozen=True)
class ToyLearnedConfig(QuantConfig):
    kind: ClassVar[str] = "test_toy_learned"


class ToyStatsLinear(ToyHalfLinear):
    built_with: ClassVar[list] = []

    @classmethod
    def from_float(cls, weight, config, segments=None, act_max=None):
        cls.built_with.append(act_max)
        return super().from_float(weight, config, segments)


prepass_calls = []
register_scheme(ToyLearnedConfig, layer=ToyStatsLinear, calibrates=True,
                prepass=lambda model, config, calibration, layer_filter: prepass_calls.append((config, calibration)))


@dataclass(frozen=True)
class ToyWideBlockConfig(QuantConfig):
    kind: ClassVar[str] = "test_toy_block48"


register_scheme(ToyWideBlockConfig, layer=ToyHalfLinear, in_features_multiple=48,
                prepass=lambda *args: pytest.fail("the shape check must come before the pre-pass"))


def test_quantize_runs_the_registered_prepass_and_passes_statistics(tiny_pair):
    model = load_model(str(tiny_pair[2]), device="cpu").model
    recipe = Recipe(ToyLearnedConfig())
    assert recipe.needs_calibration
    with pytest.raises(LigeroError, match="needs calibration data"):
        quantize(model, recipe)
    windows = [list(range(1, 17))]
    prepass_calls.clear()
    ToyStatsLinear.built_with.clear()
    quantize(model, recipe, calibration=windows)
    assert prepass_calls == [(ToyLearnedConfig(), windows)]
    assert len(ToyStatsLinear.built_with) == 4 * model.cfg.n_layers  # qkv, o, gate_up, down of every block
    assert all(a is not None and a.ndim == 1 for a in ToyStatsLinear.built_with)
    with pytest.raises(LigeroError, match="needs in_features divisible by 48"):
        quantize(load_model(str(tiny_pair[2]), device="cpu").model, Recipe(ToyWideBlockConfig()), calibration=windows)


def test_scheme_names_come_from_the_registry():
    with pytest.raises(LigeroError, match="the scheme is empty; valid schemes: int8, int4"):
        recipe_for("")
    assert recipe_for("int4-g128").weights == recipe_for("int4", 128).weights == IntGroupConfig(128)
    assert recipe_for("int4-g128").name == recipe_for("int4", 128).name == "int4-g128"
    assert recipe_for("lsq-g64+kv3").weights.group_size == 64
    with pytest.raises(LigeroError, match="already names its group size"):
        recipe_for("int4-g64", 64)
    grouped = r"int4, nf4, adaround, .*lsq-w4a8, int4-sym, q4_0, int4-a8, int4-sym-a8$"
    with pytest.raises(LigeroError, match=r"fixed block size.*applies to: " + grouped):
        recipe_for("int8", 64)
    with pytest.raises(LigeroError, match="fixed block size"):
        recipe_for("toy-fp16-g64")
    assert recipe_for("toy-fp16").weights == ToyHalfConfig()
    assert [recipe_for(s).needs_calibration for s in ("w8a8", "w8a8-naive", "adaround", "lsq", "int4", "int4+kv3")] \
        == [True, False, True, True, False, False]
    with pytest.raises(ValueError, match="already registered"):
        register_named_scheme("int4", ToyHalfConfig)
    for reserved in ("fp32", "kv3", "a+b", "toy-g32", ""):
        with pytest.raises(ValueError, match="cannot name a scheme"):
            register_named_scheme(reserved, ToyHalfConfig)
    assert "fp32" not in NAMED_SCHEMES
