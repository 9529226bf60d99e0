"""Small checks of user-supplied settings, shared by the guardrails and access-control modules."""

from __future__ import annotations

import math
from typing import Any


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (parsers' messages span several; errors must fit `ligero: error: ...`)."""
    return " ".join(str(exc).split())


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
