"""Progress bars for long steps (conversion, learned rounding, evaluation): one helper, drawn by rich on stderr.

`with progress_bar("AdaRound", total=n) as advance: ... advance()` shows a bar with the elapsed time and an
ETA while the step runs, redrawn in place on a terminal. Off a terminal (CI logs, pipes) there is no bar, so logs
stay free of redraws and blank lines. LIGERO_PROGRESS=0 turns the bars off everywhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _enabled() -> bool:
    return os.environ.get("LIGERO_PROGRESS", "1") != "0"


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A bar for `total` units of work; yields `advance(n=1)`. Nested bars draw one under the other."""
    console = Console(file=sys.stderr)
    if not _enabled() or not console.is_terminal:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
