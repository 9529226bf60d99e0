"""Hugging Face folders a user may point Ligero at by mistake: another architecture, a broken or hostile
config.json. Each ends in one `ligero: error:` line and exit code 2, never a traceback. Loading shows progress."""

import json
import subprocess
import sys

import pytest

from ligero.cli import main
from ligero.io import hf_folder
from ligero.models.config import config_from_hf
from tiny_models import tiny_hf_model

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
         "vocab_size": 160, "intermediate_size": 96}
BAD_CONFIGS = {
    "gpt2": (json.dumps({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12}), "'gpt2' is not supported"),
    "bert": (json.dumps({"model_type": "bert", "hidden_size": 768, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "vocab_size": 30522, "intermediate_size": 3072}),
             "'bert' is not supported"),
    "no-model-type": (json.dumps({k: v for k, v in LLAMA.items() if k != "model_type"}), "without model_type"),
    "gemma3-without-text-config": (json.dumps({"model_type": "gemma3", "vision_config": {}}), "no text_config"),
    "json-list": ("[1, 2, 3]", "holds a JSON list, not an object"),
    "non-utf8": (b'{"model_type": "llama\xff\xfe"}', "not UTF-8"),
    "bad-json": ('{"model_type": "llama",', "not valid JSON"),
    "missing-key": (json.dumps({k: v for k, v in LLAMA.items() if k != "hidden_size"}), "'hidden_size'"),
    "wrong-type": (json.dumps({**LLAMA, "num_attention_heads": "four"}), "'num_attention_heads'"),
    "zero-heads": (json.dumps({**LLAMA, "num_key_value_heads": 0}), "'num_key_value_heads'"),
    "rope-not-an-object": (json.dumps({**LLAMA, "rope_scaling": [2]}), "RoPE settings"),
}


def model_folder(tmp_path, content):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def assert_one_error_line(rc, err, fragment):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ligero: error:")]
    assert len(lines) == 1 and fragment in lines[0], err


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_json_is_one_line(tmp_path, capsys, case):
    content, fragment = BAD_CONFIGS[case]
    rc = main(["generate", "--model", str(model_folder(tmp_path, content)), "--device", "cpu", "hi"])
    assert_one_error_line(rc, capsys.readouterr().err, fragment)


def test_another_architecture_through_the_command_line(tmp_path):
    content, fragment = BAD_CONFIGS["gpt2"]
    proc = subprocess.run([sys.executable, "-m", "ligero", "generate", "--model", str(model_folder(tmp_path, content)),
                           "hi"], capture_output=True, text=True, timeout=300)
    assert_one_error_line(proc.returncode, proc.stderr, fragment)


def test_a_bad_shard_index_is_one_line(tmp_path, capsys):
    folder = model_folder(tmp_path, json.dumps(LLAMA))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    rc = main(["generate", "--model", str(folder), "--device", "cpu", "hi"])
    assert_one_error_line(rc, capsys.readouterr().err, "weight_map")


def test_a_good_llama_config_still_translates():
    cfg = config_from_hf({**LLAMA, "num_key_value_heads": None, "rms_norm_eps": 1e-5})
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, cfg.max_seq_len) == (4, 16, 1e-5, 2048)


def test_hf_loading_shows_progress(tmp_path, record_progress):
    steps = record_progress(hf_folder)
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    n_tensors = len(model.state_dict())
    loaded = list(hf_folder.hf_state_dict(tmp_path / "tiny", hf_folder.hf_config(tmp_path / "tiny")))
    assert steps[0] == ("loading tiny", n_tensors) and steps[1:] == [1] * n_tensors
    assert len(loaded) == n_tensors
