"""Where Ligero keeps what it builds or converts once per machine (kernels, converted models, assembled files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LIGERO_CACHE, or ~/.cache/ligero."""
    return Path(os.environ.get("LIGERO_CACHE", Path.home() / ".cache" / "ligero")).expanduser()
