"""Card signing: Ed25519 key pairs, `ligero card sign`, and `ligero card validate --key` against edits and
wrong keys."""

import json
import stat

import pytest

from ligero.card import read_card, seal
from ligero.card.signing import generate_keys
from ligero.cli import main
from ligero.errors import LigeroError


def one_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ligero: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def keys(tmp_path):
    assert main(["card", "keygen", "--out", str(tmp_path / "keys" / "signer")]) == 0
    return tmp_path / "keys" / "signer", tmp_path / "keys" / "signer.pub"


@pytest.fixture
def signed(keys, int8_card, tmp_path, capsys):
    path = tmp_path / "int8.json"
    path.write_text(json.dumps(int8_card))
    assert main(["card", "sign", str(path), "--key", str(keys[0])]) == 0
    capsys.readouterr()
    return path


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys, capsys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert main(["card", "keygen", "--out", str(private)]) == 2
    one_error(capsys, "already exists")
    with pytest.raises(LigeroError, match="already exists"):
        generate_keys(public.with_suffix(""))  # its .pub exists


def test_signed_card_validates_with_its_public_key(signed, keys, capsys):
    card = read_card(signed)
    assert card["integrity"]["signature"]["algorithm"] == "ed25519"
    assert "Signed: ed25519" in signed.with_suffix(".md").read_text()
    assert main(["card", "validate", str(signed), "--key", str(keys[1])]) == 0
    assert "signature checked" in capsys.readouterr().out
    assert main(["card", "validate", str(signed)]) == 0  # the digest alone still checks
    assert "no --key given" in capsys.readouterr().out


def test_wrong_key_edits_and_missing_signature_fail_with_one_line(signed, keys, tmp_path, capsys):
    assert main(["card", "keygen", "--out", str(tmp_path / "other")]) == 0
    assert main(["card", "validate", str(signed), "--key", str(tmp_path / "other.pub")]) == 2
    one_error(capsys, "another key")

    card = read_card(signed)
    card["metrics"]["capability"]["delta_ppl_pct"] = 0.0  # a better-looking number
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(card))
    assert main(["card", "validate", str(edited), "--key", str(keys[1])]) == 2
    one_error(capsys, "digest")  # edited without re-sealing: the digest catches it
    resealed = seal(card)
    resealed["integrity"]["signature"] = card["integrity"]["signature"]  # re-sealed, old signature kept
    edited.write_text(json.dumps(resealed))
    assert main(["card", "validate", str(edited), "--key", str(keys[1])]) == 2
    one_error(capsys, "signature does not match")

    unsigned = tmp_path / "unsigned.json"
    unsigned.write_text(json.dumps(seal(card)))  # a re-sealed card has no signature
    assert main(["card", "validate", str(unsigned), "--key", str(keys[1])]) == 2
    one_error(capsys, "not signed", "ligero card sign")


def test_key_mixups_and_invalid_cards(signed, keys, tmp_path, capsys):
    assert main(["card", "validate", str(signed), "--key", str(keys[0])]) == 2
    one_error(capsys, "is a private key", ".pub")
    assert main(["card", "sign", str(signed), "--key", str(keys[1])]) == 2
    one_error(capsys, "is a public key")
    assert main(["card", "sign", str(signed), "--key", str(tmp_path / "missing")]) == 2
    one_error(capsys, "does not exist", "ligero card keygen")
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    assert main(["card", "validate", str(signed), "--key", str(junk)]) == 2
    one_error(capsys, "not a PEM public key")
    card = read_card(signed)
    card["caveats"] = []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(card))
    assert main(["card", "sign", str(bad), "--key", str(keys[0])]) == 2
    one_error(capsys, "not valid", "caveats")
