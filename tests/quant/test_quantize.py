"""The quantize() verb, recipes, saved checkpoints, and the CLI's bad-input handling."""

import json
import subprocess
import sys

import pytest
import torch

from ligero.errors import LigeroError
from ligero.io.checkpoint import load_model, save_checkpoint
from ligero.quant.api import quantize
from ligero.quant.config import Int8WeightConfig, IntGroupConfig, QuantConfig, Recipe, recipe_for
from ligero.quant.modules import Int8Linear, IntGroupLinear, QuantizedEmbedding


def tiny(tiny_pair):
    _, _, folder = tiny_pair
    return load_model(str(folder), device="cpu")


def test_quantize_replaces_layers_and_keeps_head_int8(tiny_pair):
    loaded = tiny(tiny_pair)
    model = quantize(loaded.model, IntGroupConfig(32))
    assert isinstance(model.layers[0].attn.qkv_proj, IntGroupLinear)
    assert isinstance(model.layers[0].mlp.down_proj, IntGroupLinear)
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.embed, QuantizedEmbedding)
    if model.cfg.tie_embeddings:
        assert model.embed.table is model.lm_head  # one table serves both
    with pytest.raises(LigeroError, match="already quantized"):
        quantize(model, Int8WeightConfig())


def test_overrides_and_filters(tiny_pair):
    recipe = Recipe(IntGroupConfig(32), overrides=[("layers.0.*", Int8WeightConfig()), ("*.o_proj", None)])
    model = quantize(tiny(tiny_pair).model, recipe)
    assert isinstance(model.layers[0].attn.qkv_proj, Int8Linear)
    assert isinstance(model.layers[1].attn.qkv_proj, IntGroupLinear)
    assert type(model.layers[1].attn.o_proj).__name__ == "Linear"
    only_mlp = quantize(tiny(tiny_pair).model, Int8WeightConfig(), filter=lambda name, _: ".mlp." in name)
    assert isinstance(only_mlp.layers[0].mlp.gate_up_proj, Int8Linear)
    assert type(only_mlp.layers[0].attn.qkv_proj).__name__ == "Linear"


def test_configs_serialize_and_validate():
    recipe = recipe_for("int4", 64)
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again.weights == IntGroupConfig(64) and again.head == Int8WeightConfig()
    assert QuantConfig.from_dict(IntGroupConfig(128).to_dict()) == IntGroupConfig(128)
    with pytest.raises(LigeroError, match="invalid group size 33"):
        IntGroupConfig(33)
    with pytest.raises(LigeroError, match="valid schemes: int8, int4, fp8"):
        recipe_for("int3-magic")
    with pytest.raises(LigeroError, match="newer"):
        QuantConfig.from_dict({"kind": "int4_weight", "version": 99, "group_size": 32})


def test_save_load_gives_identical_logits_and_detects_tampering(tiny_pair, tmp_path):
    loaded = tiny(tiny_pair)
    quantize(loaded.model, IntGroupConfig(32))
    save_checkpoint(loaded.model, None, tmp_path, {"base": "tiny"})
    again = load_model(str(tmp_path), device="cpu").model
    tokens = torch.arange(20)[None] % loaded.model.cfg.vocab_size
    with torch.inference_mode():
        torch.testing.assert_close(again(tokens), loaded.model(tokens), atol=0, rtol=0)
        torch.testing.assert_close(again(tokens[:, :1]), loaded.model(tokens[:, :1]), atol=0, rtol=0)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LigeroError, match="does not match the sha256"):
        load_model(str(tmp_path), device="cpu")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ligero", *args], capture_output=True, text=True, timeout=600)


def test_cli_rejects_bad_schemes_and_group_sizes(tmp_path):
    proc = cli("quantize", "--scheme", "int5", "--out", str(tmp_path / "q"))
    assert proc.returncode == 2 and "valid schemes: int8, int4, fp8" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("eval", "quality", "--scheme", "int4", "--group-size", "48")
    assert proc.returncode == 2 and "invalid group size 48" in proc.stderr


@pytest.mark.slow
def test_quantize_cli_round_trip_on_smollm2(tmp_path):
    out = tmp_path / "smollm2-int8"
    proc = cli("quantize", "--model", "smollm2-135m", "--scheme", "int8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {"ligero.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    proc = cli("eval", "quality", "--model", str(out), "--max-tokens", "1024", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["base"] == "smollm2-135m" and res["windows"] == 2
    assert abs(res["delta_ppl_pct"]) < 1.0 and res["kld"] < 0.01 and res["top1_agreement"] > 0.95
    assert 8.0 < res["bits_per_weight"] < 8.6  # int8 values + per-row scales + fp32 norms
