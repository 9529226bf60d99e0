"""The labs' trainer: schedules, resuming after a kill with the same losses, two data-parallel processes against
one with the doubled batch, the trained ternary model as a Ligero model, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ligero.cli import main
from ligero.errors import LigeroError
from ligero.lab.trainer import TrainConfig

STEPS = 60  # a step takes ~8 ms here: the kill after step 8 must land well before the end
TINY = ["--size", "test", "--vocab", "512", "--batch-rows", "4", "--seq-len", "32", "--eval-tokens", "256",
        "--threads", "1"]


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "train.jsonl").read_text().splitlines()]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ligero.cli", "lab", "train", *TINY, "--steps", str(STEPS), "--warmup", "2",
            "--checkpoint-every", "3", "--eval-every", "6", "--out", str(out), *extra]


def test_schedules():
    tc = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert tc.lr_at(5) == pytest.approx(5e-4) and tc.lr_at(10) == pytest.approx(1e-3)
    assert tc.lr_at(100) == pytest.approx(1e-4) and tc.lr_at(55) < tc.lr_at(30)
    two = TrainConfig(steps=100, lr=1e-3, schedule="two_stage", weight_decay=0.1, stage2_lr_ratio=0.4)
    assert two.lr_at(50) == pytest.approx(5e-4) and two.lr_at(51) < 0.45e-3  # the drop at the midpoint
    assert two.weight_decay_at(50) == 0.1 and two.weight_decay_at(51) == 0.0
    with pytest.raises(LigeroError, match="unknown schedule"):
        TrainConfig(steps=10, schedule="linear")


def test_a_killed_run_resumes_with_the_same_losses(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(whole), check=True, capture_output=True)
    proc = subprocess.Popen(_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "train.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 8:  # past the checkpoint of step 6
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_losses(killed)) < STEPS  # it was stopped before the end
    resumed = subprocess.run(_command(killed), check=True, capture_output=True, text=True)
    assert "resuming at step" in resumed.stdout
    assert _losses(killed) == _losses(whole)  # bit for bit: same data per step, weights and optimizer restored
    assert len(_losses(whole)) == STEPS and _losses(whole)[-1] < _losses(whole)[0]


def test_two_processes_give_the_losses_of_one_with_the_doubled_batch(tmp_path):
    from ligero.lab.runs import RunSpec, train_run

    spec = RunSpec("test", vocab_size=512)
    tc = TrainConfig(steps=6, batch_rows=8, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=6, eval_tokens=256,
                     checkpoint_every=6)
    one = train_run(spec, tc, tmp_path / "one", processes=1, log=lambda m: None)
    two = train_run(spec, tc, tmp_path / "two", processes=2, log=lambda m: None)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4)  # each process takes 4 rows; gradients averaged by all-reduce
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-4)


def test_a_trained_ternary_model_is_a_ligero_model(tmp_path, capsys):
    out = tmp_path / "b158"
    assert main(["lab", "train", *TINY, "--ternary", "--steps", "4", "--warmup", "1", "--eval-every", "4",
                 "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["packed_eval_loss"] == pytest.approx(run["final_eval_loss"], rel=1e-4)  # same ternary values
    assert 0.2 < run["zero_weight_share"] < 0.6
    saved = json.loads((out / "model" / "ligero.json").read_text())
    assert saved["quantization"]["weights"]["kind"] == "ternary"
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(out / "model"), "--max-tokens", "256", "--ctx", "32"]) == 0
    assert "ppl" in capsys.readouterr().out.lower()
    assert main(["generate", "--model", str(out / "model"), "The", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()  # a continuation, in the trained tokenizer's text


def test_bad_input_ends_in_one_line_and_keeps_what_was_trained(tmp_path, capsys, monkeypatch):
    assert main(["lab", "train", "--size", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model size 'huge'" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["lab", "train", *TINY, "--steps", "3", "--warmup", "1", "--out", str(out)]) == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a torn file
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(["lab", "train", *TINY, "--steps", "6", "--warmup", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is unreadable" in err and "Traceback" not in err
    assert ckpt.read_bytes() == before and (out / "model" / "ligero.json").exists()  # nothing removed
    monkeypatch.setenv("LIGERO_MAX_MEMORY_MB", "1")
    assert main(["lab", "train", *TINY, "--steps", "3", "--warmup", "1", "--out", str(tmp_path / "big")]) == 2
    assert "GB is available" in capsys.readouterr().err
