"""benchmarks/vs_llamacpp.py without llama.cpp: the one-line answer when llama-cpp-python is missing, and the
medians, ratios and Markdown table on hand-made numbers (the benchmark itself is not run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_llamacpp.py"
MESSAGE = ("vs_llamacpp: llama-cpp-python is not installed; run: make bench-llamacpp "
           "(compiles llama.cpp once, ~15 min)")


def vs_llamacpp():
    spec = importlib.util.spec_from_file_location("vs_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_llama_cpp_python_the_script_says_how_to_install_it(tmp_path):
    # A llama_cpp package that fails to import shadows any installed one.
    stub = tmp_path / "stub" / "llama_cpp"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named llama_cpp')\n")
    env = {**os.environ, "PYTHONPATH": str(stub.parent)}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == MESSAGE and proc.stdout == ""
    assert not out.exists()


def test_main_returns_2_when_llama_cpp_cannot_be_imported(monkeypatch, capsys, tmp_path):
    module = vs_llamacpp()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert module.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == MESSAGE


PAIRS = [("Q4_1", "int4-g32", "same format"), ("F16", "fp32", "baselines"), ("Q8_0", "int8", "not measured")]


def run(engine, ltype, scheme, prefill_s, decode_s, idle=0.0, during=0.0, model="m"):
    return {"model": model, "llamacpp_type": ltype, "ligero_scheme": scheme, "engine": engine, "prefill_s": prefill_s,
            "decode_s": decode_s, "idle_before": idle, "foreign_during": during}


def hand_made():
    # 100 prefill tokens, 10 decode tokens; three rounds each, the median run is the middle one.
    return [
        run("ligero", "Q4_1", "int4-g32", 1.0, 0.10), run("ligero", "Q4_1", "int4-g32", 2.0, 0.50),
        run("ligero", "Q4_1", "int4-g32", 0.5, 0.05),
        run("llamacpp", "Q4_1", "int4-g32", 0.25, 0.20), run("llamacpp", "Q4_1", "int4-g32", 0.5, 0.2),
        run("llamacpp", "Q4_1", "int4-g32", 0.5, 0.2),
        run("ligero", "F16", "fp32", 2.0, 0.4, idle=0.2), run("llamacpp", "F16", "fp32", 1.0, 0.25, during=0.01),
    ]


def test_summary_takes_medians_and_ratios_and_flags_rows_under_load():
    module = vs_llamacpp()
    rows = module.summarize(hand_made(), PAIRS, prefill_tokens=100, decode_tokens=10, load_flag=0.05)
    assert [r["llamacpp_type"] for r in rows] == ["Q4_1", "F16"]  # Q8_0 has no measurements: no row
    q, f = rows
    assert q["ligero_prefill_tok_s"] == pytest.approx(100.0) and q["llamacpp_prefill_tok_s"] == pytest.approx(200.0)
    assert q["ligero_decode_tok_s"] == pytest.approx(100.0) and q["llamacpp_decode_tok_s"] == pytest.approx(50.0)
    assert q["prefill_ratio"] == pytest.approx(0.5) and q["decode_ratio"] == pytest.approx(2.0)
    assert q["ligero_runs"] == q["llamacpp_runs"] == 3
    assert not q["under_load"] and q["max_foreign_share"] == 0.0
    assert f["under_load"] and f["max_foreign_share"] == pytest.approx(0.2)
    assert f["decode_ratio"] == pytest.approx(25 / 40) and f["ligero_scheme"] == "fp32"

    own = module.own_ratios(rows, "Q4_1", "F16")["m"]
    assert own["ligero_decode_ratio"] == pytest.approx(100 / 25)  # int4 100 tok/s over fp32 25 tok/s
    assert own["llamacpp_decode_ratio"] == pytest.approx(50 / 40)
    assert module.own_ratios(rows, "Q8_0", "F16") == {}


def test_markdown_table():
    module = vs_llamacpp()
    rows = module.summarize(hand_made(), PAIRS, prefill_tokens=100, decode_tokens=10, load_flag=0.05)
    rows[0]["llamacpp_tensor_types"] = {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    report = {
        "machine": {"commit": "abc1234", "cpu": "Some CPU", "cores": 2, "torch": "2.13.0"},
        "llamacpp": {"version": "0.3.36", "system_info": "CPU : AVX2 = 1"},
        "date": "2026-01-01 00:00 UTC", "threads": 2, "rounds": 3, "prefill_tokens": 100, "decode_tokens": 10,
        "prompt_tokens": 16, "load_flag": 0.05, "ligero_kernels": "AVX-512 kernels", "results": rows,
        "own_ratios": module.own_ratios(rows),
        "random_weight_shapes": {"m": module.SHAPES["tinyllama-1.1b"]},
    }
    text = module.render_markdown(report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert lines[header + 2] == "| m | Q4_1 / int4-g32 | 100.0 | 50.0 | 2.00x | 100 | 200 | 0.50x | 0% |"
    assert lines[header + 3] == "| m | F16 / fp32 | 25.0 | 40.0 | 0.62x | 50 | 100 | 0.50x | 20% **under load** |"
    assert "Ligero 4.00x, llama.cpp 1.25x" in text
    assert "- m, Q4_1 / int4-g32: same format. llama.cpp file tensors: 210 Q4_1, 61 F32, 1 Q8_0" in text
    assert "- m, F16 / fp32: baselines" in text
    assert "0.3.36" in text and "2 threads" in text and "Median of 3" in text and "2026-01-01" in text
    assert "Ratios, not absolute numbers, are what carry across machines" in text
    assert "re-run those on an idle machine" in text
    assert "m: seeded random weights in that model's shapes (22 layers, dim 2048, FFN 5632, 32/4 heads, vocab 32000)" \
        in text


def test_shape_gguf_has_the_shapes_and_a_vocabulary(tmp_path):
    import gguf

    module = vs_llamacpp()
    shape = dict(module.SHAPES["tinyllama-1.1b"], dim=64, n_layers=1, ffn_dim=128, n_heads=4, n_kv_heads=2,
                 vocab_size=300)
    path = module.write_shape_gguf(tmp_path / "tiny.gguf", shape)
    reader = gguf.GGUFReader(str(path))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # GGUF order: (cols, rows)
    assert shapes["token_embd.weight"] == (64, 300) and shapes["output.weight"] == (64, 300)
    assert shapes["blk.0.attn_k.weight"] == (64, 32) and shapes["blk.0.ffn_down.weight"] == (128, 64)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 300
    assert module.tensor_types(path) == {"F16": 9, "F32": 3}  # 7 block matrices, embedding, head; 3 norms
    assert module.write_shape_gguf(path, shape) == path  # written once
