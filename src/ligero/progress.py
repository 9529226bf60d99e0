"""Progress bars for long steps (conversion, learned rounding, evaluation): one helper, drawn by rich on stderr.

`with progress_bar("AdaRound", total=n) as advance: ... advance()` shows a bar with the elapsed time and an
ETA while the step runs. On a terminal it redraws in place; elsewhere (CI logs, pipes) rich prints nothing until
the bar finishes, so logs stay short. LIGERO_PROGRESS=0 turns the bars off.
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
    if not _enabled():
        yield lambda n=1: None
        return
    console = Console(file=sys.stderr)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
