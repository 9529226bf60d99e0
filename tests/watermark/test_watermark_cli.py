"""`ligero watermark keygen | detect` and `ligero generate --watermark`, run as a user runs them (in process)."""

from __future__ import annotations

import json

import pytest

from ligero.cli import main


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wm") / "smollm2.key"
    assert main(["watermark", "keygen", "--out", str(path), "--delta", "4"]) == 0
    return path


def generated(capsys, *extra: str) -> str:
    code = main(["generate", "The history of the old harbour town begins", "--temperature", "1", "--seed", "3",
                 "--max-new-tokens", "64", *extra])
    assert code == 0
    return capsys.readouterr().out


def test_generated_text_is_detected_only_when_marked(key_file, capsys, tmp_path):
    marked = generated(capsys, "--watermark", str(key_file))
    plain = generated(capsys)
    (tmp_path / "marked.txt").write_text(marked)
    (tmp_path / "plain.txt").write_text(plain)
    assert main(["watermark", "detect", "--key", str(key_file), str(tmp_path / "marked.txt"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["watermarked"] and d["z"] > 4 and d["p_value"] < 1e-4 and d["scored"] >= 30
    assert main(["watermark", "detect", "--key", str(key_file), str(tmp_path / "plain.txt")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("not watermarked: z = ") and "scored tokens green" in out
    key = json.loads(key_file.read_text())
    assert key["secret"] not in marked + out and d["key_id"] == key["key_id"]


def test_detect_reads_standard_input(key_file, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("A plain sentence written by a person, long enough to be scored by "
                                                 "the detector without complaint, about rivers and bridges."))
    assert main(["watermark", "detect", "--key", str(key_file), "-"]) == 1
    assert "not watermarked" in capsys.readouterr().out


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ligero: error: "), err
    for f in fragments:
        assert f in err, err


def test_bad_input_is_one_clear_line(key_file, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some words that a person wrote down for a test of the detector, long enough to score. " * 3)
    one_line_error(capsys, ["watermark", "detect", "--key", str(tmp_path / "missing.key"), str(text)],
                   "missing.key does not exist", "ligero watermark keygen")
    bad = tmp_path / "bad.key"
    bad.write_text("{this is not json")
    one_line_error(capsys, ["watermark", "detect", "--key", str(bad), str(text)], "not a watermark key")
    one_line_error(capsys, ["generate", "hello", "--watermark", str(bad)], "not a watermark key")
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    one_line_error(capsys, ["watermark", "detect", "--key", str(key_file), str(short)], "needs at least 16")
    other = tmp_path / "other-model.key"
    d = json.loads(key_file.read_text())
    d["tokenizer"] = {"sha256": "f" * 64, "vocab_size": 262144, "model": "gemma3-270m"}
    other.write_text(json.dumps(d))
    one_line_error(capsys, ["watermark", "detect", "--key", str(other), str(text), "--model", "smollm2-135m"],
                   "was made for the tokenizer of gemma3-270m", "smollm2-135m has another one")
    one_line_error(capsys, ["watermark", "keygen", "--out", str(key_file)], "already exists")
    one_line_error(capsys, ["watermark", "keygen", "--out", str(tmp_path / "n.key"), "--preset", "rainbow"],
                   "unknown watermark preset 'rainbow'")
    one_line_error(capsys, ["watermark", "detect", "--key", str(key_file), str(tmp_path / "nothing.txt")],
                   "nothing.txt does not exist")
