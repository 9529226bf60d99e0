"""Saved folders against hostile or careless input: broken manifests, a user's files next to the model,
permissions, and scheme names the CLI must refuse."""

import json
import os
import stat

import pytest

from ligero.cli import main
from ligero.errors import LigeroError
from ligero.io.checkpoint import load_model, save_checkpoint
from ligero.io.tokenizer import TOKENIZER_FILE, TOKENIZER_META
from ligero.quant.api import quantize
from ligero.quant.config import Int8WeightConfig


@pytest.fixture
def saved(tiny_pair, tmp_path):
    """A quantized tiny model saved to tmp_path/int8."""
    loaded = load_model(str(tiny_pair[2]), device="cpu")
    quantize(loaded.model, Int8WeightConfig())
    folder = tmp_path / "int8"
    save_checkpoint(loaded.model, None, folder, {"base": str(tiny_pair[2])})
    return folder


@pytest.mark.parametrize("manifest", ["{not json", "[]", '{"files": 3}', "\xff\xfe"])
def test_a_broken_manifest_is_a_one_line_error(saved, manifest):
    (saved / "manifest.json").write_text(manifest, encoding="latin-1")
    with pytest.raises(LigeroError, match="manifest.json .*re-create the folder with `ligero quantize`"):
        load_model(str(saved), device="cpu")


def test_only_the_files_ligero_writes_are_hashed(tiny_pair, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    notes = folder / "notes.txt"
    notes.write_text("my notes")
    (folder / TOKENIZER_FILE).write_text("{}")  # left over from an earlier save that had a tokenizer
    (folder / TOKENIZER_META).write_text("{}")
    loaded = load_model(str(tiny_pair[2]), device="cpu")
    quantize(loaded.model, Int8WeightConfig())
    save_checkpoint(loaded.model, None, folder, {"base": "tiny"})
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["ligero.json", "model.safetensors"]
    notes.write_text("my notes, edited after saving")
    again = load_model(str(folder), device="cpu")
    assert again.tokenizer is None  # files the manifest does not vouch for are not this model's


def test_saved_files_share_the_umask_permissions(tiny_pair, tmp_path):
    old = os.umask(0o022)
    try:
        loaded = load_model(str(tiny_pair[2]), device="cpu")
        save_checkpoint(loaded.model, None, tmp_path / "fp32", {"base": "tiny"})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "fp32").iterdir()}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("command", [["eval", "ppl"], ["generate", "hello"], ["quantize", "--out", "unused"],
                                     ["eval", "quality"]])
def test_an_empty_scheme_is_an_error_not_the_baseline(command, capsys):
    # The model does not exist: the scheme is rejected before any model loads.
    assert main([*command, "--scheme", "", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ligero: error: the scheme is empty; valid schemes: int8, int4") and err.count("\n") == 1


def test_a_saved_quantized_folder_refuses_a_second_scheme(saved, capsys):
    assert main(["eval", "ppl", "--model", str(saved), "--scheme", "int4"]) == 2
    assert "is already quantized; drop --scheme" in capsys.readouterr().err
