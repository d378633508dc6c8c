"""Progress of long steps: rich bars (bytes, rate, ETA) on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mirrord.jobs.base import NoProgress


class RichProgress:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, int] = {}

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        task_id = self._progress.add_task(description, total=total)
        self._tasks[description] = task_id
        return lambda n: self._progress.advance(task_id, n)

    def done(self, description: str) -> None:
        task_id = self._tasks.pop(description, None)
        if task_id is not None:
            self._progress.remove_task(task_id)


@contextmanager
def terminal_progress() -> Iterator[RichProgress | NoProgress]:
    if not sys.stderr.isatty():
        yield NoProgress()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        yield RichProgress(progress)
