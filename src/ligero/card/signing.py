"""Signed deployment cards: Ed25519 key pairs, signing, and checking a signature against a public key.

A card's digest (ligero.card.seal) catches accidental edits, but anyone can change a number and recompute it. A
signature can only be made with the private key: a card that verifies against a public key you trust was signed
by that key's holder and not changed since. The signature covers the same canonical JSON as the digest and is
kept in integrity.signature, with the signer's public key; a card re-sealed after a change loses it.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ligero.card import canonical_json, card_errors
from ligero.errors import LigeroError

ALGORITHM = "ed25519"
PUBLIC_SUFFIX = ".pub"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def public_key_text(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in base64, as a card records it."""
    return _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def generate_keys(out: str | Path) -> tuple[Path, Path]:
    """Write a new private key to `out` (PEM, readable by its owner only) and its public key to `out`.pub."""
    private_path = Path(out).expanduser()
    public_path = private_path.with_name(private_path.name + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if path.exists():
            raise LigeroError(f"{path} already exists; choose another --out (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        # Created with mode 0600 in one step, so the private key is never readable by others, even briefly.
        with os.fdopen(os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise LigeroError(f"cannot write {private_path} ({exc.strerror}); choose a writable --out") from None
    return private_path, public_path


def _read_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise LigeroError(f"key file {path} does not exist; create a key pair with `ligero card keygen --out KEY`")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LigeroError(f"cannot read key file {path} ({exc.strerror})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path).expanduser()
    data = _read_key_file(path)
    if b"PUBLIC KEY" in data:
        raise LigeroError(f"{path} is a public key; sign with the private key (the file without {PUBLIC_SUFFIX})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise LigeroError(f"{path} is protected by a password; give an unencrypted key from `ligero card keygen`") \
            from None
    except ValueError:
        raise LigeroError(f"{path} is not a PEM private key; create one with `ligero card keygen --out KEY`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LigeroError(f"{path} is not an Ed25519 key; create one with `ligero card keygen --out KEY`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path).expanduser()
    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        raise LigeroError(f"{path} is a private key; check signatures with the public key ({path.name}{PUBLIC_SUFFIX}) "
                          "and keep the private key to yourself")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise LigeroError(f"{path} is not a PEM public key; give the .pub file written by `ligero card keygen`") \
            from None
    if not isinstance(key, Ed25519PublicKey):
        raise LigeroError(f"{path} is not an Ed25519 public key; give the .pub file written by `ligero card keygen`")
    return key


def sign_card(card: dict, key: Ed25519PrivateKey) -> dict:
    """The card with integrity.signature set; only a valid card (schema and digest) is signed."""
    errors = card_errors(card)
    if errors:
        raise LigeroError(f"the card is not valid ({errors[0]}); only a valid, unedited card can be signed")
    signature = {"algorithm": ALGORITHM, "public_key": public_key_text(key.public_key()),
                 "value": _b64(key.sign(canonical_json(card)))}
    return {**card, "integrity": {**card["integrity"], "signature": signature}}


def verify_card(card: dict, key: Ed25519PublicKey, key_name: str) -> None:
    """Raise LigeroError unless the card is signed by `key` and unchanged since (call after card_errors)."""
    signature = card["integrity"].get("signature")
    if signature is None:
        raise LigeroError("the card is not signed; sign it with `ligero card sign CARD --key KEY`")
    if signature["public_key"] != public_key_text(key):
        raise LigeroError(f"the card was signed with another key (public key {signature['public_key'][:12]}…), not "
                          f"{key_name}; get the card from its signer or check it with the signer's public key")
    try:
        key.verify(base64.b64decode(signature["value"]), canonical_json(card))
    except InvalidSignature:
        raise LigeroError("the card's signature does not match its content: it was changed after signing; take the "
                          "signed original") from None
