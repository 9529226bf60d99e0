"""The GGUF header reader behind `ligero models` (no torch, no tensors) agrees with the full reader; GGUF
conversion shows a progress bar."""

import subprocess
import sys

import numpy as np
import pytest

from ligero.errors import LigeroError
from ligero.io import gguf_file
from ligero.io.checkpoint import resolve_spec
from ligero.io.gguf_file import GGUFFile
from ligero.io.gguf_header import read_gguf_header

TINY_TENSORS = {  # name -> [rows, cols] of a one-layer llama with dim 8, 2 heads, FFN 16, vocab 10
    "token_embd.weight": (10, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
    "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8), "blk.0.attn_v.weight": (8, 8),
    "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,), "blk.0.ffn_gate.weight": (16, 8),
    "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16),
}


def write_tiny_llama(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(5000.0)
    w.add_token_list([f"t{i}" for i in range(10)])
    w.add_name("tiny")
    g = np.random.default_rng(0)
    for name, shape in TINY_TENSORS.items():
        w.add_tensor(name, g.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_matches_the_full_reader(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    header, full = read_gguf_header(path), GGUFFile(path)
    assert header.n_vocab == full.n_vocab == 10
    assert header.tensor_names == set(full.tensors) == set(TINY_TENSORS)
    assert header.meta["general.name"] == "tiny" and header.meta["llama.rope.freq_base"] == 5000.0
    assert header.config() == full.config()
    assert header.config().tie_embeddings  # no output.weight


@pytest.mark.slow
def test_header_matches_the_full_reader_on_the_default_model():
    path = resolve_spec("smollm2-135m")
    header, full = read_gguf_header(path), GGUFFile(path)
    assert header.config() == full.config() and header.n_vocab == full.n_vocab
    assert {k: v for k, v in full.meta.items() if not isinstance(v, list) and not k.startswith("GGUF.")} == header.meta


@pytest.mark.parametrize("keep", [3, 30, 200])
def test_a_truncated_header_is_a_clean_error(tmp_path, keep):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(LigeroError, match="not a GGUF file" if keep < 4 else "truncated or corrupt"):
        read_gguf_header(cut)


def test_ligero_models_reads_headers_without_torch():
    code = ("import sys; from ligero.cli import main; rc = main(['models']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m" in proc.stdout and "gemma3-270m" in proc.stdout


def test_gguf_conversion_shows_progress(tmp_path, record_progress):
    steps = record_progress(gguf_file)
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    full = GGUFFile(path)
    names = [name for name, _ in full.state_dict(full.config())]
    assert steps[0] == ("dequantizing tiny.gguf", len(TINY_TENSORS)) and steps[1:] == [1] * len(TINY_TENSORS)
    assert len(names) == len(TINY_TENSORS)


@pytest.mark.parametrize("bad", ["missing", "text"])
def test_bad_gguf_shape_metadata_is_one_error_line(tmp_path, monkeypatch, capsys, bad):
    import gguf

    from ligero.cli import main

    monkeypatch.setenv("LIGERO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    if bad == "text":
        w.add_string("llama.embedding_length", "eight")
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["generate", "--model", str(path), "--device", "cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("ligero: error:") == 1 and "'llama.embedding_length' must be a whole number" in err, err
