"""Read a GGUF file's header (metadata and tensor names) with the standard library only.

Listing models needs the architecture and shapes, not the tensors: this reads a few hundred kilobytes of a
memory-mapped file and imports neither torch nor numpy, where `gguf.GGUFReader` builds an array per vocabulary
entry. Layout (little-endian): magic, version u32, tensor count u64, metadata count u64, the metadata entries
(key string, value type u32, value), then per tensor: name, n_dims u32, dims u64 x n_dims, type u32, offset u64.
Strings are a u64 length and UTF-8 bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ligero.errors import LigeroError
from ligero.models.config import ModelConfig, config_from_gguf

_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
VOCAB_KEY = "tokenizer.ggml.tokens"


def check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LigeroError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf file, "
                          "a Hugging Face folder or a registry id (see `ligero models`)")


def gguf_config(meta: dict[str, Any], n_vocab: int, tensor_names: set[str]) -> ModelConfig:
    """The ModelConfig of a GGUF file: its metadata, plus a tied head when the file has no output tensor."""
    cfg = config_from_gguf(meta, n_vocab)
    cfg.tie_embeddings = "output.weight" not in tensor_names
    return cfg


class _Cursor:
    """Sequential little-endian reads from a buffer."""

    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        # A separate call: in `self.at += self.scalar(...)` Python reads self.at before scalar() advances it.
        self.at += n

    def count(self) -> int:
        """A u64 count of things that each take at least a byte: larger than the file means corrupt."""
        n = self.scalar("Q")
        if n > len(self.buf):
            raise ValueError(f"a count of {n} is larger than the file")
        return n

    def string(self) -> str:
        n = self.scalar("Q")
        if self.at + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        raw = self.buf[self.at:self.at + n]
        self.at += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool = True):
        """One metadata value; arrays come back as their length only (`keep` False: strings skipped unread)."""
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string()
            self.skip(self.scalar("Q"))
            return None
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.count()
            if item in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item]))
            else:
                for _ in range(count):
                    self.value(item, keep=False)
            return count
        raise ValueError(f"unknown metadata value type {kind}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF stores them
    type_id: int  # ggml type number
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    meta: dict[str, Any]  # scalar and string metadata (arrays, such as the vocabulary, are left out)
    n_vocab: int  # entries of the embedded vocabulary (0 when there is none)
    tensor_names: set[str]
    tensors: list[TensorInfo]
    data_start: int  # file offset of the tensor data (after the header, aligned)

    def config(self) -> ModelConfig:
        return gguf_config(self.meta, self.n_vocab, self.tensor_names)


def read_gguf_header(path: Path) -> GGUFHeader:
    path = Path(path)
    check_magic(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse(_Cursor(buf))
        except (struct.error, ValueError, OverflowError) as exc:
            raise LigeroError(f"{path} is truncated or corrupt ({exc}); re-download or re-create the file") from None


def _parse(cur: _Cursor) -> GGUFHeader:
    cur.at = 4  # after the magic
    version, n_tensors, n_meta = cur.scalar("I"), cur.count(), cur.count()
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old (Ligero reads version 2 and later)")
    meta, n_vocab = {}, 0
    for _ in range(n_meta):
        key, kind = cur.string(), cur.scalar("I")
        value = cur.value(kind)
        if kind != _ARRAY:
            meta[key] = value
        elif key == VOCAB_KEY:
            n_vocab = value
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(cur.scalar("Q") for _ in range(n_dims))
        tensors.append(TensorInfo(name, dims, cur.scalar("I"), cur.scalar("Q")))
    alignment = int(meta.get("general.alignment", 32)) or 32
    data_start = -(-cur.at // alignment) * alignment
    return GGUFHeader(meta, n_vocab, {t.name for t in tensors}, tensors, data_start)
