"""Progress bars on long work (private): rich on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(
    total: int, label: str, *, enabled: bool | None = None
) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable; draws a bar on standard error when enabled.

    Args:
        total: Steps in all.
        label: What is counted ("runs", "tasks").
        enabled: Force the bar on or off (default: on when standard error is a terminal).
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total <= 0:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        task_id = progress.add_task(label, total=total)
        yield lambda: progress.advance(task_id)
