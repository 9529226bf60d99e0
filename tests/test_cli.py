"""The command line as a user meets it: real subprocesses, exit codes, one-line errors without tracebacks."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ligero.io.checkpoint import resolve_spec


def ligero(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "ligero", *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_error(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ligero: error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]


def write_gguf(path, arch, tensors):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    for name, data, raw_type in tensors:
        w.add_tensor(name, data, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_path():
    assert_clean_error(*ligero("eval", "ppl", "--model", "/no/such/model.gguf")[::2], "not found", "ligero models")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("just text")
    assert_clean_error(*ligero("eval", "ppl", "--model", str(bad))[::2], "not a GGUF file")


def test_truncated_gguf(tmp_path):
    src = resolve_spec("smollm2-135m")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: 3_000_000])
    assert_clean_error(*ligero("generate", "--model", str(cut), "hi")[::2], "truncated or corrupt")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2", [("token_embd.weight", np.zeros((8, 32), np.float32), None)])
    assert_clean_error(*ligero("eval", "ppl", "--model", str(path))[::2], "architecture 'gpt2' is not supported")


def test_unsupported_tensor_type(tmp_path):
    import gguf

    path = tmp_path / "iq.gguf"
    # IQ2_XXS: 256 weights in 66 bytes. Shape given in bytes, as the writer expects for raw quantized data.
    write_gguf(path, "llama", [("token_embd.weight", np.zeros((8, 66), np.uint8), gguf.GGMLQuantizationType.IQ2_XXS)])
    assert_clean_error(*ligero("eval", "ppl", "--model", str(path))[::2], "IQ2_XXS", "supported types")


def test_prompt_longer_than_context(tmp_path, smollm2):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    smollm2.tokenizer.fast.save(str(tmp_path / "tokenizer.json"))
    rc, _, err = ligero("generate", "--model", str(tmp_path), "word " * 40)
    assert_clean_error(rc, err, "context", "shorten the prompt")


def test_bad_numbers_are_usage_errors():
    rc, _, err = ligero("eval", "ppl", "--ctx", "zero")
    assert rc == 2 and "whole number" in err and "Traceback" not in err


@pytest.mark.slow
def test_models_generate_and_eval_on_the_default_model():
    rc, out, err = ligero("models", "--json")
    assert rc == 0, err
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows["smollm2-135m"]["parameters"] == pytest.approx(134.5e6, rel=0.01)
    rc, out, err = ligero("generate", "--chat", "What is the capital of France?", "--max-new-tokens", "12")
    assert rc == 0, err
    assert "Paris" in out
    rc, out, err = ligero("eval", "ppl", "--max-tokens", "1024", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["windows"] == 2 and 10 < res["ppl"] < 40 and len(res["text"]["sha256"]) == 64


def test_threads_set_the_speed_measurement_threads(tmp_path):
    from tiny_models import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    rc, out, err = ligero("eval", "speed", "--model", str(tmp_path), "--ctx", "16", "--decode-tokens", "4",
                          "--repeats", "1", "--threads", "1", "--json")
    assert rc == 0, err
    assert json.loads(out)["threads"] == 1
    rc, _, err = ligero("eval", "speed", "--threads", "0")
    assert rc == 2 and "must be at least 1" in err


def test_a_model_that_will_not_fit_stops_before_loading(tmp_path):
    """The memory check reads the header: a load that needs more than the cap (here 1 kB) ends in one line."""
    import os

    path = tmp_path / "big.gguf"
    write_gguf(path, "llama", [("token_embd.weight", np.zeros((8, 32), np.float32), None)])
    rc, _, err = ligero("eval", "ppl", "--model", str(path))
    assert "needs about" not in err  # a tiny file fits
    env = dict(os.environ, LIGERO_MAX_MEMORY_MB="0.001")
    proc = subprocess.run([sys.executable, "-m", "ligero", "eval", "ppl", "--model", str(path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert_clean_error(proc.returncode, proc.stderr, "big.gguf", "needs about", "available")


def test_a_bad_stream_interval_is_one_line_before_any_model_loads():
    rc, _, err = ligero("serve", "--stream-interval", "-5", "--port", "1")
    assert_clean_error(rc, err, "--stream-interval", "between 0 and 1000 ms", "-5")
